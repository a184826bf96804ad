//! `/v1/me/*`: the caller's profile, password, sessions and API keys.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::{checking_password, ApiKeyCreated, ApiKeyView, SessionView, UserView};
use crate::clock::rfc3339;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{AnyCaller, AppJson, Client, PathId, SessionCaller};
use crate::http::AppState;
use crate::service::accounts::ChangePasswordInput;
use crate::service::api_keys::NewApiKeyInput;
use crate::service::Error;

type Res<T> = Result<T, ApiError>;

/// The caller.
#[utoipa::path(get, path = "/v1/me", tag = "me", security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = UserView), (status = 401, body = Problem)))]
pub async fn me(AnyCaller(caller): AnyCaller) -> Json<UserView> {
    Json(caller.user.into())
}

/// Change the password; ends the caller's other sessions.
#[utoipa::path(post, path = "/v1/me/password", tag = "me", security(("bearer" = [])), request_body = ChangePasswordInput,
    responses((status = 204), (status = 400, body = Problem), (status = 401, body = Problem), (status = 429, body = Problem)))]
pub async fn change_password(
    State(s): State<AppState>,
    Client(meta): Client,
    SessionCaller(caller): SessionCaller,
    AppJson(input): AppJson<ChangePasswordInput>,
) -> Res<StatusCode> {
    let sid = caller.session_id.ok_or(Error::Unauthorized)?;
    let checks = s.password_checks.clone();
    checking_password(&checks, |abandoned| async move {
        s.services.change_password(&caller.user, sid, input, &meta, &abandoned).await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's live sessions.
#[utoipa::path(get, path = "/v1/me/sessions", tag = "me", security(("bearer" = [])),
    responses((status = 200, body = Vec<SessionView>), (status = 401, body = Problem)))]
pub async fn sessions(State(s): State<AppState>, SessionCaller(caller): SessionCaller) -> Res<Json<Vec<SessionView>>> {
    let list = s.services.sessions(&caller).await?;
    Ok(Json(list.into_iter().map(|x| SessionView::new(x, caller.session_id)).collect()))
}

/// End every session of the caller but the current one.
#[utoipa::path(delete, path = "/v1/me/sessions", tag = "me", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem)))]
pub async fn end_other_sessions(
    State(s): State<AppState>,
    Client(meta): Client,
    SessionCaller(caller): SessionCaller,
) -> Res<StatusCode> {
    s.services.end_other_sessions(&caller, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// End one of the caller's sessions.
#[utoipa::path(delete, path = "/v1/me/sessions/{id}", tag = "me", security(("bearer" = [])),
    params(("id" = String, Path, description = "Session id")),
    responses((status = 204), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn end_session(
    State(s): State<AppState>,
    Client(meta): Client,
    SessionCaller(caller): SessionCaller,
    PathId(id): PathId,
) -> Res<StatusCode> {
    s.services.end_session(&caller, id, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Create an API key; the key is in this answer only.
#[utoipa::path(post, path = "/v1/me/api-keys", tag = "me", security(("bearer" = [])), request_body = NewApiKeyInput,
    responses((status = 201, body = ApiKeyCreated), (status = 400, body = Problem), (status = 401, body = Problem)))]
pub async fn create_api_key(
    State(s): State<AppState>,
    Client(meta): Client,
    SessionCaller(caller): SessionCaller,
    AppJson(input): AppJson<NewApiKeyInput>,
) -> Res<(StatusCode, Json<ApiKeyCreated>)> {
    let (k, key) = s.services.create_api_key(&caller, input, &meta).await?;
    let body = ApiKeyCreated {
        id: k.id,
        name: k.name,
        key,
        prefix: k.prefix,
        created_at: rfc3339(k.created_at),
        expires_at: k.expires_at.map(rfc3339),
    };
    Ok((StatusCode::CREATED, Json(body)))
}

/// The caller's API keys, without the keys.
#[utoipa::path(get, path = "/v1/me/api-keys", tag = "me", security(("bearer" = [])),
    responses((status = 200, body = Vec<ApiKeyView>), (status = 401, body = Problem)))]
pub async fn api_keys(State(s): State<AppState>, SessionCaller(caller): SessionCaller) -> Res<Json<Vec<ApiKeyView>>> {
    Ok(Json(s.services.api_keys(&caller).await?.into_iter().map(Into::into).collect()))
}

/// Revoke an API key; it stops working at once.
#[utoipa::path(delete, path = "/v1/me/api-keys/{id}", tag = "me", security(("bearer" = [])),
    params(("id" = String, Path, description = "API key id")),
    responses((status = 204), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn revoke_api_key(
    State(s): State<AppState>,
    Client(meta): Client,
    SessionCaller(caller): SessionCaller,
    PathId(id): PathId,
) -> Res<StatusCode> {
    s.services.revoke_api_key(&caller, id, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}
