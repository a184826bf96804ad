-- A session's use changes only its `last_used_at` (a Bearer request or a refresh, at
-- most once a minute per session in use). Until now every change to a session made
-- each instance forget that user's sessions (0003), so every session in use had its
-- user's sessions read again from PostgreSQL on every instance once a minute. Such a
-- change now sends `used:<user_id>:<session_id>:<last_used_at>` and the instances
-- update the session they remember instead, as 0008 does for a login; any other
-- change still sends the user's id. An instance older than this ignores the note and
-- keeps the older time, which it uses only to decide when to record the next use.
-- (LISTEN takes no privilege: the payload holds ids and a time, no secret; a session
-- id is in every access token of that session.)
CREATE FUNCTION gatehouse_notify_session_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_used_at IS DISTINCT FROM OLD.last_used_at AND NEW.last_used_at IS NOT NULL
       AND to_jsonb(OLD) - 'last_used_at' = to_jsonb(NEW) - 'last_used_at' THEN
        PERFORM pg_notify('gatehouse_cache', 'used:' || NEW.user_id || ':' || NEW.id || ':' || NEW.last_used_at);
    ELSE
        PERFORM pg_notify('gatehouse_cache', OLD.user_id);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER sessions_changed ON sessions;
CREATE TRIGGER sessions_changed AFTER UPDATE ON sessions
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION gatehouse_notify_session_changed();
