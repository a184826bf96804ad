-- Whether the lock on a login_throttle row is still settling: 1 from the reservation
-- that counted the attempt (and so may have started the lock) until that attempt's
-- password check failed and said so. A lock that is settling may yet be cleared by a
-- right password in flight, so a login that finds one waits for it to settle instead
-- of hearing 429 for a lock that may never hold (simultaneous right-password logins
-- were refused as locked with no failure at all; black-box probe, 2026-12-07).
ALTER TABLE login_throttle ADD COLUMN settling BIGINT NOT NULL DEFAULT 0;
