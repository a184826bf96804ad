//! The use cases. Each public function is one operation of the contract: it checks
//! its input, calls the store's atomic operations, and queues mail after they commit.
//! [`Error`] has one variant per outcome the contract names.

pub mod accounts;
pub mod admin;
pub mod api_keys;
pub mod mail_jobs;
pub mod refused_locks;
pub mod sessions;

use std::net::IpAddr;
use std::sync::Arc;

use uuid::Uuid;

use crate::clock::{Clock, UnixTime};
use crate::crypto::jwt::AccessTokens;
use crate::crypto::password::{Overloaded, PasswordHasher};
use crate::domain::lockout::LockoutPolicy;
use crate::domain::user::User;
use crate::domain::FieldError;
use crate::store::{Event, Store, StoreError};

/// Every outcome of a use case other than success.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input fails validation.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// Unknown email, no password, or wrong password.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// The email's lockout is active.
    #[error("account locked")]
    AccountLocked {
        /// Seconds until it ends.
        retry_after: u32,
    },
    /// Too many requests from this client.
    #[error("rate limited")]
    RateLimited {
        /// Seconds until the window ends.
        retry_after: u32,
    },
    /// The password hashing pool is full.
    #[error("overloaded")]
    Overloaded,
    /// The request was given up (its client hung up, or it timed out) before its
    /// password check's outcome could be answered; nobody hears this.
    #[error("abandoned")]
    Abandoned,
    /// The database is saturated for now (pool, locks, timeouts).
    #[error("unavailable")]
    Unavailable,
    /// Right password, email not verified.
    #[error("email not verified")]
    EmailNotVerified,
    /// Right password, account deactivated.
    #[error("account deactivated")]
    AccountDeactivated,
    /// Right password, account suspended.
    #[error("account suspended")]
    AccountSuspended,
    /// Right password, account deleted.
    #[error("account deleted")]
    AccountDeleted,
    /// A mailed token, code or refresh token that is wrong, used, expired or ended.
    #[error("invalid token")]
    InvalidToken,
    /// A refresh token that is unknown, expired, or of an ended session.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// A rotated refresh token presented after the grace window.
    #[error("refresh token reused")]
    RefreshTokenReused,
    /// Missing, bad, expired or foreign credentials.
    #[error("unauthorized")]
    Unauthorized,
    /// A valid access token of a session that has ended.
    #[error("session ended")]
    SessionEnded,
    /// Authenticated but not allowed.
    #[error("forbidden")]
    Forbidden,
    /// No such resource (or not the caller's).
    #[error("not found")]
    NotFound,
    /// The change would leave no admin able to act (active, verified).
    #[error("last admin")]
    LastAdmin,
    /// Something failed that is not the client's doing.
    #[error("internal error: {0}")]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        if e.is_transient() {
            tracing::warn!(error = %e, "database busy");
            Self::Unavailable
        } else {
            Self::Internal(e.into())
        }
    }
}

impl From<Overloaded> for Error {
    fn from(_: Overloaded) -> Self {
        Self::Overloaded
    }
}

/// Result of a use case.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who is asking: the client address and user agent.
#[derive(Debug, Clone)]
pub struct ClientMeta {
    /// Client IP (the TCP peer, or X-Forwarded-For from a trusted proxy).
    pub ip: IpAddr,
    /// `User-Agent`, truncated.
    pub user_agent: Option<String>,
}

/// Policy values the services need from the settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Lockout tiers and hard limit.
    pub lockout: LockoutPolicy,
    /// Sessions per user; 0 unlimited.
    pub device_limit: u32,
    /// Refresh token lifetime (idle limit).
    pub refresh_ttl: i64,
    /// Absolute session lifetime.
    pub session_max_age: i64,
    /// Refresh grace window.
    pub refresh_grace: i64,
    /// Verification link lifetime.
    pub verify_link_ttl: u32,
    /// Verification code lifetime.
    pub verify_code_ttl: u32,
    /// Reset token lifetime.
    pub reset_ttl: u32,
    /// Base of links in mails.
    pub public_url: String,
    /// Mails anyone can ask for, per address (see the mail worker).
    pub mail_per_address: crate::config::RateLimit,
}

/// Wrong tries a verification code allows.
pub const CODE_ATTEMPTS: u32 = 5;

/// Looks up where an IP is, for `last_login_geolocation`.
pub trait GeoLookup: Send + Sync + 'static {
    /// A JSON object describing the location, if known.
    fn locate(&self, ip: IpAddr) -> Option<serde_json::Value>;
}

/// Everything the use cases work with.
pub struct Services {
    /// Persistence.
    pub store: Arc<dyn Store>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Password hashing pool.
    pub hasher: PasswordHasher,
    /// Access token signer and verifier.
    pub tokens: AccessTokens,
    /// Wakes this instance's mail worker when a mail is queued.
    pub mail_wake: Arc<tokio::sync::Notify>,
    /// Policy values.
    pub policy: Policy,
    /// Optional GeoIP lookup.
    pub geo: Option<Box<dyn GeoLookup>>,
    /// Emails' locks as read for logins refused for overload (see `refused_locks`).
    pub refused_locks: refused_locks::RefusedLocks,
    /// Sessions whose use was recorded lately (see `sessions`).
    pub recent_touches: sessions::RecentTouches,
}

/// A caller authenticated by a Bearer token or an API key.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user, read from the store on this request.
    pub user: User,
    /// The session of the Bearer token; `None` for API keys.
    pub session_id: Option<Uuid>,
}

impl Services {
    /// Now.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// Appends an audit event; a failure is logged, never passed to the client.
    pub async fn audit(
        &self,
        user: Option<&User>,
        email: Option<&str>,
        kind: &str,
        meta: Option<&ClientMeta>,
        detail: serde_json::Value,
    ) {
        let e = self.event(user, email, kind, meta, detail);
        if let Err(err) = self.store.record_event(&e).await {
            tracing::error!(error = %err, kind, "could not record an audit event");
        }
    }

    /// Queues a mail durably and wakes the worker.
    pub async fn queue_mail(&self, kind: crate::store::MailKind, email: &str) -> Result<()> {
        self.store.enqueue_mail(kind, email, self.now()).await?;
        self.mail_wake.notify_one();
        Ok(())
    }

    /// An audit event of now.
    pub fn event(
        &self,
        user: Option<&User>,
        email: Option<&str>,
        kind: &str,
        meta: Option<&ClientMeta>,
        detail: serde_json::Value,
    ) -> Event {
        Event {
            user_id: user.map(|u| u.id),
            email: email.map(str::to_owned).or_else(|| user.map(|u| u.email.clone())),
            kind: kind.to_owned(),
            at: self.now(),
            ip: meta.map(|m| m.ip.to_string()),
            user_agent: meta.and_then(|m| m.user_agent.clone()),
            detail,
        }
    }

    /// Ends one of the caller's sessions and records it (in the same commit where the
    /// store can); `false` if it was not theirs or not live.
    pub async fn end_recorded(&self, caller: &Caller, sid: Uuid, reason: &str, meta: &ClientMeta) -> Result<bool> {
        let detail = serde_json::json!({"session_id": sid, "reason": reason});
        let event = self.event(Some(&caller.user), None, "session_ended", Some(meta), detail);
        Ok(self.store.end_session(caller.user.id, sid, reason, &event).await?)
    }

    /// Records that sessions ended.
    pub async fn audit_ended(&self, user: &User, ended: &[Uuid], reason: &str, meta: Option<&ClientMeta>) {
        for sid in ended {
            self.audit(
                Some(user),
                None,
                "session_ended",
                meta,
                serde_json::json!({"session_id": sid, "reason": reason}),
            )
            .await;
        }
    }
}

/// Collects field errors and fails with all of them at once.
#[derive(Debug, Default)]
pub struct Checks(Vec<FieldError>);

impl Checks {
    /// Keeps the value or remembers the error.
    pub fn take<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }

    /// Remembers an error.
    pub fn push(&mut self, e: FieldError) {
        self.0.push(e);
    }

    /// Fails if any check failed.
    pub fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Validation(self.0))
        }
    }
}

/// A required field.
pub fn required<T>(v: Option<T>, field: &str) -> Result<T, FieldError> {
    v.ok_or_else(|| FieldError::new(field, "required", format!("{field} is required")))
}
