//! Everything else: health, audit events, rate limits, signing keys and the purge.

use gatehouse::config::RateLimit;
use gatehouse::crypto::jwt::SigningKey;
use gatehouse::crypto::tokens::hash_token;
use gatehouse::store::{Event, Reservation};
use serde_json::json;

use crate::both_backends;
use crate::support::*;

both_backends!(
    the_store_answers_a_ping_and_names_its_backend,
    events_are_listed_per_user_newest_first_up_to_the_limit,
    a_rate_limit_allows_its_requests_per_window_then_answers_the_seconds_left,
    each_rate_limit_key_counts_on_its_own,
    the_first_signing_key_stays_active_and_later_candidates_are_ignored,
    the_purge_removes_tokens_and_rate_windows_over_a_day_old_and_expired_refresh_tokens,
    the_purge_forgets_failure_counts_untouched_for_thirty_days_but_never_a_hard_lock,
    a_hit_from_an_instance_whose_clock_lags_counts_in_the_newer_window,
);

async fn the_store_answers_a_ping_and_names_its_backend(b: Backend) {
    let db = Db::new(b).await;
    db.store.ping().await.unwrap();
    let expected = match b {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(db.store.backend(), expected);
}

fn event(user: Option<uuid::Uuid>, kind: &str, at: i64, n: u32) -> Event {
    Event {
        user_id: user,
        email: Some("events@example.test".into()),
        kind: kind.to_owned(),
        at,
        ip: Some("198.51.100.1".into()),
        user_agent: Some("ua".into()),
        detail: json!({"n": n}),
    }
}

async fn events_are_listed_per_user_newest_first_up_to_the_limit(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "events@example.test").await;
    let other = user(&*db.store, "other@example.test").await;
    for n in 0..20u32 {
        db.store.record_event(&event(Some(u.id), "login", T0 + i64::from(n), n)).await.unwrap();
        if n == 3 {
            db.store.record_event(&event(Some(other.id), "lockout", T0, 99)).await.unwrap();
            db.store.record_event(&event(None, "login_failed", T0, 98)).await.unwrap();
        }
    }
    let latest = db.store.list_events(u.id, 3).await.unwrap();
    let ns: Vec<_> = latest.iter().map(|e| e.detail["n"].clone()).collect();
    assert_eq!(ns, vec![json!(19), json!(18), json!(17)]);
    let e = &latest[0];
    assert_eq!(e.user_id, Some(u.id));
    assert_eq!(e.email.as_deref(), Some("events@example.test"));
    assert_eq!(e.kind, "login");
    assert_eq!(e.at, T0 + 19);
    assert_eq!(e.ip.as_deref(), Some("198.51.100.1"));
    assert_eq!(e.user_agent.as_deref(), Some("ua"));

    let all = db.store.list_events(u.id, 100).await.unwrap();
    let ns: Vec<_> = all.iter().map(|e| e.detail["n"].clone()).collect();
    assert_eq!(ns, (0..20).rev().map(|n| json!(n)).collect::<Vec<_>>());
    let theirs = db.store.list_events(other.id, 100).await.unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].kind, "lockout");
}

fn limit(requests: u32, per_seconds: u32) -> RateLimit {
    RateLimit { requests, per_seconds }
}

async fn a_rate_limit_allows_its_requests_per_window_then_answers_the_seconds_left(b: Backend) {
    let db = Db::new(b).await;
    let l = limit(3, 60);
    // T0 is a multiple of 60, so windows start at T0, T0 + 60, ...
    assert_eq!(T0 % 60, 0);
    for _ in 0..3 {
        assert_eq!(db.store.hit_rate_limit("ip:a", l, T0 + 10).await.unwrap(), None);
    }
    assert_eq!(db.store.hit_rate_limit("ip:a", l, T0 + 10).await.unwrap(), Some(50));
    assert_eq!(db.store.hit_rate_limit("ip:a", l, T0 + 59).await.unwrap(), Some(1));
    // A new window starts over.
    for _ in 0..3 {
        assert_eq!(db.store.hit_rate_limit("ip:a", l, T0 + 60).await.unwrap(), None);
    }
    assert_eq!(db.store.hit_rate_limit("ip:a", l, T0 + 75).await.unwrap(), Some(45));
    // A window later than the next one starts over too.
    assert_eq!(db.store.hit_rate_limit("ip:a", l, T0 + 1000).await.unwrap(), None);
}

async fn each_rate_limit_key_counts_on_its_own(b: Backend) {
    let db = Db::new(b).await;
    let l = limit(1, 10);
    assert_eq!(db.store.hit_rate_limit("ip:a", l, T0).await.unwrap(), None);
    assert_eq!(db.store.hit_rate_limit("ip:a", l, T0).await.unwrap(), Some(10));
    assert_eq!(db.store.hit_rate_limit("ip:b", l, T0).await.unwrap(), None);
    assert_eq!(db.store.hit_rate_limit("ip:b", l, T0 + 9).await.unwrap(), Some(1));
}

async fn the_first_signing_key_stays_active_and_later_candidates_are_ignored(b: Backend) {
    let db = Db::new(b).await;
    let first = SigningKey::generate(T0).unwrap();
    let (active, all) = db.store.signing_keys(&first).await.unwrap();
    assert_eq!(active.kid, first.kid);
    assert_eq!(active.private_pkcs8, first.private_pkcs8);
    assert_eq!(active.public, first.public);
    assert_eq!(active.created_at, T0);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].kid, first.kid);

    let later = SigningKey::generate(T0 + 100).unwrap();
    let (active, all) = db.store.signing_keys(&later).await.unwrap();
    assert_eq!(active.kid, first.kid);
    assert_eq!(active.private_pkcs8, first.private_pkcs8);
    assert_eq!(all.len(), 1);

    // Another instance on the same database gets the same key.
    let again = db.another_instance().await;
    let (active, _) = again.signing_keys(&SigningKey::generate(T0 + 200).unwrap()).await.unwrap();
    assert_eq!(active.kid, first.kid);
}

async fn the_purge_removes_tokens_and_rate_windows_over_a_day_old_and_expired_refresh_tokens(b: Backend) {
    const DAY: i64 = 86_400;
    let db = Db::new(b).await;
    let s = &*db.store;
    let purge_at = T0 + 10 + DAY + 1;

    // Expired more than a day before the purge: three one-time tokens.
    let old = user(s, "old@example.test").await;
    let (_, l) = one_time(T0 + 10);
    let (_, c) = one_time_code(T0 + 10);
    s.issue_verification(old.id, &l, &c, T0).await.unwrap();
    let (_, r) = one_time(T0 + 10);
    s.issue_reset(old.id, &r, T0).await.unwrap();
    // A refresh token past its expiry.
    let (_, mut ns) = new_session(old.id, T0);
    ns.refresh_expires_at = T0 + 20;
    s.open_session(&ns, 0).await.unwrap().expect("session opened");
    // A rate window more than a day old.
    s.hit_rate_limit("ip:old", limit(10, 60), T0).await.unwrap();

    // Kept: live tokens, a token expired less than a day ago, a recent window and
    // a live refresh token.
    let live = user(s, "live@example.test").await;
    let (link, l) = one_time(purge_at + 3600);
    let (_, c) = one_time_code(purge_at + 3600);
    s.issue_verification(live.id, &l, &c, T0).await.unwrap();
    let recent = user(s, "recent@example.test").await;
    let (_, r) = one_time(purge_at - 100);
    s.issue_reset(recent.id, &r, T0).await.unwrap();
    let recent_window = (purge_at - 3600) / 60 * 60;
    s.hit_rate_limit("ip:recent", limit(10, 60), recent_window).await.unwrap();
    let session = login(s, live.id, T0).await;

    assert_eq!(s.purge_expired(purge_at).await.unwrap(), 5);
    assert_eq!(s.purge_expired(purge_at).await.unwrap(), 0);

    // What was kept still works.
    assert!(s.verify_email_by_link(&hash_token(&link), purge_at).await.unwrap().is_some());
    let (rot, _) = rotate(&session.refresh, purge_at);
    assert!(matches!(s.rotate_refresh(&rot).await.unwrap(), gatehouse::store::Rotation::Rotated { .. }));
    assert_eq!(
        s.hit_rate_limit("ip:recent", limit(1, 60), recent_window).await.unwrap(),
        Some(60),
        "the recent window kept its count"
    );

    // A day after their expiry, the rest go too: the reset token and the window.
    assert_eq!(s.purge_expired(purge_at - 100 + DAY + 1).await.unwrap(), 2);
}

async fn the_purge_forgets_failure_counts_untouched_for_thirty_days_but_never_a_hard_lock(b: Backend) {
    const DAY: i64 = 86_400;
    let db = Db::new(b).await;
    let s = &*db.store;
    let p = policy("2:60", 3);
    // Two failures (a 60 s lock) at T0, never touched again.
    s.reserve_login("stale@example.test", &p, T0).await.unwrap();
    s.reserve_login("stale@example.test", &p, T0).await.unwrap();
    // Hard-locked at T0 + 120.
    for now in [T0, T0, T0 + 120] {
        s.reserve_login("hard@example.test", &p, now).await.unwrap();
    }
    // One failure a day before the purge.
    s.reserve_login("recent@example.test", &p, T0 + 29 * DAY).await.unwrap();

    assert_eq!(s.purge_expired(T0 + 30 * DAY).await.unwrap(), 0, "not yet 30 days");
    assert_eq!(s.purge_expired(T0 + 30 * DAY + 121).await.unwrap(), 1);
    let later = T0 + 30 * DAY + 200;
    assert_eq!(s.reserve_login("stale@example.test", &p, later).await.unwrap(), Reservation::Allowed { failures: 1 });
    assert_eq!(
        s.reserve_login("hard@example.test", &p, later).await.unwrap(),
        Reservation::Locked { retry_after: 60, settling: false },
        "a hard lock is never forgotten"
    );
    assert_eq!(s.reserve_login("recent@example.test", &p, later).await.unwrap(), Reservation::Allowed { failures: 2 });
    assert!(s.purge_expired(T0 + 365 * DAY).await.unwrap() >= 2);
    assert!(matches!(
        s.reserve_login("hard@example.test", &p, T0 + 365 * DAY).await.unwrap(),
        Reservation::Locked { .. }
    ));
}

async fn a_hit_from_an_instance_whose_clock_lags_counts_in_the_newer_window(b: Backend) {
    let db = Db::new(b).await;
    let lagging = db.another_instance().await;
    let l = limit(2, 60);
    assert_eq!(db.store.hit_rate_limit("ip:a", l, T0 + 60).await.unwrap(), None);
    // A second clock that is two seconds behind is still in the previous window.
    assert_eq!(lagging.hit_rate_limit("ip:a", l, T0 + 58).await.unwrap(), None);
    let over = lagging.hit_rate_limit("ip:a", l, T0 + 58).await.unwrap();
    assert!(matches!(over, Some(1..=60)), "counted in the newer window: {over:?}");
    assert_eq!(db.store.hit_rate_limit("ip:a", l, T0 + 61).await.unwrap(), Some(59));
    // The window did not move back: the next window starts over as usual.
    assert_eq!(db.store.hit_rate_limit("ip:a", l, T0 + 120).await.unwrap(), None);
}
