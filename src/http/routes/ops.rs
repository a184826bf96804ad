//! Operations: health, readiness, metrics, the OpenAPI document and its viewer.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;

use crate::http::metrics::{prometheus_text, OPENMETRICS, PROMETHEUS_TEXT};
use crate::http::AppState;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "Up")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// The database answers.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses((status = 200, description = "Ready"), (status = 503, description = "Database unreachable")))]
pub async fn readyz(State(s): State<AppState>) -> Response {
    match s.services.store.ping().await {
        Ok(()) => Json(serde_json::json!({"status": "ready", "database": s.services.store.backend()})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            let mut res =
                (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "unavailable"}))).into_response();
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(5));
            res
        }
    }
}

/// Prometheus metrics: the text format 0.0.4, or OpenMetrics to a scraper that asks
/// for it (`Accept: application/openmetrics-text`).
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text")))]
pub async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let text = s.metrics.render();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains("application/openmetrics-text") {
        ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
    } else {
        ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], prometheus_text(&text)).into_response()
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "OpenAPI 3.1")))]
pub async fn openapi(State(s): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], s.openapi_json.clone()).into_response()
}

/// A page that renders the OpenAPI document (Redoc, loaded from its CDN).
#[utoipa::path(get, path = "/docs", tag = "ops", responses((status = 200, description = "HTML page", content_type = "text/html")))]
pub async fn docs() -> Response {
    let mut res = Html(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Gatehouse API</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="https://cdn.redoc.ly/redoc/v2.1.5/bundles/redoc.standalone.js"></script>
<noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>"#,
    )
    .into_response();
    res.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src https://cdn.redoc.ly; style-src 'unsafe-inline' https://fonts.googleapis.com; \
             font-src https://fonts.gstatic.com; img-src data: https:; connect-src 'self'; worker-src blob:; frame-ancestors 'none'",
        ),
    );
    res
}
