-- Every change to a user or a session tells the instances which user it concerns, on
-- the channel `gatehouse_cache`, at commit (PostgreSQL delivers NOTIFY only when the
-- transaction commits, in commit order). Each instance keeps a memory of sessions and
-- their users for Bearer checks and forgets a user's entries when told (everything, on
-- 'all', after a TRUNCATE). Triggers, not application code, send these, so that no write
-- path (nor an operator's SQL) is missed. SQL run with triggers disabled
-- (session_replication_role = replica, ALTER TABLE ... DISABLE TRIGGER, a restore with
-- --disable-triggers) is not seen: restart the instances after it.
-- The argument names the column that holds the user's id (users.id, sessions.user_id).
CREATE FUNCTION gatehouse_notify_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gatehouse_cache', to_jsonb(OLD) ->> TG_ARGV[0]);
    RETURN NULL;
END
$$;

CREATE TRIGGER users_changed AFTER UPDATE ON users
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION gatehouse_notify_user('id');
CREATE TRIGGER users_deleted AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION gatehouse_notify_user('id');
CREATE TRIGGER sessions_changed AFTER UPDATE ON sessions
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION gatehouse_notify_user('user_id');
CREATE TRIGGER sessions_deleted AFTER DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION gatehouse_notify_user('user_id');

CREATE FUNCTION gatehouse_notify_all() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gatehouse_cache', 'all');
    RETURN NULL;
END
$$;

CREATE TRIGGER users_truncated AFTER TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION gatehouse_notify_all();
CREATE TRIGGER sessions_truncated AFTER TRUNCATE ON sessions
    FOR EACH STATEMENT EXECUTE FUNCTION gatehouse_notify_all();
