-- Times are Unix seconds (INTEGER); ids are UUID text; secrets are stored only as hashes.
CREATE TABLE users (
    id                 TEXT PRIMARY KEY,
    email              TEXT NOT NULL UNIQUE,
    name               TEXT,
    password_hash      TEXT,
    role               TEXT NOT NULL DEFAULT 'user',
    status             TEXT NOT NULL DEFAULT 'active',
    email_verified_at  INTEGER,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    last_login_at      INTEGER,
    last_login_geo     TEXT,
    metadata           TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX users_status ON users (status, id);

-- Mailed one-time secrets: verification links and codes, password resets.
CREATE TABLE one_time_tokens (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX one_time_tokens_user ON one_time_tokens (user_id, kind);

-- Consecutive login failures per normalised email, known or not.
CREATE TABLE login_throttle (
    email         TEXT PRIMARY KEY,
    failures      INTEGER NOT NULL DEFAULT 0,
    locked_until  INTEGER NOT NULL DEFAULT 0,
    hard_locked   INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL
);

-- Fixed-window counters (per-IP rate limits).
CREATE TABLE rate_limits (
    key           TEXT PRIMARY KEY,
    window_start  INTEGER NOT NULL,
    hits          INTEGER NOT NULL
);

CREATE TABLE sessions (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    ip            TEXT,
    user_agent    TEXT,
    ended_at      INTEGER,
    end_reason    TEXT
);
CREATE INDEX sessions_user ON sessions (user_id, ended_at);

-- Every refresh token a session has had; rotated ones keep their sealed successor
-- for the grace window and their hash for reuse detection.
CREATE TABLE refresh_tokens (
    token_hash        TEXT PRIMARY KEY,
    session_id        TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    rotated_at        INTEGER,
    successor_sealed  TEXT
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL,
    key_hash      TEXT NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    last_used_at  INTEGER,
    revoked_at    INTEGER
);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    user_id     TEXT,
    email       TEXT,
    kind        TEXT NOT NULL,
    at          INTEGER NOT NULL,
    ip          TEXT,
    user_agent  TEXT,
    detail      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_user ON events (user_id, id);

-- active_slot is 1 for the key that signs; UNIQUE makes racing instances agree.
CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY,
    alg          TEXT NOT NULL,
    private_key  TEXT NOT NULL,
    public_key   TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    active_slot  INTEGER UNIQUE
);
