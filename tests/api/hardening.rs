//! Regression tests for the security review's findings.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    a_grace_of_zero_treats_any_second_use_as_reuse,
    the_right_password_on_the_hard_limit_attempt_does_not_stay_locked,
    nul_characters_are_a_validation_error_not_a_server_error,
    a_path_that_is_not_utf8_is_not_found,
    reissued_codes_do_not_buy_unlimited_guesses,
    a_later_forgot_password_does_not_kill_the_earlier_link,
    a_password_reset_revokes_api_keys,
    hashes_made_with_older_parameters_log_in_in_parallel,
    one_address_gets_no_more_than_its_share_of_the_mails_anyone_can_ask_for,
);

async fn a_grace_of_zero_treats_any_second_use_as_reuse(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("refresh_grace", 0))).await;
    let t = app.logged_in("zero@example.com").await;
    let old = str_of(&t, "refresh_token");
    assert_eq!(app.post("/v1/auth/refresh", json!({"refresh_token": old})).await.status(), StatusCode::OK);
    let r = app.post("/v1/auth/refresh", json!({"refresh_token": old})).await;
    assert_problem(r, StatusCode::UNAUTHORIZED, "refresh_token_reused").await;
}

async fn the_right_password_on_the_hard_limit_attempt_does_not_stay_locked(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("lockout_hard_limit", 3)).merge(("lockout_tiers", "50:60"))).await;
    app.verified_user("edge@example.com").await;
    for _ in 0..2 {
        assert_eq!(app.login("edge@example.com", "wrong password").await.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(app.login("edge@example.com", PASSWORD).await.status(), StatusCode::OK);
    assert_eq!(app.login("edge@example.com", PASSWORD).await.status(), StatusCode::OK);
    // Three real failures do hard-lock.
    for _ in 0..3 {
        app.login("edge@example.com", "wrong password").await;
    }
    app.clock.advance(86_400);
    let r = app.login("edge@example.com", PASSWORD).await;
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;
}

async fn nul_characters_are_a_validation_error_not_a_server_error(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("nul@example.com").await;
    let at = str_of(&t, "access_token");
    let r = app.post_bearer("/v1/me/api-keys", &at, Some(json!({"name": "a\u{0}b"}))).await;
    let p = assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
    assert_eq!(p["errors"][0]["field"], "name");
    let r =
        app.post("/v1/auth/register", json!({"email": "x@example.com", "password": PASSWORD, "name": "\u{0}"})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let r = app.get_bearer("/v1/admin/users?email=%00", &admin).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
}

async fn a_path_that_is_not_utf8_is_not_found(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let r = app.get_bearer("/v1/admin/users/%FF", &admin).await;
    assert_problem(r, StatusCode::NOT_FOUND, "not_found").await;
}

async fn reissued_codes_do_not_buy_unlimited_guesses(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.register("victim@example.com").await;
    app.wait_mail("victim@example.com", "Verify").await;
    // Two codes' worth of wrong tries (10) use up the day's budget.
    for round in 0..2 {
        if round > 0 {
            app.post("/v1/auth/resend-verification", json!({"email": "victim@example.com"})).await;
            app.wait_mails("victim@example.com", "Verify", round + 1).await;
        }
        for _ in 0..5 {
            app.post("/v1/auth/verify-email", json!({"email": "victim@example.com", "code": "000000"})).await;
        }
    }
    app.post("/v1/auth/resend-verification", json!({"email": "victim@example.com"})).await;
    let mails = app.wait_mails("victim@example.com", "Verify", 3).await;
    let latest = mails.last().unwrap();
    let r = app.post("/v1/auth/verify-email", json!({"email": "victim@example.com", "code": code(latest)})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
    // The link still verifies.
    assert_eq!(app.post("/v1/auth/verify-email", json!({"token": link_token(latest)})).await.status(), StatusCode::OK);
}

async fn a_later_forgot_password_does_not_kill_the_earlier_link(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.verified_user("owner@example.com").await;
    app.post("/v1/auth/password/forgot", json!({"email": "owner@example.com"})).await;
    let first = app.wait_mail("owner@example.com", "Reset").await;
    app.post("/v1/auth/password/forgot", json!({"email": "owner@example.com"})).await;
    let both = app.wait_mails("owner@example.com", "Reset", 2).await;
    let r = app
        .post("/v1/auth/password/reset", json!({"token": link_token(&first), "password": "a fresh passphrase"}))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Using one link retires the others.
    let r = app
        .post("/v1/auth/password/reset", json!({"token": link_token(&both[1]), "password": "another passphrase"}))
        .await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
}

async fn a_password_reset_revokes_api_keys(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("keys@example.com").await;
    let r = app.post_bearer("/v1/me/api-keys", &str_of(&t, "access_token"), Some(json!({"name": "ci"}))).await;
    let key = str_of(&r.json::<Value>().await.unwrap(), "key");
    let me = |k: String| app.client.get(app.url("/v1/me")).header("x-api-key", k).send();
    assert_eq!(me(key.clone()).await.unwrap().status(), StatusCode::OK);
    app.post("/v1/auth/password/forgot", json!({"email": "keys@example.com"})).await;
    let mail = app.wait_mail("keys@example.com", "Reset").await;
    app.post("/v1/auth/password/reset", json!({"token": link_token(&mail), "password": "a fresh passphrase"})).await;
    assert_eq!(me(key).await.unwrap().status(), StatusCode::UNAUTHORIZED);
}

async fn hashes_made_with_older_parameters_log_in_in_parallel(b: Backend) {
    use gatehouse::clock::Clock;
    use gatehouse::crypto::password::{hash_blocking, HashParams};
    let app = TestApp::spawn(b).await;
    let now = app.clock.now();
    let old = hash_blocking(&HashParams { m: 128, t: 1, p: 1 }, PASSWORD.as_bytes());
    app.state
        .services
        .store
        .create_user(gatehouse::store::NewUser {
            id: uuid::Uuid::now_v7(),
            email: "old@example.com".into(),
            name: None,
            password_hash: Some(old),
            role: gatehouse::domain::user::Role::User,
            email_verified_at: Some(now),
            now,
        })
        .await
        .unwrap();
    let logins = futures::future::join_all((0..4).map(|_| app.login("old@example.com", PASSWORD))).await;
    for r in logins {
        assert_eq!(r.status(), StatusCode::OK);
    }
}

/// Many requests (from as many addresses as an attacker likes) cannot flood one inbox:
/// each kind of mail anyone can ask for (verification, reset, taken-email notice) has a
/// per-address share (2 an hour here), counted only for mails that would go out; the
/// notice of a changed password always goes. Every answer stays 202.
async fn one_address_gets_no_more_than_its_share_of_the_mails_anyone_can_ask_for(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("mail_per_address", "2/3600"))).await;
    // Mails go out in the order they were asked for: once a fresh address's
    // verification has gone, every mail asked for before it was sent or held back.
    let settled = |n: usize| {
        let app = &app;
        async move {
            app.clock.advance(1);
            app.register(&format!("sentinel{n}@example.com")).await;
            app.wait_mail(&format!("sentinel{n}@example.com"), "Verify").await;
        }
    };
    app.verified_user("flooded@example.com").await;
    for i in 0..4 {
        app.clock.advance(1);
        let r = app.post("/v1/auth/password/forgot", json!({"email": "flooded@example.com"})).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        settled(i).await;
    }
    for i in 4..7 {
        app.clock.advance(1);
        assert_eq!(app.register("flooded@example.com").await.status(), StatusCode::ACCEPTED);
        settled(i).await;
    }
    let count = |subject: &str| {
        app.mails_to("flooded@example.com").iter().filter(|m| m.contains(&format!("Subject: {subject}"))).count()
    };
    assert_eq!(count("Verify your email address"), 1);
    assert_eq!(count("Reset your password"), 2, "two resets, then nothing");
    assert_eq!(count("Sign-up attempt"), 2, "two notices, then nothing");
    // Asking for what would not go out (no account yet) spends nothing: the sign-up
    // that follows still gets its verification.
    for i in 7..10 {
        app.clock.advance(1);
        app.post("/v1/auth/resend-verification", json!({"email": "later@example.com"})).await;
        settled(i).await;
    }
    app.clock.advance(1);
    app.register("later@example.com").await;
    app.wait_mail("later@example.com", "Verify").await;
    // The notice of a changed password is not held back.
    let t = app.login_ok("flooded@example.com").await;
    let r = app
        .post_bearer(
            "/v1/me/password",
            &str_of(&t, "access_token"),
            Some(json!({"current_password": PASSWORD, "new_password": "another long passphrase"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    app.wait_mail("flooded@example.com", "changed").await;
    // An hour later the address has its share again.
    app.clock.advance(3600);
    app.post("/v1/auth/password/forgot", json!({"email": "flooded@example.com"})).await;
    assert_eq!(app.wait_mails("flooded@example.com", "Reset", 3).await.len(), 3);
}
