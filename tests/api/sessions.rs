//! Sessions: refresh rotation with grace and reuse detection, the device limit,
//! logout, listing and ending sessions, password change.

use gatehouse::clock::{rfc3339, Clock};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    refresh_rotates_and_rereads_the_user,
    parallel_refreshes_of_one_token_yield_one_successor,
    reuse_after_the_grace_window_ends_the_session_for_both_holders,
    expired_unknown_or_ended_refresh_tokens_are_invalid,
    the_login_beyond_the_device_limit_ends_the_oldest_session,
    an_idle_session_holds_no_place_but_the_calling_one_is_listed,
    parallel_logins_never_leave_more_than_the_device_limit,
    logout_stops_access_and_refresh_tokens_at_once,
    sessions_are_listed_with_current_and_ended_one_by_one_or_all_others,
    a_sessions_last_use_is_its_last_bearer_request_or_refresh_to_the_minute,
    changing_the_password_needs_the_current_one_and_ends_other_sessions,
    a_password_reset_ends_every_session,
);

async fn refresh(app: &TestApp, token: &str) -> reqwest::Response {
    app.post("/v1/auth/refresh", json!({"refresh_token": token})).await
}

async fn refresh_rotates_and_rereads_the_user(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let t = app.logged_in("rot@example.com").await;
    let r = app
        .client
        .patch(app.url(&format!("/v1/admin/users/{}", t["user"]["id"].as_str().unwrap())))
        .bearer_auth(&admin)
        .json(&json!({"role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    app.clock.advance(10);
    let r = refresh(&app, &str_of(&t, "refresh_token")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let n: Value = r.json().await.unwrap();
    assert_ne!(n["refresh_token"], t["refresh_token"]);
    assert_eq!(n["session_id"], t["session_id"]);
    assert_eq!(n["user"]["role"], "admin", "role is read afresh");
    let me = app.get_bearer("/v1/admin/users", &str_of(&n, "access_token")).await;
    assert_eq!(me.status(), StatusCode::OK);
    // The successor rotates in turn.
    assert_eq!(refresh(&app, &str_of(&n, "refresh_token")).await.status(), StatusCode::OK);
}

async fn parallel_refreshes_of_one_token_yield_one_successor(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("tabs@example.com").await;
    let old = str_of(&t, "refresh_token");
    let all = futures::future::join_all((0..10).map(|_| refresh(&app, &old))).await;
    let mut successors = Vec::new();
    for r in all {
        assert_eq!(r.status(), StatusCode::OK);
        successors.push(str_of(&r.json::<Value>().await.unwrap(), "refresh_token"));
    }
    successors.dedup();
    assert_eq!(successors.len(), 1, "one successor, not a fork");
    // Within the grace window a retry returns the same successor again.
    app.clock.advance(5);
    let again: Value = refresh(&app, &old).await.json().await.unwrap();
    assert_eq!(again["refresh_token"], successors[0].as_str());
    let next = refresh(&app, &successors[0]).await;
    assert_eq!(next.status(), StatusCode::OK);
}

async fn reuse_after_the_grace_window_ends_the_session_for_both_holders(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("thief@example.com").await;
    let old = str_of(&t, "refresh_token");
    let honest: Value = refresh(&app, &old).await.json().await.unwrap();
    app.clock.advance(6);
    let r = refresh(&app, &old).await;
    assert_problem(r, StatusCode::UNAUTHORIZED, "refresh_token_reused").await;
    let r = refresh(&app, &str_of(&honest, "refresh_token")).await;
    assert_problem(r, StatusCode::UNAUTHORIZED, "invalid_token").await;
    let r = app.get_bearer("/v1/me", &str_of(&honest, "access_token")).await;
    assert_problem(r, StatusCode::UNAUTHORIZED, "session_ended").await;
    let r = app.get_bearer("/v1/me", &str_of(&t, "access_token")).await;
    assert_problem(r, StatusCode::UNAUTHORIZED, "session_ended").await;
}

async fn expired_unknown_or_ended_refresh_tokens_are_invalid(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("refresh_token_ttl", 100))).await;
    let t = app.logged_in("exp@example.com").await;
    assert_eq!(t["refresh_expires_in"], 100);
    assert_problem(refresh(&app, "nonsense").await, StatusCode::UNAUTHORIZED, "invalid_token").await;
    assert_problem(refresh(&app, "").await, StatusCode::UNAUTHORIZED, "invalid_token").await;
    let r = app.post("/v1/auth/refresh", json!({})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
    app.clock.advance(100);
    assert_problem(refresh(&app, &str_of(&t, "refresh_token")).await, StatusCode::UNAUTHORIZED, "invalid_token").await;
}

async fn the_login_beyond_the_device_limit_ends_the_oldest_session(b: Backend) {
    let app = TestApp::spawn(b).await;
    let first = app.logged_in("dev@example.com").await;
    let second = app.login_ok("dev@example.com").await;
    let third = app.login_ok("dev@example.com").await;
    let r = app.get_bearer("/v1/me", &str_of(&first, "access_token")).await;
    assert_problem(r, StatusCode::UNAUTHORIZED, "session_ended").await;
    assert_problem(refresh(&app, &str_of(&first, "refresh_token")).await, StatusCode::UNAUTHORIZED, "invalid_token")
        .await;
    for t in [&second, &third] {
        assert_eq!(app.get_bearer("/v1/me", &str_of(t, "access_token")).await.status(), StatusCode::OK);
    }
    let list: Vec<Value> =
        app.get_bearer("/v1/me/sessions", &str_of(&third, "access_token")).await.json().await.unwrap();
    assert_eq!(list.len(), 2);
}

async fn parallel_logins_never_leave_more_than_the_device_limit(b: Backend) {
    // More simultaneous attempts than the first lockout tier would be refused while
    // in flight (see domain::lockout), so the tier is raised for this race.
    let app = TestApp::spawn_with(b, |f| f.merge(("lockout_tiers", "20:60"))).await;
    app.verified_user("many@example.com").await;
    let all = futures::future::join_all((0..8).map(|_| app.login("many@example.com", PASSWORD))).await;
    let mut tokens = Vec::new();
    for r in all {
        assert_eq!(r.status(), StatusCode::OK);
        tokens.push(str_of(&r.json::<Value>().await.unwrap(), "access_token"));
    }
    let mut live = 0;
    for t in &tokens {
        if app.get_bearer("/v1/me", t).await.status() == StatusCode::OK {
            live += 1;
        }
    }
    assert_eq!(live, 2);
}

async fn logout_stops_access_and_refresh_tokens_at_once(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("bye@example.com").await;
    let at = str_of(&t, "access_token");
    let r = app.post_bearer("/v1/auth/logout", &at, None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_problem(app.get_bearer("/v1/me", &at).await, StatusCode::UNAUTHORIZED, "session_ended").await;
    assert_problem(refresh(&app, &str_of(&t, "refresh_token")).await, StatusCode::UNAUTHORIZED, "invalid_token").await;
    let r = app.client.post(app.url("/v1/auth/logout")).send().await.unwrap();
    assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

/// The `last_used_at` of the session `sid` as listed by its own access token `at`.
async fn last_used(app: &TestApp, at: &str, sid: &str) -> String {
    let list: Vec<Value> = app.get_bearer("/v1/me/sessions", at).await.json().await.unwrap();
    let s = list.iter().find(|s| s["id"] == sid).expect("listed");
    str_of(s, "last_used_at")
}

/// Waits until the session's `last_used_at` is `t` (the use is written after the
/// answer).
async fn until_last_used(app: &TestApp, at: &str, sid: &str, t: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let seen = last_used(app, at, sid).await;
        if seen == rfc3339(t) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "last_used_at stayed {seen}, not {}", rfc3339(t));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn a_sessions_last_use_is_its_last_bearer_request_or_refresh_to_the_minute(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("used@example.com").await;
    let (at, sid) = (str_of(&t, "access_token"), str_of(&t, "session_id"));
    let t0 = app.clock.now();
    assert_eq!(last_used(&app, &at, &sid).await, rfc3339(t0), "a new session was used when it was opened");
    // A Bearer request records its use (listing is one), at most once a minute.
    app.clock.advance(90);
    until_last_used(&app, &at, &sid, t0 + 90).await;
    app.clock.advance(30);
    assert_eq!(last_used(&app, &at, &sid).await, rfc3339(t0 + 90), "within a minute of the last recorded use");
    app.clock.advance(30);
    assert_eq!(app.get_bearer("/v1/me", &at).await.status(), StatusCode::OK);
    app.clock.advance(1);
    until_last_used(&app, &at, &sid, t0 + 150).await;
    // So does a refresh.
    app.clock.advance(100);
    let r: Value = refresh(&app, &str_of(&t, "refresh_token")).await.json().await.unwrap();
    app.clock.advance(1);
    assert_eq!(last_used(&app, &str_of(&r, "access_token"), &sid).await, rfc3339(t0 + 251));
}

async fn sessions_are_listed_with_current_and_ended_one_by_one_or_all_others(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("device_limit", 0))).await;
    let a = app.logged_in("list@example.com").await;
    let b2 = app.login_ok("list@example.com").await;
    let c = app
        .client
        .post(app.url("/v1/auth/login"))
        .header("user-agent", "test-agent/1.0")
        .json(&json!({"email": "list@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let at = str_of(&c, "access_token");
    let list: Vec<Value> = app.get_bearer("/v1/me/sessions", &at).await.json().await.unwrap();
    assert_eq!(list.len(), 3);
    let current: Vec<&Value> = list.iter().filter(|s| s["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["id"], c["session_id"]);
    assert_eq!(current[0]["user_agent"], "test-agent/1.0");
    assert_eq!(current[0]["ip"], "127.0.0.1");
    for k in ["created_at", "last_used_at"] {
        assert!(current[0][k].is_string());
    }
    let r = app.delete_bearer(&format!("/v1/me/sessions/{}", str_of(&a, "session_id")), &at).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_problem(
        app.get_bearer("/v1/me", &str_of(&a, "access_token")).await,
        StatusCode::UNAUTHORIZED,
        "session_ended",
    )
    .await;
    // Someone else's session, or nonsense, is not found.
    let other = app.logged_in("other@example.com").await;
    let r = app.delete_bearer(&format!("/v1/me/sessions/{}", str_of(&other, "session_id")), &at).await;
    assert_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(app.get_bearer("/v1/me", &str_of(&other, "access_token")).await.status(), StatusCode::OK);
    assert_problem(app.delete_bearer("/v1/me/sessions/xyz", &at).await, StatusCode::NOT_FOUND, "not_found").await;
    // Ending all others keeps only the current one.
    assert_eq!(app.delete_bearer("/v1/me/sessions", &at).await.status(), StatusCode::NO_CONTENT);
    assert_problem(
        app.get_bearer("/v1/me", &str_of(&b2, "access_token")).await,
        StatusCode::UNAUTHORIZED,
        "session_ended",
    )
    .await;
    let list: Vec<Value> = app.get_bearer("/v1/me/sessions", &at).await.json().await.unwrap();
    assert_eq!(list.len(), 1);
}

async fn changing_the_password_needs_the_current_one_and_ends_other_sessions(b: Backend) {
    let app = TestApp::spawn(b).await;
    let a = app.logged_in("pw@example.com").await;
    let b2 = app.login_ok("pw@example.com").await;
    let at = str_of(&b2, "access_token");
    let r = app
        .post_bearer(
            "/v1/me/password",
            &at,
            Some(json!({"current_password": "nope nope", "new_password": "another fine passphrase"})),
        )
        .await;
    assert_problem(r, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let r = app
        .post_bearer("/v1/me/password", &at, Some(json!({"current_password": PASSWORD, "new_password": "short"})))
        .await;
    assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
    let r = app
        .post_bearer(
            "/v1/me/password",
            &at,
            Some(json!({"current_password": PASSWORD, "new_password": "another fine passphrase"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.get_bearer("/v1/me", &at).await.status(), StatusCode::OK, "the current session stays");
    assert_problem(
        app.get_bearer("/v1/me", &str_of(&a, "access_token")).await,
        StatusCode::UNAUTHORIZED,
        "session_ended",
    )
    .await;
    assert_problem(app.login("pw@example.com", PASSWORD).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    assert_eq!(app.login("pw@example.com", "another fine passphrase").await.status(), StatusCode::OK);
    app.wait_mail("pw@example.com", "password was changed").await;
}

async fn a_password_reset_ends_every_session(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("forgot@example.com").await;
    let known = app.post("/v1/auth/password/forgot", json!({"email": "forgot@example.com"})).await;
    let unknown = app.post("/v1/auth/password/forgot", json!({"email": "ghost@example.com"})).await;
    assert_eq!(known.status(), StatusCode::ACCEPTED);
    assert_eq!(known.text().await.unwrap(), unknown.text().await.unwrap());
    let mail = app.wait_mail("forgot@example.com", "Reset").await;
    let token = link_token(&mail);
    let r = app.post("/v1/auth/password/reset", json!({"token": token, "password": "short"})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
    let r = app.post("/v1/auth/password/reset", json!({"token": "wrong", "password": "the new passphrase"})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
    let r = app.post("/v1/auth/password/reset", json!({"token": token, "password": "the new passphrase"})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_problem(
        app.get_bearer("/v1/me", &str_of(&t, "access_token")).await,
        StatusCode::UNAUTHORIZED,
        "session_ended",
    )
    .await;
    let r = app.post("/v1/auth/password/reset", json!({"token": token, "password": "yet another passphrase"})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
    assert_eq!(app.login("forgot@example.com", "the new passphrase").await.status(), StatusCode::OK);
    app.assert_no_mail_with("ghost@example.com", "Reset").await;
}

/// A session whose refresh token expired holds no place under the device limit and is
/// not listed; with access tokens that outlive refresh tokens (an odd setting), the
/// session of the calling token is listed all the same.
async fn an_idle_session_holds_no_place_but_the_calling_one_is_listed(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("refresh_token_ttl", 60)).merge(("device_limit", 2))).await;
    app.verified_user("idle@example.com").await;
    let idle = app.login_ok("idle@example.com").await;
    app.clock.advance(30);
    let in_use = app.login_ok("idle@example.com").await;
    app.clock.advance(40);
    let r = refresh(&app, &str_of(&in_use, "refresh_token")).await;
    assert_eq!(r.status(), StatusCode::OK, "the second session is renewed");
    app.clock.advance(40); // the first one's refresh token expired 50 s ago
    let third = app.login_ok("idle@example.com").await;
    // The limit (2) ended nothing: the idle session held no place.
    assert_eq!(app.get_bearer("/v1/me", &str_of(&in_use, "access_token")).await.status(), StatusCode::OK);
    let ids = |list: Vec<Value>| list.iter().map(|s| str_of(s, "id")).collect::<Vec<_>>();
    let list: Vec<Value> =
        app.get_bearer("/v1/me/sessions", &str_of(&third, "access_token")).await.json().await.unwrap();
    assert_eq!(ids(list), [str_of(&third, "session_id"), str_of(&in_use, "session_id")]);
    // Its access token (1 h) still works, and its own list shows it, as current.
    let list: Vec<Value> =
        app.get_bearer("/v1/me/sessions", &str_of(&idle, "access_token")).await.json().await.unwrap();
    assert_eq!(
        ids(list.clone()),
        [str_of(&third, "session_id"), str_of(&in_use, "session_id"), str_of(&idle, "session_id")]
    );
    assert_eq!(list[2]["current"], true);
}
