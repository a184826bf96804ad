-- A login changes only the user's last login (its time and place). Until now every
-- change to a user made each instance forget that user's sessions (0003), so a user who
-- logs in often had every Bearer check of their other sessions read PostgreSQL: in the
-- bench's overload phase, where the flooded email's user is also the one probing
-- `GET /v1/me`, that probe's p99 reached 17.0 ms on one instance and 37.4 ms on two
-- (2026-12-07), against 1.1 and 1.8 ms for another user's session. Such a change now
-- sends `login:<id>:<last_login_at>:<last_login_geo>` (the place as stored, JSON or
-- nothing) and the instances update the user they remember instead; any other change
-- still sends the id. A note too long for a notification falls back to the id.
CREATE FUNCTION gatehouse_notify_user_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    note TEXT;
BEGIN
    IF NEW.last_login_at IS NOT NULL
       AND to_jsonb(OLD) - 'last_login_at' - 'last_login_geo' = to_jsonb(NEW) - 'last_login_at' - 'last_login_geo' THEN
        note := 'login:' || NEW.id || ':' || NEW.last_login_at || ':' || coalesce(NEW.last_login_geo, '');
        IF octet_length(note) <= 7000 THEN
            PERFORM pg_notify('gatehouse_cache', note);
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_notify('gatehouse_cache', OLD.id);
    RETURN NULL;
END
$$;

DROP TRIGGER users_changed ON users;
CREATE TRIGGER users_changed AFTER UPDATE ON users
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION gatehouse_notify_user_changed();
