//! API keys: created once with a Bearer token, listed without the key, accepted as
//! `X-API-Key` on `GET /v1/me`, and stopped at once by revocation, expiry or an
//! owner who is no longer active.

use chrono::DateTime;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    a_new_key_is_shown_once_with_its_prefix_and_acts_for_its_owner,
    the_key_list_never_holds_the_key_itself,
    a_revoked_key_is_refused_at_once,
    another_users_key_or_a_nonsense_id_is_not_found,
    a_key_with_expires_in_stops_when_it_expires,
    invalid_names_and_lifetimes_are_validation_failures,
    an_api_key_cannot_manage_keys_or_reach_bearer_only_endpoints,
    a_key_stops_working_when_an_admin_suspends_its_owner,
);

async fn create_key(app: &TestApp, token: &str, body: Value) -> Response {
    app.post_bearer("/v1/me/api-keys", token, Some(body)).await
}

/// Creates a key and returns the 201 body.
async fn new_key(app: &TestApp, token: &str, body: Value) -> Value {
    let r = create_key(app, token, body).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json().await.unwrap()
}

async fn me_with_key(app: &TestApp, key: &str) -> Response {
    app.client.get(app.url("/v1/me")).header("x-api-key", key).send().await.unwrap()
}

fn time(v: &Value, k: &str) -> i64 {
    DateTime::parse_from_rfc3339(&str_of(v, k)).unwrap_or_else(|e| panic!("{k} in {v}: {e}")).timestamp()
}

async fn a_new_key_is_shown_once_with_its_prefix_and_acts_for_its_owner(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("keys@example.com").await;
    let at = str_of(&t, "access_token");
    let r = create_key(&app, &at, json!({"name": "  ci deploy  "})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let k: Value = r.json().await.unwrap();
    let mut fields: Vec<&str> = k.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["created_at", "expires_at", "id", "key", "name", "prefix"]);
    assert!(uuid::Uuid::parse_str(&str_of(&k, "id")).is_ok());
    assert_eq!(k["name"], "ci deploy");
    assert!(k["expires_at"].is_null(), "no expires_in, no expiry: {k}");
    time(&k, "created_at");
    let key = str_of(&k, "key");
    let prefix = str_of(&k, "prefix");
    assert!(!prefix.is_empty());
    assert!(key.starts_with(&prefix), "{key} starts with {prefix}");
    assert!(key.len() > prefix.len() + 16, "a key has a real secret part");

    let r = me_with_key(&app, &key).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let me: Value = r.json().await.unwrap();
    assert_eq!(me["id"], t["user"]["id"]);
    assert_eq!(me["email"], "keys@example.com");

    // Never from the URL: a key in the query is no key.
    for q in ["api_key", "key", "x-api-key"] {
        let r = app.client.get(app.url(&format!("/v1/me?{q}={key}"))).send().await.unwrap();
        assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // The key is not tied to the session that created it.
    let r = app.post_bearer("/v1/auth/logout", &at, None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(me_with_key(&app, &key).await.status(), StatusCode::OK);
    let at = str_of(&app.login_ok("keys@example.com").await, "access_token");

    // A second key is a different key; a wrong one is no key at all.
    let other = new_key(&app, &at, json!({"name": "second"})).await;
    assert_ne!(other["key"], k["key"]);
    assert_ne!(other["id"], k["id"]);
    let mut forged = key.clone();
    forged.push('x');
    for bad in [forged.as_str(), prefix.as_str(), "nonsense"] {
        assert_problem(me_with_key(&app, bad).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}

async fn the_key_list_never_holds_the_key_itself(b: Backend) {
    let app = TestApp::spawn(b).await;
    let at = str_of(&app.logged_in("list@example.com").await, "access_token");
    let first = new_key(&app, &at, json!({"name": "first"})).await;
    let second = new_key(&app, &at, json!({"name": "second", "expires_in": 3600})).await;
    // Someone else's key is not in the list.
    let other = str_of(&app.logged_in("else@example.com").await, "access_token");
    let foreign = new_key(&app, &other, json!({"name": "foreign"})).await;

    let r = app.get_bearer("/v1/me/api-keys", &at).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let text = r.text().await.unwrap();
    for k in [&first, &second, &foreign] {
        let key = str_of(k, "key");
        assert!(!text.contains(&key), "the list shows a key: {text}");
        // Nor the secret part after the prefix.
        let secret = &key[str_of(k, "prefix").len()..];
        assert!(!text.contains(secret), "the list shows a secret: {text}");
    }
    let list: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(list.len(), 2, "{text}");
    for created in [&first, &second] {
        let listed = list
            .iter()
            .find(|l| l["id"] == created["id"])
            .unwrap_or_else(|| panic!("{} listed in {text}", created["id"]));
        assert!(listed.get("key").is_none(), "{listed}");
        for f in ["name", "prefix", "created_at", "expires_at"] {
            assert_eq!(listed[f], created[f], "{f}");
        }
    }
    assert!(!list.iter().any(|l| l["id"] == foreign["id"]));
}

async fn a_revoked_key_is_refused_at_once(b: Backend) {
    let app = TestApp::spawn(b).await;
    let at = str_of(&app.logged_in("revoke@example.com").await, "access_token");
    let k = new_key(&app, &at, json!({"name": "doomed"})).await;
    let keep = new_key(&app, &at, json!({"name": "kept"})).await;
    let key = str_of(&k, "key");
    assert_eq!(me_with_key(&app, &key).await.status(), StatusCode::OK);
    let path = format!("/v1/me/api-keys/{}", str_of(&k, "id"));
    let r = app.delete_bearer(&path, &at).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_problem(me_with_key(&app, &key).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // The other key is untouched; revoking twice finds nothing more to revoke.
    assert_eq!(me_with_key(&app, &str_of(&keep, "key")).await.status(), StatusCode::OK);
    assert_problem(app.delete_bearer(&path, &at).await, StatusCode::NOT_FOUND, "not_found").await;
    assert_problem(me_with_key(&app, &key).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

async fn another_users_key_or_a_nonsense_id_is_not_found(b: Backend) {
    let app = TestApp::spawn(b).await;
    let owner = str_of(&app.logged_in("owner@example.com").await, "access_token");
    let k = new_key(&app, &owner, json!({"name": "mine"})).await;
    let intruder = str_of(&app.logged_in("intruder@example.com").await, "access_token");
    let r = app.delete_bearer(&format!("/v1/me/api-keys/{}", str_of(&k, "id")), &intruder).await;
    assert_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    for id in [uuid::Uuid::new_v4().to_string().as_str(), "not-a-uuid"] {
        let r = app.delete_bearer(&format!("/v1/me/api-keys/{id}"), &intruder).await;
        assert_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    }
    // The owner's key survived the attempt.
    assert_eq!(me_with_key(&app, &str_of(&k, "key")).await.status(), StatusCode::OK);
}

async fn a_key_with_expires_in_stops_when_it_expires(b: Backend) {
    let app = TestApp::spawn(b).await;
    let at = str_of(&app.logged_in("exp@example.com").await, "access_token");
    let k = new_key(&app, &at, json!({"name": "short", "expires_in": 600})).await;
    assert_eq!(time(&k, "expires_at") - time(&k, "created_at"), 600);
    let lasting = new_key(&app, &at, json!({"name": "long", "expires_in": 3600})).await;
    let key = str_of(&k, "key");
    app.clock.advance(599);
    assert_eq!(me_with_key(&app, &key).await.status(), StatusCode::OK);
    app.clock.advance(2);
    assert_problem(me_with_key(&app, &key).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(me_with_key(&app, &str_of(&lasting, "key")).await.status(), StatusCode::OK);
}

async fn invalid_names_and_lifetimes_are_validation_failures(b: Backend) {
    let app = TestApp::spawn(b).await;
    let at = str_of(&app.logged_in("valid@example.com").await, "access_token");
    let ten_years: i64 = 10 * 365 * 86_400;
    let cases = [
        (json!({}), "name"),
        (json!({"name": ""}), "name"),
        (json!({"name": "   "}), "name"),
        (json!({"name": "x".repeat(101)}), "name"),
        (json!({"name": "k", "expires_in": 59}), "expires_in"),
        (json!({"name": "k", "expires_in": 0}), "expires_in"),
        (json!({"name": "k", "expires_in": -60}), "expires_in"),
        (json!({"name": "k", "expires_in": ten_years + 1}), "expires_in"),
        (json!({"name": "k", "expires_in": "3600"}), "expires_in"),
        (json!({"name": 7}), "name"),
    ];
    for (body, field) in cases {
        let r = create_key(&app, &at, body.clone()).await;
        let p = assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
        let errors = p["errors"].as_array().unwrap_or_else(|| panic!("{p}"));
        assert!(errors.iter().any(|e| e["field"] == field), "{body} names {field}: {p}");
    }
    // Both problems at once are both reported.
    let r = create_key(&app, &at, json!({"expires_in": 1})).await;
    let p = assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
    let fields: Vec<&Value> = p["errors"].as_array().unwrap().iter().map(|e| &e["field"]).collect();
    assert!(fields.contains(&&json!("name")) && fields.contains(&&json!("expires_in")));
    // Nothing was created by the refused requests; the edges of the range are fine.
    let list: Vec<Value> = app.get_bearer("/v1/me/api-keys", &at).await.json().await.unwrap();
    assert!(list.is_empty(), "{list:?}");
    for e in [60, ten_years] {
        new_key(&app, &at, json!({"name": "edge", "expires_in": e})).await;
    }
    new_key(&app, &at, json!({"name": "x".repeat(100)})).await;
}

async fn an_api_key_cannot_manage_keys_or_reach_bearer_only_endpoints(b: Backend) {
    let app = TestApp::spawn(b).await;
    let root = app.admin("root@example.com").await;
    let at = str_of(&root, "access_token");
    let k = new_key(&app, &at, json!({"name": "admin key"})).await;
    let key = str_of(&k, "key");
    let with_key = |m: reqwest::Method, path: &str| app.client.request(m, app.url(path)).header("x-api-key", &key);
    let r = with_key(reqwest::Method::POST, "/v1/me/api-keys").json(&json!({"name": "child"})).send().await.unwrap();
    assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let by_id = format!("/v1/me/api-keys/{}", str_of(&k, "id"));
    let user_path = format!("/v1/admin/users/{}", root["user"]["id"].as_str().unwrap());
    for (m, path) in [
        (reqwest::Method::GET, "/v1/me/api-keys"),
        (reqwest::Method::DELETE, by_id.as_str()),
        (reqwest::Method::GET, "/v1/me/sessions"),
        (reqwest::Method::POST, "/v1/auth/logout"),
        (reqwest::Method::GET, "/v1/admin/users"),
        (reqwest::Method::GET, user_path.as_str()),
    ] {
        let r = with_key(m.clone(), path).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{m} {path}");
        assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // The key is still there and still works: the refused DELETE did nothing.
    assert_eq!(me_with_key(&app, &key).await.status(), StatusCode::OK);
    let list: Vec<Value> = app.get_bearer("/v1/me/api-keys", &at).await.json().await.unwrap();
    assert_eq!(list.len(), 1);
    // And without any credentials the key endpoints are 401 too.
    let r = app.client.post(app.url("/v1/me/api-keys")).json(&json!({"name": "anon"})).send().await.unwrap();
    assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

async fn a_key_stops_working_when_an_admin_suspends_its_owner(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let t = app.logged_in("worker@example.com").await;
    let k = new_key(&app, &str_of(&t, "access_token"), json!({"name": "bot"})).await;
    let key = str_of(&k, "key");
    assert_eq!(me_with_key(&app, &key).await.status(), StatusCode::OK);
    let r = app
        .client
        .patch(app.url(&format!("/v1/admin/users/{}", t["user"]["id"].as_str().unwrap())))
        .bearer_auth(&admin)
        .json(&json!({"status": "suspended"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_problem(me_with_key(&app, &key).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
}
