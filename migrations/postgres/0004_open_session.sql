-- A login's writes after its password check, in one call: one round trip and one commit
-- instead of a transaction of several statements (see SqlStore::open_session, which runs
-- the same steps as statements on SQLite).
--
-- The user row is written first: that locks it, so logins of the same user run one after
-- the other. Each later statement takes a newer snapshot (READ COMMITTED), so the device
-- limit counts every session that an earlier login of the user committed.
--
-- The audit events' ids are made here, after the lock, so that they sort in the order
-- the logins took effect (events are listed by id): UUIDv7 text from the clock (the
-- milliseconds, then the fraction of a millisecond in 12 bits), then `seq` (the login 0,
-- its evictions 1, 2, ...) so that a login sorts before its evictions, then random bits.
CREATE FUNCTION gatehouse_event_id(seq INT) RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    ms NUMERIC := extract(epoch FROM clock_timestamp()) * 1000;
    whole BIGINT := floor(ms);
    t TEXT := lpad(to_hex(whole), 12, '0');
BEGIN
    RETURN substr(t, 1, 8) || '-' || substr(t, 9, 4)
        || '-7' || lpad(to_hex(floor((ms - whole) * 4096)::INT), 3, '0')
        || '-' || to_hex(32768 + seq % 16384)
        || '-' || substr(md5(random()::TEXT), 1, 12);
END
$$;

CREATE FUNCTION gatehouse_open_session(
    p_id TEXT, p_user_id TEXT, p_now BIGINT, p_expires_at BIGINT, p_ip TEXT, p_user_agent TEXT,
    p_refresh_hash TEXT, p_refresh_expires_at BIGINT, p_geo TEXT, p_verified_hash TEXT,
    p_device_limit BIGINT, p_login_detail TEXT)
RETURNS TABLE (evicted TEXT, id TEXT, email TEXT, name TEXT, password_hash TEXT, role TEXT,
    status TEXT, email_verified_at BIGINT, created_at BIGINT, updated_at BIGINT,
    last_login_at BIGINT, last_login_geo TEXT, metadata TEXT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    u users%ROWTYPE;
    gone TEXT[];
BEGIN
    UPDATE users SET last_login_at = p_now, last_login_geo = p_geo
     WHERE users.id = p_user_id AND users.status = 'active'
       AND (p_verified_hash = '' OR users.password_hash = p_verified_hash)
    RETURNING * INTO u;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO sessions (id, user_id, created_at, last_used_at, expires_at, ip, user_agent)
    VALUES (p_id, p_user_id, p_now, p_now, p_expires_at, p_ip, p_user_agent);
    INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at)
    VALUES (p_refresh_hash, p_id, p_now, p_refresh_expires_at);
    UPDATE login_throttle SET failures = 0, locked_until = 0, hard_locked = 0, updated_at = p_now
     WHERE login_throttle.email = u.email;
    INSERT INTO events (id, user_id, email, kind, at, ip, user_agent, detail)
    VALUES (gatehouse_event_id(0), p_user_id, u.email, 'login', p_now, p_ip, p_user_agent, p_login_detail);
    IF p_device_limit > 0 THEN
        -- The new session counts: it is in this statement's snapshot. A session ended
        -- meanwhile by another request (logout, revoke) keeps its end.
        WITH ended AS (
            UPDATE sessions SET ended_at = p_now, end_reason = 'evicted'
             WHERE sessions.ended_at IS NULL AND sessions.id IN (
                 SELECT s.id FROM sessions s
                  WHERE s.user_id = p_user_id AND s.ended_at IS NULL AND s.expires_at > p_now
                  ORDER BY s.created_at DESC, s.id DESC OFFSET p_device_limit)
            RETURNING sessions.id)
        SELECT array_agg(ended.id ORDER BY ended.id DESC) INTO gone FROM ended;
        INSERT INTO events (id, user_id, email, kind, at, ip, user_agent, detail)
        SELECT gatehouse_event_id(g.n::INT), p_user_id, u.email, 'session_ended', p_now, p_ip, p_user_agent,
               json_build_object('reason', 'evicted', 'session_id', g.sid)::text
          FROM unnest(gone) WITH ORDINALITY AS g(sid, n);
    END IF;
    RETURN QUERY SELECT array_to_string(gone, ','), u.id, u.email, u.name, u.password_hash,
        u.role, u.status, u.email_verified_at, u.created_at, u.updated_at, u.last_login_at,
        u.last_login_geo, u.metadata;
END
$$;
