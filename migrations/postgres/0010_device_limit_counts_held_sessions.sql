-- The device limit counts only the sessions a user still holds: a session whose current
-- refresh token has expired (unused for GATEHOUSE_REFRESH_TOKEN_TTL seconds) cannot be
-- renewed, and until now it kept its place until its absolute expiry, so that a login
-- ended a session still in use while an idle, expired one stayed (black-box audit,
-- 2026-12-07). The function is restated whole with that condition (refresh_tokens'
-- index on session_id serves it); nothing else changes.
CREATE OR REPLACE FUNCTION gatehouse_open_session(
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
        -- meanwhile by another request (logout, revoke) keeps its end. A session whose
        -- refresh token expired (idle too long) is over and holds no place.
        WITH ended AS (
            UPDATE sessions SET ended_at = p_now, end_reason = 'evicted'
             WHERE sessions.user_id = p_user_id AND sessions.ended_at IS NULL AND sessions.id IN (
                 SELECT s.id FROM sessions s
                  WHERE s.user_id = p_user_id AND s.ended_at IS NULL AND s.expires_at > p_now
                    AND EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.session_id = s.id
                                AND t.rotated_at IS NULL AND t.expires_at > p_now)
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
