//! Register, verify by link or code, resend.

use gatehouse::clock::Clock;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    registering_mails_a_link_and_a_code_and_the_link_verifies,
    a_taken_email_gets_the_same_answer_and_a_notice_without_a_token,
    the_code_verifies_and_allows_five_wrong_tries_at_most,
    verification_tokens_are_single_use_and_expire,
    resend_answers_alike_and_supersedes_the_old_code,
    weak_or_malformed_registrations_list_every_bad_field,
    an_unverified_login_is_refused_and_a_fresh_mail_sent_once_expired,
    addresses_no_mail_can_reach_are_refused_and_a_stored_one_is_given_up_at_once,
);

async fn registering_mails_a_link_and_a_code_and_the_link_verifies(b: Backend) {
    let app = TestApp::spawn(b).await;
    let r = app.register("  New.User@Example.COM ").await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "verification_sent"}));
    let mail = app.wait_mail("new.user@example.com", "Verify").await;
    assert_eq!(code(&mail).len(), 6);
    // RFC 5322's Date and Message-ID (named in the sender's domain, not the host's).
    assert!(mail.lines().any(|l| l.starts_with("Date: ")), "{mail}");
    let id = mail.lines().find_map(|l| l.strip_prefix("Message-ID: ")).expect("a Message-ID");
    assert!(id.starts_with('<') && id.ends_with("@gatehouse.invalid>"), "{id}");
    let r = app.post("/v1/auth/verify-email", json!({"token": link_token(&mail)})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let user: Value = r.json().await.unwrap();
    assert_eq!(user["email"], "new.user@example.com");
    assert_eq!(user["email_verified"], true);
    assert!(user["email_verified_at"].is_string());
    assert_eq!(user["role"], "user");
    assert_eq!(user["status"], "active");
    assert_eq!(user["metadata"], json!({}));
    for k in ["id", "name", "created_at", "updated_at", "last_login_at", "last_login_geolocation"] {
        assert!(user.get(k).is_some(), "{k} missing from {user}");
    }
}

async fn a_taken_email_gets_the_same_answer_and_a_notice_without_a_token(b: Backend) {
    let app = TestApp::spawn(b).await;
    let first = app.register("taken@example.com").await;
    let (s1, b1) = (first.status(), first.text().await.unwrap());
    app.wait_mail("taken@example.com", "Verify").await;
    let second = app.register("TAKEN@example.com").await;
    assert_eq!((second.status(), second.text().await.unwrap()), (s1, b1));
    let notice = app.wait_mail("taken@example.com", "Sign-up attempt").await;
    assert!(!notice.contains("token="), "the notice must not carry a token");
    assert_eq!(app.mails_to("taken@example.com").iter().filter(|m| m.contains("Verify")).count(), 1);
}

async fn the_code_verifies_and_allows_five_wrong_tries_at_most(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.register("coder@example.com").await;
    let right = code(&app.wait_mail("coder@example.com", "Verify").await);
    let wrong = if right == "000000" { "111111" } else { "000000" };
    for _ in 0..4 {
        let r = app.post("/v1/auth/verify-email", json!({"email": "coder@example.com", "code": wrong})).await;
        assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
    }
    // Four wrong tries leave one: the right code still works.
    let r = app.post("/v1/auth/verify-email", json!({"email": "Coder@example.com", "code": right})).await;
    assert_eq!(r.status(), StatusCode::OK);

    app.register("coder2@example.com").await;
    let right = code(&app.wait_mail("coder2@example.com", "Verify").await);
    let wrong = if right == "000000" { "111111" } else { "000000" };
    for _ in 0..5 {
        let r = app.post("/v1/auth/verify-email", json!({"email": "coder2@example.com", "code": wrong})).await;
        assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
    }
    let r = app.post("/v1/auth/verify-email", json!({"email": "coder2@example.com", "code": right})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
}

async fn verification_tokens_are_single_use_and_expire(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.register("once@example.com").await;
    let mail = app.wait_mail("once@example.com", "Verify").await;
    let token = link_token(&mail);
    assert_eq!(app.post("/v1/auth/verify-email", json!({"token": token})).await.status(), StatusCode::OK);
    let r = app.post("/v1/auth/verify-email", json!({"token": token})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
    let r = app.post("/v1/auth/verify-email", json!({"email": "once@example.com", "code": code(&mail)})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;

    app.register("late@example.com").await;
    let mail = app.wait_mail("late@example.com", "Verify").await;
    app.clock.advance(15 * 60 + 1);
    let r = app.post("/v1/auth/verify-email", json!({"email": "late@example.com", "code": code(&mail)})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
    // The link lives 24 hours.
    assert_eq!(app.post("/v1/auth/verify-email", json!({"token": link_token(&mail)})).await.status(), StatusCode::OK);

    app.register("later@example.com").await;
    let mail = app.wait_mail("later@example.com", "Verify").await;
    app.clock.advance(24 * 3600 + 1);
    let r = app.post("/v1/auth/verify-email", json!({"token": link_token(&mail)})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
    let r = app.post("/v1/auth/verify-email", json!({"token": "not-a-token"})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
}

async fn resend_answers_alike_and_supersedes_the_old_code(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.register("again@example.com").await;
    let first = app.wait_mail("again@example.com", "Verify").await;
    let known = app.post("/v1/auth/resend-verification", json!({"email": "again@example.com"})).await;
    let unknown = app.post("/v1/auth/resend-verification", json!({"email": "nobody@example.com"})).await;
    assert_eq!(known.status(), StatusCode::ACCEPTED);
    assert_eq!(unknown.status(), StatusCode::ACCEPTED);
    assert_eq!(known.text().await.unwrap(), unknown.text().await.unwrap());
    let mails = app.wait_mails("again@example.com", "Verify", 2).await;
    let second = mails.last().unwrap();
    let r = app.post("/v1/auth/verify-email", json!({"token": link_token(&first)})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_token").await;
    assert_eq!(app.post("/v1/auth/verify-email", json!({"token": link_token(second)})).await.status(), StatusCode::OK);
    app.assert_no_mail_with("nobody@example.com", "Verify").await;
    // A verified account gets no more verification mails.
    app.post("/v1/auth/resend-verification", json!({"email": "again@example.com"})).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.mails_to("again@example.com").len(), 2);
}

async fn weak_or_malformed_registrations_list_every_bad_field(b: Backend) {
    let app = TestApp::spawn(b).await;
    let r = app.post("/v1/auth/register", json!({})).await;
    let body = assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
    let fields: Vec<&str> = body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, vec!["email", "password"]);
    for (body, field, code) in [
        (json!({"email": "not-an-email", "password": PASSWORD}), "email", "invalid_email"),
        (json!({"email": "a@example.com", "password": "short"}), "password", "too_short"),
        (json!({"email": "a@example.com", "password": "password123"}), "password", "too_common"),
        (json!({"email": "a@example.com", "password": 12345678}), "password", "invalid_type"),
        (json!({"email": "a@example.com", "password": PASSWORD, "name": "x".repeat(201)}), "name", "too_long"),
    ] {
        let r = app.post("/v1/auth/register", body).await;
        let p = assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
        assert_eq!(p["errors"][0]["field"], field, "{p}");
        assert_eq!(p["errors"][0]["code"], code, "{p}");
        assert!(p["errors"][0]["message"].is_string());
    }
    app.assert_no_mail_with("a@example.com", "Verify").await;
}

async fn an_unverified_login_is_refused_and_a_fresh_mail_sent_once_expired(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.register("slow@example.com").await;
    app.wait_mail("slow@example.com", "Verify").await;
    let r = app.login("slow@example.com", PASSWORD).await;
    assert_problem(r, StatusCode::FORBIDDEN, "email_not_verified").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.mails_to("slow@example.com").len(), 1, "the first link is still valid: no new mail");
    app.clock.advance(24 * 3600 + 1);
    let r = app.login("slow@example.com", PASSWORD).await;
    assert_problem(r, StatusCode::FORBIDDEN, "email_not_verified").await;
    let mails = app.wait_mails("slow@example.com", "Verify", 2).await;
    assert_eq!(
        app.post("/v1/auth/verify-email", json!({"token": link_token(&mails[1])})).await.status(),
        StatusCode::OK
    );
    assert_eq!(app.login("slow@example.com", PASSWORD).await.status(), StatusCode::OK);
}

/// An address with an invisible or format character (a zero-width space, a right-to-left
/// override) once made an account that looked like another and whose every mail failed,
/// retried for hours: such addresses are refused for new accounts; an account stored
/// before can still log in, and its mail is given up at the first try.
async fn addresses_no_mail_can_reach_are_refused_and_a_stored_one_is_given_up_at_once(b: Backend) {
    let app = TestApp::spawn(b).await;
    for email in ["a\u{200b}@example.com", "\u{202e}a@example.com", "\u{feff}d@example.com", "e\u{301}@example.com"] {
        let r = app.post("/v1/auth/register", json!({"email": email, "password": "a strong enough password 9"})).await;
        let body = assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
        assert_eq!(
            (&body["errors"][0]["field"], &body["errors"][0]["code"]),
            (&json!("email"), &json!("invalid_email"))
        );
    }
    // Stored before this check: it logs in, and its password-changed notice is tried
    // once, then dropped.
    let store = app.state.services.store.clone();
    let now = app.clock.now();
    let email = "z\u{200b}@example.com";
    let hash =
        gatehouse::crypto::password::hash_blocking(&"argon2id:m=64,t=1,p=1".parse().unwrap(), PASSWORD.as_bytes());
    let nu = gatehouse::store::NewUser {
        id: uuid::Uuid::now_v7(),
        email: email.into(),
        name: None,
        password_hash: Some(hash),
        role: gatehouse::domain::user::Role::User,
        email_verified_at: Some(now),
        now,
    };
    let user = store.create_user(nu).await.unwrap().unwrap();
    assert_eq!(app.login(email, PASSWORD).await.status(), StatusCode::OK);
    store.change_password(user.id, "y", None, app.clock.now()).await.unwrap();
    // The worker looks at the queue at least once a second.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let left = store.claim_mail_job(app.clock.now() + 10_000_000, 60).await.unwrap();
    assert!(left.is_none(), "the mail waits for another try: {left:?}");
}
