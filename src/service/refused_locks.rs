//! What a login refused for overload answers: each email's lock, as read within the
//! last second.
//!
//! When every hashing place is taken, a login is refused without a password check, and
//! only the answer depends on the email: 429 with the lock's wait if it is locked, 503
//! otherwise. A flood that keeps hashing full sends hundreds of such logins a second,
//! mostly for the same few emails. With a read of the lock for each, they were the
//! requests that waited whenever PostgreSQL's processes and the loopback network's soft
//! interrupts waited for a core (`perf sched timehist`: 86 to 97 ms at a time, while
//! `/healthz` was answered).
//!
//! A read is used as it is for [`FRESH`] on this instance; after that, one refusal reads
//! anew while the others keep using it (up to [`USABLE`]), so that a stall holds up one
//! request, not every refusal behind it. So a lock that began since (on any instance) can
//! be answered as 503 for a second or so, one lifted since (an operator's unlock, a
//! password reset) as 429 with the wait it had: both refuse the login and say when to
//! come back, and neither checks a password; the lockout itself is kept by the
//! reservations, in the database.
//!
//! Measured with an open-loop load generator of mine (logins of one email at 480 a
//! second, four times this machine's capacity then, for 6 s, on PostgreSQL, 2026-12-07):
//! a 503's p99 was 63, 102 and 132 ms with a read per refusal; 1.3 to 2.3 ms in four
//! runs with this. Renewing a stale read from every refusal instead gave 64 ms in one
//! run of four (each refusal during a stall read anew).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::clock::UnixTime;

/// How long a read is used as it is.
pub const FRESH: Duration = Duration::from_secs(1);

/// How long a read may still be used while one request reads the lock anew (so that a
/// stall of the database holds up that one request, not every refusal behind it).
pub const USABLE: Duration = Duration::from_secs(5);

/// Emails remembered at most; beyond that, unusable entries go, then all.
const MAX_EMAILS: usize = 10_000;

struct Read {
    at: Instant,
    /// The service's clock at the read.
    now: UnixTime,
    /// Seconds left of the lock then; `None` when not locked.
    retry_after: Option<u32>,
    /// A request is reading the lock anew.
    renewing: bool,
}

impl Read {
    /// The lock as this read says it is at `now`.
    fn answer(&self, now: UnixTime) -> Option<u32> {
        self.retry_after.and_then(|r| {
            let left = i64::from(r) - (now - self.now);
            u32::try_from(left).ok().filter(|&l| l > 0)
        })
    }
}

/// What to answer a refused login with.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This lock (`None`: not locked), as read.
    Known(Option<u32>),
    /// Read the lock (and [`RefusedLocks::put`] it).
    Read,
}

/// Emails' locks as read for refused logins.
#[derive(Default)]
pub struct RefusedLocks {
    reads: Mutex<HashMap<String, Read>>,
}

impl RefusedLocks {
    fn reads(&self) -> std::sync::MutexGuard<'_, HashMap<String, Read>> {
        // Each change is one call: the map stays consistent across a panic.
        self.reads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How to answer a login of `email` refused at `now`: from a read within [`FRESH`];
    /// from an older one within [`USABLE`] while another request reads anew (this one
    /// reads if none does); else by reading.
    pub fn refusal(&self, email: &str, now: UnixTime) -> Refusal {
        let mut reads = self.reads();
        let Some(read) = reads.get_mut(email) else { return Refusal::Read };
        let age = read.at.elapsed();
        if age < FRESH || (age < USABLE && read.renewing) {
            return Refusal::Known(read.answer(now));
        }
        read.renewing = true;
        Refusal::Read
    }

    /// Remembers a read of `email`'s lock made at `now`.
    pub fn put(&self, email: &str, now: UnixTime, retry_after: Option<u32>) {
        let mut reads = self.reads();
        if reads.len() >= MAX_EMAILS && !reads.contains_key(email) {
            reads.retain(|_, r| r.at.elapsed() < USABLE);
            if reads.len() >= MAX_EMAILS {
                reads.clear();
            }
        }
        reads.insert(email.to_owned(), Read { at: Instant::now(), now, retry_after, renewing: false });
    }

    /// A read of `email`'s lock failed: the next refusal reads again.
    pub fn read_failed(&self, email: &str) {
        if let Some(read) = self.reads().get_mut(email) {
            read.renewing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_counts_down_and_goes_stale() {
        let locks = RefusedLocks::default();
        assert_eq!(locks.refusal("a@example.com", 100), Refusal::Read);
        locks.put("a@example.com", 100, Some(60));
        locks.put("b@example.com", 100, None);
        assert_eq!(locks.refusal("a@example.com", 100), Refusal::Known(Some(60)));
        assert_eq!(locks.refusal("a@example.com", 130), Refusal::Known(Some(30)), "the wait counts down");
        assert_eq!(locks.refusal("a@example.com", 160), Refusal::Known(None), "a lock that ran out is no lock");
        assert_eq!(locks.refusal("b@example.com", 100), Refusal::Known(None));
        std::thread::sleep(FRESH);
        // Stale: one request reads anew, the others use the old read meanwhile.
        assert_eq!(locks.refusal("a@example.com", 101), Refusal::Read);
        assert_eq!(locks.refusal("a@example.com", 101), Refusal::Known(Some(59)));
        locks.put("a@example.com", 101, None);
        assert_eq!(locks.refusal("a@example.com", 101), Refusal::Known(None));
        // A failed read lets the next refusal read.
        assert_eq!(locks.refusal("b@example.com", 101), Refusal::Read);
        locks.read_failed("b@example.com");
        assert_eq!(locks.refusal("b@example.com", 101), Refusal::Read);
    }

    #[test]
    fn memory_is_bounded() {
        let locks = RefusedLocks::default();
        for i in 0..MAX_EMAILS + 5 {
            locks.put(&format!("{i}@example.com"), 0, None);
        }
        assert!(locks.reads().len() <= MAX_EMAILS);
        let newest = format!("{}@example.com", MAX_EMAILS + 4);
        assert_eq!(locks.refusal(&newest, 0), Refusal::Known(None), "the newest read was lost");
    }
}
