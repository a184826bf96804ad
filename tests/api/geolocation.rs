//! `last_login_geolocation` from a MaxMind city database, for the client address a
//! trusted proxy forwards; the session list shows that address too.

use gatehouse::app::App;
use gatehouse::config::Settings;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

/// MaxMind's public test database (see the README next to it), read in place from the
/// `shared/` folder beside this repository.
const GEOIP_DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/testdata/geoip/GeoIP2-City-Test.mmdb");

both_backends!(
    a_login_through_a_trusted_proxy_is_located_by_the_forwarded_address,
    each_login_replaces_the_location_of_the_last,
    without_a_trusted_proxy_the_forwarded_address_is_ignored,
    without_a_geoip_database_the_location_is_null,
    a_geoip_database_that_cannot_be_opened_stops_the_start,
);

async fn located_app(b: Backend) -> TestApp {
    TestApp::spawn_with(b, |f| f.merge(("geoip_db", GEOIP_DB)).merge(("trusted_proxies", "127.0.0.1"))).await
}

async fn login_from(app: &TestApp, email: &str, forwarded_for: Option<&str>) -> Response {
    let mut r = app.client.post(app.url("/v1/auth/login")).json(&json!({"email": email, "password": PASSWORD}));
    if let Some(xff) = forwarded_for {
        r = r.header("x-forwarded-for", xff);
    }
    r.send().await.unwrap()
}

async fn login_ok_from(app: &TestApp, email: &str, forwarded_for: Option<&str>) -> Value {
    let r = login_from(app, email, forwarded_for).await;
    assert_eq!(r.status(), StatusCode::OK, "login from {forwarded_for:?}");
    r.json().await.unwrap()
}

/// The caller's current session as `GET /v1/me/sessions` lists it.
async fn current_session(app: &TestApp, t: &Value) -> Value {
    let list: Vec<Value> = app.get_bearer("/v1/me/sessions", &str_of(t, "access_token")).await.json().await.unwrap();
    list.into_iter().find(|s| s["current"] == true).expect("the current session is listed")
}

async fn me(app: &TestApp, t: &Value) -> Value {
    let r = app.get_bearer("/v1/me", &str_of(t, "access_token")).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

async fn a_login_through_a_trusted_proxy_is_located_by_the_forwarded_address(b: Backend) {
    let app = located_app(b).await;
    app.verified_user("london@example.com").await;
    let t = login_ok_from(&app, "london@example.com", Some("81.2.69.142")).await;
    let geo = &t["user"]["last_login_geolocation"];
    assert!(geo.is_object(), "{t}");
    assert_eq!(geo["country_code"], "GB", "{geo}");
    assert_eq!(geo["city"], "London", "{geo}");
    assert_eq!(current_session(&app, &t).await["ip"], "81.2.69.142");
    // The stored user holds it too, for the user and for an admin.
    assert_eq!(&me(&app, &t).await["last_login_geolocation"], geo);
    let admin = str_of(&app.admin("root@example.com").await, "access_token");
    let u: Value =
        app.get_bearer(&format!("/v1/admin/users/{}", str_of(&t["user"], "id")), &admin).await.json().await.unwrap();
    assert_eq!(&u["last_login_geolocation"], geo);

    // Through a chain of proxies the right-most untrusted hop is the client.
    let t = login_ok_from(&app, "london@example.com", Some("203.0.113.9, 81.2.69.142, 127.0.0.1")).await;
    assert_eq!(t["user"]["last_login_geolocation"]["city"], "London");
    assert_eq!(current_session(&app, &t).await["ip"], "81.2.69.142");
}

async fn each_login_replaces_the_location_of_the_last(b: Backend) {
    let app = located_app(b).await;
    app.verified_user("travel@example.com").await;
    let t = login_ok_from(&app, "travel@example.com", Some("89.160.20.115")).await;
    let geo = &t["user"]["last_login_geolocation"];
    assert_eq!(geo["country_code"], "SE", "{geo}");
    assert_eq!(geo["city"], "Linköping", "{geo}");
    assert_eq!(current_session(&app, &t).await["ip"], "89.160.20.115");

    // A country-only entry, over IPv6.
    let t = login_ok_from(&app, "travel@example.com", Some("2001:218::1")).await;
    let geo = &t["user"]["last_login_geolocation"];
    assert_eq!(geo["country_code"], "JP", "{geo}");
    assert!(geo["city"].is_null(), "{geo}");
    assert_eq!(current_session(&app, &t).await["ip"], "2001:218::1");

    // An address the database does not know leaves no stale location behind.
    let t = login_ok_from(&app, "travel@example.com", Some("192.0.2.1")).await;
    assert!(t["user"]["last_login_geolocation"].is_null(), "{t}");
    assert!(me(&app, &t).await["last_login_geolocation"].is_null());
    assert_eq!(current_session(&app, &t).await["ip"], "192.0.2.1");
}

async fn without_a_trusted_proxy_the_forwarded_address_is_ignored(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("geoip_db", GEOIP_DB))).await;
    app.verified_user("direct@example.com").await;
    let t = login_ok_from(&app, "direct@example.com", Some("81.2.69.142")).await;
    assert_eq!(current_session(&app, &t).await["ip"], "127.0.0.1");
    // The peer is loopback, which no city database locates.
    assert!(t["user"]["last_login_geolocation"].is_null(), "{t}");
    assert!(me(&app, &t).await["last_login_geolocation"].is_null());

    // A trusted proxy other than the peer changes nothing either.
    let app =
        TestApp::spawn_with(b, |f| f.merge(("geoip_db", GEOIP_DB)).merge(("trusted_proxies", "10.0.0.0/8"))).await;
    app.verified_user("direct@example.com").await;
    let t = login_ok_from(&app, "direct@example.com", Some("81.2.69.142")).await;
    assert_eq!(current_session(&app, &t).await["ip"], "127.0.0.1");
    assert!(t["user"]["last_login_geolocation"].is_null(), "{t}");
}

async fn without_a_geoip_database_the_location_is_null(b: Backend) {
    let app = TestApp::spawn_with(b, |f| f.merge(("trusted_proxies", "127.0.0.1"))).await;
    app.verified_user("nowhere@example.com").await;
    let t = login_ok_from(&app, "nowhere@example.com", Some("81.2.69.142")).await;
    assert!(t["user"].get("last_login_geolocation").is_some(), "the field is there: {t}");
    assert!(t["user"]["last_login_geolocation"].is_null(), "{t}");
    assert!(me(&app, &t).await["last_login_geolocation"].is_null());
    // The forwarded address is still the client's.
    assert_eq!(current_session(&app, &t).await["ip"], "81.2.69.142");
}

async fn a_geoip_database_that_cannot_be_opened_stops_the_start(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(b, dir.path()).await;
    let missing = dir.path().join("no-such.mmdb");
    let not_a_db = dir.path().join("garbage.mmdb");
    std::fs::write(&not_a_db, b"this is not a MaxMind database").unwrap();
    for path in [&missing, &not_a_db] {
        let settings = Settings::from_figment(
            Settings::figment(None)
                .merge(("data_dir", dir.path().display().to_string()))
                .merge(("database_url", url.clone()))
                .merge(("password_hash", "argon2id:m=64,t=1,p=1"))
                .merge(("geoip_db", path.display().to_string())),
        )
        .expect("settings");
        let Err(e) = App::build(&settings).await else {
            panic!("{} was accepted as a GeoIP database", path.display());
        };
        let msg = format!("{e:#}");
        assert!(msg.contains("geoip_db"), "the error names the setting: {msg}");
    }
}
