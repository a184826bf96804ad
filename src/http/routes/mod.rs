//! Thin handlers grouped by area, and the response shapes of the contract.

pub mod admin;
pub mod auth;
pub mod me;
pub mod ops;
pub mod well_known;

use std::future::Future;

use serde::Serialize;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::clock::{rfc3339, UnixTime};
use crate::crypto::password::Abandoned;
use crate::domain::user::{Role, Status, User};
use crate::service::accounts::Tokens;
use crate::service::Error;
use crate::store::{ApiKey, Event, Session};

/// Runs a use case that checks a password (login, password change) on a task of its
/// own, so that the check's outcome is acted on even if the client hangs up or the
/// request times out: a request's future is dropped then, and would take the rest of
/// the use case with it. The use case learns that through its [`Abandoned`]. The task
/// is one of `checks`, which shutdown waits for before the store closes.
pub(crate) async fn checking_password<T, F>(
    checks: &TaskTracker,
    use_case: impl FnOnce(Abandoned) -> F,
) -> Result<T, Error>
where
    T: Send + 'static,
    F: Future<Output = Result<T, Error>> + Send + 'static,
{
    let abandoned = Abandoned::default();
    let _mark = abandoned.on_drop();
    match checks.spawn(use_case(abandoned.clone())).await {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(_) => Err(Error::Unavailable),
    }
}

/// A user as clients see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    id: Uuid,
    email: String,
    name: Option<String>,
    role: Role,
    status: Status,
    email_verified: bool,
    email_verified_at: Option<String>,
    created_at: String,
    updated_at: String,
    last_login_at: Option<String>,
    #[schema(value_type = Option<Object>)]
    last_login_geolocation: Option<serde_json::Value>,
    #[schema(value_type = Object)]
    metadata: serde_json::Value,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        Self {
            id: u.id,
            email_verified: u.email_verified(),
            email: u.email,
            name: u.name,
            role: u.role,
            status: u.status,
            email_verified_at: u.email_verified_at.map(rfc3339),
            created_at: rfc3339(u.created_at),
            updated_at: rfc3339(u.updated_at),
            last_login_at: u.last_login_at.map(rfc3339),
            last_login_geolocation: u.last_login_geolocation,
            metadata: u.metadata,
        }
    }
}

/// Tokens of a login or refresh.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// Always `Bearer`.
    token_type: &'static str,
    /// The JWT access token.
    access_token: String,
    /// Seconds until it expires.
    expires_in: i64,
    /// When it expires, Unix seconds.
    expires_at: i64,
    /// The opaque refresh token.
    refresh_token: String,
    /// Seconds until the refresh token expires.
    refresh_expires_in: i64,
    /// The session.
    session_id: Uuid,
    /// The user.
    user: UserView,
}

impl TokenResponse {
    /// Converts the service's tokens as of `now`.
    pub fn new(t: Tokens, now: UnixTime) -> Self {
        Self {
            token_type: "Bearer",
            access_token: t.access_token,
            expires_in: t.access_expires_at - now,
            expires_at: t.access_expires_at,
            refresh_token: t.refresh_token,
            refresh_expires_in: (t.refresh_expires_at - now).max(0),
            session_id: t.session_id,
            user: t.user.into(),
        }
    }
}

/// A `{"status": ...}` acknowledgement.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusBody {
    /// What happened.
    status: &'static str,
}

/// A session as its owner sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    id: Uuid,
    created_at: String,
    last_used_at: String,
    ip: Option<String>,
    user_agent: Option<String>,
    /// Whether this is the session of the token making the request.
    current: bool,
}

impl SessionView {
    fn new(s: Session, current: Option<Uuid>) -> Self {
        Self {
            current: Some(s.id) == current,
            id: s.id,
            created_at: rfc3339(s.created_at),
            last_used_at: rfc3339(s.last_used_at),
            ip: s.ip,
            user_agent: s.user_agent,
        }
    }
}

/// A new API key, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyCreated {
    id: Uuid,
    name: String,
    /// The key: store it now, it is never shown again.
    key: String,
    prefix: String,
    created_at: String,
    expires_at: Option<String>,
}

/// An API key without the key.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    id: Uuid,
    name: String,
    prefix: String,
    created_at: String,
    expires_at: Option<String>,
    last_used_at: Option<String>,
}

impl From<ApiKey> for ApiKeyView {
    fn from(k: ApiKey) -> Self {
        Self {
            id: k.id,
            name: k.name,
            prefix: k.prefix,
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

/// A page of users.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserPage {
    users: Vec<UserView>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// An audit event.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    /// `login`, `login_failed`, `lockout`, `password_reset`, `session_ended`, ...
    #[serde(rename = "type")]
    kind: String,
    at: String,
    ip: Option<String>,
    user_agent: Option<String>,
    #[schema(value_type = Object)]
    detail: serde_json::Value,
}

impl From<Event> for EventView {
    fn from(e: Event) -> Self {
        Self { kind: e.kind, at: rfc3339(e.at), ip: e.ip, user_agent: e.user_agent, detail: e.detail }
    }
}

/// A page of a user's events, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    events: Vec<EventView>,
    /// `cursor` of the next (older) page; null on the last.
    next_cursor: Option<String>,
}
