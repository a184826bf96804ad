//! Progressive lockout per email, exact under concurrency; per-IP rate limit;
//! hashing admission control.

use gatehouse::clock::Clock;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::{both_backends, postgres_only};

both_backends!(
    every_tier_boundary_locks_on_the_right_failure,
    retry_after_counts_down_and_the_right_password_waits_it_out,
    unknown_emails_lock_the_same_way,
    a_success_resets_the_count,
    the_hard_lock_holds_until_a_reset_or_an_admin_unlock,
    fifty_simultaneous_guesses_check_at_most_five_passwords,
    simultaneous_logins_with_the_right_password_all_get_in,
    a_lock_whose_attempt_never_settles_it_is_waited_for_two_seconds_at_most,
    an_attempt_abandoned_mid_check_is_still_checked_and_recorded,
    an_attempt_abandoned_in_the_queue_leaves_its_lockout_in_the_trail_unchecked,
    a_right_password_abandoned_mid_check_clears_the_count_and_changes_nothing,
    a_password_change_abandoned_during_its_new_hash_changes_nothing,
    a_login_abandoned_while_it_waits_for_a_lock_is_not_counted,
    shutdown_waits_for_a_check_whose_client_hung_up,
    the_per_ip_limit_answers_429_with_retry_after,
    forwarded_for_counts_only_from_trusted_proxies,
    a_full_hashing_queue_answers_503_at_once,
    a_locked_email_hears_429_even_when_hashing_is_full,
    a_refused_login_hears_a_lock_that_began_more_than_a_second_after_the_last_refusal,
);

postgres_only!(
    a_locked_email_hears_429_at_once_while_another_email_s_logins_wait_on_its_row,
    another_email_logs_in_while_one_email_s_logins_wait_on_its_counter_row,
    another_user_logs_in_while_one_user_s_logins_wait_on_the_user_row,
);

async fn fail(app: &TestApp, email: &str) -> reqwest::Response {
    app.login(email, "wrong password!").await
}

/// Whether `n` hashes came to be running (the pool's gauge says so) within 500 looks at `/metrics`.
async fn hashes_run(app: &TestApp, n: usize) -> bool {
    gauge_reaches(app, &format!("gatehouse_password_hash_running {n}")).await
}

/// Whether `n` hashing places came to be held (the pool's gauge says so) within 500 looks at `/metrics`.
async fn hashing_holds(app: &TestApp, n: usize) -> bool {
    gauge_reaches(app, &format!("gatehouse_password_hash_in_flight {n}")).await
}

/// Whether `/metrics` came to hold the line `line` within 10 s.
async fn gauge_reaches(app: &TestApp, line: &str) -> bool {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < until {
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if metrics.lines().any(|l| l == line) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    false
}

/// An operator's connection holding `email`'s row of `table` (PostgreSQL) until it
/// sends `ROLLBACK`.
async fn hold_row(app: &TestApp, table: &str, email: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut operator = sqlx::PgConnection::connect(&app.db_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut operator).await.unwrap();
    sqlx::query(&format!("SELECT 1 FROM {table} WHERE email = $1 FOR UPDATE"))
        .bind(email)
        .fetch_one(&mut operator)
        .await
        .unwrap();
    operator
}

/// `n` logins of `email` with the right password, under way.
fn logins_of(app: &TestApp, email: &str, n: usize) -> Vec<tokio::task::JoinHandle<reqwest::Response>> {
    (0..n)
        .map(|_| {
            let (client, url) = (app.client.clone(), app.url("/v1/auth/login"));
            let body = json!({"email": email, "password": PASSWORD});
            tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap() })
        })
        .collect()
}

/// Fails `n` times, asserting each is a plain 401.
async fn fail_n(app: &TestApp, email: &str, n: usize) {
    for i in 0..n {
        let r = fail(app, email).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "failure {} of {n}", i + 1);
    }
}

async fn every_tier_boundary_locks_on_the_right_failure(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.verified_user("tiers@example.com").await;
    fail_n(&app, "tiers@example.com", 5).await;
    let r = fail(&app, "tiers@example.com").await;
    assert_eq!(retry_after(&r), 60);
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
    app.clock.advance(60);
    fail_n(&app, "tiers@example.com", 5).await; // failures 6..=10; the 10th locks for 300 s
    let r = fail(&app, "tiers@example.com").await;
    assert_eq!(retry_after(&r), 300);
    app.clock.advance(300);
    fail_n(&app, "tiers@example.com", 10).await; // 11..=20; the 20th locks for an hour
    let r = fail(&app, "tiers@example.com").await;
    assert_eq!(retry_after(&r), 3600);
    app.clock.advance(3600);
    fail_n(&app, "tiers@example.com", 1).await; // the 21st locks again for an hour
    assert_eq!(retry_after(&fail(&app, "tiers@example.com").await), 3600);
}

async fn retry_after_counts_down_and_the_right_password_waits_it_out(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.verified_user("wait@example.com").await;
    fail_n(&app, "wait@example.com", 5).await;
    app.clock.advance(20);
    let r = app.login("wait@example.com", PASSWORD).await;
    assert_eq!(retry_after(&r), 40);
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
    app.clock.advance(39);
    assert_eq!(retry_after(&app.login("wait@example.com", PASSWORD).await), 1);
    app.clock.advance(1);
    assert_eq!(app.login("wait@example.com", PASSWORD).await.status(), StatusCode::OK);
}

async fn unknown_emails_lock_the_same_way(b: Backend) {
    let app = TestApp::spawn(b).await;
    fail_n(&app, "nobody@example.com", 5).await;
    let r = fail(&app, "NOBODY@example.com").await;
    assert_eq!(retry_after(&r), 60);
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
}

async fn a_success_resets_the_count(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.verified_user("reset@example.com").await;
    fail_n(&app, "reset@example.com", 4).await;
    assert_eq!(app.login("reset@example.com", PASSWORD).await.status(), StatusCode::OK);
    fail_n(&app, "reset@example.com", 4).await;
    assert_eq!(app.login("reset@example.com", PASSWORD).await.status(), StatusCode::OK);
}

async fn the_hard_lock_holds_until_a_reset_or_an_admin_unlock(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.admin("root@example.com").await;
    let user = app.verified_user("hard@example.com").await;
    for n in 1..=100 {
        let r = fail(&app, "hard@example.com").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "failure {n} is checked");
        app.clock.advance(3600);
    }
    app.clock.advance(10 * 86_400);
    let r = app.login("hard@example.com", PASSWORD).await;
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
    let admin = str_of(&app.login_ok("root@example.com").await, "access_token");
    let r = app.get_bearer(&format!("/v1/admin/users/{}/events", str_of(&user, "id")), &admin).await;
    let trail: Value = r.json().await.unwrap();
    let lock = trail["events"].as_array().unwrap().iter().find(|e| e["type"] == "lockout").unwrap();
    assert_eq!(lock["detail"], json!({"failures": 100, "permanent": true}), "the newest lockout is the hard one");
    let r = app.post_bearer(&format!("/v1/admin/users/{}/unlock", str_of(&user, "id")), &admin, None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.login("hard@example.com", PASSWORD).await.status(), StatusCode::OK);

    // Again, cleared this time by a completed password reset.
    for _ in 1..=100 {
        fail(&app, "hard@example.com").await;
        app.clock.advance(3600);
    }
    assert_eq!(app.login("hard@example.com", PASSWORD).await.status(), StatusCode::TOO_MANY_REQUESTS);
    app.post("/v1/auth/password/forgot", json!({"email": "hard@example.com"})).await;
    let mail = app.wait_mail("hard@example.com", "Reset").await;
    let r = app
        .post("/v1/auth/password/reset", json!({"token": link_token(&mail), "password": "a brand new passphrase"}))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.login("hard@example.com", "a brand new passphrase").await.status(), StatusCode::OK);
}

async fn fifty_simultaneous_guesses_check_at_most_five_passwords(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.verified_user("race@example.com").await;
    let guesses = (0..50).map(|_| fail(&app, "race@example.com"));
    let statuses: Vec<StatusCode> = futures::future::join_all(guesses).await.iter().map(|r| r.status()).collect();
    let checked = statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count();
    let locked = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!(checked, 5, "{statuses:?}");
    assert_eq!(locked, 45);
}

/// Ten logins at once with the right password: each is counted before its check, so the
/// fifth starts a lock while all are in flight. That lock is settling (a right password
/// may clear it), so the later ones wait for it instead of hearing 429 `account_locked`
/// for a lock that never holds (they did, with `Retry-After: 60`, before).
async fn simultaneous_logins_with_the_right_password_all_get_in(b: Backend) {
    // One hashing thread and a real hash: the ten are in flight together (with room
    // for all of them in the queue, so that none is refused for overload).
    let app = TestApp::spawn_with(b, |f| {
        f.merge(("hash_workers", 1))
            .merge(("hash_queue", 16))
            .merge(("password_hash", "argon2id:m=19456,t=2,p=1"))
            .merge(("device_limit", 0))
    })
    .await;
    app.verified_user("many@example.com").await;
    let logins = (0..10).map(|_| app.login("many@example.com", PASSWORD));
    let statuses: Vec<StatusCode> = futures::future::join_all(logins).await.iter().map(|r| r.status()).collect();
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    // Nothing is left locked or counted: four failures, and the fifth starts the lock.
    for _ in 0..5 {
        assert_problem(fail(&app, "many@example.com").await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    // Its check failed, so the lock is settled: logins now hear 429 without waiting.
    let (store, lockout) = (&app.state.services.store, &app.state.services.policy.lockout);
    let now = app.clock.now();
    let r = store.reserve_login("many@example.com", lockout, now).await.unwrap();
    assert_eq!(r, gatehouse::store::Reservation::Locked { retry_after: 60, settling: false });
    // A wrong current password on a password change settles the lock it starts too.
    let t = app.logged_in("changer@example.com").await;
    let body = json!({"current_password": "wrong password!", "new_password": "another long passphrase"});
    for _ in 0..5 {
        let r = app.post_bearer("/v1/me/password", &str_of(&t, "access_token"), Some(body.clone())).await;
        assert_problem(r, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    let r = store.reserve_login("changer@example.com", lockout, now).await.unwrap();
    assert_eq!(r, gatehouse::store::Reservation::Locked { retry_after: 60, settling: false });
}

/// The attempt that started a lock never says how its check ended (its instance stopped):
/// a login with the right password waits for it (about 2 s), then hears 429 with the
/// lock's time; once the store no longer calls the lock settling (3 s on its clock),
/// the answer comes without waiting.
async fn a_lock_whose_attempt_never_settles_it_is_waited_for_two_seconds_at_most(b: Backend) {
    use std::time::{Duration, Instant};
    let app = TestApp::spawn(b).await;
    app.verified_user("hung@example.com").await;
    // Five attempts counted, as if their instance had stopped before their checks ended.
    counted_attempts(&app, "hung@example.com", 5).await;
    let t = Instant::now();
    let r = app.login("hung@example.com", PASSWORD).await;
    let waited = t.elapsed();
    assert_eq!(retry_after(&r), 60);
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
    assert!(waited >= Duration::from_millis(1500), "answered after {waited:?}, before the lock could settle");
    app.clock.advance(3);
    let t = Instant::now();
    let r = app.login("hung@example.com", PASSWORD).await;
    let took = t.elapsed();
    assert_eq!(retry_after(&r), 57);
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
    assert!(took < Duration::from_millis(1500), "a settled lock still kept the login waiting {took:?}");
}

/// An app for the abandonment tests: one hashing thread and a slow hash, so
/// that a check can be caught running or waiting; an admin to read the trail.
async fn slow_hashing_app(b: Backend) -> (TestApp, String) {
    let app =
        TestApp::spawn_with(b, |f| f.merge(("hash_workers", 1)).merge(("password_hash", "argon2id:m=65536,t=6,p=1")))
            .await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    (app, admin)
}

/// Counts `n` attempts of `email` through the store, whose checks never say how they
/// ended (as if guessed; the fifth starts a lock, settling).
async fn counted_attempts(app: &TestApp, email: &str, n: usize) {
    let (store, lockout) = (&app.state.services.store, &app.state.services.policy.lockout);
    for _ in 0..n {
        store.reserve_login(email, lockout, app.clock.now()).await.unwrap();
    }
}

/// A login of `email` with `password`, sent on a task of its own (to be aborted: its
/// client hangs up).
fn login_in_background(
    app: &TestApp,
    email: &str,
    password: &str,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let url = app.url("/v1/auth/login");
    let body = json!({"email": email, "password": password});
    tokio::spawn(async move { reqwest::Client::new().post(url).json(&body).send().await })
}

/// User `id`'s trail as it stands.
async fn events(app: &TestApp, admin: &str, id: &str) -> Vec<Value> {
    let r = app.get_bearer(&format!("/v1/admin/users/{id}/events"), admin).await;
    r.json::<Value>().await.unwrap()["events"].as_array().unwrap().clone()
}

/// The first event of `kind` in user `id`'s trail, waited for up to 5 s.
async fn event_of(app: &TestApp, admin: &str, id: &str, kind: &str) -> Option<Value> {
    for _ in 0..100 {
        if let Some(e) = events(app, admin, id).await.into_iter().find(|e| e["type"] == kind) {
            return Some(e);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}

/// How many events of `kind` user `id`'s trail holds now.
async fn count_of(app: &TestApp, admin: &str, id: &str, kind: &str) -> usize {
    events(app, admin, id).await.iter().filter(|e| e["type"] == kind).count()
}

/// The right password of `email` hears 429 `account_locked` without waiting for the
/// lock to settle: the lock is settled.
async fn locked_at_once(app: &TestApp, email: &str) {
    let t = std::time::Instant::now();
    let r = app.login(email, PASSWORD).await;
    let took = t.elapsed();
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
    assert!(took < std::time::Duration::from_millis(1500), "the lock kept the login waiting {took:?}");
}

/// The attempt that reaches a tier is counted, and starts its lock, before its check.
/// If its client hangs up once the check runs, the check still ends and is acted on:
/// the failure and the lock are in the trail as for any wrong password, and the lock is
/// settled, so the right password hears 429 without waiting for it.
async fn an_attempt_abandoned_mid_check_is_still_checked_and_recorded(b: Backend) {
    let (app, admin) = slow_hashing_app(b).await;
    let id = str_of(&app.verified_user("gone@example.com").await, "id");
    counted_attempts(&app, "gone@example.com", 4).await;
    let attempt = login_in_background(&app, "gone@example.com", "wrong password!");
    assert!(hashes_run(&app, 1).await, "the fifth attempt's check never started");
    attempt.abort();
    let event = event_of(&app, &admin, &id, "lockout").await.expect("a lockout event for the abandoned attempt");
    assert_eq!(event["detail"], json!({"failures": 5, "seconds": 60}));
    let failed = event_of(&app, &admin, &id, "login_failed").await.expect("its failure in the trail");
    assert_eq!(failed["detail"], json!({"failures": 5}));
    locked_at_once(&app, "gone@example.com").await;
}

/// An attempt given up while its check waits in the queue is never checked (its hash
/// would only delay the others). The lock its count started holds, and the trail says
/// so (`unchecked`).
async fn an_attempt_abandoned_in_the_queue_leaves_its_lockout_in_the_trail_unchecked(b: Backend) {
    let (app, admin) = slow_hashing_app(b).await;
    app.verified_user("holder@example.com").await;
    let id = str_of(&app.verified_user("gone@example.com").await, "id");
    counted_attempts(&app, "gone@example.com", 4).await;
    // Another login holds the one hashing thread; the fifth attempt waits behind it.
    let holder = login_in_background(&app, "holder@example.com", PASSWORD);
    assert!(hashes_run(&app, 1).await, "the first login's check never started");
    let attempt = login_in_background(&app, "gone@example.com", "wrong password!");
    assert!(hashing_holds(&app, 2).await, "the fifth attempt never queued");
    attempt.abort();
    assert_eq!(holder.await.unwrap().unwrap().status(), StatusCode::OK);
    let event = event_of(&app, &admin, &id, "lockout").await.expect("a lockout event for the abandoned attempt");
    assert_eq!(event["detail"], json!({"failures": 5, "seconds": 60, "unchecked": true}));
    assert_eq!(count_of(&app, &admin, &id, "login_failed").await, 0, "an unchecked attempt failed nothing");
    // The lock holds, and is settled (no check will settle it).
    locked_at_once(&app, "gone@example.com").await;
}

/// A login given up while it waits for a settling lock is not counted once the lock
/// is gone: nobody would hear its check.
async fn a_login_abandoned_while_it_waits_for_a_lock_is_not_counted(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.verified_user("patient@example.com").await;
    // A settling lock: five attempts counted whose checks never said how they ended.
    counted_attempts(&app, "patient@example.com", 5).await;
    let (store, lockout) = (&app.state.services.store, &app.state.services.policy.lockout);
    let waiting = login_in_background(&app, "patient@example.com", PASSWORD);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    waiting.abort();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // The lock goes (a right password elsewhere); the abandoned login's next look finds
    // it gone (it looks at least every 160 ms).
    store.clear_login_failures("patient@example.com", app.clock.now()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let r = store.reserve_login("patient@example.com", lockout, app.clock.now()).await.unwrap();
    assert_eq!(r, gatehouse::store::Reservation::Allowed { failures: 1 }, "the abandoned login was counted");
}

/// A graceful shutdown (SIGTERM) waits for the checks under way, also one whose client
/// hung up: when the server has stopped, the wrong password is counted and in the
/// trail, and the lock its attempt started is settled. (Otherwise the runtime's end
/// would cancel the check, the store closed beneath it.)
async fn shutdown_waits_for_a_check_whose_client_hung_up(b: Backend) {
    let (mut app, _admin) = slow_hashing_app(b).await;
    let id = str_of(&app.verified_user("late@example.com").await, "id");
    counted_attempts(&app, "late@example.com", 4).await;
    let attempt = login_in_background(&app, "late@example.com", "wrong password!");
    assert!(hashes_run(&app, 1).await, "the attempt's check never started");
    attempt.abort();
    app.shut_down().await;
    let (store, lockout) = (&app.state.services.store, &app.state.services.policy.lockout);
    let trail = store.list_events(id.parse().unwrap(), 50).await.unwrap();
    let failed = trail.iter().find(|e| e.kind == "login_failed").expect("the failure recorded before the stop");
    assert_eq!(failed.detail, json!({"failures": 5}));
    let lock = store.login_lock_state("late@example.com", lockout, app.clock.now()).await.unwrap();
    assert_eq!(lock, (Some(60), false), "locked for 60 s, settled");
}

/// Whether `email`'s lock (the one its fifth attempt started) is gone within 10 s: the
/// abandoned attempt's task clears it after its check, on its own time.
async fn lock_goes(app: &TestApp, email: &str) -> bool {
    let (store, lockout) = (&app.state.services.store, &app.state.services.policy.lockout);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < until {
        if store.login_lock(email, lockout, app.clock.now()).await.unwrap().is_none() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

/// A right password whose client hangs up during the check is no guess: the count is
/// cleared, so the fifth attempt starts no lock, and nothing else happens (no session
/// for a login, no new password for a change).
async fn a_right_password_abandoned_mid_check_clears_the_count_and_changes_nothing(b: Backend) {
    let (app, admin) = slow_hashing_app(b).await;
    let id = str_of(&app.verified_user("back@example.com").await, "id");
    counted_attempts(&app, "back@example.com", 4).await;
    let attempt = login_in_background(&app, "back@example.com", PASSWORD);
    assert!(hashes_run(&app, 1).await, "the fifth attempt's check never started");
    attempt.abort();
    assert!(hashing_holds(&app, 0).await, "the check never ended");
    assert!(lock_goes(&app, "back@example.com").await, "the abandoned right password left the account locked");
    let t = app.login("back@example.com", PASSWORD).await;
    assert_eq!(t.status(), StatusCode::OK);
    let token = str_of(&t.json::<Value>().await.unwrap(), "access_token");
    let sessions: Value = app.get_bearer("/v1/me/sessions", &token).await.json().await.unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 1, "the abandoned login opened a session: {sessions}");
    assert_eq!(count_of(&app, &admin, &id, "login").await, 1);

    // A password change with the right current password, abandoned mid-check.
    counted_attempts(&app, "back@example.com", 4).await;
    let (url, token_) = (app.url("/v1/me/password"), token.clone());
    let body = json!({"current_password": PASSWORD, "new_password": "another long passphrase"});
    let change =
        tokio::spawn(async move { reqwest::Client::new().post(url).bearer_auth(token_).json(&body).send().await });
    assert!(hashes_run(&app, 1).await, "the change's check never started");
    change.abort();
    // The check ends; a change that went on would take a place again for the new
    // password's hash: give it time to (a slow hash is far longer than this).
    assert!(hashing_holds(&app, 0).await, "the check never ended");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(hashing_holds(&app, 0).await, "the change went on to hash a new password");
    assert!(lock_goes(&app, "back@example.com").await, "the abandoned right password left the account locked");
    let r = app.login("back@example.com", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::OK, "the old password no longer logs in, or the account locked");
    assert_eq!(count_of(&app, &admin, &id, "password_changed").await, 0);
}

/// A password change whose client hangs up after its check passed, while the new
/// password's hash runs: the hash ends, and the change looks once more before it
/// writes, so nothing changes (the old password still logs in, no `password_changed`).
async fn a_password_change_abandoned_during_its_new_hash_changes_nothing(b: Backend) {
    let (app, admin) = slow_hashing_app(b).await;
    let id = str_of(&app.verified_user("late@example.com").await, "id");
    let token = str_of(&app.login_ok("late@example.com").await, "access_token");
    // Four attempts counted and the change's own start a lock, which its right current
    // password clears just before the new password's hash: its going marks the step.
    counted_attempts(&app, "late@example.com", 4).await;
    let url = app.url("/v1/me/password");
    let body = json!({"current_password": PASSWORD, "new_password": "another long passphrase"});
    let change =
        tokio::spawn(async move { reqwest::Client::new().post(url).bearer_auth(token).json(&body).send().await });
    assert!(hashes_run(&app, 1).await, "the change's check never started");
    assert!(lock_goes(&app, "late@example.com").await, "the change's check never passed");
    assert!(hashes_run(&app, 1).await, "the new password's hash never started");
    change.abort();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !app.state.password_checks.is_empty() && std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(app.state.password_checks.is_empty(), "the change never ended");
    assert_eq!(count_of(&app, &admin, &id, "password_changed").await, 0);
    let r = app.login("late@example.com", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::OK, "the old password no longer logs in");
}

async fn the_per_ip_limit_answers_429_with_retry_after(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("rate_limit_per_ip", "3/60"))).await;
    for _ in 0..3 {
        let r = app.post("/v1/auth/resend-verification", json!({"email": "x@example.com"})).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let r = app.login("x@example.com", PASSWORD).await;
    let wait = retry_after(&r);
    assert!((1..=60).contains(&wait), "{wait}");
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // Only the auth endpoints are limited.
    assert_eq!(app.client.get(app.url("/healthz")).send().await.unwrap().status(), StatusCode::OK);
    app.clock.advance(60);
    assert_eq!(app.login("x@example.com", PASSWORD).await.status(), StatusCode::UNAUTHORIZED);
}

async fn forwarded_for_counts_only_from_trusted_proxies(b: Backend) {
    let send = |app: &TestApp, ip: &str| {
        app.client
            .post(app.url("/v1/auth/resend-verification"))
            .header("x-forwarded-for", ip)
            .json(&json!({"email": "x@example.com"}))
            .send()
    };
    let untrusted = TestApp::spawn_with(b, |f| f.merge(("rate_limit_per_ip", "2/60"))).await;
    assert_eq!(send(&untrusted, "1.1.1.1").await.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(send(&untrusted, "2.2.2.2").await.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(send(&untrusted, "3.3.3.3").await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);

    let trusted =
        TestApp::spawn_with(b, |f| f.merge(("rate_limit_per_ip", "2/60")).merge(("trusted_proxies", "127.0.0.1")))
            .await;
    for ip in ["1.1.1.1", "1.1.1.1", "2.2.2.2", "2.2.2.2"] {
        assert_eq!(send(&trusted, ip).await.unwrap().status(), StatusCode::ACCEPTED, "{ip}");
    }
    assert_eq!(send(&trusted, "1.1.1.1").await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
}

async fn a_full_hashing_queue_answers_503_at_once(b: Backend) {
    let app = TestApp::spawn_with(b, |f| {
        f.merge(("hash_workers", 1)).merge(("hash_queue", 1)).merge(("password_hash", "argon2id:m=65536,t=3,p=1"))
    })
    .await;
    let emails: Vec<String> = (0..12).map(|i| format!("flood{i}@example.com")).collect();
    let logins = emails.iter().map(|e| app.login(e, "some password"));
    let health = async {
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        app.client.get(app.url("/healthz")).send().await.unwrap().status()
    };
    let (results, health) = tokio::join!(futures::future::join_all(logins), health);
    assert_eq!(health, StatusCode::OK);
    let mut overloaded = 0;
    for r in results {
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(retry_after(&r), 1);
            assert_problem(r, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
            overloaded += 1;
        } else {
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
    }
    assert!(overloaded >= 1, "12 logins on 1 worker + 1 queue slot must overflow");
    // A login refused for overload is not counted as a failure.
    let r = app.login("flood0@example.com", "x").await;
    assert_ne!(r.status(), StatusCode::TOO_MANY_REQUESTS);
}

async fn a_locked_email_hears_429_even_when_hashing_is_full(b: Backend) {
    let app = TestApp::spawn_with(b, |f| {
        f.merge(("hash_workers", 1)).merge(("hash_queue", 1)).merge(("password_hash", "argon2id:m=65536,t=3,p=1"))
    })
    .await;
    app.verified_user("locked@example.com").await;
    fail_n(&app, "locked@example.com", 5).await;
    // Two slow logins take the worker and the queue's one place.
    let busy: Vec<String> = (0..2).map(|i| format!("busy{i}@example.com")).collect();
    let flood = futures::future::join_all(busy.iter().map(|e| fail(&app, e)));
    let probes = async {
        // Once both hold their places (the pool's gauge says so).
        assert!(hashing_holds(&app, 2).await, "the two slow logins never held both places");
        (app.login("locked@example.com", PASSWORD).await, fail(&app, "other@example.com").await)
    };
    let (flood, (locked, other)) = tokio::join!(flood, probes);
    assert_problem(other, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
    assert_eq!(retry_after(&locked), 60);
    assert_problem(locked, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
    for r in flood {
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
}

/// Logins of one email wait on its counter's row while another login of it commits
/// (here an operator holds the row). Even when such logins hold every hashing place and
/// every counters' connection, the overload path's lock read answers at once.
async fn a_locked_email_hears_429_at_once_while_another_email_s_logins_wait_on_its_row() {
    use std::time::{Duration, Instant};
    // 8 pool connections: 2 for the counters. Hashing: 1 worker and 3 waiting places.
    let app = TestApp::spawn_with(Backend::Postgres, |f| {
        f.merge(("hash_workers", 1)).merge(("hash_queue", 3)).merge(("db_acquire_timeout", 3))
    })
    .await;
    app.verified_user("hot@example.com").await;
    app.verified_user("locked@example.com").await;
    fail_n(&app, "locked@example.com", 5).await;
    fail_n(&app, "hot@example.com", 1).await;
    let mut operator = hold_row(&app, "login_throttle", "hot@example.com").await;
    // Four logins of hot@ take the four hashing places, one of them a counters'
    // connection (the others wait their turn behind it), and wait.
    let waiting = logins_of(&app, "hot@example.com", 4);
    assert!(hashing_holds(&app, 4).await, "the four logins never held every hashing place");
    // Give them time to reach the row (each is in its statement, or waits for a connection).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let locked = app.login("locked@example.com", PASSWORD).await;
    let took = t.elapsed();
    let other = fail(&app, "other@example.com").await;
    // Only now does the row come free.
    sqlx::query("ROLLBACK").execute(&mut operator).await.unwrap();
    assert_eq!(retry_after(&locked), 60);
    assert_problem(locked, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
    assert!(took < Duration::from_secs(1), "the locked email waited {took:?} for its answer");
    assert_problem(other, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
    for w in waiting {
        assert_eq!(w.await.unwrap().status(), StatusCode::OK);
    }
}

/// An operator holds one of hot@'s rows (as another login of it does while it commits);
/// three logins of hot@ wait on it. A login of another email must not wait behind them:
/// only one of them may hold a connection of the set whose statement waits on that row
/// (two connections here, 8 in all), the others wait their turn without one.
async fn another_login_goes_through_while_hot_logins_wait_on(row: &str) {
    use sqlx::Connection;
    use std::time::{Duration, Instant};
    let app = TestApp::spawn_with(Backend::Postgres, |f| {
        f.merge(("hash_workers", 1)).merge(("hash_queue", 6)).merge(("db_acquire_timeout", 3))
    })
    .await;
    app.verified_user("hot@example.com").await;
    app.verified_user("calm@example.com").await;
    fail_n(&app, "hot@example.com", 1).await;
    let mut operator = hold_row(&app, row, "hot@example.com").await;
    let waiting = logins_of(&app, "hot@example.com", 3);
    // Once one waits on the row, give the others time to queue behind it.
    let mut watcher = sqlx::PgConnection::connect(&app.db_url).await.unwrap();
    let waits_on_a_lock = "SELECT count(*) FROM pg_stat_activity \
        WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let mut polls = 0;
    while sqlx::query_scalar::<_, i64>(waits_on_a_lock).fetch_one(&mut watcher).await.unwrap() == 0 {
        polls += 1;
        assert!(polls < 500, "no login came to wait on the row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let calm = app.login("calm@example.com", PASSWORD).await;
    let took = t.elapsed();
    let still_waiting = waiting.iter().filter(|w| !w.is_finished()).count();
    sqlx::query("ROLLBACK").execute(&mut operator).await.unwrap();
    assert_eq!(calm.status(), StatusCode::OK);
    assert!(took < Duration::from_secs(1), "another email's login waited {took:?} behind hot@'s");
    assert_eq!(still_waiting, 3, "hot@'s logins did not wait on the row: the test shows nothing");
    for w in waiting {
        assert_eq!(w.await.unwrap().status(), StatusCode::OK);
    }
}

async fn another_email_logs_in_while_one_email_s_logins_wait_on_its_counter_row() {
    another_login_goes_through_while_hot_logins_wait_on("login_throttle").await;
}

async fn another_user_logs_in_while_one_user_s_logins_wait_on_the_user_row() {
    another_login_goes_through_while_hot_logins_wait_on("users").await;
}

/// Logins refused for overload answer from the email's lock as read within the last
/// second (see `refused_locks`): a lock that began after a refusal is heard once that
/// read is a second old.
async fn a_refused_login_hears_a_lock_that_began_more_than_a_second_after_the_last_refusal(b: Backend) {
    use std::time::{Duration, Instant};
    let app = TestApp::spawn_with(b, |f| {
        f.merge(("hash_workers", 1)).merge(("hash_queue", 1)).merge(("password_hash", "argon2id:m=65536,t=3,p=1"))
    })
    .await;
    app.verified_user("soon@example.com").await;
    // While two slow logins hold both hashing places, a login of soon@ is refused.
    let refused_while_full = || async {
        let busy: Vec<String> = (0..2).map(|i| format!("busy{i}@example.com")).collect();
        let flood = futures::future::join_all(busy.iter().map(|e| fail(&app, e)));
        let probe = async {
            assert!(hashing_holds(&app, 2).await, "the two slow logins never held both places");
            (app.login("soon@example.com", PASSWORD).await, Instant::now())
        };
        tokio::join!(flood, probe).1
    };
    let (first, at) = refused_while_full().await;
    assert_problem(first, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
    fail_n(&app, "soon@example.com", 5).await;
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(at.elapsed())).await;
    let (second, _) = refused_while_full().await;
    assert_eq!(retry_after(&second), 60);
    assert_problem(second, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
}
