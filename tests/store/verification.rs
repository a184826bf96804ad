//! Email verification: links and codes, issue, expiry, attempts, single use.

use gatehouse::crypto::tokens::{hash_code, hash_token};
use gatehouse::store::NewUser;

use crate::both_backends;
use crate::support::*;

both_backends!(
    issuing_verification_supersedes_the_earlier_link_and_code,
    a_verification_link_verifies_the_email_once,
    a_verification_link_does_not_work_at_or_after_its_expiry,
    a_live_verification_is_an_unused_unexpired_link,
    verifying_keeps_the_first_verification_time,
    a_code_allows_exactly_max_attempts_reservations_then_none,
    a_code_is_reserved_only_for_its_own_email_while_it_is_live,
    verifying_by_code_consumes_the_code_and_the_link,
    verifying_by_link_consumes_the_code,
    codes_issued_within_a_day_share_a_budget_of_twice_max_attempts,
);

async fn issuing_verification_supersedes_the_earlier_link_and_code(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "v@example.test").await;
    let (link1, l1) = one_time(T0 + 3600);
    let (_, c1) = one_time_code(T0 + 3600);
    db.store.issue_verification(u.id, &l1, &c1, T0).await.unwrap();
    let (link2, l2) = one_time(T0 + 3600);
    let (code2, c2) = one_time_code(T0 + 3600);
    db.store.issue_verification(u.id, &l2, &c2, T0 + 10).await.unwrap();

    assert!(db.store.verify_email_by_link(&hash_token(&link1), T0 + 20).await.unwrap().is_none());
    let attempt = db.store.reserve_code_attempt("v@example.test", 5, T0 + 20).await.unwrap().unwrap();
    assert_eq!(attempt.token_id, c2.id, "only the newest code is live");
    assert_eq!(attempt.code_hash, hash_code(&c2.id.to_string(), &code2));
    assert!(db.store.verify_email_by_code(c1.id, T0 + 20).await.unwrap().is_none());
    let verified = db.store.verify_email_by_link(&hash_token(&link2), T0 + 20).await.unwrap().unwrap();
    assert_eq!(verified.id, u.id);
    assert_eq!(verified.email_verified_at, Some(T0 + 20));
}

async fn a_verification_link_verifies_the_email_once(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "once@example.test").await;
    let (link, l) = one_time(T0 + 3600);
    let (_, c) = one_time_code(T0 + 3600);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();

    let v = db.store.verify_email_by_link(&hash_token(&link), T0 + 5).await.unwrap().unwrap();
    assert_eq!(v.id, u.id);
    assert!(v.email_verified());
    assert_eq!(v.email_verified_at, Some(T0 + 5));
    assert_eq!(v.updated_at, T0 + 5);
    assert!(db.store.verify_email_by_link(&hash_token(&link), T0 + 6).await.unwrap().is_none());
    assert!(db.store.verify_email_by_link(&hash_token("not-a-link"), T0 + 6).await.unwrap().is_none());
    let stored = db.store.user_by_id(u.id).await.unwrap().unwrap();
    assert_eq!(stored.email_verified_at, Some(T0 + 5));
}

async fn a_verification_link_does_not_work_at_or_after_its_expiry(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "late@example.test").await;
    let (link, l) = one_time(T0 + 100);
    let (_, c) = one_time_code(T0 + 100);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    assert!(db.store.verify_email_by_link(&hash_token(&link), T0 + 100).await.unwrap().is_none());
    assert!(db.store.verify_email_by_link(&hash_token(&link), T0 + 101).await.unwrap().is_none());
    assert!(!db.store.user_by_id(u.id).await.unwrap().unwrap().email_verified());

    // One second before its expiry, a fresh link still works.
    let (link, l) = one_time(T0 + 300);
    let (_, c) = one_time_code(T0 + 300);
    db.store.issue_verification(u.id, &l, &c, T0 + 200).await.unwrap();
    assert!(db.store.verify_email_by_link(&hash_token(&link), T0 + 299).await.unwrap().is_some());
}

async fn a_live_verification_is_an_unused_unexpired_link(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "live@example.test").await;
    assert!(!db.store.has_live_verification(u.id, T0).await.unwrap());
    let (link, l) = one_time(T0 + 100);
    let (_, c) = one_time_code(T0 + 100);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    assert!(db.store.has_live_verification(u.id, T0 + 99).await.unwrap());
    assert!(!db.store.has_live_verification(u.id, T0 + 100).await.unwrap());
    let other = user(&*db.store, "other@example.test").await;
    assert!(!db.store.has_live_verification(other.id, T0).await.unwrap());
    db.store.verify_email_by_link(&hash_token(&link), T0 + 1).await.unwrap().unwrap();
    assert!(!db.store.has_live_verification(u.id, T0 + 2).await.unwrap());
}

async fn verifying_keeps_the_first_verification_time(b: Backend) {
    let db = Db::new(b).await;
    let u = db
        .store
        .create_user(NewUser { email_verified_at: Some(T0), ..new_user("already@example.test") })
        .await
        .unwrap()
        .unwrap();
    let (link, l) = one_time(T0 + 3600);
    let (_, c) = one_time_code(T0 + 3600);
    db.store.issue_verification(u.id, &l, &c, T0 + 10).await.unwrap();
    let v = db.store.verify_email_by_link(&hash_token(&link), T0 + 50).await.unwrap().unwrap();
    assert_eq!(v.email_verified_at, Some(T0));
    assert_eq!(v.updated_at, T0, "nothing changed");
}

async fn a_code_allows_exactly_max_attempts_reservations_then_none(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "code@example.test").await;
    let (_, l) = one_time(T0 + 900);
    let (code, c) = one_time_code(T0 + 900);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    for i in 0..3 {
        let a = db
            .store
            .reserve_code_attempt("code@example.test", 3, T0 + i)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("attempt {} of 3", i + 1));
        assert_eq!(a.token_id, c.id);
        assert_eq!(a.code_hash, hash_code(&c.id.to_string(), &code));
    }
    assert!(db.store.reserve_code_attempt("code@example.test", 3, T0 + 4).await.unwrap().is_none());
    // A new code starts with a fresh allowance.
    let (_, l) = one_time(T0 + 900);
    let (_, c2) = one_time_code(T0 + 900);
    db.store.issue_verification(u.id, &l, &c2, T0 + 10).await.unwrap();
    let a = db.store.reserve_code_attempt("code@example.test", 3, T0 + 11).await.unwrap().unwrap();
    assert_eq!(a.token_id, c2.id);
}

async fn a_code_is_reserved_only_for_its_own_email_while_it_is_live(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "mine@example.test").await;
    user(&*db.store, "yours@example.test").await;
    let (_, l) = one_time(T0 + 100);
    let (_, c) = one_time_code(T0 + 100);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    for email in ["yours@example.test", "nobody@example.test"] {
        assert!(db.store.reserve_code_attempt(email, 5, T0 + 1).await.unwrap().is_none());
    }
    assert!(db.store.reserve_code_attempt("mine@example.test", 5, T0 + 100).await.unwrap().is_none());
    assert!(db.store.reserve_code_attempt("mine@example.test", 5, T0 + 99).await.unwrap().is_some());
    // An expired code cannot be used even with a reservation made in time.
    assert!(db.store.verify_email_by_code(c.id, T0 + 100).await.unwrap().is_none());
}

async fn verifying_by_code_consumes_the_code_and_the_link(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "bycode@example.test").await;
    let (link, l) = one_time(T0 + 900);
    let (_, c) = one_time_code(T0 + 900);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    let a = db.store.reserve_code_attempt("bycode@example.test", 5, T0 + 1).await.unwrap().unwrap();
    let v = db.store.verify_email_by_code(a.token_id, T0 + 2).await.unwrap().unwrap();
    assert_eq!(v.id, u.id);
    assert_eq!(v.email_verified_at, Some(T0 + 2));
    assert!(db.store.verify_email_by_code(a.token_id, T0 + 3).await.unwrap().is_none());
    assert!(db.store.reserve_code_attempt("bycode@example.test", 5, T0 + 3).await.unwrap().is_none());
    assert!(db.store.verify_email_by_link(&hash_token(&link), T0 + 3).await.unwrap().is_none());
    assert!(!db.store.has_live_verification(u.id, T0 + 3).await.unwrap());
    // A link id is not a code.
    let (_, l2) = one_time(T0 + 900);
    let (_, c2) = one_time_code(T0 + 900);
    db.store.issue_verification(u.id, &l2, &c2, T0 + 4).await.unwrap();
    assert!(db.store.verify_email_by_code(l2.id, T0 + 5).await.unwrap().is_none());
}

async fn verifying_by_link_consumes_the_code(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "bylink@example.test").await;
    let (link, l) = one_time(T0 + 900);
    let (_, c) = one_time_code(T0 + 900);
    db.store.issue_verification(u.id, &l, &c, T0).await.unwrap();
    db.store.verify_email_by_link(&hash_token(&link), T0 + 1).await.unwrap().unwrap();
    assert!(db.store.reserve_code_attempt("bylink@example.test", 5, T0 + 2).await.unwrap().is_none());
    assert!(db.store.verify_email_by_code(c.id, T0 + 2).await.unwrap().is_none());
}

async fn codes_issued_within_a_day_share_a_budget_of_twice_max_attempts(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "budget@example.test").await;
    let e = "budget@example.test";
    let reserve_all = |now: i64| {
        let store = db.store.clone();
        async move {
            let mut n = 0;
            while store.reserve_code_attempt(e, 3, now).await.unwrap().is_some() {
                n += 1;
                assert!(n <= 3, "never more than max_attempts on one code");
            }
            n
        }
    };
    let issue = |at: i64| {
        let store = db.store.clone();
        async move {
            let (_, l) = one_time(at + 2 * 86_400);
            let (_, c) = one_time_code(at + 2 * 86_400);
            store.issue_verification(u.id, &l, &c, at).await.unwrap();
            c.id
        }
    };
    issue(T0).await;
    assert_eq!(reserve_all(T0 + 1).await, 3);
    issue(T0 + 10).await;
    assert_eq!(reserve_all(T0 + 11).await, 3);
    // Six tries on codes of the last 24 hours: a third code gets none.
    let third = issue(T0 + 20).await;
    assert_eq!(reserve_all(T0 + 21).await, 0);
    assert!(db.store.reserve_code_attempt(e, 3, T0 + 86_399).await.unwrap().is_none());
    // Once the first two codes are more than a day old, the third gets its tries.
    let a = db.store.reserve_code_attempt(e, 3, T0 + 10 + 86_400).await.unwrap().unwrap();
    assert_eq!(a.token_id, third);
    // The link still verifies whatever the code budget.
    let (link, l) = one_time(T0 + 3 * 86_400);
    let (_, c) = one_time_code(T0 + 3 * 86_400);
    db.store.issue_verification(u.id, &l, &c, T0 + 86_500).await.unwrap();
    assert!(db.store.verify_email_by_link(&hash_token(&link), T0 + 86_501).await.unwrap().is_some());
}
