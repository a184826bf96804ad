//! `/v1/admin/*`: user administration, for callers whose stored role is admin.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::{EventPage, UserPage, UserView};
use crate::domain::FieldError;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{AdminCaller, AppJson, Client, PathId};
use crate::http::AppState;
use crate::service::admin::{EventQuery, UserPatchInput, UserQuery};
use crate::service::Error;

type Res<T> = Result<T, ApiError>;

/// A query string that does not parse (a repeated parameter, say): a validation failure.
fn query_problem(e: QueryRejection) -> Error {
    Error::Validation(vec![FieldError::new("query", "invalid", e.body_text())])
}

/// List users, filtered, a page at a time.
#[utoipa::path(get, path = "/v1/admin/users", tag = "admin", security(("bearer" = [])), params(UserQuery),
    responses((status = 200, body = UserPage), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn users(
    State(s): State<AppState>,
    _admin: AdminCaller,
    q: Result<Query<UserQuery>, QueryRejection>,
) -> Res<Json<UserPage>> {
    let Query(q) = q.map_err(query_problem)?;
    let (users, next_cursor) = s.services.admin_list_users(q).await?;
    Ok(Json(UserPage { users: users.into_iter().map(Into::into).collect(), next_cursor }))
}

/// One user.
#[utoipa::path(get, path = "/v1/admin/users/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")),
    responses((status = 200, body = UserView), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn user(State(s): State<AppState>, _admin: AdminCaller, PathId(id): PathId) -> Res<Json<UserView>> {
    Ok(Json(s.services.admin_user(id).await?.into()))
}

/// Change a user; a state other than active ends their sessions. The last admin able to
/// act (active, verified) keeps the role, the state and the verification (409 `last_admin`).
#[utoipa::path(patch, path = "/v1/admin/users/{id}", tag = "admin", security(("bearer" = [])), request_body = UserPatchInput,
    params(("id" = String, Path, description = "User id")),
    responses((status = 200, body = UserView), (status = 400, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "`last_admin`: the change would leave no admin able to act (active, verified)", body = Problem)))]
pub async fn patch_user(
    State(s): State<AppState>,
    AdminCaller(admin): AdminCaller,
    Client(meta): Client,
    PathId(id): PathId,
    AppJson(input): AppJson<UserPatchInput>,
) -> Res<Json<UserView>> {
    Ok(Json(s.services.admin_patch_user(&admin, id, input, &meta).await?.into()))
}

/// Clear the lockout of the user's email, the hard lock too.
#[utoipa::path(post, path = "/v1/admin/users/{id}/unlock", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn unlock(
    State(s): State<AppState>,
    AdminCaller(admin): AdminCaller,
    Client(meta): Client,
    PathId(id): PathId,
) -> Res<StatusCode> {
    s.services.admin_unlock(&admin, id, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The user's audit trail, newest first, a page at a time (the latest 200 by default).
#[utoipa::path(get, path = "/v1/admin/users/{id}/events", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id"), EventQuery),
    responses((status = 200, body = EventPage), (status = 400, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn events(
    State(s): State<AppState>,
    _admin: AdminCaller,
    PathId(id): PathId,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> Res<Json<EventPage>> {
    let Query(q) = q.map_err(query_problem)?;
    let (events, next_cursor) = s.services.admin_events(id, q).await?;
    Ok(Json(EventPage { events: events.into_iter().map(Into::into).collect(), next_cursor }))
}
