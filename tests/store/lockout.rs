//! Login lockout: reservations under the tiers, the hard lock, clearing and unlocking,
//! and counts that live in the database.

use gatehouse::store::Reservation;

use crate::both_backends;
use crate::support::*;

both_backends!(
    every_tier_locks_exactly_on_its_failure_count_for_exactly_its_time,
    the_hard_lock_has_no_end_and_answers_the_longest_tier,
    a_right_password_clears_the_count_and_a_timed_lock,
    a_right_password_clears_even_the_hard_lock_its_own_reservation_set,
    an_admin_unlock_clears_the_hard_lock_a_timed_lock_and_the_count,
    the_lock_in_force_is_read_without_counting_an_attempt,
    each_email_has_its_own_count,
    a_policy_without_tiers_or_hard_limit_never_locks,
    counts_and_locks_survive_reopening_the_store,
    reservations_racing_unlocks_always_get_an_answer,
    a_reservation_for_a_login_reads_the_account_with_the_count,
    a_lock_settles_when_the_check_that_started_it_fails_and_not_for_another_count,
);

const E: &str = "guess@example.test";

fn allowed(failures: u32) -> Reservation {
    Reservation::Allowed { failures }
}

/// A lock, settling or not: most tests here are about counts and times, and compare
/// reservations through [`plain`].
fn locked(retry_after: u32) -> Reservation {
    Reservation::Locked { retry_after, settling: false }
}

fn plain(r: Reservation) -> Reservation {
    match r {
        Reservation::Locked { retry_after, .. } => locked(retry_after),
        allowed => allowed,
    }
}

fn settling(retry_after: u32) -> Reservation {
    Reservation::Locked { retry_after, settling: true }
}

async fn every_tier_locks_exactly_on_its_failure_count_for_exactly_its_time(b: Backend) {
    let db = Db::new(b).await;
    let s = &*db.store;
    let p = default_policy();
    let r = |now: i64| {
        let p = p.clone();
        async move { s.reserve_login(E, &p, now).await.unwrap() }
    };
    for n in 1..=5 {
        assert_eq!(r(T0).await, allowed(n), "failure {n}");
    }
    assert_eq!(plain(r(T0).await), locked(60));
    assert_eq!(plain(r(T0 + 1).await), locked(59));
    assert_eq!(plain(r(T0 + 59).await), locked(1));
    // Refused attempts were not counted: the count goes on from 5.
    assert_eq!(r(T0 + 60).await, allowed(6));
    for n in 7..=10 {
        assert_eq!(r(T0 + 60).await, allowed(n), "failure {n}");
    }
    assert_eq!(plain(r(T0 + 60).await), locked(300));
    assert_eq!(plain(r(T0 + 359).await), locked(1));
    for n in 11..=20 {
        assert_eq!(r(T0 + 360).await, allowed(n), "failure {n}");
    }
    assert_eq!(plain(r(T0 + 360).await), locked(3600));
    assert_eq!(plain(r(T0 + 3959).await), locked(1));
    // From the last tier on, every failure locks again for the last tier's time.
    assert_eq!(r(T0 + 3960).await, allowed(21));
    assert_eq!(plain(r(T0 + 3960).await), locked(3600));
    assert_eq!(r(T0 + 7560).await, allowed(22));
    assert_eq!(plain(r(T0 + 7561).await), locked(3599));
}

async fn the_hard_lock_has_no_end_and_answers_the_longest_tier(b: Backend) {
    let db = Db::new(b).await;
    let p = policy("1:30,2:90", 3);
    let s = &*db.store;
    assert_eq!(s.reserve_login(E, &p, T0).await.unwrap(), allowed(1));
    assert_eq!(s.reserve_login(E, &p, T0 + 30).await.unwrap(), allowed(2));
    assert_eq!(plain(s.reserve_login(E, &p, T0 + 60).await.unwrap()), locked(60));
    assert_eq!(s.reserve_login(E, &p, T0 + 120).await.unwrap(), allowed(3));
    for later in [T0 + 120, T0 + 211, T0 + 86_400, T0 + 10 * 365 * 86_400] {
        assert_eq!(plain(s.reserve_login(E, &p, later).await.unwrap()), locked(90), "at {later}");
    }
}

async fn a_right_password_clears_the_count_and_a_timed_lock(b: Backend) {
    let db = Db::new(b).await;
    let p = default_policy();
    let s = &*db.store;
    for _ in 0..3 {
        s.reserve_login(E, &p, T0).await.unwrap();
    }
    s.clear_login_failures(E, T0).await.unwrap();
    assert_eq!(s.reserve_login(E, &p, T0).await.unwrap(), allowed(1));
    for n in 2..=5 {
        assert_eq!(s.reserve_login(E, &p, T0).await.unwrap(), allowed(n));
    }
    assert_eq!(plain(s.reserve_login(E, &p, T0 + 1).await.unwrap()), locked(59));
    s.clear_login_failures(E, T0 + 2).await.unwrap();
    assert_eq!(s.reserve_login(E, &p, T0 + 2).await.unwrap(), allowed(1));
    // Clearing an email never seen is harmless.
    s.clear_login_failures("new@example.test", T0).await.unwrap();
    assert_eq!(s.reserve_login("new@example.test", &p, T0).await.unwrap(), allowed(1));
}

async fn a_right_password_clears_even_the_hard_lock_its_own_reservation_set(b: Backend) {
    let db = Db::new(b).await;
    let p = policy("5:60", 2);
    let s = &*db.store;
    assert_eq!(s.reserve_login(E, &p, T0).await.unwrap(), allowed(1));
    // This reservation reaches the hard limit; its password is still checked.
    assert_eq!(s.reserve_login(E, &p, T0).await.unwrap(), allowed(2));
    assert_eq!(plain(s.reserve_login(E, &p, T0).await.unwrap()), locked(60));
    // It was the right one: the count and the lock it set go.
    s.clear_login_failures(E, T0 + 1).await.unwrap();
    assert_eq!(s.reserve_login(E, &p, T0 + 1).await.unwrap(), allowed(1));
}

async fn an_admin_unlock_clears_the_hard_lock_a_timed_lock_and_the_count(b: Backend) {
    let db = Db::new(b).await;
    let p = policy("5:60", 2);
    let s = &*db.store;
    s.reserve_login(E, &p, T0).await.unwrap();
    s.reserve_login(E, &p, T0).await.unwrap();
    assert_eq!(plain(s.reserve_login(E, &p, T0 + 86_400).await.unwrap()), locked(60));
    s.unlock_login(E, T0 + 86_401).await.unwrap();
    assert_eq!(s.reserve_login(E, &p, T0 + 86_401).await.unwrap(), allowed(1));

    let q = default_policy();
    let other = "timed@example.test";
    for _ in 0..5 {
        s.reserve_login(other, &q, T0).await.unwrap();
    }
    assert_eq!(plain(s.reserve_login(other, &q, T0).await.unwrap()), locked(60));
    s.unlock_login(other, T0 + 1).await.unwrap();
    assert_eq!(s.reserve_login(other, &q, T0 + 1).await.unwrap(), allowed(1));
    // Unlocking an email never seen is harmless.
    s.unlock_login("never@example.test", T0).await.unwrap();
}

async fn the_lock_in_force_is_read_without_counting_an_attempt(b: Backend) {
    let db = Db::new(b).await;
    let p = default_policy();
    let s = &*db.store;
    assert_eq!(s.login_lock(E, &p, T0).await.unwrap(), None, "never seen");
    for n in 1..=4 {
        assert_eq!(s.reserve_login(E, &p, T0).await.unwrap(), allowed(n));
        assert_eq!(s.login_lock(E, &p, T0).await.unwrap(), None);
    }
    assert_eq!(s.reserve_login(E, &p, T0).await.unwrap(), allowed(5));
    assert_eq!(s.login_lock(E, &p, T0).await.unwrap(), Some(60));
    assert_eq!(s.login_lock(E, &p, T0 + 59).await.unwrap(), Some(1));
    assert_eq!(s.login_lock(E, &p, T0 + 60).await.unwrap(), None);
    // Reading counted nothing: the next failure is the sixth.
    assert_eq!(s.reserve_login(E, &p, T0 + 60).await.unwrap(), allowed(6));

    let h = policy("1:30,2:90", 2);
    let hard = "hard@example.test";
    s.reserve_login(hard, &h, T0).await.unwrap();
    assert_eq!(s.login_lock(hard, &h, T0 + 1).await.unwrap(), Some(29));
    s.reserve_login(hard, &h, T0 + 30).await.unwrap();
    assert_eq!(
        s.login_lock(hard, &h, T0 + 10 * 86_400).await.unwrap(),
        Some(90),
        "a hard lock answers the longest tier"
    );
}

async fn each_email_has_its_own_count(b: Backend) {
    let db = Db::new(b).await;
    let p = default_policy();
    let s = &*db.store;
    for _ in 0..5 {
        s.reserve_login("a@example.test", &p, T0).await.unwrap();
    }
    assert_eq!(plain(s.reserve_login("a@example.test", &p, T0).await.unwrap()), locked(60));
    assert_eq!(s.reserve_login("b@example.test", &p, T0).await.unwrap(), allowed(1));
    s.clear_login_failures("b@example.test", T0).await.unwrap();
    assert_eq!(plain(s.reserve_login("a@example.test", &p, T0 + 1).await.unwrap()), locked(59));
}

async fn a_policy_without_tiers_or_hard_limit_never_locks(b: Backend) {
    let db = Db::new(b).await;
    let p = policy("", 0);
    for n in 1..=30 {
        assert_eq!(db.store.reserve_login(E, &p, T0).await.unwrap(), allowed(n));
    }
}

async fn counts_and_locks_survive_reopening_the_store(b: Backend) {
    let db = Db::new(b).await;
    let p = default_policy();
    for n in 1..=4 {
        assert_eq!(db.store.reserve_login(E, &p, T0).await.unwrap(), allowed(n));
    }
    let Db { url, store, _dir } = db;
    drop(store);

    let reopened = open(&url).await;
    assert_eq!(reopened.reserve_login(E, &p, T0).await.unwrap(), allowed(5));
    drop(reopened);

    let again = open(&url).await;
    assert_eq!(plain(again.reserve_login(E, &p, T0 + 10).await.unwrap()), locked(50));
    assert_eq!(again.reserve_login(E, &p, T0 + 60).await.unwrap(), allowed(6));
}

async fn reservations_racing_unlocks_always_get_an_answer(b: Backend) {
    let db = Db::new(b).await;
    let other = db.another_instance().await;
    let p = default_policy();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = if i % 2 == 0 { db.store.clone() } else { other.clone() };
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            if i % 5 == 0 {
                store.unlock_login(E, T0).await.map(|_| ())
            } else {
                store.reserve_login(E, &p, T0).await.map(|_| ())
            }
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every reservation and unlock answers");
    }
}

async fn a_reservation_for_a_login_reads_the_account_with_the_count(b: Backend) {
    let db = Db::new(b).await;
    let s = &*db.store;
    let p = policy("2:60", 0);
    let u = user(s, E).await;
    // Allowed: the count and the account as it is now (here just renamed).
    let renamed = s
        .patch_user(u.id, &gatehouse::store::UserPatch { name: Some(Some("Renamed".into())), ..Default::default() }, T0)
        .await
        .unwrap()
        .changed()
        .unwrap()
        .0;
    let (r, read) = s.reserve_login_for(E, &p, T0).await.unwrap();
    assert_eq!(r, allowed(1));
    assert_eq!(read.as_ref(), Some(&renamed));
    // An email without an account is counted the same, and reads nothing.
    let (r, read) = s.reserve_login_for("nobody@example.test", &p, T0).await.unwrap();
    assert_eq!((r, read), (allowed(1), None));
    // Locked: no password will be checked, so no account is read.
    assert_eq!(s.reserve_login_for(E, &p, T0).await.unwrap(), (allowed(2), Some(renamed)));
    let (r, user) = s.reserve_login_for(E, &p, T0 + 1).await.unwrap();
    assert_eq!((plain(r), user), (locked(59), None));
}

/// SQLite: a count meets the database locked by something outside the service (an
/// operator's `sqlite3`, a backup). It waits for the lock and is then counted, and the
/// runtime thread it started on is not held meanwhile: here the runtime has a single
/// worker, and a task ticking every 10 ms keeps ticking while the count waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_count_waits_for_an_outside_lock_without_holding_the_runtime() {
    let db = Db::new(Backend::Sqlite).await;
    let path = db.url.trim_start_matches("sqlite://").split('?').next().unwrap().to_owned();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(400));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let started = std::time::Instant::now();
    // On the runtime's worker (the test's own body runs on another thread).
    let store = db.store.clone();
    let counted =
        tokio::spawn(async move { store.reserve_login(E, &default_policy(), T0).await.unwrap() }).await.unwrap();
    let waited = started.elapsed();
    let ticked = ticks.load(std::sync::atomic::Ordering::Relaxed);
    ticker.abort();
    holder.join().unwrap();
    assert_eq!(counted, allowed(1));
    assert!(waited >= std::time::Duration::from_millis(300), "the count did not wait for the lock: {waited:?}");
    assert!(ticked >= 10, "the runtime's only worker was held while the count waited: {ticked} ticks in {waited:?}");
}

/// A lock is settling from the reservation that started it until that attempt's failure
/// is settled, or for a few seconds at most (an attempt whose client hung up never says);
/// settling with another count changes nothing, and the read-only lock is the same
/// either way.
async fn a_lock_settles_when_the_check_that_started_it_fails_and_not_for_another_count(b: Backend) {
    let db = Db::new(b).await;
    let s = &*db.store;
    let p = default_policy();
    for n in 1..=5 {
        assert_eq!(s.reserve_login(E, &p, T0).await.unwrap(), allowed(n));
    }
    assert_eq!(s.reserve_login(E, &p, T0).await.unwrap(), settling(60));
    // The check of failure 4 failing settles nothing: failure 5's may yet clear it.
    s.settle_login_lock(E, 4).await.unwrap();
    assert_eq!(s.reserve_login(E, &p, T0 + 1).await.unwrap(), settling(59));
    assert_eq!(s.login_lock_state(E, &p, T0 + 1).await.unwrap(), (Some(59), true));
    assert_eq!(s.login_lock(E, &p, T0 + 1).await.unwrap(), Some(59));
    s.settle_login_lock(E, 5).await.unwrap();
    assert_eq!(s.reserve_login(E, &p, T0 + 2).await.unwrap(), locked(58));
    assert_eq!(s.login_lock_state(E, &p, T0 + 2).await.unwrap(), (Some(58), false));
    // The next tier's lock is settling from its reservation on, for three seconds
    // unless its failure says so first.
    for n in 6..=10 {
        assert_eq!(s.reserve_login(E, &p, T0 + 60).await.unwrap(), allowed(n));
    }
    assert_eq!(s.reserve_login(E, &p, T0 + 62).await.unwrap(), settling(298));
    assert_eq!(s.reserve_login(E, &p, T0 + 63).await.unwrap(), locked(297), "settling ends by itself");
    // A right password clears a lock, settling or not; a late settle of the old count
    // (10) does not settle a new lock at another count.
    s.clear_login_failures(E, T0 + 64).await.unwrap();
    for n in 1..=5 {
        assert_eq!(s.reserve_login(E, &p, T0 + 64).await.unwrap(), allowed(n));
    }
    s.settle_login_lock(E, 10).await.unwrap();
    assert_eq!(s.reserve_login(E, &p, T0 + 64).await.unwrap(), settling(60));
    // An email never seen: nothing to settle, nothing made.
    s.settle_login_lock("never@example.test", 5).await.unwrap();
    assert_eq!(s.login_lock_state("never@example.test", &p, T0).await.unwrap(), (None, false));
}
