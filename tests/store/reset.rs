//! Password resets: single use, expiry, ended sessions, cleared lockout.

use gatehouse::crypto::tokens::hash_token;
use gatehouse::domain::user::Status;
use gatehouse::store::{Reservation, UserPatch};

use crate::both_backends;
use crate::support::*;

both_backends!(
    a_reset_sets_the_password_verifies_the_email_and_ends_every_session_once,
    a_reset_token_does_not_work_at_or_after_its_expiry,
    earlier_reset_tokens_stay_valid_until_one_is_used,
    a_live_reset_token_is_checked_without_using_it,
    a_reset_revokes_every_api_key_of_the_user,
    a_reset_clears_the_login_lockout_of_the_email_even_a_hard_lock,
    a_reset_is_refused_for_a_deleted_user_and_changes_nothing,
    a_verification_link_is_not_a_reset_token,
);

async fn a_reset_sets_the_password_verifies_the_email_and_ends_every_session_once(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "reset@example.test").await;
    let other = user(&*db.store, "other@example.test").await;
    let s1 = login(&*db.store, u.id, T0).await;
    let s2 = login(&*db.store, u.id, T0 + 1).await;
    let kept = login(&*db.store, other.id, T0).await;
    let (secret, t) = one_time(T0 + 3600);
    db.store.issue_reset(u.id, &t, T0 + 5).await.unwrap();

    let (after, mut ended) =
        db.store.reset_password(&hash_token(&secret), "reset-hash", T0 + 10).await.unwrap().unwrap();
    assert_eq!(after.id, u.id);
    assert_eq!(after.password_hash.as_deref(), Some("reset-hash"));
    assert_eq!(after.email_verified_at, Some(T0 + 10), "a reset proves the mailbox");
    assert_eq!(after.updated_at, T0 + 10);
    ended.sort();
    let mut expected = vec![s1.id, s2.id];
    expected.sort();
    assert_eq!(ended, expected);
    assert!(db.store.list_sessions(u.id, T0 + 10).await.unwrap().is_empty());
    assert_eq!(db.store.list_sessions(other.id, T0 + 10).await.unwrap()[0].id, kept.id);

    assert!(db.store.reset_password(&hash_token(&secret), "second-hash", T0 + 11).await.unwrap().is_none());
    let stored = db.store.user_by_id(u.id).await.unwrap().unwrap();
    assert_eq!(stored.password_hash.as_deref(), Some("reset-hash"));
    assert!(db.store.reset_password(&hash_token("unknown"), "x", T0 + 11).await.unwrap().is_none());
}

async fn a_reset_token_does_not_work_at_or_after_its_expiry(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "late@example.test").await;
    let (secret, t) = one_time(T0 + 100);
    db.store.issue_reset(u.id, &t, T0).await.unwrap();
    assert!(db.store.reset_password(&hash_token(&secret), "h", T0 + 100).await.unwrap().is_none());
    let stored = db.store.user_by_id(u.id).await.unwrap().unwrap();
    assert_eq!(stored.password_hash, u.password_hash);

    let (secret, t) = one_time(T0 + 300);
    db.store.issue_reset(u.id, &t, T0 + 200).await.unwrap();
    assert!(db.store.reset_password(&hash_token(&secret), "h", T0 + 299).await.unwrap().is_some());
}

async fn earlier_reset_tokens_stay_valid_until_one_is_used(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "twice@example.test").await;
    let (first, t1) = one_time(T0 + 3600);
    db.store.issue_reset(u.id, &t1, T0).await.unwrap();
    let (second, t2) = one_time(T0 + 3600);
    db.store.issue_reset(u.id, &t2, T0 + 1).await.unwrap();
    assert!(db.store.reset_token_live(&hash_token(&first), T0 + 2).await.unwrap());
    assert!(db.store.reset_token_live(&hash_token(&second), T0 + 2).await.unwrap());

    // The older link is the one opened; the newer one is retired with it.
    let (after, _) = db.store.reset_password(&hash_token(&first), "h1", T0 + 2).await.unwrap().unwrap();
    assert_eq!(after.password_hash.as_deref(), Some("h1"));
    assert!(!db.store.reset_token_live(&hash_token(&second), T0 + 3).await.unwrap());
    assert!(db.store.reset_password(&hash_token(&second), "h2", T0 + 3).await.unwrap().is_none());
    let stored = db.store.user_by_id(u.id).await.unwrap().unwrap();
    assert_eq!(stored.password_hash.as_deref(), Some("h1"));

    // Another user's reset token is not retired by this one.
    let other = user(&*db.store, "other@example.test").await;
    let (theirs, t3) = one_time(T0 + 3600);
    db.store.issue_reset(other.id, &t3, T0).await.unwrap();
    let (mine, t4) = one_time(T0 + 3600);
    db.store.issue_reset(u.id, &t4, T0 + 10).await.unwrap();
    db.store.reset_password(&hash_token(&mine), "h3", T0 + 11).await.unwrap().unwrap();
    assert!(db.store.reset_token_live(&hash_token(&theirs), T0 + 11).await.unwrap());

    // Issuing a reset leaves verification secrets alone.
    let (link, l) = one_time(T0 + 3600);
    let (_, c) = one_time_code(T0 + 3600);
    let v = user(&*db.store, "both@example.test").await;
    db.store.issue_verification(v.id, &l, &c, T0).await.unwrap();
    let (_, r) = one_time(T0 + 3600);
    db.store.issue_reset(v.id, &r, T0 + 1).await.unwrap();
    assert!(db.store.verify_email_by_link(&hash_token(&link), T0 + 2).await.unwrap().is_some());
}

async fn a_live_reset_token_is_checked_without_using_it(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "check@example.test").await;
    let (secret, t) = one_time(T0 + 100);
    db.store.issue_reset(u.id, &t, T0).await.unwrap();
    for _ in 0..3 {
        assert!(db.store.reset_token_live(&hash_token(&secret), T0 + 99).await.unwrap());
    }
    assert!(!db.store.reset_token_live(&hash_token(&secret), T0 + 100).await.unwrap());
    assert!(!db.store.reset_token_live(&hash_token("unknown"), T0).await.unwrap());
    // A verification link is not a reset token.
    let (link, l) = one_time(T0 + 100);
    let (_, c) = one_time_code(T0 + 100);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    assert!(!db.store.reset_token_live(&hash_token(&link), T0 + 1).await.unwrap());
    // Checking used nothing up.
    db.store.reset_password(&hash_token(&secret), "h", T0 + 99).await.unwrap().unwrap();
    assert!(!db.store.reset_token_live(&hash_token(&secret), T0 + 99).await.unwrap());
}

async fn a_reset_revokes_every_api_key_of_the_user(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "keys@example.test").await;
    let other = user(&*db.store, "other@example.test").await;
    let mut secrets = Vec::new();
    for (owner, name) in [(u.id, "a"), (u.id, "b"), (other.id, "theirs")] {
        let (secret, prefix) = gatehouse::crypto::tokens::new_api_key();
        let k = gatehouse::store::ApiKey {
            id: uuid::Uuid::new_v4(),
            user_id: owner,
            name: name.into(),
            prefix,
            created_at: T0,
            expires_at: None,
            last_used_at: None,
        };
        assert!(db.store.create_api_key(&k, &hash_token(&secret), 50).await.unwrap());
        secrets.push(secret);
    }
    let (secret, t) = one_time(T0 + 3600);
    db.store.issue_reset(u.id, &t, T0).await.unwrap();
    db.store.reset_password(&hash_token(&secret), "h", T0 + 1).await.unwrap().unwrap();
    assert!(db.store.list_api_keys(u.id).await.unwrap().is_empty());
    for s in &secrets[..2] {
        assert!(db.store.api_key_user(&hash_token(s), T0 + 2).await.unwrap().is_none());
    }
    assert_eq!(db.store.list_api_keys(other.id).await.unwrap().len(), 1);
    assert!(db.store.api_key_user(&hash_token(&secrets[2]), T0 + 2).await.unwrap().is_some());
}

async fn a_reset_clears_the_login_lockout_of_the_email_even_a_hard_lock(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "locked@example.test").await;
    let p = policy("2:60", 3);
    for n in 1..=3 {
        let now = T0 + 100 * i64::from(n);
        assert_eq!(
            db.store.reserve_login("locked@example.test", &p, now).await.unwrap(),
            Reservation::Allowed { failures: n }
        );
    }
    assert!(matches!(
        db.store.reserve_login("locked@example.test", &p, T0 + 100_000).await.unwrap(),
        Reservation::Locked { .. }
    ));
    // Another email's count is not touched by this reset.
    db.store.reserve_login("bystander@example.test", &p, T0).await.unwrap();

    let (secret, t) = one_time(T0 + 200_000);
    db.store.issue_reset(u.id, &t, T0 + 100_000).await.unwrap();
    db.store.reset_password(&hash_token(&secret), "h", T0 + 100_001).await.unwrap().unwrap();
    assert_eq!(
        db.store.reserve_login("locked@example.test", &p, T0 + 100_002).await.unwrap(),
        Reservation::Allowed { failures: 1 }
    );
    assert_eq!(
        db.store.reserve_login("bystander@example.test", &p, T0 + 100_002).await.unwrap(),
        Reservation::Allowed { failures: 2 }
    );
}

async fn a_reset_is_refused_for_a_deleted_user_and_changes_nothing(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "gone@example.test").await;
    let p = default_policy();
    for _ in 0..5 {
        db.store.reserve_login("gone@example.test", &p, T0).await.unwrap();
    }
    let (secret, t) = one_time(T0 + 3600);
    db.store.issue_reset(u.id, &t, T0).await.unwrap();
    db.store
        .patch_user(u.id, &UserPatch { status: Some(Status::Deleted), ..UserPatch::default() }, T0 + 1)
        .await
        .unwrap()
        .changed()
        .unwrap();
    assert!(db.store.reset_password(&hash_token(&secret), "h", T0 + 2).await.unwrap().is_none());
    let stored = db.store.user_by_id(u.id).await.unwrap().unwrap();
    assert_eq!(stored.password_hash, u.password_hash);
    assert_eq!(stored.status, Status::Deleted);
    assert_eq!(stored.email_verified_at, None);
    assert_eq!(
        db.store.reserve_login("gone@example.test", &p, T0 + 3).await.unwrap(),
        Reservation::Locked { retry_after: 57, settling: false },
        "the lockout is not cleared"
    );
}

async fn a_verification_link_is_not_a_reset_token(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "kinds@example.test").await;
    let (link, l) = one_time(T0 + 3600);
    let (_, c) = one_time_code(T0 + 3600);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    assert!(db.store.reset_password(&hash_token(&link), "h", T0 + 1).await.unwrap().is_none());
    let (reset, r) = one_time(T0 + 3600);
    db.store.issue_reset(u.id, &r, T0).await.unwrap();
    assert!(db.store.verify_email_by_link(&hash_token(&reset), T0 + 1).await.unwrap().is_none());
}
