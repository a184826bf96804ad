//! The one place that reads the wall clock. Everything else takes the time from a
//! [`Clock`], so tests can drive time with a [`ManualClock`] instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};

/// Unix time in whole seconds.
pub type UnixTime = i64;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now(&self) -> UnixTime;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        chrono::Utc::now().timestamp()
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A manual clock starting at the real current time.
    pub fn starting_now() -> Self {
        Self(AtomicI64::new(SystemClock.now()))
    }

    /// Moves the clock forward by `seconds`.
    pub fn advance(&self, seconds: i64) {
        self.0.fetch_add(seconds, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixTime {
        self.0.load(Ordering::SeqCst)
    }
}

/// RFC 3339 UTC text of a Unix time, as the API shows timestamps.
pub fn rfc3339(t: UnixTime) -> String {
    chrono::DateTime::from_timestamp(t, 0).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = ManualClock::starting_now();
        let t = c.now();
        assert_eq!(c.now(), t);
        c.advance(61);
        assert_eq!(c.now(), t + 61);
    }

    #[test]
    fn rfc3339_is_utc_with_z() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
