//! Discovery: the JWK set and the OpenID-style configuration.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::http::AppState;

fn cacheable(body: serde_json::Value) -> Response {
    let mut res = Json(body).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    res
}

/// The public keys that verify access tokens.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "ops", responses((status = 200, description = "JWK set")))]
pub async fn jwks(State(s): State<AppState>) -> Response {
    cacheable(s.services.tokens.jwks().clone())
}

/// Issuer, JWKS location and endpoints.
#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "ops", responses((status = 200, description = "Discovery document")))]
pub async fn openid_configuration(State(s): State<AppState>) -> Response {
    let iss = s.services.tokens.issuer();
    cacheable(serde_json::json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "token_endpoint": format!("{iss}/v1/auth/login"),
        "refresh_endpoint": format!("{iss}/v1/auth/refresh"),
        "userinfo_endpoint": format!("{iss}/v1/me"),
        "registration_endpoint": format!("{iss}/v1/auth/register"),
        "revocation_endpoint": format!("{iss}/v1/auth/logout"),
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "token_endpoint_auth_methods_supported": ["none"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "grant_types_supported": ["password", "refresh_token"],
    }))
}
