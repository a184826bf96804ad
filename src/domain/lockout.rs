//! Progressive lockout of logins, per normalised email.
//!
//! # Policy
//!
//! Every login attempt for an email, whether or not an account exists for it, is
//! first *reserved* in the database: one atomic statement that either refuses the
//! attempt because a lock is active, or counts it as a consecutive failure before
//! any password is hashed. Counting up front is what makes the limit exact under
//! concurrency: fifty simultaneous guesses reserve fifty consecutive counts, and only
//! the ones that reserved counts below the locking tier get their password checked.
//!
//! * A reservation that brings the count to a tier's number of failures (by default
//!   5, 10, 20) starts that tier's lock (60 s, 300 s, 3600 s) at once. Its own
//!   password is still checked and answered 401 if wrong; every later attempt gets
//!   429 `account_locked` with `Retry-After` = seconds left, and is neither checked
//!   nor counted, so even the right password is refused during a lock.
//! * From the last tier on, every further failure locks again for the last tier's
//!   time. Between tiers (after a lock expired) failures count without locking.
//! * At the hard limit (100 consecutive failures) the lock has no end: only a
//!   completed password reset or an admin unlock clears it. `Retry-After` then
//!   says the last tier's time, since no honest answer is shorter.
//! * Because attempts are counted before they are checked, the attempt that reaches a
//!   tier starts its lock before its own check. That lock is *settling* until the
//!   check fails (or for a few seconds at most): a right password in flight may clear
//!   it, so later attempts wait for it to settle rather than hear 429 for a lock that
//!   may never hold; ten simultaneous logins with the right password all get in.
//! * A right password clears the count and any lock it started, whatever the account
//!   state (a 403 for an unverified or suspended account is not a guess).
//! * The count lives in the database, so it survives restarts and is shared by every
//!   instance on the same database.
//!
//! ```text
//!   count<5 --fail--> ... --5th fail--> locked 60s --expires--> count=5 --fail x5--> locked 300s
//!      ^                                                                               |
//!      +------------------------- right password or reset -----------------------------+
//!   count>=20: each fail locks 3600s;  count>=100: locked until reset/unlock
//! ```

use std::str::FromStr;

/// Tiers of `(consecutive failures, lock seconds)`, sorted by failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutTiers(pub Vec<(u32, u32)>);

impl FromStr for LockoutTiers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tiers = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (f, secs) = part.split_once(':').ok_or_else(|| format!("expected FAILURES:SECONDS, got {part:?}"))?;
            let f: u32 = f.trim().parse().map_err(|_| format!("bad failure count in {part:?}"))?;
            let secs: u32 = secs.trim().parse().map_err(|_| format!("bad seconds in {part:?}"))?;
            if f == 0 || secs == 0 {
                return Err(format!("failures and seconds must be at least 1 in {part:?}"));
            }
            tiers.push((f, secs));
        }
        tiers.sort_unstable();
        if tiers.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err("two tiers with the same failure count".into());
        }
        Ok(Self(tiers))
    }
}

/// What a failure count leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// No lock.
    None,
    /// Locked for this many seconds from the failure.
    For(u32),
    /// Locked until a reset or an admin unlock.
    Hard,
}

/// The lockout policy in force.
#[derive(Debug, Clone)]
pub struct LockoutPolicy {
    /// The tiers.
    pub tiers: LockoutTiers,
    /// Failures at which the lock becomes permanent; 0 disables the hard lock.
    pub hard_limit: u32,
}

impl LockoutPolicy {
    /// The lock that the `failures`-th consecutive failure starts.
    pub fn lock_after(&self, failures: u32) -> Lock {
        if self.hard_limit > 0 && failures >= self.hard_limit {
            return Lock::Hard;
        }
        let Some(&(last_f, last_s)) = self.tiers.0.last() else {
            return Lock::None;
        };
        if failures >= last_f {
            return Lock::For(last_s);
        }
        match self.tiers.0.iter().find(|(f, _)| *f == failures) {
            Some(&(_, s)) => Lock::For(s),
            None => Lock::None,
        }
    }

    /// [`lock_after`](Self::lock_after) as SQL, so that counting a failure and starting
    /// its lock are one statement: the new `(locked_until, hard_locked)` of a row whose
    /// count becomes `failures` at time `now`, keeping `until_now` when no timed lock
    /// starts (all three SQL integer expressions). `hard_locked` is 1 at the hard limit
    /// and 0 below it: the caller counts only rows that are not hard-locked. Only the
    /// policy's numbers go into the text.
    pub fn lock_sql(&self, failures: &str, now: &str, until_now: &str) -> (String, String) {
        let mut until = String::from("CASE");
        let hard = if self.hard_limit > 0 {
            until += &format!(" WHEN {failures} >= {} THEN 0", self.hard_limit);
            format!("CASE WHEN {failures} >= {} THEN 1 ELSE 0 END", self.hard_limit)
        } else {
            "0".to_owned()
        };
        if let Some(&(last_f, last_s)) = self.tiers.0.last() {
            until += &format!(" WHEN {failures} >= {last_f} THEN {now} + {last_s}");
        }
        for &(f, s) in &self.tiers.0 {
            until += &format!(" WHEN {failures} = {f} THEN {now} + {s}");
        }
        let until = if until == "CASE" { until_now.to_owned() } else { format!("{until} ELSE {until_now} END") };
        (until, hard)
    }

    /// The `Retry-After` for a hard lock: the longest tier (or an hour without tiers).
    pub fn hard_retry_after(&self) -> u32 {
        self.tiers.0.iter().map(|t| t.1).max().unwrap_or(3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LockoutPolicy {
        LockoutPolicy { tiers: "5:60,10:300,20:3600".parse().unwrap(), hard_limit: 100 }
    }

    #[test]
    fn tiers_lock_exactly_at_their_failure_counts() {
        let p = policy();
        for n in 1..5 {
            assert_eq!(p.lock_after(n), Lock::None, "{n}");
        }
        assert_eq!(p.lock_after(5), Lock::For(60));
        for n in 6..10 {
            assert_eq!(p.lock_after(n), Lock::None, "{n}");
        }
        assert_eq!(p.lock_after(10), Lock::For(300));
        assert_eq!(p.lock_after(19), Lock::None);
        assert_eq!(p.lock_after(20), Lock::For(3600));
        assert_eq!(p.lock_after(21), Lock::For(3600));
        assert_eq!(p.lock_after(99), Lock::For(3600));
        assert_eq!(p.lock_after(100), Lock::Hard);
        assert_eq!(p.lock_after(150), Lock::Hard);
    }

    /// The SQL form of the policy locks exactly where `lock_after` does, for every count.
    #[test]
    fn lock_sql_agrees_with_lock_after() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        let policies = [
            policy(),
            LockoutPolicy { tiers: "3:10".parse().unwrap(), hard_limit: 0 },
            LockoutPolicy { tiers: LockoutTiers(vec![]), hard_limit: 7 },
            LockoutPolicy { tiers: LockoutTiers(vec![]), hard_limit: 0 },
        ];
        for p in policies {
            let (until, hard) = p.lock_sql("f", "1000", "locked_until");
            let sql = format!("SELECT {until}, {hard} FROM (SELECT ?1 AS f, 17 AS locked_until)");
            for f in 1..=120u32 {
                let (u, h): (i64, i64) = db.query_row(&sql, [f], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
                let expected = match p.lock_after(f) {
                    Lock::None => (17, 0),
                    Lock::For(s) => (1000 + i64::from(s), 0),
                    Lock::Hard => (0, 1),
                };
                assert_eq!((u, h), expected, "{p:?} at {f} failures");
            }
        }
    }

    #[test]
    fn tiers_parse_sorted_and_reject_nonsense() {
        let t: LockoutTiers = "10:300, 5:60".parse().unwrap();
        assert_eq!(t.0, vec![(5, 60), (10, 300)]);
        assert!("5".parse::<LockoutTiers>().is_err());
        assert!("0:60".parse::<LockoutTiers>().is_err());
        assert!("5:60,5:70".parse::<LockoutTiers>().is_err());
    }
}
