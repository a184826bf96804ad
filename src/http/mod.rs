//! The HTTP surface: the route table, middleware (security headers, metrics, per-IP
//! rate limit), problem+json errors, extractors, and the OpenAPI document generated
//! from the handlers' own annotations.

pub mod error;
pub mod extract;
pub mod metrics;
pub mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::{CorsOrigins, RateLimit, TrustedProxies};
use crate::service::{Error, Services};
use error::ApiError;
use routes::{admin, auth, me, ops, well_known};

/// Largest request body.
pub const BODY_LIMIT: usize = 64 * 1024;

/// What handlers share.
pub struct HttpState {
    /// The use cases.
    pub services: Services,
    /// Proxies whose X-Forwarded-For is believed.
    pub trusted_proxies: TrustedProxies,
    /// The per-IP limit on `/v1/auth/*`.
    pub rate_limit: RateLimit,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// The OpenAPI document, rendered once.
    pub openapi_json: String,
    /// The password checks under way (see [`routes::checking_password`]), waited for
    /// at shutdown.
    pub password_checks: TaskTracker,
}

/// Shared state handle.
pub type AppState = Arc<HttpState>;

#[derive(OpenApi)]
#[openapi(
    info(title = "Gatehouse", description = "Self-hosted identity service: accounts, sessions, access tokens."),
    modifiers(&SecuritySchemes),
    tags(
        (name = "auth", description = "Registration, verification, login, tokens"),
        (name = "me", description = "The authenticated user"),
        (name = "admin", description = "User administration"),
        (name = "ops", description = "Operations and discovery"),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
    }
}

/// The route table and its OpenAPI document, from the same annotations.
fn api() -> (Router<AppState>, utoipa::openapi::OpenApi, Router<AppState>) {
    let (auth_routes, auth_doc) = OpenApiRouter::new()
        .routes(routes!(auth::register))
        .routes(routes!(auth::verify_email))
        .routes(routes!(auth::resend_verification))
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::forgot_password))
        .routes(routes!(auth::reset_password))
        .split_for_parts();
    let (rest, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(me::me))
        .routes(routes!(me::change_password))
        .routes(routes!(me::sessions, me::end_other_sessions))
        .routes(routes!(me::end_session))
        .routes(routes!(me::create_api_key, me::api_keys))
        .routes(routes!(me::revoke_api_key))
        .routes(routes!(admin::users))
        .routes(routes!(admin::user, admin::patch_user))
        .routes(routes!(admin::unlock))
        .routes(routes!(admin::events))
        .routes(routes!(well_known::jwks))
        .routes(routes!(well_known::openid_configuration))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
        .routes(routes!(ops::docs))
        .split_for_parts();
    let mut doc = doc;
    doc.merge(auth_doc);
    (auth_routes, doc, rest)
}

/// Builds the router over `state`'s services.
pub fn router(
    services: Services,
    trusted_proxies: TrustedProxies,
    rate_limit: RateLimit,
    cors_origins: &CorsOrigins,
) -> (Router, AppState) {
    let (auth_routes, doc, rest) = api();
    let openapi_json = doc.to_json().unwrap_or_else(|_| "{}".into());
    let (hasher, store) = (services.hasher.clone(), services.store.clone());
    let metrics = metrics::Metrics::new(move || metrics::Readings {
        hash_in_flight: hasher.in_flight(),
        hash_running: hasher.running(),
        hash_workers: hasher.workers(),
        memory: store.memory_reads(),
    });
    let state = Arc::new(HttpState {
        services,
        trusted_proxies,
        rate_limit,
        metrics,
        openapi_json,
        password_checks: TaskTracker::new(),
    });
    let auth_routes = auth_routes.route_layer(middleware::from_fn_with_state(state.clone(), rate_limit_per_ip));
    let router = Router::new()
        .merge(auth_routes)
        .merge(rest)
        .fallback(|| async { ApiError::RouteNotFound })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // A client that trickles its body is cut off; no request runs forever.
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(10)))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(30)))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Service(Error::Internal(anyhow::anyhow!("a handler panicked"))).into_response()
        }))
        .layer(middleware::from_fn(problems_for_bare_answers));
    // Outside what turns the framework's bare answers into problems, so that those carry
    // the CORS headers; inside the metrics, so that the preflights it answers itself are
    // counted, and inside the security headers, so that they carry them too.
    let router = match cors(cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    let router = router
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(security_headers))
        .with_state(state.clone());
    (router, state)
}

/// Cross-origin calls from the pages of `origins` (none: no CORS headers, and a
/// preflight is 405 as any unknown method; with origins, the layer answers every
/// `OPTIONS` itself). Tokens travel in headers, never cookies, so no credentials mode;
/// 429 and 503 tell their `Retry-After`.
fn cors(origins: &CorsOrigins) -> Option<CorsLayer> {
    if origins.0.is_empty() {
        return None;
    }
    let list = origins.0.iter().filter_map(|o| HeaderValue::from_str(o).ok());
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
            .allow_headers([AUTHORIZATION, CONTENT_TYPE, HeaderName::from_static("x-api-key")])
            .expose_headers([RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    )
}

/// Per-IP fixed-window limit on the auth endpoints, counted in the database so every
/// instance shares it.
async fn rate_limit_per_ip(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.rate_limit.enabled() {
        let ip = extract::request_ip(&req, &state.trusted_proxies);
        let now = state.services.now();
        match state.services.store.hit_rate_limit(&extract::rate_key(ip), state.rate_limit, now).await {
            Ok(None) => {}
            Ok(Some(retry_after)) => return ApiError::from(Error::RateLimited { retry_after }).into_response(),
            Err(e) => return ApiError::from(Error::from(e)).into_response(),
        }
    }
    next.run(req).await
}

/// Records metrics.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let res = next.run(req).await;
    state.metrics.observe(&method, &route, res.status().as_u16(), start.elapsed().as_secs_f64());
    res
}

/// Turns the framework's bare 405 and 408 into problem+json.
async fn problems_for_bare_answers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    if !res.headers().contains_key(header::CONTENT_TYPE) {
        if res.status() == StatusCode::METHOD_NOT_ALLOWED {
            let allow = res.headers().get(header::ALLOW).cloned();
            res = ApiError::MethodNotAllowed.into_response();
            if let Some(allow) = allow {
                res.headers_mut().insert(header::ALLOW, allow);
            }
        } else if res.status() == StatusCode::REQUEST_TIMEOUT {
            res = ApiError::Timeout.into_response();
        }
    }
    res
}

/// `nosniff` everywhere; `no-store` and a locked-down CSP unless the handler chose.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    res
}
