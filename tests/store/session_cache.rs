//! PostgreSQL only: each instance's memory of sessions, kept exact by notifications
//! (src/store/session_cache.rs). SQLite reads the file on every check and has none.

use std::time::{Duration, Instant};

use gatehouse::domain::user::{Status, User};
use gatehouse::store::{Rotation, Session, Store, UserPatch};
use sqlx::Connection;
use uuid::Uuid;

use crate::postgres_only;
use crate::support::*;

postgres_only!(
    a_remembered_session_is_answered_from_memory_until_postgresql_reports_a_change,
    a_change_is_seen_at_once_by_the_instance_that_made_it,
    a_session_ended_on_one_instance_is_refused_by_another_at_once,
    an_instance_that_cannot_renew_its_lease_stops_answering_from_memory_and_writes_wait_for_it,
    every_write_that_ends_a_session_or_changes_a_user_is_seen_by_another_instance_at_once,
    a_stopped_instance_is_not_waited_for,
    a_login_updates_the_user_every_instance_remembers_and_keeps_their_sessions,
    a_sessions_use_updates_it_where_remembered_and_keeps_it,
);

/// Runs `sql` on the database directly, as an operator would; with `quiet`, with
/// triggers off (so no notification), which only a test would do.
async fn operator_sql(url: &str, sql: &str, quiet: bool) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    if quiet {
        sqlx::query("SET session_replication_role = replica").execute(&mut *conn).await.unwrap();
    }
    sqlx::query(sql).execute(&mut *conn).await.unwrap();
    drop(conn);
    pool.close().await;
}

/// Waits until `store` answers `sid` from memory: a quiet change to the session's user
/// agent (which no test reads otherwise) is not seen by a remembered entry.
async fn until_remembered(url: &str, store: &dyn Store, sid: Uuid) {
    // A new instance may take a moment for its first lease on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(10);
    for k in 0.. {
        let marker = format!("quiet-{k}");
        operator_sql(url, &format!("UPDATE sessions SET user_agent = '{marker}' WHERE id = '{sid}'"), true).await;
        let (session, _) = store.session_with_user(sid).await.unwrap().expect("session exists");
        if session.user_agent.as_deref() != Some(marker.as_str()) {
            return;
        }
        assert!(Instant::now() < deadline, "session {sid} was never answered from memory");
        if k >= 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn ended_at(store: &dyn Store, sid: Uuid) -> Option<i64> {
    store.session_with_user(sid).await.unwrap().expect("session exists").0.ended_at
}

async fn a_remembered_session_is_answered_from_memory_until_postgresql_reports_a_change() {
    let db = Db::new(Backend::Postgres).await;
    let u = user(&*db.store, "memory@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    assert_eq!(ended_at(&*db.store, s.id).await, None);

    // A change PostgreSQL does not report (triggers off) is not seen once the session is
    // remembered: the answer comes from memory, not from a query. (A read can miss the
    // memory, when it ran while the login's own notification was on its way; it is then
    // remembered by the next read.)
    let mut last_read = None;
    let mut from_memory = false;
    for k in 1..=50 {
        let quiet = format!("UPDATE sessions SET ended_at = {} WHERE id = '{}'", T0 + k, s.id);
        operator_sql(&db.url, &quiet, true).await;
        let read = ended_at(&*db.store, s.id).await;
        if read != Some(T0 + k) {
            assert_eq!(read, last_read, "an answer from memory is the last one read");
            from_memory = true;
            break;
        }
        last_read = read;
    }
    assert!(from_memory, "no read was answered from memory");
    let fresh = db.another_instance().await;
    let in_database = ended_at(&*fresh, s.id).await;
    assert!(in_database.is_some() && in_database != last_read, "the database has the change");

    // Any reported change to the user (here an operator's SQL) makes the memory forget.
    operator_sql(&db.url, &format!("UPDATE users SET name = 'Renamed' WHERE id = '{}'", u.id), false).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (session, owner) = db.store.session_with_user(s.id).await.unwrap().unwrap();
        if session.ended_at == in_database {
            assert_eq!(owner.name.as_deref(), Some("Renamed"));
            break;
        }
        assert!(Instant::now() < deadline, "the notification never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn a_change_is_seen_at_once_by_the_instance_that_made_it() {
    let db = Db::new(Backend::Postgres).await;
    let u = user(&*db.store, "own@example.test").await;
    let (a, b, c) =
        (login(&*db.store, u.id, T0).await, login(&*db.store, u.id, T0).await, login(&*db.store, u.id, T0).await);
    for s in [&a, &b, &c] {
        until_remembered(&db.url, &*db.store, s.id).await;
        assert_eq!(ended_at(&*db.store, s.id).await, None);
    }
    assert!(logout(&*db.store, u.id, a.id, T0 + 1).await);
    assert_eq!(ended_at(&*db.store, a.id).await, Some(T0 + 1));

    db.store.end_sessions(u.id, Some(c.id), "ended_by_user", T0 + 2).await.unwrap();
    assert_eq!(ended_at(&*db.store, b.id).await, Some(T0 + 2));
    assert_eq!(ended_at(&*db.store, c.id).await, None);

    let suspend = UserPatch { status: Some(Status::Suspended), ..Default::default() };
    db.store.patch_user(u.id, &suspend, T0 + 3).await.unwrap().changed().expect("user exists");
    let (session, owner) = db.store.session_with_user(c.id).await.unwrap().unwrap();
    assert_eq!(owner.status, Status::Suspended);
    assert_eq!(session.ended_at, Some(T0 + 3));
}

async fn a_session_ended_on_one_instance_is_refused_by_another_at_once() {
    let db = Db::new(Backend::Postgres).await;
    let other = db.another_instance().await;
    let u = user(&*db.store, "across@example.test").await;
    // Many rounds: the other instance must never answer from a stale memory.
    for round in 0..50 {
        let s = login(&*db.store, u.id, T0).await;
        until_remembered(&db.url, &*other, s.id).await;
        assert_eq!(ended_at(&*other, s.id).await, None);
        assert!(logout(&*db.store, u.id, s.id, T0 + 1).await);
        assert_eq!(ended_at(&*other, s.id).await, Some(T0 + 1), "round {round}");
    }
}

async fn an_instance_that_cannot_renew_its_lease_stops_answering_from_memory_and_writes_wait_for_it() {
    let db = Db::new(Backend::Postgres).await;
    let other = db.another_instance().await;
    let u = user(&*db.store, "lease@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    until_remembered(&db.url, &*other, s.id).await;

    // An operator's lock on the leases' table: every instance's next renewal waits for
    // it, and so does everything else its listening connection would do (handle the
    // logout's notification, acknowledge it). Reading the table still works.
    let mut operator = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut operator).await.unwrap();
    sqlx::query("LOCK TABLE gatehouse_instances IN EXCLUSIVE MODE").execute(&mut operator).await.unwrap();
    // Past a renewal period: both listeners are now stuck in a renewal.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let started = Instant::now();
    assert!(logout(&*db.store, u.id, s.id, T0 + 1).await);
    let took = started.elapsed();
    // The other instance did not handle the change, but its lease has run out: it reads
    // the database.
    assert_eq!(ended_at(&*other, s.id).await, Some(T0 + 1));
    // No acknowledgement could come: the write waited a whole lease (3 s) for them.
    assert!(took >= Duration::from_millis(2900), "the write waited {took:?} only");
    assert!(took <= Duration::from_secs(5), "the write waited {took:?}, much longer than a lease");

    sqlx::query("ROLLBACK").execute(&mut operator).await.unwrap();
    // Renewing again, the other instance answers from memory again.
    let s2 = login(&*db.store, u.id, T0 + 2).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for k in 0.. {
        let marker = format!("after-the-lock-{k}");
        operator_sql(&db.url, &format!("UPDATE sessions SET user_agent = '{marker}' WHERE id = '{}'", s2.id), true)
            .await;
        let (session, _) = other.session_with_user(s2.id).await.unwrap().expect("session exists");
        if session.user_agent.as_deref() != Some(marker.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "the other instance never used its memory again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn every_write_that_ends_a_session_or_changes_a_user_is_seen_by_another_instance_at_once() {
    let db = Db::new(Backend::Postgres).await;
    let other = db.another_instance().await;
    for round in 0..10 {
        let u = user(&*db.store, &format!("writes-{round}@example.test")).await;
        let remembered = |s: Uuid| until_remembered(&db.url, &*other, s);

        // A login over the device limit evicts the oldest session.
        let old = login(&*db.store, u.id, T0).await;
        remembered(old.id).await;
        let (_, newer) = new_session(u.id, T0 + 1);
        db.store.open_session(&newer, 1).await.unwrap().expect("session opened");
        assert_eq!(ended_at(&*other, old.id).await, Some(T0 + 1), "eviction, round {round}");

        // A refresh token used twice, past the grace window, ends its session.
        let s = login(&*db.store, u.id, T0 + 2).await;
        remembered(s.id).await;
        let (first, _) = rotate(&s.refresh, T0 + 3);
        assert!(matches!(db.store.rotate_refresh(&first).await.unwrap(), Rotation::Rotated { .. }));
        let (again, _) = rotate(&s.refresh, T0 + 3 + GRACE + 1);
        assert!(matches!(db.store.rotate_refresh(&again).await.unwrap(), Rotation::Reused { .. }));
        assert_eq!(ended_at(&*other, s.id).await, Some(T0 + 3 + GRACE + 1), "reuse, round {round}");

        // A password change ends the other sessions.
        let s = login(&*db.store, u.id, T0 + 40).await;
        remembered(s.id).await;
        db.store.change_password(u.id, "$argon2id$changed", None, T0 + 41).await.unwrap();
        assert_eq!(ended_at(&*other, s.id).await, Some(T0 + 41), "password change, round {round}");

        // Ending all but one, as "log out everywhere else" does.
        let (s, kept) = (login(&*db.store, u.id, T0 + 42).await, login(&*db.store, u.id, T0 + 42).await);
        remembered(s.id).await;
        db.store.end_sessions(u.id, Some(kept.id), "ended_by_user", T0 + 43).await.unwrap();
        assert_eq!(ended_at(&*other, s.id).await, Some(T0 + 43), "end all others, round {round}");

        // A verified email and a new name are seen on the user at once (before the
        // reset below, which also marks the email verified).
        let s = login(&*db.store, u.id, T0 + 46).await;
        remembered(s.id).await;
        let ((_, link), (_, code)) = (one_time(T0 + 3600), one_time_code(T0 + 3600));
        db.store.issue_verification(u.id, &link, &code, T0 + 46).await.unwrap();
        db.store.verify_email_by_link(&link.token_hash, T0 + 47).await.unwrap().expect("verified");
        let (_, owner) = other.session_with_user(s.id).await.unwrap().expect("session exists");
        assert!(owner.email_verified_at.is_some(), "verification, round {round}");
        remembered(s.id).await;
        let rename = UserPatch { name: Some(Some(format!("Renamed {round}"))), ..Default::default() };
        db.store.patch_user(u.id, &rename, T0 + 48).await.unwrap().changed().expect("user exists");
        let (_, owner) = other.session_with_user(s.id).await.unwrap().expect("session exists");
        assert_eq!(owner.name, Some(format!("Renamed {round}")), "rename, round {round}");

        // A password reset ends every session.
        let s = login(&*db.store, u.id, T0 + 49).await;
        remembered(s.id).await;
        let (_, reset) = one_time(T0 + 3600);
        db.store.issue_reset(u.id, &reset, T0 + 49).await.unwrap();
        db.store.reset_password(&reset.token_hash, "$argon2id$reset", T0 + 50).await.unwrap().expect("reset");
        assert_eq!(ended_at(&*other, s.id).await, Some(T0 + 50), "password reset, round {round}");

        // An administrator's suspension ends them all and is seen on the user at once.
        let s = login(&*db.store, u.id, T0 + 51).await;
        remembered(s.id).await;
        let suspend = UserPatch { status: Some(Status::Suspended), ..Default::default() };
        db.store.patch_user(u.id, &suspend, T0 + 52).await.unwrap().changed().expect("user exists");
        let (session, owner) = other.session_with_user(s.id).await.unwrap().expect("session exists");
        assert_eq!((session.ended_at, owner.status), (Some(T0 + 52), Status::Suspended), "suspension, round {round}");
    }
}

async fn a_stopped_instance_is_not_waited_for() {
    let db = Db::new(Backend::Postgres).await;
    let u = user(&*db.store, "stopped@example.test").await;
    let other = db.another_instance().await;
    let remembered = login(&*db.store, u.id, T0).await;
    until_remembered(&db.url, &*other, remembered.id).await;
    other.close().await;
    // It answers from memory no more.
    let marker = "after-close";
    operator_sql(&db.url, &format!("UPDATE sessions SET user_agent = '{marker}' WHERE id = '{}'", remembered.id), true)
        .await;
    let (session, _) = other.session_with_user(remembered.id).await.unwrap().expect("session exists");
    assert_eq!(session.user_agent.as_deref(), Some(marker));
    // Gone: it can acknowledge nothing any more.
    drop(other);
    let s = login(&*db.store, u.id, T0).await;
    let started = Instant::now();
    assert!(logout(&*db.store, u.id, s.id, T0 + 1).await);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "the write waited {took:?} for a stopped instance");
}

/// How a read was answered, by the store's counts of its memory's reads.
#[derive(Debug, PartialEq)]
enum Answer {
    Memory,
    /// From the database, the session not being remembered.
    Database,
    /// From the database, the memory's lease having lapsed (a machine stalled for
    /// seconds): nothing can be concluded from the read.
    Lapsed,
}

/// Reads session `sid` on `store`: the session, its user, and how the read was answered.
async fn read_counted(store: &dyn Store, sid: Uuid) -> (Session, User, Answer) {
    let before = store.memory_reads().expect("PostgreSQL has a memory");
    let (session, owner) = store.session_with_user(sid).await.unwrap().expect("session exists");
    let after = store.memory_reads().expect("PostgreSQL has a memory");
    let answer = if after.unleased > before.unleased {
        Answer::Lapsed
    } else if after.hits > before.hits {
        Answer::Memory
    } else {
        assert!(after.misses > before.misses, "the read was counted: {before:?} then {after:?}");
        Answer::Database
    };
    (session, owner, answer)
}

/// A login without a place changes only the user's last login: the instances keep the
/// user's sessions they remember (no read of the database) and show the new last login
/// (0008). Seen failing before it: the remembered session was forgotten and read anew.
/// A login with a place, like any other change, still makes them forget.
async fn a_login_updates_the_user_every_instance_remembers_and_keeps_their_sessions() {
    let db = Db::new(Backend::Postgres).await;
    let other = db.another_instance().await;
    let u = user(&*db.store, "often@example.test").await;
    without_lapses(100, |t| login_note_scenario(&db, &*other, u.id, t)).await;
}

/// The user agent the database holds for a session made by [`remembered_by_both`].
const IN_DATABASE: &str = "neither-remembers";

/// Runs `scenario` from a time until no read found a lease lapsed on the way (such a
/// read proves nothing either way), at most five times, each from a later time.
async fn without_lapses<F: std::future::Future<Output = bool>>(step: i64, mut scenario: impl FnMut(i64) -> F) {
    for attempt in 0..5 {
        if scenario(T0 + step * attempt).await {
            return;
        }
    }
    panic!("a lease lapsed in each of five attempts");
}

/// A session of `uid` opened at `t`, remembered by both instances, whose user agent in
/// the database ([`IN_DATABASE`]) neither memory has.
async fn remembered_by_both(db: &Db, other: &dyn Store, uid: Uuid, t: i64) -> Opened {
    let s = login(&*db.store, uid, t).await;
    for store in [&*db.store, other] {
        until_remembered(&db.url, store, s.id).await;
    }
    operator_sql(&db.url, &format!("UPDATE sessions SET user_agent = '{IN_DATABASE}' WHERE id = '{}'", s.id), true)
        .await;
    s
}

/// One attempt of the test above, from `t`; false when a lease lapsed on the way.
async fn login_note_scenario(db: &Db, other: &dyn Store, uid: Uuid, t: i64) -> bool {
    let s = remembered_by_both(db, other, uid, t).await;
    let mut remembered = Vec::new();
    for store in [&*db.store, other] {
        match read_counted(store, s.id).await {
            (session, _, Answer::Memory) => remembered.push(session.user_agent),
            (_, _, Answer::Lapsed) => return false,
            (_, _, Answer::Database) => panic!("a session just remembered was read from the database"),
        }
    }
    assert!(!remembered.contains(&Some(IN_DATABASE.to_owned())));
    let kept_by_other = remembered[1].clone();

    let (_, next) = new_session(uid, t + 50);
    db.store.open_session(&next, 0).await.unwrap().expect("session opened");
    for (store, remembered) in [&*db.store, other].into_iter().zip(remembered) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (session, owner, answer) = read_counted(store, s.id).await;
            match answer {
                Answer::Lapsed => return false,
                Answer::Database => panic!("the login made an instance forget the session"),
                Answer::Memory => assert_eq!(session.user_agent, remembered, "the session was kept in memory"),
            }
            if owner.last_login_at == Some(t + 50) {
                break;
            }
            assert!(Instant::now() < deadline, "the login's notification never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // A login with a place: the place is not sent on the channel, the instances forget.
    let (_, mut placed) = new_session(uid, t + 60);
    placed.geolocation = Some(serde_json::json!({"country": "NZ", "city": "Wellington"}));
    db.store.open_session(&placed, 0).await.unwrap().expect("session opened");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (session, owner, answer) = read_counted(other, s.id).await;
        match answer {
            Answer::Lapsed => return false,
            Answer::Database => {
                assert_eq!(session.user_agent.as_deref(), Some(IN_DATABASE));
                assert_eq!(owner.last_login_at, Some(t + 60));
                assert_eq!(owner.last_login_geolocation, placed.geolocation);
                return true;
            }
            Answer::Memory => assert_eq!(session.user_agent, kept_by_other, "not yet forgotten"),
        }
        assert!(Instant::now() < deadline, "the login's notification never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A session's use changes only its `last_used_at` (at most once a minute): the
/// instances keep it and show the new time (0009), as the login note does for a user.
async fn a_sessions_use_updates_it_where_remembered_and_keeps_it() {
    let db = Db::new(Backend::Postgres).await;
    let other = db.another_instance().await;
    let u = user(&*db.store, "used@example.test").await;
    without_lapses(1000, |t| use_note_scenario(&db, &*other, u.id, t)).await;
}

/// One attempt of the test above, from `t`; false when a lease lapsed on the way.
async fn use_note_scenario(db: &Db, other: &dyn Store, uid: Uuid, t: i64) -> bool {
    let s = remembered_by_both(db, other, uid, t).await;
    db.store.touch_session(s.id, t + 90).await.unwrap();
    for store in [&*db.store, other] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (session, _, answer) = read_counted(store, s.id).await;
            match answer {
                Answer::Lapsed => return false,
                Answer::Database => panic!("the use made an instance forget the session"),
                Answer::Memory => {
                    assert_ne!(session.user_agent.as_deref(), Some(IN_DATABASE), "the session was kept in memory")
                }
            }
            if session.last_used_at == t + 90 {
                break;
            }
            assert!(Instant::now() < deadline, "the use's notification never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    true
}
