//! Races between two store instances on one database, as two processes would run:
//! every count stays exact and every single-use secret is used once.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use gatehouse::config::RateLimit;
use gatehouse::crypto::jwt::SigningKey;
use gatehouse::crypto::tokens::{hash_token, unseal};
use gatehouse::store::{Reservation, Rotation, Store};
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::both_backends;
use crate::support::*;

both_backends!(
    fifty_simultaneous_login_reservations_on_two_instances_allow_exactly_five,
    twenty_simultaneous_rotations_of_one_token_rotate_once_and_grace_the_rest,
    simultaneous_rotations_of_mixed_tokens_each_get_their_own_answer,
    ten_simultaneous_logins_with_a_device_limit_of_two_leave_exactly_two_live_sessions,
    thirty_simultaneous_hits_on_a_limit_of_ten_let_exactly_ten_through,
    two_instances_starting_on_a_fresh_database_agree_on_one_signing_key,
    twenty_simultaneous_code_attempts_reserve_exactly_the_allowed_five,
    a_verification_link_used_simultaneously_verifies_exactly_once,
    a_reset_token_used_simultaneously_resets_exactly_once,
    ten_simultaneous_creations_of_one_email_create_exactly_one_user,
    ten_simultaneous_registrations_of_one_email_create_one_user_and_record_nine_attempts,
    twenty_simultaneous_key_creations_with_room_for_five_create_exactly_five,
);

/// Runs `n` calls at once, alternating between the two instances, released together.
async fn race<T, F, Fut>(n: usize, stores: &[Arc<dyn Store>; 2], f: F) -> Vec<T>
where
    F: Fn(usize, Arc<dyn Store>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let fut = f(i, stores[i % 2].clone());
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                fut.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

async fn two_instances(b: Backend) -> (Db, [Arc<dyn Store>; 2]) {
    let db = Db::new(b).await;
    let second = db.another_instance().await;
    let stores = [db.store.clone(), second];
    (db, stores)
}

async fn fifty_simultaneous_login_reservations_on_two_instances_allow_exactly_five(b: Backend) {
    let (db, stores) = two_instances(b).await;
    let p = default_policy();
    let results = race(50, &stores, |_, s| {
        let p = p.clone();
        async move { s.reserve_login("target@example.test", &p, T0).await.unwrap() }
    })
    .await;
    let mut counted: Vec<u32> = results
        .iter()
        .filter_map(|r| match r {
            Reservation::Allowed { failures } => Some(*failures),
            Reservation::Locked { .. } => None,
        })
        .collect();
    counted.sort_unstable();
    assert_eq!(counted, vec![1, 2, 3, 4, 5], "{results:?}");
    assert!(results
        .iter()
        .all(|r| matches!(r, Reservation::Allowed { .. } | Reservation::Locked { retry_after: 60, settling: true })));
    // The refused 45 were not counted.
    assert_eq!(
        db.store.reserve_login("target@example.test", &p, T0 + 60).await.unwrap(),
        Reservation::Allowed { failures: 6 }
    );
}

async fn twenty_simultaneous_rotations_of_one_token_rotate_once_and_grace_the_rest(b: Backend) {
    let (db, stores) = two_instances(b).await;
    let u = user(&*db.store, "race@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    let attempts: Vec<_> = (0..20).map(|_| rotate(&s.refresh, T0 + 100)).collect();
    let results = race(20, &stores, |i, store| {
        let r = attempts[i].0.clone();
        async move { store.rotate_refresh(&r).await.unwrap() }
    })
    .await;

    let winners: Vec<usize> =
        results.iter().enumerate().filter(|(_, r)| matches!(r, Rotation::Rotated { .. })).map(|(i, _)| i).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let w = winners[0];
    let (winning, winning_next) = &attempts[w];
    for (i, r) in results.iter().enumerate() {
        if i == w {
            continue;
        }
        match r {
            Rotation::Grace { sealed, session, .. } => {
                assert_eq!(sealed, &winning.sealed);
                assert_eq!(&unseal(sealed, &s.refresh).unwrap(), winning_next);
                assert_eq!(session.id, s.id);
            }
            other => panic!("attempt {i}: expected Grace, got {other:?}"),
        }
    }
    assert_eq!(db.store.list_sessions(u.id, T0 + 100).await.unwrap().len(), 1);

    // Only the winner's successor was installed.
    for (i, (_, next)) in attempts.iter().enumerate() {
        if i == w {
            continue;
        }
        let (r, _) = rotate(next, T0 + 101);
        assert!(matches!(db.store.rotate_refresh(&r).await.unwrap(), Rotation::Invalid));
    }
    let (r, _) = rotate(winning_next, T0 + 102);
    assert!(matches!(stores[1].rotate_refresh(&r).await.unwrap(), Rotation::Rotated { .. }));
}

/// Rotations arriving together are committed in groups (one statement per group on
/// PostgreSQL): each must still get the answer it would get alone.
async fn simultaneous_rotations_of_mixed_tokens_each_get_their_own_answer(b: Backend) {
    let db = Db::new(b).await;
    let sql = [open_sql(&db.url).await, open_sql(&db.url).await];
    let stores: [Arc<dyn Store>; 2] = [sql[0].clone(), sql[1].clone()];
    let active = user(&*db.store, "mixed@example.test").await;
    let leaving = user(&*db.store, "leaving@example.test").await;
    let live: Vec<Opened> = futures::future::join_all((0..12).map(|_| login(&*db.store, active.id, T0))).await;
    let ended = login(&*db.store, active.id, T0).await;
    assert!(logout(&*db.store, active.id, ended.id, T0 + 1).await);
    let suspended = login(&*db.store, leaving.id, T0).await;
    let suspend =
        gatehouse::store::UserPatch { status: Some(gatehouse::domain::user::Status::Suspended), ..Default::default() };
    db.store.patch_user(leaving.id, &suspend, T0 + 1).await.unwrap().changed().expect("user exists");
    // Rotated before, within grace at T0 + 100: must come back as Grace, not Rotated.
    let earlier = login(&*db.store, active.id, T0).await;
    let (first, _) = rotate(&earlier.refresh, T0 + 90);
    assert!(matches!(db.store.rotate_refresh(&first).await.unwrap(), Rotation::Rotated { .. }));

    // 12 live tokens (the first presented twice), then unknown, ended, suspended, graced.
    let mut presented: Vec<String> = live.iter().map(|s| s.refresh.clone()).collect();
    presented.push(live[0].refresh.clone());
    presented.extend(["never-issued".to_owned(), ended.refresh.clone(), suspended.refresh.clone(), earlier.refresh]);
    let attempts: Vec<_> = presented.iter().map(|t| rotate(t, T0 + 100)).collect();
    let results = race(attempts.len(), &stores, |i, store| {
        let r = attempts[i].0.clone();
        async move { store.rotate_refresh(&r).await.unwrap() }
    })
    .await;

    for (i, s) in live.iter().enumerate().skip(1) {
        match &results[i] {
            Rotation::Rotated { session, user, refresh_expires_at } => {
                assert_eq!(session.id, s.id);
                assert_eq!(user.id, active.id);
                assert_eq!(*refresh_expires_at, T0 + 100 + REFRESH_TTL);
                assert_eq!(session.last_used_at, T0 + 100);
            }
            other => panic!("live token {i}: expected Rotated, got {other:?}"),
        }
    }
    // The token presented twice: one rotation, one grace answer with the same successor.
    let twice = [&results[0], &results[12]];
    let rotated = twice.iter().filter(|r| matches!(r, Rotation::Rotated { .. })).count();
    let graced = twice.iter().filter(|r| matches!(r, Rotation::Grace { .. })).count();
    assert_eq!((rotated, graced), (1, 1), "{twice:?}");
    for i in [13, 14, 15] {
        assert!(matches!(results[i], Rotation::Invalid), "attempt {i}: {:?}", results[i]);
    }
    assert!(matches!(results[16], Rotation::Grace { .. }), "{:?}", results[16]);
    // The 12 tokens were rotated by group statements, not by the one-by-one fallback.
    assert_eq!(sql[0].grouped_rotations() + sql[1].grouped_rotations(), 12);

    // Every successor handed out rotates next; the session's last use was recorded.
    for (i, s) in live.iter().enumerate().skip(1) {
        let (r, _) = rotate(&attempts[i].1, T0 + 200);
        assert!(matches!(db.store.rotate_refresh(&r).await.unwrap(), Rotation::Rotated { .. }), "chain {i}");
        let (stored, _) = db.store.session_with_user(s.id).await.unwrap().unwrap();
        assert_eq!(stored.last_used_at, T0 + 200);
    }
}

async fn ten_simultaneous_logins_with_a_device_limit_of_two_leave_exactly_two_live_sessions(b: Backend) {
    let (db, stores) = two_instances(b).await;
    let u = user(&*db.store, "devices@example.test").await;
    let sessions: Vec<_> = (0..10).map(|_| new_session(u.id, T0)).collect();
    let results = race(10, &stores, |i, store| {
        let s = sessions[i].1.clone();
        async move { store.open_session(&s, 2).await.unwrap().expect("session opened") }
    })
    .await;

    let live: Vec<Uuid> = db.store.list_sessions(u.id, T0).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(live.len(), 2, "{live:?}");
    let evicted: Vec<Uuid> = results.into_iter().flat_map(|(_, e)| e).collect();
    let evicted_set: HashSet<Uuid> = evicted.iter().copied().collect();
    assert_eq!(evicted.len(), 8, "each session is evicted once");
    assert_eq!(evicted_set.len(), 8);
    let all: HashSet<Uuid> = sessions.iter().map(|(o, _)| o.id).collect();
    let accounted: HashSet<Uuid> = evicted_set.iter().chain(live.iter()).copied().collect();
    assert_eq!(accounted, all);
    for id in &evicted {
        let (s, _) = db.store.session_with_user(*id).await.unwrap().unwrap();
        assert_eq!(s.ended_at, Some(T0));
    }
    // The audit trail (newest first) has each session's login before its end, in the
    // order the logins took effect, whichever waited for the other.
    let trail = db.store.list_events(u.id, 100).await.unwrap();
    let mut opened_at = std::collections::HashMap::new();
    for (pos, e) in trail.iter().enumerate().rev() {
        let sid = e.detail["session_id"].as_str().unwrap().to_owned();
        match e.kind.as_str() {
            "login" => {
                opened_at.insert(sid, pos);
            }
            "session_ended" => assert!(opened_at.contains_key(&sid), "{sid} ended before its login: {trail:#?}"),
            other => panic!("unexpected event {other}"),
        }
    }
    assert_eq!(opened_at.len(), 10);
}

async fn thirty_simultaneous_hits_on_a_limit_of_ten_let_exactly_ten_through(b: Backend) {
    let (_db, stores) = two_instances(b).await;
    let limit = RateLimit { requests: 10, per_seconds: 60 };
    let results =
        race(30, &stores, |_, store| async move { store.hit_rate_limit("ip:192.0.2.1", limit, T0 + 5).await.unwrap() })
            .await;
    assert_eq!(results.iter().filter(|r| r.is_none()).count(), 10);
    assert!(results.iter().all(|r| r.is_none() || *r == Some(55)));
}

async fn two_instances_starting_on_a_fresh_database_agree_on_one_signing_key(b: Backend) {
    for _ in 0..3 {
        let (_db, stores) = two_instances(b).await;
        let candidates = [SigningKey::generate(T0).unwrap(), SigningKey::generate(T0).unwrap()];
        assert_ne!(candidates[0].kid, candidates[1].kid);
        let results = race(2, &stores, |i, store| {
            let c = candidates[i].clone();
            async move { store.signing_keys(&c).await.unwrap() }
        })
        .await;
        let (a, all_a) = &results[0];
        let (b2, all_b) = &results[1];
        assert_eq!(a.kid, b2.kid);
        assert_eq!(a.private_pkcs8, b2.private_pkcs8);
        assert!(candidates.iter().any(|c| c.kid == a.kid));
        assert_eq!(all_a.len(), 1);
        assert_eq!(all_b.len(), 1);
    }
}

async fn twenty_simultaneous_code_attempts_reserve_exactly_the_allowed_five(b: Backend) {
    let (db, stores) = two_instances(b).await;
    let u = user(&*db.store, "code@example.test").await;
    let (_, l) = one_time(T0 + 900);
    let (_, c) = one_time_code(T0 + 900);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    let results = race(20, &stores, |_, store| async move {
        store.reserve_code_attempt("code@example.test", 5, T0 + 1).await.unwrap()
    })
    .await;
    let reserved: Vec<_> = results.iter().flatten().collect();
    assert_eq!(reserved.len(), 5);
    assert!(reserved.iter().all(|a| a.token_id == c.id));
}

async fn a_verification_link_used_simultaneously_verifies_exactly_once(b: Backend) {
    let (db, stores) = two_instances(b).await;
    let u = user(&*db.store, "link@example.test").await;
    let (link, l) = one_time(T0 + 900);
    let (_, c) = one_time_code(T0 + 900);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    let h = hash_token(&link);
    let results = race(10, &stores, |_, store| {
        let h = h.clone();
        async move { store.verify_email_by_link(&h, T0 + 1).await.unwrap() }
    })
    .await;
    assert_eq!(results.iter().filter(|r| r.is_some()).count(), 1);
}

async fn a_reset_token_used_simultaneously_resets_exactly_once(b: Backend) {
    let (db, stores) = two_instances(b).await;
    let u = user(&*db.store, "reset@example.test").await;
    login(&*db.store, u.id, T0).await;
    let (secret, t) = one_time(T0 + 900);
    db.store.issue_reset(u.id, &t, T0).await.unwrap();
    let h = hash_token(&secret);
    let results = race(10, &stores, |i, store| {
        let h = h.clone();
        async move { store.reset_password(&h, &format!("hash-{i}"), T0 + 1).await.unwrap() }
    })
    .await;
    let winners: Vec<_> = results.iter().flatten().collect();
    assert_eq!(winners.len(), 1);
    let (winner, ended) = winners[0];
    assert_eq!(ended.len(), 1);
    let stored = db.store.user_by_id(u.id).await.unwrap().unwrap();
    assert_eq!(stored.password_hash, winner.password_hash);
}

async fn ten_simultaneous_creations_of_one_email_create_exactly_one_user(b: Backend) {
    let (db, stores) = two_instances(b).await;
    let candidates: Vec<_> = (0..10).map(|_| new_user("same@example.test")).collect();
    let results = race(10, &stores, |i, store| {
        let nu = candidates[i].clone();
        async move { store.create_user(nu).await.unwrap() }
    })
    .await;
    let created: Vec<_> = results.iter().flatten().collect();
    assert_eq!(created.len(), 1);
    let stored = db.store.user_by_email("same@example.test").await.unwrap().unwrap();
    assert_eq!(stored.id, created[0].id);
}

async fn ten_simultaneous_registrations_of_one_email_create_one_user_and_record_nine_attempts(b: Backend) {
    let (db, stores) = two_instances(b).await;
    let candidates: Vec<_> = (0..10).map(|_| new_user("same@example.test")).collect();
    let results = race(10, &stores, |i, store| {
        let nu = candidates[i].clone();
        async move { store.register(nu, None, None).await.unwrap() }
    })
    .await;
    let created: Vec<_> = results.iter().flatten().collect();
    assert_eq!(created.len(), 1);
    let mut kinds: Vec<String> =
        db.store.list_events(created[0].id, 100).await.unwrap().into_iter().map(|e| e.kind).collect();
    kinds.sort();
    let mut expected = vec!["registration_attempt".to_owned(); 9];
    expected.push("registered".to_owned());
    expected.sort();
    assert_eq!(kinds, expected);
}

async fn twenty_simultaneous_key_creations_with_room_for_five_create_exactly_five(b: Backend) {
    let (db, stores) = two_instances(b).await;
    let u = user(&*db.store, "keys@example.test").await;
    let results = race(20, &stores, move |i, store| async move {
        let (secret, prefix) = gatehouse::crypto::tokens::new_api_key();
        let k = gatehouse::store::ApiKey {
            id: Uuid::new_v4(),
            user_id: u.id,
            name: format!("k{i}"),
            prefix,
            created_at: T0,
            expires_at: None,
            last_used_at: None,
        };
        store.create_api_key(&k, &hash_token(&secret), 5).await.unwrap()
    })
    .await;
    assert_eq!(results.iter().filter(|ok| **ok).count(), 5);
    assert_eq!(db.store.list_api_keys(u.id).await.unwrap().len(), 5);
}
