//! Bad input gets problem+json, never a 5xx; operations endpoints.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    bad_bodies_get_the_contract_errors,
    unknown_routes_and_methods_are_problems_too,
    health_readiness_metrics_and_discovery_answer,
    metrics_count_how_the_session_memory_answered,
    the_openapi_document_covers_every_route,
    browsers_on_the_listed_origins_only_may_call_the_api,
);

async fn raw(app: &TestApp, path: &str, ct: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut r = app.client.post(app.url(path)).body(body);
    if let Some(ct) = ct {
        r = r.header("content-type", ct);
    }
    r.send().await.unwrap()
}

/// A request that declares a body of 100 MB and sends two bytes, asking to be told to
/// go on: what comes back within 3 s.
async fn declared_too_large(app: &TestApp, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.addr;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n{{}}"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&answer).contains("payload_too_large") {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

async fn bad_bodies_get_the_contract_errors(b: Backend) {
    let app = TestApp::spawn(b).await;
    for path in
        ["/v1/auth/register", "/v1/auth/login", "/v1/auth/verify-email", "/v1/auth/refresh", "/v1/auth/password/reset"]
    {
        assert_problem(
            raw(&app, path, Some("application/json"), b"{nope".to_vec()).await,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        )
        .await;
        assert_problem(
            raw(&app, path, Some("text/plain"), b"{}".to_vec()).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        assert_problem(
            raw(&app, path, None, b"{}".to_vec()).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        // JSON is UTF-8: a body declared in another charset is not read as if it were.
        assert_problem(
            raw(&app, path, Some("application/json; charset=latin1"), b"{}".to_vec()).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        // A name twice in an object (escaped the second time, or nested): which counts
        // would depend on the parser, so neither does.
        for dup in [
            &br#"{"email": "a@example.com", "password": "one", "password": "two"}"#[..],
            br#"{"email": "a@example.com", "\u0065mail": "b@example.com"}"#,
            br#"{"email": "a@example.com", "password": "a", "pass\u0077ord": "b"}"#,
            br#"{"token": "t", "x": {"k": 1, "k": 2}}"#,
        ] {
            assert_problem(
                raw(&app, path, Some("application/json"), dup.to_vec()).await,
                StatusCode::BAD_REQUEST,
                "invalid_json",
            )
            .await;
        }
        let big = format!("{{\"email\": \"{}\"}}", "a".repeat(70 * 1024)).into_bytes();
        // Too large is answered first, whatever the content type says.
        for ct in [Some("application/json"), Some("text/plain"), None] {
            assert_problem(raw(&app, path, ct, big.clone()).await, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
                .await;
        }
        // Declared too large by a client that waits to be told to go on: answered at
        // once, without `100 Continue`.
        let answer = declared_too_large(&app, path).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains("payload_too_large") && !answer.contains("100 Continue"), "{path}: {answer}");
        for body in [&b"[]"[..], b"null", b"42", b"\"s\""] {
            let r = raw(&app, path, Some("application/json"), body.to_vec()).await;
            assert_problem(r, StatusCode::BAD_REQUEST, "validation_failed").await;
        }
        let r =
            raw(&app, path, Some("application/json; charset=utf-8"), br#"{"email": ["x"], "password": {}}"#.to_vec())
                .await;
        assert!(r.status().is_client_error(), "{path}: {}", r.status());
    }
    // Odd but well-formed input never yields a 5xx.
    for body in [
        r#"{"email": "\u0000@example.com", "password": "x"}"#,
        r#"{"email": "a@example.com", "password": "\ud800"}"#,
        r#"{"email": "émile@exämple.com", "password": "correct horse battery"}"#,
    ] {
        let r = raw(&app, "/v1/auth/login", Some("application/json"), body.as_bytes().to_vec()).await;
        assert!(r.status().is_client_error(), "{body}: {}", r.status());
    }
    let long = "p".repeat(60 * 1024);
    let r = app.login("long@example.com", &long).await;
    assert_problem(r, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
}

async fn unknown_routes_and_methods_are_problems_too(b: Backend) {
    let app = TestApp::spawn(b).await;
    let r = app.client.get(app.url("/v1/nothing")).send().await.unwrap();
    assert_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = app.client.get(app.url("/v1/auth/login")).send().await.unwrap();
    assert!(r.headers().contains_key("allow"));
    assert_problem(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

/// The value of the series `name` in the metrics text, if present.
fn series(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn metrics_count_how_the_session_memory_answered(b: Backend) {
    let app = TestApp::spawn(b).await;
    let token = str_of(&app.logged_in("counted@example.com").await, "access_token");
    let reads = |answer: &str, metrics: &str| {
        series(metrics, &format!("gatehouse_session_memory_reads_total{{answer=\"{answer}\"}}")).unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut checks = 0;
    loop {
        assert_eq!(app.get_bearer("/v1/me", &token).await.status(), StatusCode::OK);
        checks += 1;
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        match b {
            Backend::Sqlite => {
                // SQLite reads the file on every check: no memory, no series.
                assert!(!metrics.contains("gatehouse_session_memory_reads_total{"), "{metrics}");
                return;
            }
            Backend::Postgres => {
                let counted = reads("hit", &metrics) + reads("miss", &metrics) + reads("unleased", &metrics);
                assert_eq!(counted, checks, "each Bearer check's read is counted once: {metrics}");
                if reads("hit", &metrics) > 0 {
                    return;
                }
            }
        }
        assert!(std::time::Instant::now() < deadline, "no Bearer check was answered from memory");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn health_readiness_metrics_and_discovery_answer(b: Backend) {
    let app = TestApp::spawn(b).await;
    let get = |p: &str| app.client.get(app.url(p)).send();
    let r = get("/healthz").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let ready: Value = get("/readyz").await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    app.login("m@example.com", "whatever").await;
    let r = get("/metrics").await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let metrics = r.text().await.unwrap();
    assert!(
        metrics.contains("gatehouse_http_requests_total{method=\"POST\",route=\"/v1/auth/login\",status=\"401\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE gatehouse_http_requests_total counter\n"), "{metrics}");
    assert!(metrics.contains("gatehouse_password_hash_workers"));
    assert!(!metrics.contains("# EOF"), "{metrics}");
    // OpenMetrics to a scraper that asks for it.
    let r = app.client.get(app.url("/metrics")).header("accept", "application/openmetrics-text; version=1.0.0").send();
    let r = r.await.unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let om = r.text().await.unwrap();
    assert!(om.ends_with("# EOF\n") && om.contains("# TYPE gatehouse_http_requests counter\n"), "{om}");
    let conf: Value = get("/.well-known/openid-configuration").await.unwrap().json().await.unwrap();
    assert_eq!(conf["issuer"], "http://127.0.0.1:8080");
    assert_eq!(conf["jwks_uri"], "http://127.0.0.1:8080/.well-known/jwks.json");
    let jwks: Value = get("/.well-known/jwks.json").await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    let docs = get("/docs").await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("/openapi.json"));
}

async fn the_openapi_document_covers_every_route(b: Backend) {
    let app = TestApp::spawn(b).await;
    let doc: Value = app.client.get(app.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/auth/register", "post"),
        ("/v1/auth/verify-email", "post"),
        ("/v1/auth/resend-verification", "post"),
        ("/v1/auth/login", "post"),
        ("/v1/auth/refresh", "post"),
        ("/v1/auth/logout", "post"),
        ("/v1/auth/password/forgot", "post"),
        ("/v1/auth/password/reset", "post"),
        ("/v1/me", "get"),
        ("/v1/me/password", "post"),
        ("/v1/me/sessions", "get"),
        ("/v1/me/sessions/{id}", "delete"),
        ("/v1/me/api-keys", "post"),
        ("/v1/me/api-keys", "get"),
        ("/v1/me/api-keys/{id}", "delete"),
        ("/v1/admin/users", "get"),
        ("/v1/admin/users/{id}", "get"),
        ("/v1/admin/users/{id}", "patch"),
        ("/v1/admin/users/{id}/unlock", "post"),
        ("/v1/admin/users/{id}/events", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/docs", "get"),
        ("/.well-known/jwks.json", "get"),
        ("/.well-known/openid-configuration", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    // What a validator checks: an operation's path parameters are exactly its
    // template's, each parameter is declared once, and every reference resolves.
    for (path, item) in paths {
        let template: std::collections::BTreeSet<&str> =
            path.split('/').filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}')).collect();
        for (method, op) in item.as_object().unwrap() {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let declared: std::collections::BTreeSet<&str> =
                params.iter().filter(|p| p["in"] == "path").map(|p| p["name"].as_str().unwrap()).collect();
            assert_eq!(declared, template, "{method} {path}: path parameters");
            let mut seen = std::collections::BTreeSet::new();
            for p in &params {
                assert!(seen.insert((p["name"].to_string(), p["in"].to_string())), "{method} {path}: {p} twice");
                assert!(["path", "query", "header", "cookie"].contains(&p["in"].as_str().unwrap()), "{p}");
            }
        }
    }
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"").skip(1) {
        let target = r.split('"').next().unwrap();
        let pointer = target.strip_prefix('#').unwrap_or_else(|| panic!("external reference {target}"));
        assert!(doc.pointer(pointer).is_some(), "unresolved reference {target}");
    }
}

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(reqwest::Method::OPTIONS, app.url("/v1/auth/login"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap()
}

async fn browsers_on_the_listed_origins_only_may_call_the_api(b: Backend) {
    // By default no origin is listed: no CORS headers, and a preflight is 405.
    let app = TestApp::spawn(b).await;
    let r = preflight(&app, "https://app.example.com").await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let app =
        TestApp::spawn_with(b, |f| f.merge(("cors_origins", "https://app.example.com,http://localhost:5173"))).await;
    let r = preflight(&app, "https://app.example.com").await;
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"), "{h:?}");
    assert!(h["access-control-allow-headers"].to_str().unwrap().contains("content-type"), "{h:?}");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(h.get("access-control-allow-credentials").is_none(), "tokens travel in headers, not cookies");
    // The call itself: answered with the origin, Retry-After readable by the page.
    let r = app
        .client
        .post(app.url("/v1/auth/login"))
        .header("origin", "http://localhost:5173")
        .json(&json!({"email": "nobody@example.com", "password": "not the password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["access-control-allow-origin"], "http://localhost:5173");
    assert!(r.headers()["access-control-expose-headers"].to_str().unwrap().contains("retry-after"));
    // Another origin is told nothing.
    let r = preflight(&app, "https://evil.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = app.client.get(app.url("/v1/me")).header("origin", "https://evil.example").send().await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // The framework's own answers, made problems, keep the CORS headers a page needs
    // to read them.
    let r = app.client.put(app.url("/v1/auth/login")).header("origin", "https://app.example.com").send().await.unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example.com");
    assert_problem(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    // The preflights the CORS layer answered itself are counted like any request.
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let preflights = "gatehouse_http_requests_total{method=\"OPTIONS\",route=\"/v1/auth/login\",status=\"200\"} 2";
    assert!(metrics.contains(preflights), "{metrics}");
}
