//! Refresh token rotation: rotated, grace, reuse and invalid tokens.

use gatehouse::crypto::tokens::{new_refresh_token, unseal};
use gatehouse::domain::user::Status;
use gatehouse::store::{Rotation, UserPatch};

use crate::both_backends;
use crate::support::*;

both_backends!(
    a_refresh_token_rotates_into_its_successor_which_rotates_next,
    a_successor_never_outlives_its_session,
    the_old_token_within_grace_returns_the_same_sealed_successor,
    the_old_token_after_grace_is_reuse_and_ends_the_session,
    unknown_and_expired_tokens_are_invalid,
    tokens_of_ended_or_expired_sessions_are_invalid,
    tokens_of_users_no_longer_active_are_invalid,
    with_no_grace_window_presenting_a_rotated_token_again_is_reuse,
    the_same_rotation_run_again_is_its_own_answer_not_reuse,
    a_rotation_run_again_among_others_spoils_none_of_them,
    a_token_whose_session_an_operator_deleted_is_invalid,
);

fn is_invalid(r: &Rotation) -> bool {
    matches!(r, Rotation::Invalid)
}

async fn a_refresh_token_rotates_into_its_successor_which_rotates_next(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "rot@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    let (r, next) = rotate(&s.refresh, T0 + 100);
    match db.store.rotate_refresh(&r).await.unwrap() {
        Rotation::Rotated { session, user, refresh_expires_at } => {
            assert_eq!(session.id, s.id);
            assert_eq!(session.last_used_at, T0 + 100);
            assert_eq!(session.created_at, T0);
            assert_eq!(user.id, u.id);
            assert_eq!(refresh_expires_at, T0 + 100 + REFRESH_TTL);
        }
        other => panic!("expected Rotated, got {other:?}"),
    }
    let (stored, _) = db.store.session_with_user(s.id).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, T0 + 100);

    let (r2, _) = rotate(&next, T0 + 200);
    match db.store.rotate_refresh(&r2).await.unwrap() {
        Rotation::Rotated { session, refresh_expires_at, .. } => {
            assert_eq!(session.id, s.id);
            assert_eq!(session.last_used_at, T0 + 200);
            assert_eq!(refresh_expires_at, T0 + 200 + REFRESH_TTL);
        }
        other => panic!("expected Rotated, got {other:?}"),
    }
}

async fn a_successor_never_outlives_its_session(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "short@example.test").await;
    let (s, mut ns) = new_session(u.id, T0);
    ns.expires_at = T0 + 1000;
    ns.refresh_expires_at = T0 + 1000;
    db.store.open_session(&ns, 0).await.unwrap().expect("session opened");
    let (r, _) = rotate(&s.refresh, T0 + 500);
    match db.store.rotate_refresh(&r).await.unwrap() {
        Rotation::Rotated { refresh_expires_at, .. } => assert_eq!(refresh_expires_at, T0 + 1000),
        other => panic!("expected Rotated, got {other:?}"),
    }
}

async fn the_old_token_within_grace_returns_the_same_sealed_successor(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "grace@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    let (r1, next) = rotate(&s.refresh, T0 + 100);
    assert!(matches!(db.store.rotate_refresh(&r1).await.unwrap(), Rotation::Rotated { .. }));
    for at in [T0 + 100, T0 + 101, T0 + 100 + GRACE] {
        // A retry brings its own candidate successor; it is not used.
        let (retry, unused) = rotate(&s.refresh, at);
        match db.store.rotate_refresh(&retry).await.unwrap() {
            Rotation::Grace { sealed, session, user, refresh_expires_at } => {
                assert_eq!(sealed, r1.sealed);
                assert_eq!(unseal(&sealed, &s.refresh).unwrap(), next);
                assert_eq!(session.id, s.id);
                assert_eq!(user.id, u.id);
                assert_eq!(refresh_expires_at, T0 + 100 + REFRESH_TTL);
            }
            other => panic!("expected Grace at {at}, got {other:?}"),
        }
        let (probe, _) = rotate(&unused, at);
        assert!(is_invalid(&db.store.rotate_refresh(&probe).await.unwrap()), "a grace answer installs no token");
    }
    assert_eq!(db.store.list_sessions(u.id, T0 + 200).await.unwrap().len(), 1, "grace ends nothing");
    let (r2, _) = rotate(&next, T0 + 100 + GRACE);
    assert!(matches!(db.store.rotate_refresh(&r2).await.unwrap(), Rotation::Rotated { .. }));
}

async fn the_old_token_after_grace_is_reuse_and_ends_the_session(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "reuse@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    let other = login(&*db.store, u.id, T0 + 1).await;
    let (r1, next) = rotate(&s.refresh, T0 + 100);
    db.store.rotate_refresh(&r1).await.unwrap();
    let late = T0 + 100 + GRACE + 1;
    let (stolen, _) = rotate(&s.refresh, late);
    match db.store.rotate_refresh(&stolen).await.unwrap() {
        Rotation::Reused { session_id, user_id } => {
            assert_eq!(session_id, s.id);
            assert_eq!(user_id, u.id);
        }
        other => panic!("expected Reused, got {other:?}"),
    }
    let (ended, _) = db.store.session_with_user(s.id).await.unwrap().unwrap();
    assert_eq!(ended.ended_at, Some(late));
    let live: Vec<_> = db.store.list_sessions(u.id, late).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(live, vec![other.id], "only the reused session ends");

    let (succ, _) = rotate(&next, late + 1);
    assert!(is_invalid(&db.store.rotate_refresh(&succ).await.unwrap()));
    let (again, _) = rotate(&s.refresh, late + 2);
    assert!(is_invalid(&db.store.rotate_refresh(&again).await.unwrap()));
}

async fn unknown_and_expired_tokens_are_invalid(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "expired@example.test").await;
    let (unknown, _) = rotate(&new_refresh_token(), T0);
    assert!(is_invalid(&db.store.rotate_refresh(&unknown).await.unwrap()));

    for (at, ok) in [(T0 + 100, false), (T0 + 101, false), (T0 + 99, true)] {
        let (s, mut ns) = new_session(u.id, T0);
        ns.refresh_expires_at = T0 + 100;
        db.store.open_session(&ns, 0).await.unwrap().expect("session opened");
        let (r, _) = rotate(&s.refresh, at);
        let out = db.store.rotate_refresh(&r).await.unwrap();
        if ok {
            assert!(matches!(out, Rotation::Rotated { .. }), "{out:?}");
        } else {
            assert!(is_invalid(&out), "at {at}: {out:?}");
            // Being refused does not end the session.
            let (stored, _) = db.store.session_with_user(s.id).await.unwrap().unwrap();
            assert_eq!(stored.ended_at, None);
        }
    }
}

async fn tokens_of_ended_or_expired_sessions_are_invalid(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "ended@example.test").await;

    // Never rotated, session ended.
    let s = login(&*db.store, u.id, T0).await;
    logout(&*db.store, u.id, s.id, T0 + 10).await;
    for at in [T0 + 11, T0 + 11 + GRACE + 1] {
        let (r, _) = rotate(&s.refresh, at);
        assert!(is_invalid(&db.store.rotate_refresh(&r).await.unwrap()));
    }

    // Rotated, then the session ended: neither grace nor reuse.
    let s = login(&*db.store, u.id, T0).await;
    let (r1, next) = rotate(&s.refresh, T0 + 10);
    db.store.rotate_refresh(&r1).await.unwrap();
    logout(&*db.store, u.id, s.id, T0 + 11).await;
    for (token, at) in [(&s.refresh, T0 + 12), (&s.refresh, T0 + 12 + GRACE), (&next, T0 + 12)] {
        let (r, _) = rotate(token, at);
        assert!(is_invalid(&db.store.rotate_refresh(&r).await.unwrap()));
    }

    // The session's absolute expiry passed while its refresh token had time left.
    let (s, mut ns) = new_session(u.id, T0);
    ns.expires_at = T0 + 100;
    ns.refresh_expires_at = T0 + 1000;
    db.store.open_session(&ns, 0).await.unwrap().expect("session opened");
    let (r, _) = rotate(&s.refresh, T0 + 100);
    assert!(is_invalid(&db.store.rotate_refresh(&r).await.unwrap()));
}

async fn tokens_of_users_no_longer_active_are_invalid(b: Backend) {
    let db = Db::new(b).await;
    for status in [Status::Suspended, Status::Deactivated, Status::Deleted] {
        let u = user(&*db.store, &format!("{}@example.test", status.as_str())).await;
        let fresh = login(&*db.store, u.id, T0).await;
        let rotated = login(&*db.store, u.id, T0).await;
        let (r1, next) = rotate(&rotated.refresh, T0 + 10);
        db.store.rotate_refresh(&r1).await.unwrap();
        db.store
            .patch_user(u.id, &UserPatch { status: Some(status), ..UserPatch::default() }, T0 + 11)
            .await
            .unwrap()
            .changed()
            .unwrap();
        for (token, at) in [(&fresh.refresh, T0 + 12), (&rotated.refresh, T0 + 12), (&next, T0 + 12)] {
            let (r, _) = rotate(token, at);
            let out = db.store.rotate_refresh(&r).await.unwrap();
            assert!(is_invalid(&out), "{status:?}: {out:?}");
        }
    }
}

async fn with_no_grace_window_presenting_a_rotated_token_again_is_reuse(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "nograce@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    let (mut r1, _) = rotate(&s.refresh, T0 + 100);
    r1.grace = 0;
    assert!(matches!(db.store.rotate_refresh(&r1).await.unwrap(), Rotation::Rotated { .. }));
    let (mut again, _) = rotate(&s.refresh, T0 + 100);
    again.grace = 0;
    match db.store.rotate_refresh(&again).await.unwrap() {
        Rotation::Reused { session_id, .. } => assert_eq!(session_id, s.id),
        other => panic!("expected Reused, got {other:?}"),
    }
    assert!(db.store.list_sessions(u.id, T0 + 100).await.unwrap().is_empty());
}

/// A rotation that committed but whose answer was lost (a group statement failing after
/// its commit) is run again alone: it must come back as done, even with no grace window.
async fn the_same_rotation_run_again_is_its_own_answer_not_reuse(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "again@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    let (mut r, next) = rotate(&s.refresh, T0 + 100);
    r.grace = 0;
    let first = db.store.rotate_refresh(&r).await.unwrap();
    let Rotation::Rotated { refresh_expires_at: expires, .. } = first else {
        panic!("expected Rotated, got {first:?}")
    };
    match db.store.rotate_refresh(&r).await.unwrap() {
        Rotation::Rotated { session, refresh_expires_at, .. } => {
            assert_eq!(session.id, s.id);
            assert_eq!(refresh_expires_at, expires);
        }
        other => panic!("expected Rotated again, got {other:?}"),
    }
    // The session lives on and the successor works.
    assert_eq!(db.store.list_sessions(u.id, T0 + 100).await.unwrap().len(), 1);
    let (r2, _) = rotate(&next, T0 + 200);
    assert!(matches!(db.store.rotate_refresh(&r2).await.unwrap(), Rotation::Rotated { .. }));
}

/// The same, arriving together with ordinary rotations (so, most likely, in one group).
async fn a_rotation_run_again_among_others_spoils_none_of_them(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "again-many@example.test").await;
    for round in 0..5 {
        let s = login(&*db.store, u.id, T0).await;
        let others: Vec<Opened> = futures::future::join_all((0..10).map(|_| login(&*db.store, u.id, T0))).await;
        let (again, _) = rotate(&s.refresh, T0 + 100);
        assert!(matches!(db.store.rotate_refresh(&again).await.unwrap(), Rotation::Rotated { .. }));
        let attempts: Vec<_> =
            std::iter::once(again).chain(others.iter().map(|o| rotate(&o.refresh, T0 + 100).0)).collect();
        let results = futures::future::join_all(attempts.iter().map(|r| db.store.rotate_refresh(r))).await;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(Rotation::Rotated { .. }) => {}
                other => panic!("round {round}, attempt {i}: expected Rotated, got {other:?}"),
            }
        }
    }
}

/// (On PostgreSQL refresh tokens keep no foreign key to their session: migration 0005.)
async fn a_token_whose_session_an_operator_deleted_is_invalid(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "gone@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    let other = login(&*db.store, u.id, T0).await;
    sqlx::any::install_default_drivers();
    let operator = sqlx::AnyPool::connect(&db.url).await.unwrap();
    sqlx::query(&format!("DELETE FROM sessions WHERE id = '{}'", s.id)).execute(&operator).await.unwrap();
    operator.close().await;
    // Both alone and among other rotations (PostgreSQL groups them in one statement).
    let (r, _) = rotate(&s.refresh, T0 + 100);
    assert!(is_invalid(&db.store.rotate_refresh(&r).await.unwrap()));
    let (r, _) = rotate(&s.refresh, T0 + 101);
    let (o, _) = rotate(&other.refresh, T0 + 101);
    let (gone, kept) = tokio::join!(db.store.rotate_refresh(&r), db.store.rotate_refresh(&o));
    assert!(is_invalid(&gone.unwrap()));
    assert!(matches!(kept.unwrap(), Rotation::Rotated { .. }));
}
