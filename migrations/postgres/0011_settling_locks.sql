-- Until when the lock on a login_throttle row is settling (Unix seconds; 0: not):
-- a few seconds from the reservation that counted the attempt (and so may have started
-- the lock), unless that attempt's password check failed and said so before. A lock
-- that is settling may yet be cleared by a right password in flight, so a login that
-- finds one waits for it to settle instead of hearing 429 for a lock that may never
-- hold (simultaneous right-password logins were refused as locked with no failure at
-- all; black-box probe, 2026-12-07). A deadline, not a flag: an attempt whose client
-- hung up (or whose instance died) never says, and its lock must not keep later logins
-- waiting for as long as it lasts.
ALTER TABLE login_throttle ADD COLUMN settling_until BIGINT NOT NULL DEFAULT 0;
