-- A login changes only the user's last login. Until now every change to a user made
-- each instance forget that user's sessions (0003), so a user who logs in often had
-- every Bearer check of their other sessions read PostgreSQL: in the bench's overload
-- phase, where the flooded email's user is also the one probing `GET /v1/me`, that
-- probe's p99 reached 17.0 ms on one instance and 37.4 ms on two (2026-12-07), against
-- 1.1 and 1.8 ms for another user's session. Such a change now sends
-- `login:<id>:<last_login_at>` and the instances update the user they remember
-- instead; any other change still sends the id. Only when the login has no place
-- (`last_login_geo` is NULL, as without a GeoIP database): LISTEN takes no privilege,
-- so whatever can connect to this database could read a notification's payload, and
-- a place is personal data. A login with a place sends the id, as before.
CREATE FUNCTION gatehouse_notify_user_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_login_at IS NOT NULL AND NEW.last_login_geo IS NULL
       AND to_jsonb(OLD) - 'last_login_at' - 'last_login_geo' = to_jsonb(NEW) - 'last_login_at' - 'last_login_geo' THEN
        PERFORM pg_notify('gatehouse_cache', 'login:' || NEW.id || ':' || NEW.last_login_at);
    ELSE
        PERFORM pg_notify('gatehouse_cache', OLD.id);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER users_changed ON users;
CREATE TRIGGER users_changed AFTER UPDATE ON users
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION gatehouse_notify_user_changed();
