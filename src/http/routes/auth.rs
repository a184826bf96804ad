//! `/v1/auth/*`: register, verify, login, refresh, logout, password reset.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::{checking_password, StatusBody, TokenResponse, UserView};
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{AppJson, Client, SessionCaller};
use crate::http::AppState;
use crate::service::accounts::{EmailInput, LoginInput, RegisterInput, ResetInput, VerifyEmailInput};
use crate::service::sessions::RefreshInput;

type Res<T> = Result<T, ApiError>;

/// Create an account; the same answer whether or not the email is taken.
#[utoipa::path(post, path = "/v1/auth/register", tag = "auth", request_body = RegisterInput,
    responses((status = 202, body = StatusBody), (status = 400, body = Problem), (status = 429, body = Problem), (status = 503, body = Problem)))]
pub async fn register(
    State(s): State<AppState>,
    Client(meta): Client,
    AppJson(input): AppJson<RegisterInput>,
) -> Res<(StatusCode, Json<StatusBody>)> {
    s.services.register(input, &meta).await?;
    Ok((StatusCode::ACCEPTED, Json(StatusBody { status: "verification_sent" })))
}

/// Verify an email with the link token or the 6-digit code.
#[utoipa::path(post, path = "/v1/auth/verify-email", tag = "auth", request_body = VerifyEmailInput,
    responses((status = 200, body = UserView), (status = 400, body = Problem)))]
pub async fn verify_email(
    State(s): State<AppState>,
    Client(meta): Client,
    AppJson(input): AppJson<VerifyEmailInput>,
) -> Res<Json<UserView>> {
    Ok(Json(s.services.verify_email(input, &meta).await?.into()))
}

/// Mail a fresh verification; the same answer for every email.
#[utoipa::path(post, path = "/v1/auth/resend-verification", tag = "auth", request_body = EmailInput,
    responses((status = 202, body = StatusBody), (status = 400, body = Problem)))]
pub async fn resend_verification(
    State(s): State<AppState>,
    AppJson(input): AppJson<EmailInput>,
) -> Res<(StatusCode, Json<StatusBody>)> {
    s.services.resend_verification(input).await?;
    Ok((StatusCode::ACCEPTED, Json(StatusBody { status: "verification_sent" })))
}

/// Log in: rate limit, lockout, password, account state, in that order.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginInput,
    responses((status = 200, body = TokenResponse), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 429, body = Problem), (status = 503, body = Problem)))]
pub async fn login(
    State(s): State<AppState>,
    Client(meta): Client,
    AppJson(input): AppJson<LoginInput>,
) -> Res<Json<TokenResponse>> {
    let st = s.clone();
    let tokens =
        checking_password(
            &s.password_checks,
            |abandoned| async move { st.services.login(input, &meta, &abandoned).await },
        )
        .await?;
    Ok(Json(TokenResponse::new(tokens, s.services.now())))
}

/// Rotate a refresh token.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshInput,
    responses((status = 200, body = TokenResponse), (status = 400, body = Problem), (status = 401, body = Problem)))]
pub async fn refresh(
    State(s): State<AppState>,
    Client(meta): Client,
    AppJson(input): AppJson<RefreshInput>,
) -> Res<Json<TokenResponse>> {
    let tokens = s.services.refresh(input, &meta).await?;
    Ok(Json(TokenResponse::new(tokens, s.services.now())))
}

/// End the caller's session.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem)))]
pub async fn logout(
    State(s): State<AppState>,
    Client(meta): Client,
    SessionCaller(caller): SessionCaller,
) -> Res<StatusCode> {
    s.services.logout(&caller, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Mail a password reset link; the same answer for every email.
#[utoipa::path(post, path = "/v1/auth/password/forgot", tag = "auth", request_body = EmailInput,
    responses((status = 202, body = StatusBody), (status = 400, body = Problem)))]
pub async fn forgot_password(
    State(s): State<AppState>,
    AppJson(input): AppJson<EmailInput>,
) -> Res<(StatusCode, Json<StatusBody>)> {
    s.services.forgot_password(input).await?;
    Ok((StatusCode::ACCEPTED, Json(StatusBody { status: "reset_sent" })))
}

/// Set a new password with a reset token; ends every session.
#[utoipa::path(post, path = "/v1/auth/password/reset", tag = "auth", request_body = ResetInput,
    responses((status = 204), (status = 400, body = Problem)))]
pub async fn reset_password(
    State(s): State<AppState>,
    Client(meta): Client,
    AppJson(input): AppJson<ResetInput>,
) -> Res<StatusCode> {
    s.services.reset_password(input, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}
