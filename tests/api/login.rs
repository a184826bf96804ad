//! Login: the token response, anti-enumeration, account states, /v1/me.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    login_returns_the_token_response_of_the_contract,
    the_access_token_is_an_eddsa_at_jwt_with_the_contract_claims,
    unknown_email_and_wrong_password_answer_identically,
    account_states_are_refused_only_after_the_right_password,
    an_account_without_a_password_cannot_log_in,
    me_needs_a_valid_bearer_token,
);

async fn login_returns_the_token_response_of_the_contract(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.verified_user("tok@example.com").await;
    let r = app.login("TOK@example.com ", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 3600);
    assert_eq!(t["expires_at"].as_i64().unwrap(), app_now(&app) + 3600);
    assert_eq!(t["refresh_expires_in"], 2_592_000);
    assert!(str_of(&t, "refresh_token").len() >= 22);
    assert!(uuid::Uuid::parse_str(&str_of(&t, "session_id")).is_ok());
    assert_eq!(t["user"]["email"], "tok@example.com");
    assert!(t["user"]["last_login_at"].is_string());
    let me = app.get_bearer("/v1/me", &str_of(&t, "access_token")).await;
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(me.json::<Value>().await.unwrap()["id"], t["user"]["id"]);
}

fn app_now(app: &TestApp) -> i64 {
    use gatehouse::clock::Clock;
    app.clock.now()
}

fn decode_part(jwt: &str, i: usize) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(jwt.split('.').nth(i).unwrap()).unwrap()).unwrap()
}

async fn the_access_token_is_an_eddsa_at_jwt_with_the_contract_claims(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("jwt@example.com").await;
    let jwt = str_of(&t, "access_token");
    let header = decode_part(&jwt, 0);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    let jwks: Value = app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"][0]["kid"], header["kid"]);
    let claims = decode_part(&jwt, 1);
    for k in ["iss", "sub", "aud", "exp", "iat", "jti", "sid", "email", "role"] {
        assert!(claims.get(k).is_some(), "claim {k} missing: {claims}");
    }
    assert_eq!(claims["sub"], t["user"]["id"]);
    assert_eq!(claims["sid"], t["session_id"]);
    assert_eq!(claims["iss"], "http://127.0.0.1:8080");
    // The token verifies with nothing but the published key.
    let x = jwks["keys"][0]["x"].as_str().unwrap();
    let key = jsonwebtoken::DecodingKey::from_ed_components(x).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["gatehouse"]);
    v.set_issuer(&["http://127.0.0.1:8080"]);
    assert!(jsonwebtoken::decode::<Value>(&jwt, &key, &v).is_ok());
    // A token past its expiry is refused.
    app.clock.advance(3600);
    assert_problem(app.get_bearer("/v1/me", &jwt).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

async fn unknown_email_and_wrong_password_answer_identically(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.verified_user("known@example.com").await;
    let wrong = app.login("known@example.com", "not the password").await;
    let unknown = app.login("unknown@example.com", "not the password").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    let hw: Vec<_> =
        wrong.headers().iter().filter(|(k, _)| *k != "date").map(|(k, v)| (k.clone(), v.clone())).collect();
    let hu: Vec<_> =
        unknown.headers().iter().filter(|(k, _)| *k != "date").map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(hw, hu);
    assert_eq!(wrong.text().await.unwrap(), unknown.text().await.unwrap());
}

async fn account_states_are_refused_only_after_the_right_password(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    for (state, code) in
        [("deactivated", "account_deactivated"), ("suspended", "account_suspended"), ("deleted", "account_deleted")]
    {
        let email = format!("{state}@example.com");
        let user = app.verified_user(&email).await;
        let r = app
            .client
            .patch(app.url(&format!("/v1/admin/users/{}", str_of(&user, "id"))))
            .bearer_auth(&admin)
            .json(&json!({"status": state}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_problem(app.login(&email, "wrong password").await, StatusCode::UNAUTHORIZED, "invalid_credentials")
            .await;
        assert_problem(app.login(&email, PASSWORD).await, StatusCode::FORBIDDEN, code).await;
    }
}

async fn an_account_without_a_password_cannot_log_in(b: Backend) {
    let app = TestApp::spawn(b).await;
    let now = app_now(&app);
    app.state
        .services
        .store
        .create_user(gatehouse::store::NewUser {
            id: uuid::Uuid::now_v7(),
            email: "social@example.com".into(),
            name: None,
            password_hash: None,
            role: gatehouse::domain::user::Role::User,
            email_verified_at: Some(now),
            now,
        })
        .await
        .unwrap()
        .unwrap();
    let none = app.login("social@example.com", PASSWORD).await;
    let unknown = app.login("ghost@example.com", PASSWORD).await;
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(none.text().await.unwrap(), unknown.text().await.unwrap());
}

async fn me_needs_a_valid_bearer_token(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("me@example.com").await;
    let jwt = str_of(&t, "access_token");
    let r = app.client.get(app.url("/v1/me")).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_problem(app.get_bearer("/v1/me", "garbage").await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // Flip a character inside the signature (the last one may only carry padding bits).
    let i = jwt.len() - 10;
    let flipped = if &jwt[i..=i] == "A" { "B" } else { "A" };
    let tampered = format!("{}{}{}", &jwt[..i], flipped, &jwt[i + 1..]);
    assert_problem(app.get_bearer("/v1/me", &tampered).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // Tokens are never taken from the query string.
    let r = app.client.get(app.url(&format!("/v1/me?access_token={jwt}"))).send().await.unwrap();
    assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // A token of another Gatehouse (another key) is foreign.
    let other = TestApp::spawn(b).await;
    let foreign = str_of(&other.logged_in("me@example.com").await, "access_token");
    assert_problem(app.get_bearer("/v1/me", &foreign).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
}
