-- Mail to send, written in the same transaction as what it announces (or, for the
-- requests that must answer alike for every email, on the request path for every
-- email), and worked off by any instance: nothing acknowledged is lost to a crash.
CREATE TABLE mail_jobs (
    id             TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,
    email          TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    run_at         INTEGER NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    claimed_until  INTEGER
);
CREATE INDEX mail_jobs_due ON mail_jobs (run_at);
