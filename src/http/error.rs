//! problem+json (RFC 9457) for every failure. [`ApiError::parts`] is the one
//! exhaustive mapping from an outcome to status, `code` and `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::FieldError;
use crate::service::Error;

/// An error of the HTTP layer: a service outcome, or a request that never reached one.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// From a use case.
    #[error(transparent)]
    Service(#[from] Error),
    /// The body is not JSON.
    #[error("invalid json")]
    InvalidJson,
    /// The body is not declared as JSON.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// The body is over the limit.
    #[error("payload too large")]
    PayloadTooLarge,
    /// No such route.
    #[error("no such route")]
    RouteNotFound,
    /// The request took too long to arrive or to answer.
    #[error("request timeout")]
    Timeout,
    /// The route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
}

/// The problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type: `urn:gatehouse:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// Explanation of this occurrence.
    pub detail: String,
    /// Stable machine-readable code; clients branch on this.
    pub code: String,
    /// Per-field problems of `validation_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

struct Parts {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: &'static str,
    retry_after: Option<u32>,
}

const fn p(status: StatusCode, code: &'static str, title: &'static str, detail: &'static str) -> Parts {
    Parts { status, code, title, detail, retry_after: None }
}

impl ApiError {
    fn parts(&self) -> Parts {
        use StatusCode as S;
        match self {
            Self::InvalidJson => {
                p(S::BAD_REQUEST, "invalid_json", "Invalid JSON", "The request body is not valid JSON.")
            }
            Self::UnsupportedMediaType => p(
                S::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Unsupported media type",
                "Send the body as application/json.",
            ),
            Self::PayloadTooLarge => {
                p(S::PAYLOAD_TOO_LARGE, "payload_too_large", "Payload too large", "The request body is over 64 KiB.")
            }
            Self::RouteNotFound => p(S::NOT_FOUND, "not_found", "Not found", "There is nothing at this path."),
            Self::Timeout => p(S::REQUEST_TIMEOUT, "request_timeout", "Request timeout", "The request took too long."),
            Self::MethodNotAllowed => p(
                S::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
                "This path does not take this method.",
            ),
            Self::Service(e) => match e {
                Error::Validation(_) => {
                    p(S::BAD_REQUEST, "validation_failed", "Validation failed", "Some fields are missing or invalid.")
                }
                Error::InvalidCredentials => {
                    p(S::UNAUTHORIZED, "invalid_credentials", "Invalid credentials", "The email or password is wrong.")
                }
                Error::AccountLocked { retry_after } => Parts {
                    retry_after: Some(*retry_after),
                    ..p(
                        S::TOO_MANY_REQUESTS,
                        "account_locked",
                        "Account locked",
                        "Too many failed logins; try again later.",
                    )
                },
                Error::RateLimited { retry_after } => Parts {
                    retry_after: Some(*retry_after),
                    ..p(S::TOO_MANY_REQUESTS, "rate_limited", "Rate limited", "Too many requests from this address.")
                },
                Error::Overloaded => Parts {
                    retry_after: Some(1),
                    ..p(S::SERVICE_UNAVAILABLE, "overloaded", "Overloaded", "The service is busy; try again shortly.")
                },
                // Nobody hears it (see the variant).
                Error::Unavailable | Error::Abandoned => Parts {
                    retry_after: Some(1),
                    ..p(
                        S::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "Unavailable",
                        "The service cannot answer right now; try again shortly.",
                    )
                },
                Error::EmailNotVerified => p(
                    S::FORBIDDEN,
                    "email_not_verified",
                    "Email not verified",
                    "Verify your email address first; check your mail.",
                ),
                Error::AccountDeactivated => {
                    p(S::FORBIDDEN, "account_deactivated", "Account deactivated", "This account is deactivated.")
                }
                Error::AccountSuspended => {
                    p(S::FORBIDDEN, "account_suspended", "Account suspended", "This account is suspended.")
                }
                Error::AccountDeleted => {
                    p(S::FORBIDDEN, "account_deleted", "Account deleted", "This account was deleted.")
                }
                Error::InvalidToken => {
                    p(S::BAD_REQUEST, "invalid_token", "Invalid token", "The token or code is wrong, used or expired.")
                }
                Error::InvalidRefreshToken => p(
                    S::UNAUTHORIZED,
                    "invalid_token",
                    "Invalid token",
                    "The refresh token is unknown, expired or ended.",
                ),
                Error::RefreshTokenReused => p(
                    S::UNAUTHORIZED,
                    "refresh_token_reused",
                    "Refresh token reused",
                    "This refresh token was already used; the session has been ended.",
                ),
                Error::Unauthorized => {
                    p(S::UNAUTHORIZED, "unauthorized", "Unauthorized", "Missing or invalid credentials.")
                }
                Error::SessionEnded => p(S::UNAUTHORIZED, "session_ended", "Session ended", "This session has ended."),
                Error::Forbidden => p(S::FORBIDDEN, "forbidden", "Forbidden", "You may not do this."),
                Error::NotFound => p(S::NOT_FOUND, "not_found", "Not found", "No such resource."),
                Error::LastAdmin => p(
                    S::CONFLICT,
                    "last_admin",
                    "Last admin",
                    "This change would leave no admin able to act; make another admin first.",
                ),
                Error::Internal(_) => {
                    p(S::INTERNAL_SERVER_ERROR, "internal_error", "Internal error", "Something went wrong on our side.")
                }
            },
        }
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.parts().code
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let parts = self.parts();
        if let ApiError::Service(Error::Internal(cause)) = &self {
            // The cause goes to the log only; the client sees nothing of it.
            tracing::error!(error = %cause, "internal error");
        }
        let errors = match self {
            ApiError::Service(Error::Validation(errors)) => Some(errors),
            _ => None,
        };
        let body = Problem {
            kind: format!("urn:gatehouse:problem:{}", parts.code),
            title: parts.title.to_owned(),
            status: parts.status.as_u16(),
            detail: parts.detail.to_owned(),
            code: parts.code.to_owned(),
            errors,
        };
        let mut res = (parts.status, axum::Json(body)).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(secs) = parts.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if parts.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}
