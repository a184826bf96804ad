//! Admin endpoints: who may call them, listing with filters and cursor pages, reading
//! and changing one user, suspension, unlocking a lockout, and the audit trail.

use std::collections::HashSet;

use chrono::DateTime;
use gatehouse::domain::user::Role;
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    every_admin_route_is_forbidden_to_users_and_unauthorized_without_a_token,
    the_admin_role_is_read_from_the_store_on_every_request,
    the_last_active_admin_cannot_demote_suspend_or_delete_itself,
    users_are_filtered_by_email_substring_and_by_status,
    pages_of_two_walk_every_user_once_with_a_cursor,
    bad_limits_states_and_cursors_are_validation_failures,
    one_user_is_read_by_id_and_unknown_or_malformed_ids_are_not_found,
    patch_changes_name_metadata_role_and_verification_and_returns_the_user,
    patch_rejects_unknown_states_and_roles_and_metadata_that_is_not_an_object,
    suspending_ends_every_session_at_once_and_refuses_login_until_reactivated,
    the_other_inactive_states_refuse_login_with_their_own_code,
    unlock_clears_a_lockout_so_the_right_password_works_at_once,
    events_list_logins_failures_lockouts_and_session_ends_newest_first,
    events_come_a_page_at_a_time_with_a_cursor_and_bad_pages_are_validation_failures,
);

/// A verified user made through the store; returns its id.
async fn user(app: &TestApp, email: &str) -> String {
    app.state
        .services
        .create_user_directly(email, PASSWORD.to_owned().into(), Role::User, true)
        .await
        .expect("create user")
        .id
        .to_string()
}

async fn call(app: &TestApp, m: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Response {
    let mut r = app.client.request(m, app.url(path));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap()
}

async fn patch(app: &TestApp, admin: &str, id: &str, body: Value) -> Response {
    call(app, Method::PATCH, &format!("/v1/admin/users/{id}"), Some(admin), Some(body)).await
}

/// `GET /v1/admin/users{query}` as the admin: the 200 body.
async fn list(app: &TestApp, admin: &str, query: &str) -> Value {
    let r = app.get_bearer(&format!("/v1/admin/users{query}"), admin).await;
    assert_eq!(r.status(), StatusCode::OK, "list {query}");
    assert_eq!(r.headers()["cache-control"], "no-store");
    r.json().await.unwrap()
}

/// The emails of a list page, sorted.
fn emails(page: &Value) -> Vec<String> {
    let mut v: Vec<String> = page["users"]
        .as_array()
        .unwrap_or_else(|| panic!("users in {page}"))
        .iter()
        .map(|u| str_of(u, "email"))
        .collect();
    v.sort();
    v
}

const USER_FIELDS: [&str; 12] = [
    "created_at",
    "email",
    "email_verified",
    "email_verified_at",
    "id",
    "last_login_at",
    "last_login_geolocation",
    "metadata",
    "name",
    "role",
    "status",
    "updated_at",
];

fn assert_user_shape(u: &Value) {
    let mut fields: Vec<&str> =
        u.as_object().unwrap_or_else(|| panic!("a user object: {u}")).keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, USER_FIELDS, "{u}");
}

fn time(v: &Value, k: &str) -> i64 {
    DateTime::parse_from_rfc3339(&str_of(v, k)).unwrap_or_else(|e| panic!("{k} in {v}: {e}")).timestamp()
}

/// Every admin route with a method, for an existing user id.
fn admin_routes(id: &str) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (Method::GET, "/v1/admin/users".to_owned(), None),
        (Method::GET, format!("/v1/admin/users/{id}"), None),
        (Method::PATCH, format!("/v1/admin/users/{id}"), Some(json!({"role": "admin"}))),
        (Method::POST, format!("/v1/admin/users/{id}/unlock"), None),
        (Method::GET, format!("/v1/admin/users/{id}/events"), None),
    ]
}

async fn every_admin_route_is_forbidden_to_users_and_unauthorized_without_a_token(b: Backend) {
    let app = TestApp::spawn(b).await;
    let t = app.logged_in("plain@example.com").await;
    let at = str_of(&t, "access_token");
    let id = str_of(&t["user"], "id");
    for (m, path, body) in admin_routes(&id) {
        let r = call(&app, m.clone(), &path, Some(&at), body.clone()).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "user: {m} {path}");
        assert_problem(r, StatusCode::FORBIDDEN, "forbidden").await;
        let r = call(&app, m.clone(), &path, None, body.clone()).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "anonymous: {m} {path}");
        assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
        let r = call(&app, m.clone(), &path, Some("not.a.jwt"), body).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "bad token: {m} {path}");
        assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // The refused PATCH to role admin changed nothing.
    let me: Value = app.get_bearer("/v1/me", &at).await.json().await.unwrap();
    assert_eq!(me["role"], "user");
}

async fn the_admin_role_is_read_from_the_store_on_every_request(b: Backend) {
    let app = TestApp::spawn(b).await;
    let root = str_of(&app.admin("root@example.com").await, "access_token");
    let other = app.admin("second@example.com").await;
    let other_at = str_of(&other, "access_token");
    assert_eq!(app.get_bearer("/v1/admin/users", &other_at).await.status(), StatusCode::OK);
    let r = patch(&app, &root, &str_of(&other["user"], "id"), json!({"role": "user"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["role"], "user");
    // The token still says admin; the stored role wins at once.
    assert_problem(app.get_bearer("/v1/admin/users", &other_at).await, StatusCode::FORBIDDEN, "forbidden").await;
    // A demotion is not a session end: the token still works where users may go.
    assert_eq!(app.get_bearer("/v1/me", &other_at).await.status(), StatusCode::OK);
}

async fn the_last_active_admin_cannot_demote_suspend_or_delete_itself(b: Backend) {
    let app = TestApp::spawn(b).await;
    let root = app.admin("root@example.com").await;
    let (root_at, root_id) = (str_of(&root, "access_token"), str_of(&root["user"], "id"));
    for body in [json!({"role": "user"}), json!({"status": "suspended"}), json!({"status": "deleted", "name": "x"})] {
        let r = patch(&app, &root_at, &root_id, body.clone()).await;
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_problem(r, StatusCode::CONFLICT, "last_admin").await;
    }
    // Nothing of the refused changes was made, and the session goes on.
    let me: Value = app.get_bearer("/v1/me", &root_at).await.json().await.unwrap();
    assert_eq!((&me["role"], &me["status"], &me["name"]), (&json!("admin"), &json!("active"), &root["user"]["name"]));
    // Once there is another admin, either may step down, but not the one left.
    let second = app.admin("second@example.com").await;
    let r = patch(&app, &root_at, &root_id, json!({"role": "user"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let (second_at, second_id) = (str_of(&second, "access_token"), str_of(&second["user"], "id"));
    assert_problem(
        patch(&app, &second_at, &second_id, json!({"status": "deactivated"})).await,
        StatusCode::CONFLICT,
        "last_admin",
    )
    .await;
    assert_eq!(patch(&app, &second_at, &second_id, json!({"name": "Still here"})).await.status(), StatusCode::OK);
}

async fn users_are_filtered_by_email_substring_and_by_status(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    user(&app, "alice@example.com").await;
    user(&app, "malice@example.org").await;
    let bob = user(&app, "bob@example.com").await;
    user(&app, "a_b@example.net").await;
    user(&app, "axb@example.net").await;

    let all = list(&app, &admin, "").await;
    assert_eq!(emails(&all).len(), 6);
    assert!(all["next_cursor"].is_null(), "{all}");
    for u in all["users"].as_array().unwrap() {
        assert_user_shape(u);
    }
    assert_eq!(emails(&list(&app, &admin, "?email=alice").await), ["alice@example.com", "malice@example.org"]);
    // Trimmed and lowercased like every email.
    assert_eq!(emails(&list(&app, &admin, "?email=%20ALICE@EXAMPLE.COM%20").await), ["alice@example.com"]);
    assert_eq!(emails(&list(&app, &admin, "?email=example.org").await), ["malice@example.org"]);
    // `_` and `%` are characters of the address, not wildcards.
    assert_eq!(emails(&list(&app, &admin, "?email=a_b").await), ["a_b@example.net"]);
    assert!(emails(&list(&app, &admin, "?email=%25").await).is_empty());
    assert!(emails(&list(&app, &admin, "?email=nobody").await).is_empty());

    let r = patch(&app, &admin, &bob, json!({"status": "suspended"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(emails(&list(&app, &admin, "?status=suspended").await), ["bob@example.com"]);
    assert_eq!(emails(&list(&app, &admin, "?status=active").await).len(), 5);
    assert!(emails(&list(&app, &admin, "?status=deleted").await).is_empty());
    assert!(emails(&list(&app, &admin, "?status=active&email=bob").await).is_empty());
    assert_eq!(emails(&list(&app, &admin, "?status=suspended&email=bob").await), ["bob@example.com"]);
}

async fn pages_of_two_walk_every_user_once_with_a_cursor(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    for i in 0..5 {
        user(&app, &format!("page{i}@example.com")).await;
    }
    let everyone: HashSet<String> = emails(&list(&app, &admin, "").await).into_iter().collect();
    assert_eq!(everyone.len(), 6);

    let mut seen = Vec::new();
    let mut pages = 0;
    let mut query = "?limit=2".to_owned();
    loop {
        let page = list(&app, &admin, &query).await;
        pages += 1;
        let users = page["users"].as_array().unwrap();
        assert!(users.len() <= 2, "{page}");
        seen.extend(emails(&page));
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(users.len(), 2, "a page before the last is full: {page}");
                query = format!("?limit=2&cursor={c}");
            }
            None => break,
        }
        assert!(pages < 10, "the cursor walk does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 6, "no user twice: {seen:?}");
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), everyone);

    // Filters hold across pages too.
    let first = list(&app, &admin, "?email=page&limit=3").await;
    assert_eq!(emails(&first).len(), 3);
    let c = str_of(&first, "next_cursor");
    let rest = list(&app, &admin, &format!("?email=page&limit=3&cursor={c}")).await;
    assert_eq!(emails(&rest).len(), 2);
    assert!(rest["next_cursor"].is_null());
    let mut both = emails(&first);
    both.extend(emails(&rest));
    both.sort();
    both.dedup();
    assert_eq!(both.len(), 5);
    assert!(!both.contains(&"root@example.com".to_owned()));
}

async fn bad_limits_states_and_cursors_are_validation_failures(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=201", "limit"),
        ("?limit=-1", "limit"),
        ("?limit=two", "limit"),
        ("?limit=1.5", "limit"),
        ("?status=frozen", "status"),
        ("?status=suspended1", "status"),
        ("?cursor=not-a-cursor", "cursor"),
    ] {
        let r = app.get_bearer(&format!("/v1/admin/users{query}"), &admin).await;
        let p = assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
        let errors = p["errors"].as_array().unwrap_or_else(|| panic!("{query}: {p}"));
        assert!(errors.iter().any(|e| e["field"] == field), "{query} names {field}: {p}");
    }
    // The edges are fine.
    assert_eq!(emails(&list(&app, &admin, "?limit=1").await).len(), 1);
    assert_eq!(emails(&list(&app, &admin, "?limit=200").await).len(), 1);
}

async fn one_user_is_read_by_id_and_unknown_or_malformed_ids_are_not_found(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let t = app.logged_in("one@example.com").await;
    let id = str_of(&t["user"], "id");
    let r = app.get_bearer(&format!("/v1/admin/users/{id}"), &admin).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let u: Value = r.json().await.unwrap();
    assert_user_shape(&u);
    assert_eq!(u["id"], id.as_str());
    assert_eq!(u["email"], "one@example.com");
    assert_eq!(u["status"], "active");
    assert_eq!(u["role"], "user");
    assert_eq!(u["email_verified"], true);
    assert_eq!(u["last_login_at"], t["user"]["last_login_at"]);

    let unknown = uuid::Uuid::new_v4().to_string();
    for bad in [unknown.as_str(), "not-a-uuid", "1"] {
        for (m, path, body) in admin_routes(bad).into_iter().skip(1) {
            let r = call(&app, m.clone(), &path, Some(&admin), body).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{m} {path}");
            assert_problem(r, StatusCode::NOT_FOUND, "not_found").await;
        }
    }
}

async fn patch_changes_name_metadata_role_and_verification_and_returns_the_user(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let t = app.logged_in("edit@example.com").await;
    let id = str_of(&t["user"], "id");
    let before: Value = app.get_bearer(&format!("/v1/admin/users/{id}"), &admin).await.json().await.unwrap();
    app.clock.advance(30);

    let meta = json!({"plan": "pro", "seats": 3, "tags": ["a", "b"], "nested": {"x": null}});
    let r = patch(&app, &admin, &id, json!({"name": "  Edith Editor  ", "metadata": meta})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let u: Value = r.json().await.unwrap();
    assert_user_shape(&u);
    assert_eq!(u["id"], id.as_str());
    assert_eq!(u["name"], "Edith Editor");
    assert_eq!(u["metadata"], meta);
    assert_eq!(u["role"], "user", "fields not sent stay as they were");
    assert_eq!(u["status"], "active");
    assert_eq!(u["email_verified"], true);
    assert_eq!(u["created_at"], before["created_at"]);
    assert_eq!(time(&u, "updated_at"), time(&before, "updated_at") + 30);

    // The change is stored, and the user sees it too.
    let again: Value = app.get_bearer(&format!("/v1/admin/users/{id}"), &admin).await.json().await.unwrap();
    assert_eq!(again, u);
    let me: Value = app.get_bearer("/v1/me", &str_of(&t, "access_token")).await.json().await.unwrap();
    assert_eq!(me["name"], "Edith Editor");
    assert_eq!(me["metadata"], meta);

    // Metadata is replaced, not merged; a null name clears it.
    let u: Value =
        patch(&app, &admin, &id, json!({"metadata": {"plan": "free"}, "name": null})).await.json().await.unwrap();
    assert_eq!(u["metadata"], json!({"plan": "free"}));
    assert!(u["name"].is_null(), "{u}");

    // Role: the user becomes an admin with the token they already hold.
    let u: Value = patch(&app, &admin, &id, json!({"role": "admin"})).await.json().await.unwrap();
    assert_eq!(u["role"], "admin");
    assert_eq!(app.get_bearer("/v1/admin/users", &str_of(&t, "access_token")).await.status(), StatusCode::OK);

    // Verification can be withdrawn and given.
    let u: Value = patch(&app, &admin, &id, json!({"email_verified": false})).await.json().await.unwrap();
    assert_eq!(u["email_verified"], false);
    assert!(u["email_verified_at"].is_null(), "{u}");
    assert_problem(app.login("edit@example.com", PASSWORD).await, StatusCode::FORBIDDEN, "email_not_verified").await;
    app.clock.advance(5);
    let r = patch(&app, &admin, &id, json!({"email_verified": true})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let u: Value = r.json().await.unwrap();
    assert_eq!(u["email_verified"], true);
    assert!(u["email_verified_at"].is_string(), "{u}");
    assert_eq!(app.login("edit@example.com", PASSWORD).await.status(), StatusCode::OK);

    // An empty patch changes nothing and still answers with the user.
    let r = patch(&app, &admin, &id, json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let same: Value = r.json().await.unwrap();
    assert_eq!(same["role"], "admin");
    assert_eq!(same["metadata"], json!({"plan": "free"}));
}

async fn patch_rejects_unknown_states_and_roles_and_metadata_that_is_not_an_object(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let t = app.logged_in("strict@example.com").await;
    let id = str_of(&t["user"], "id");
    for (body, field) in [
        (json!({"status": "frozen"}), "status"),
        (json!({"status": "Suspended"}), "status"),
        (json!({"status": 1}), "status"),
        (json!({"status": null, "role": "root"}), "role"),
        (json!({"role": true}), "role"),
        (json!({"metadata": [1, 2]}), "metadata"),
        (json!({"metadata": "plan=pro"}), "metadata"),
        (json!({"metadata": 3}), "metadata"),
        (json!({"email_verified": "yes"}), "email_verified"),
        (json!({"name": 5}), "name"),
        (json!({"name": "x".repeat(201)}), "name"),
    ] {
        let r = patch(&app, &admin, &id, body.clone()).await;
        let p = assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
        let errors = p["errors"].as_array().unwrap_or_else(|| panic!("{body}: {p}"));
        assert!(errors.iter().any(|e| e["field"] == field), "{body} names {field}: {p}");
    }
    // A refused patch changes nothing, not even its valid parts.
    let r = patch(&app, &admin, &id, json!({"status": "suspended", "name": "Half", "metadata": [1]})).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
    let u: Value = app.get_bearer(&format!("/v1/admin/users/{id}"), &admin).await.json().await.unwrap();
    assert_eq!(u["status"], "active");
    assert!(u["name"].is_null(), "{u}");
    assert_eq!(u["metadata"], json!({}));
    assert_eq!(
        app.get_bearer("/v1/me", &str_of(&t, "access_token")).await.status(),
        StatusCode::OK,
        "the session survived the refused suspension"
    );
}

async fn suspending_ends_every_session_at_once_and_refuses_login_until_reactivated(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let first = app.logged_in("susp@example.com").await;
    let second = app.login_ok("susp@example.com").await;
    let bystander = app.logged_in("fine@example.com").await;
    let id = str_of(&first["user"], "id");

    let r = patch(&app, &admin, &id, json!({"status": "suspended"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let u: Value = r.json().await.unwrap();
    assert_user_shape(&u);
    assert_eq!(u["status"], "suspended");
    assert_sessions_ended(&app, &[&first, &second]).await;
    assert_eq!(app.get_bearer("/v1/me", &str_of(&bystander, "access_token")).await.status(), StatusCode::OK);
    assert_problem(app.login("susp@example.com", PASSWORD).await, StatusCode::FORBIDDEN, "account_suspended").await;
    // The wrong password is still just wrong: the state shows only to the owner.
    assert_problem(
        app.login("susp@example.com", "not the password").await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;

    let r = patch(&app, &admin, &id, json!({"status": "active"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "active");
    let again = app.login_ok("susp@example.com").await;
    assert_eq!(app.get_bearer("/v1/me", &str_of(&again, "access_token")).await.status(), StatusCode::OK);
    // Reactivation opens no old session again.
    assert_sessions_ended(&app, &[&first, &second]).await;
}

async fn the_other_inactive_states_refuse_login_with_their_own_code(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    for (status, code) in [("deactivated", "account_deactivated"), ("deleted", "account_deleted")] {
        let email = format!("{status}@example.com");
        let t = app.logged_in(&email).await;
        let r = patch(&app, &admin, &str_of(&t["user"], "id"), json!({"status": status})).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.json::<Value>().await.unwrap()["status"], status);
        assert_problem(
            app.get_bearer("/v1/me", &str_of(&t, "access_token")).await,
            StatusCode::UNAUTHORIZED,
            "session_ended",
        )
        .await;
        assert_problem(app.login(&email, PASSWORD).await, StatusCode::FORBIDDEN, code).await;
        // The refusal is in the user's trail, with its reason.
        let r = app.get_bearer(&format!("/v1/admin/users/{}/events", str_of(&t["user"], "id")), &admin).await;
        let trail: Value = r.json().await.unwrap();
        let newest = &trail["events"][0];
        assert_eq!((&newest["type"], &newest["detail"]), (&json!("login_refused"), &json!({"reason": code})));
    }
}

async fn unlock_clears_a_lockout_so_the_right_password_works_at_once(b: Backend) {
    let app = TestApp::spawn(b).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let id = str_of(&app.verified_user("locked@example.com").await, "id");
    for _ in 0..5 {
        assert_problem(
            app.login("locked@example.com", "wrong password!").await,
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
        )
        .await;
    }
    let r = app.login("locked@example.com", PASSWORD).await;
    assert_eq!(retry_after(&r), 60);
    assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "account_locked").await;

    let r = call(&app, Method::POST, &format!("/v1/admin/users/{id}/unlock"), Some(&admin), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(r.text().await.unwrap().is_empty());
    let t = app.login_ok("locked@example.com").await;
    assert_eq!(t["user"]["id"], id.as_str());

    // Unlocking an account that is not locked is harmless.
    let r = call(&app, Method::POST, &format!("/v1/admin/users/{id}/unlock"), Some(&admin), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    app.login_ok("locked@example.com").await;
}

async fn events_list_logins_failures_lockouts_and_session_ends_newest_first(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("lockout_tiers", "2:60"))).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let id = str_of(&app.verified_user("trail@example.com").await, "id");
    let other = app.logged_in("noise@example.com").await;

    app.clock.advance(10);
    let login = app
        .client
        .post(app.url("/v1/auth/login"))
        .header("user-agent", "trail-agent/2.0")
        .json(&json!({"email": "trail@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let t: Value = login.json().await.unwrap();
    app.clock.advance(10);
    assert_problem(
        app.login("trail@example.com", "wrong password!").await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    app.clock.advance(10);
    // The second failure reaches the tier of this app: a lockout.
    assert_problem(
        app.login("trail@example.com", "wrong password!").await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    app.clock.advance(10);
    let r = app
        .client
        .post(app.url("/v1/auth/logout"))
        .bearer_auth(str_of(&t, "access_token"))
        .header("user-agent", "trail-agent/2.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Someone else's doings are not in this trail.
    app.login("noise@example.com", "wrong password!").await;
    app.post_bearer("/v1/auth/logout", &str_of(&other, "access_token"), None).await;

    let r = app.get_bearer(&format!("/v1/admin/users/{id}/events"), &admin).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: Value = r.json().await.unwrap();
    let events = body["events"].as_array().unwrap_or_else(|| panic!("{body}"));
    for e in events {
        let mut fields: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["at", "detail", "ip", "type", "user_agent"], "{e}");
        assert!(e["detail"].is_object(), "{e}");
        time(e, "at");
    }
    let times: Vec<i64> = events.iter().map(|e| time(e, "at")).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {body}");
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let pos = |k: &str| kinds.iter().position(|x| *x == k).unwrap_or_else(|| panic!("a {k} event in {kinds:?}"));
    // Newest first: the session end, the lockout and failures, then the login.
    assert!(pos("session_ended") < pos("lockout"), "{kinds:?}");
    assert!(pos("lockout") < pos("login"), "{kinds:?}");
    assert!(pos("login_failed") < pos("login"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "login_failed").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "login").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "session_ended").count(), 1);

    assert_eq!(events[pos("lockout")]["detail"], json!({"failures": 2, "seconds": 60}), "how long it locks");
    let ended = &events[pos("session_ended")];
    assert_eq!(ended["ip"], "127.0.0.1");
    assert_eq!(ended["user_agent"], "trail-agent/2.0");
    assert_eq!(ended["detail"]["session_id"], t["session_id"]);
    let login = &events[pos("login")];
    assert_eq!(login["ip"], "127.0.0.1");
    assert_eq!(login["user_agent"], "trail-agent/2.0");
    assert_eq!(time(login, "at"), time(ended, "at") - 30);
    let failed = &events[pos("login_failed")];
    assert_eq!(failed["ip"], "127.0.0.1");
    assert_eq!(time(failed, "at"), time(ended, "at") - 10);
    // No secret of any kind is in the trail.
    let text = body.to_string();
    for secret in [PASSWORD, "wrong password!", &str_of(&t, "access_token"), &str_of(&t, "refresh_token")] {
        assert!(!text.contains(secret), "the trail holds a secret: {text}");
    }
}

async fn events_come_a_page_at_a_time_with_a_cursor_and_bad_pages_are_validation_failures(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("lockout_tiers", "100:60"))).await;
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let id = str_of(&app.verified_user("pages@example.com").await, "id");
    for _ in 0..5 {
        app.clock.advance(1);
        app.login("pages@example.com", "wrong password!").await;
    }
    let events = |query: String| {
        let (app, admin, id) = (&app, admin.clone(), id.clone());
        async move {
            let r = app.get_bearer(&format!("/v1/admin/users/{id}/events{query}"), &admin).await;
            assert_eq!(r.status(), StatusCode::OK, "{query}");
            r.json::<Value>().await.unwrap()
        }
    };
    let all = events(String::new()).await;
    assert!(all["next_cursor"].is_null(), "one page holds them all: {all}");
    let all = all["events"].as_array().unwrap().clone();
    // The five failures, then the verification and registration of the account.
    assert!(all.len() >= 5, "{all:?}");
    let failures: Vec<i64> = all.iter().take(5).map(|e| e["detail"]["failures"].as_i64().unwrap()).collect();
    assert_eq!(failures, [5, 4, 3, 2, 1], "newest first");

    let (mut walked, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let query = cursor.as_ref().map_or_else(|| "?limit=2".to_owned(), |c| format!("?limit=2&cursor={c}"));
        let page = events(query).await;
        let got = page["events"].as_array().unwrap();
        assert!(got.len() <= 2 && !got.is_empty(), "{page}");
        walked.extend(got.iter().cloned());
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, all, "the pages walk the whole trail once, in order");
    assert_eq!(pages, all.len().div_ceil(2));

    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=201", "limit"),
        ("?limit=two", "limit"),
        ("?cursor=not-a-cursor", "cursor"),
        ("?limit=1&limit=2", "query"),
    ] {
        let r = app.get_bearer(&format!("/v1/admin/users/{id}/events{query}"), &admin).await;
        let body = assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
        assert_eq!(body["errors"][0]["field"], field, "{query}: {body}");
    }
}

/// Both tokens of each login are refused: the access token as session_ended, the
/// refresh token as invalid_token.
async fn assert_sessions_ended(app: &TestApp, logins: &[&Value]) {
    for t in logins {
        assert_problem(
            app.get_bearer("/v1/me", &str_of(t, "access_token")).await,
            StatusCode::UNAUTHORIZED,
            "session_ended",
        )
        .await;
        let r = app.post("/v1/auth/refresh", json!({"refresh_token": str_of(t, "refresh_token")})).await;
        assert_problem(r, StatusCode::UNAUTHORIZED, "invalid_token").await;
    }
}
