-- A session's current refresh token (the one not rotated yet), found without walking
-- the session's rotated ones: a session refreshed every few minutes keeps thousands of
-- rotated rows until they expire. The device limit and the session list ask for it
-- (0010), as does a rotation's answer to a retried token.
CREATE INDEX refresh_tokens_current ON refresh_tokens (session_id) WHERE rotated_at IS NULL;
