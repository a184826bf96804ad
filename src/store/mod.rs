//! Persistence. [`Store`] is a set of business operations, each atomic on its own
//! (one statement or one transaction) and correct when several instances race on one
//! database. SQL never reads the clock: times come in as arguments.
//!
//! [`sql::SqlStore`] implements it for SQLite and PostgreSQL with the same queries,
//! chosen by the URL scheme, each backend with its own migrations. Every transaction
//! starts with a write, so SQLite takes its write lock up front (no deferred upgrade
//! that could fail under concurrency) and PostgreSQL locks the rows it then reads.

mod one_per_key;
mod pg_direct;
mod session_cache;
pub use session_cache::MemoryReads;
pub mod sql;
mod sqlite_counters;
mod sqlite_logins;
mod sqlite_reads;
mod sqlite_rotations;

use async_trait::async_trait;
use uuid::Uuid;

use crate::clock::UnixTime;
use crate::config::RateLimit;
use crate::crypto::jwt::SigningKey;
use crate::domain::lockout::LockoutPolicy;
use crate::domain::user::{Role, Status, User};

/// A store failure: the database is unreachable or misbehaved. Never a client's fault.
#[derive(Debug, thiserror::Error)]
#[error("storage error: {0}")]
pub struct StoreError(#[from] pub sqlx::Error);

impl StoreError {
    /// A failure that passes with load (see [`is_transient_error`]).
    pub fn is_transient(&self) -> bool {
        is_transient_error(&self.0)
    }
}

/// A failure that passes with load: no pooled connection in time, a lock or statement
/// timeout, a busy SQLite, a serialisation conflict, too many clients.
pub fn is_transient_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(e) => {
            let code = e.code().unwrap_or_default();
            // SQLite: a primary result code (BUSY 5, LOCKED 6), possibly extended (low
            // byte), at most four digits; PostgreSQL's SQLSTATEs have five characters
            // (some all digits: 42501 must not read as SQLite's 5).
            let sqlite_busy = code.len() < 5 && code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
            // PostgreSQL: conflicts, timeouts, too many connections, no resources; a
            // connection lost (class 08, but not 08P01, a protocol violation) or ended
            // by a shutting-down server (57P01 to 57P03): the next attempt gets a new one.
            sqlite_busy
                || ["40001", "40P01", "55P03", "57014", "53300", "53400"].contains(&code.as_ref())
                || (code.starts_with("08") && code != "08P01")
                || code.starts_with("57P")
        }
        _ => false,
    }
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// A user to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Id.
    pub id: Uuid,
    /// Normalised email.
    pub email: String,
    /// Display name.
    pub name: Option<String>,
    /// PHC hash.
    pub password_hash: Option<String>,
    /// Role.
    pub role: Role,
    /// Verified at creation (admin-made accounts).
    pub email_verified_at: Option<UnixTime>,
    /// Now.
    pub now: UnixTime,
}

/// A mailed one-time secret to store (by hash).
#[derive(Debug, Clone)]
pub struct NewOneTimeToken {
    /// Row id (also the salt of a code's hash).
    pub id: Uuid,
    /// SHA-256 of the secret.
    pub token_hash: String,
    /// Expiry.
    pub expires_at: UnixTime,
}

/// What kind of one-time token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Verification link.
    VerifyLink,
    /// 6-digit verification code.
    VerifyCode,
    /// Password reset link.
    Reset,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::VerifyLink => "verify_link",
            Self::VerifyCode => "verify_code",
            Self::Reset => "reset",
        }
    }
}

/// A verification code attempt that was reserved (counted) before comparison.
#[derive(Debug, Clone)]
pub struct CodeAttempt {
    /// The code's row id.
    pub token_id: Uuid,
    /// The stored hash to compare against.
    pub code_hash: String,
}

/// The answer to a login reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The attempt was counted as failure number `failures`; check the password.
    Allowed {
        /// Consecutive failures including this attempt.
        failures: u32,
    },
    /// A lock is active; do not check the password.
    Locked {
        /// Seconds until the lock ends (at least 1).
        retry_after: u32,
        /// The lock was started, less than a few seconds ago, by an attempt whose
        /// password check has not yet said it failed ([`Store::settle_login_lock`]): a
        /// right password in flight may still clear it, so a login may wait for it to
        /// settle before answering.
        settling: bool,
    },
}

/// A session as stored.
#[derive(Debug, Clone)]
pub struct Session {
    /// Id.
    pub id: Uuid,
    /// Owner.
    pub user_id: Uuid,
    /// Opened.
    pub created_at: UnixTime,
    /// Last login or refresh, to the minute.
    pub last_used_at: UnixTime,
    /// Absolute expiry.
    pub expires_at: UnixTime,
    /// Client IP at opening.
    pub ip: Option<String>,
    /// Client user agent at opening.
    pub user_agent: Option<String>,
    /// When it ended, if it did.
    pub ended_at: Option<UnixTime>,
}

impl Session {
    /// Neither ended nor past its absolute expiry.
    pub fn is_live(&self, now: UnixTime) -> bool {
        self.ended_at.is_none() && self.expires_at > now
    }
}

/// A session to open.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Id.
    pub id: Uuid,
    /// Owner.
    pub user_id: Uuid,
    /// Hash of its first refresh token.
    pub refresh_hash: String,
    /// Refresh token expiry.
    pub refresh_expires_at: UnixTime,
    /// Absolute session expiry.
    pub expires_at: UnixTime,
    /// Client IP.
    pub ip: Option<String>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Where the login came from, for the user record.
    pub geolocation: Option<serde_json::Value>,
    /// The password hash the login was checked against, if any.
    pub verified_hash: Option<String>,
    /// Now.
    pub now: UnixTime,
}

/// A refresh token rotation to attempt.
#[derive(Debug, Clone)]
pub struct Rotate {
    /// Hash of the presented token.
    pub old_hash: String,
    /// Hash of the successor.
    pub new_hash: String,
    /// The successor sealed with the presented token.
    pub sealed: String,
    /// Refresh token lifetime in seconds.
    pub ttl: i64,
    /// Seconds after a rotation in which the old token returns the same successor.
    pub grace: i64,
    /// Now.
    pub now: UnixTime,
}

/// What presenting a refresh token led to.
#[derive(Debug, Clone)]
pub enum Rotation {
    /// Rotated: the successor is the one in the request.
    Rotated {
        /// The session (updated).
        session: Session,
        /// Its user, read afresh.
        user: User,
        /// The successor's expiry.
        refresh_expires_at: UnixTime,
    },
    /// Already rotated within the grace window: here is the successor, sealed.
    Grace {
        /// The successor sealed with the presented token.
        sealed: String,
        /// The session.
        session: Session,
        /// Its user.
        user: User,
        /// The successor's expiry.
        refresh_expires_at: UnixTime,
    },
    /// Rotated before the grace window: the session has now been ended.
    Reused {
        /// The ended session.
        session_id: Uuid,
        /// Its user.
        user_id: Uuid,
    },
    /// Unknown, expired, or of an ended session or inactive user.
    Invalid,
}

/// An API key's public record.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// Id.
    pub id: Uuid,
    /// Owner.
    pub user_id: Uuid,
    /// Name given by the owner.
    pub name: String,
    /// Public prefix of the key, for recognising it.
    pub prefix: String,
    /// Created.
    pub created_at: UnixTime,
    /// Expiry, if any.
    pub expires_at: Option<UnixTime>,
    /// Last use (updated at most once a minute).
    pub last_used_at: Option<UnixTime>,
}

/// An audit event.
#[derive(Debug, Clone)]
pub struct Event {
    /// The user concerned, if known.
    pub user_id: Option<Uuid>,
    /// The email concerned (failed logins for unknown emails have only this).
    pub email: Option<String>,
    /// `login`, `login_failed`, `lockout`, `password_reset`, `session_ended`, ...
    pub kind: String,
    /// When.
    pub at: UnixTime,
    /// Client IP.
    pub ip: Option<String>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Details; never secrets.
    pub detail: serde_json::Value,
}

/// Changes an admin may make to a user; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    /// New state.
    pub status: Option<Status>,
    /// New role.
    pub role: Option<Role>,
    /// Verified or not.
    pub email_verified: Option<bool>,
    /// New name (`Some(None)` clears it).
    pub name: Option<Option<String>>,
    /// New metadata.
    pub metadata: Option<serde_json::Value>,
}

/// What [`Store::patch_user`] did.
#[derive(Debug)]
pub enum Patched {
    /// Changed: the user as it is now, and the sessions the change ended.
    Changed(Box<User>, Vec<Uuid>),
    /// No such user.
    NotFound,
    /// Not changed: no admin able to act (active, verified) would be left.
    LastAdmin,
}

impl Patched {
    /// The user and the sessions ended, if the change was made.
    pub fn changed(self) -> Option<(User, Vec<Uuid>)> {
        match self {
            Self::Changed(user, ended) => Some((*user, ended)),
            Self::NotFound | Self::LastAdmin => None,
        }
    }
}

/// A page request for the user list.
#[derive(Debug, Clone, Default)]
pub struct UserFilter {
    /// Substring of the email.
    pub email: Option<String>,
    /// Exact state.
    pub status: Option<Status>,
    /// Page size.
    pub limit: u32,
    /// Start after this id.
    pub after: Option<Uuid>,
}

/// What a queued mail announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailKind {
    /// A verification link and code, if the account is unverified and active.
    Verification,
    /// Someone tried to register this (taken) email.
    AlreadyRegistered,
    /// A reset link, if an account that is not deleted has this email.
    Reset,
    /// The password was changed or reset.
    PasswordChanged,
}

impl MailKind {
    const ALL: [Self; 4] = [Self::Verification, Self::AlreadyRegistered, Self::Reset, Self::PasswordChanged];

    /// The name stored in `mail_jobs.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verification => "verification",
            Self::AlreadyRegistered => "already_registered",
            Self::Reset => "reset",
            Self::PasswordChanged => "password_changed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Verification, Self::AlreadyRegistered, Self::Reset, Self::PasswordChanged]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// A queued mail, claimed by one worker for a while.
#[derive(Debug, Clone)]
pub struct MailJob {
    /// Id.
    pub id: Uuid,
    /// What to send.
    pub kind: MailKind,
    /// To whom.
    pub email: String,
    /// Tries so far, this one included.
    pub attempts: u32,
    /// The claim: only its holder may finish or release the mail.
    pub lease: UnixTime,
}

/// Seconds within which a session's or an API key's `last_used_at` is not rewritten
/// (by a Bearer request, a refresh, a key's use): its resolution.
pub const LAST_USED_RESOLUTION: i64 = 60;

/// Whether a use at `now` is to be recorded over one recorded at `last`.
pub fn use_is_due(last: UnixTime, now: UnixTime) -> bool {
    now - last >= LAST_USED_RESOLUTION
}

/// The persistence operations of Gatehouse.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the database answers.
    async fn ping(&self) -> StoreResult<()>;
    /// `postgres` or `sqlite`.
    fn backend(&self) -> &'static str;

    /// How reads of sessions were answered by this instance's memory of them (on
    /// PostgreSQL with a memory; `None` otherwise).
    fn memory_reads(&self) -> Option<MemoryReads> {
        None
    }

    /// Before the process stops: gives up what other instances would otherwise wait for
    /// (on PostgreSQL, the session memory's lease).
    async fn close(&self) {}

    /// Creates a user; `None` if the email is taken.
    async fn create_user(&self, u: NewUser) -> StoreResult<Option<User>>;
    /// Registration: creates the user, or not if the email is taken, and in the same
    /// transaction records the attempt on the account and queues one mail (the
    /// verification, or the notice to the owner) either way, so both outcomes cost the
    /// same work (no timing difference tells them apart).
    async fn register(&self, u: NewUser, ip: Option<String>, user_agent: Option<String>) -> StoreResult<Option<User>>;
    /// A user by id.
    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>>;
    /// A user by normalised email.
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>>;
    /// A page of users ordered by id (creation order).
    async fn list_users(&self, f: &UserFilter) -> StoreResult<Vec<User>>;
    /// Applies an admin's changes; a state other than active ends the user's sessions.
    /// A change that would leave no admin able to act (active, verified) is not made ([`Patched::LastAdmin`]):
    /// checked in the same transaction, one such change at a time across instances.
    async fn patch_user(&self, id: Uuid, p: &UserPatch, now: UnixTime) -> StoreResult<Patched>;
    /// Replaces the hash of the same password (new parameters).
    /// Sets a new password, ends every session but `keep` and queues the notice mail;
    /// returns the sessions ended.
    async fn change_password(
        &self,
        user_id: Uuid,
        hash: &str,
        keep: Option<Uuid>,
        now: UnixTime,
    ) -> StoreResult<Vec<Uuid>>;

    /// Supersedes earlier verification secrets of the user and stores a link and a code.
    async fn issue_verification(
        &self,
        user_id: Uuid,
        link: &NewOneTimeToken,
        code: &NewOneTimeToken,
        now: UnixTime,
    ) -> StoreResult<()>;
    /// Whether the user has an unused, unexpired verification link.
    async fn has_live_verification(&self, user_id: Uuid, now: UnixTime) -> StoreResult<bool>;
    /// Verifies the email of the link's user; `None` if the link is unknown, used or expired.
    async fn verify_email_by_link(&self, token_hash: &str, now: UnixTime) -> StoreResult<Option<User>>;
    /// Counts one try against the live code of `email`, if it has tries left and the
    /// account has not used `2 * max_attempts` tries on codes in the last 24 hours
    /// (re-issuing codes must not buy unlimited guesses; the link still works).
    async fn reserve_code_attempt(
        &self,
        email: &str,
        max_attempts: u32,
        now: UnixTime,
    ) -> StoreResult<Option<CodeAttempt>>;
    /// Uses the code (after a successful comparison) and verifies its user's email.
    async fn verify_email_by_code(&self, token_id: Uuid, now: UnixTime) -> StoreResult<Option<User>>;
    /// Stores a new reset token; earlier ones stay valid until one is used.
    async fn issue_reset(&self, user_id: Uuid, t: &NewOneTimeToken, now: UnixTime) -> StoreResult<()>;
    /// Whether a reset token is unused and unexpired (read only).
    async fn reset_token_live(&self, token_hash: &str, now: UnixTime) -> StoreResult<bool>;
    /// Uses a reset token: sets the password, queues the notice mail, revokes the
    /// user's API keys, verifies the email, ends every session and
    /// clears the email's lockout. Returns the user and the ended sessions.
    async fn reset_password(
        &self,
        token_hash: &str,
        hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<(User, Vec<Uuid>)>>;

    /// Reserves a login attempt for `email` under `policy` (see `domain::lockout`).
    async fn reserve_login(&self, email: &str, policy: &LockoutPolicy, now: UnixTime) -> StoreResult<Reservation> {
        Ok(self.reserve_login_for(email, policy, now).await?.0)
    }
    /// [`Store::reserve_login`], and when the attempt is allowed, the account with that
    /// email (if any): a login's first two steps in one call (on PostgreSQL one round
    /// trip, so the account is as of the statement's start; a password change that
    /// committed while the reservation waited for the email's row is not seen, and
    /// `open_session` refuses a session checked against a replaced hash).
    async fn reserve_login_for(
        &self,
        email: &str,
        policy: &LockoutPolicy,
        now: UnixTime,
    ) -> StoreResult<(Reservation, Option<User>)>;
    /// The lock in force for `email`, read only: `Some(retry_after)` when locked.
    async fn login_lock(&self, email: &str, policy: &LockoutPolicy, now: UnixTime) -> StoreResult<Option<u32>> {
        Ok(self.login_lock_state(email, policy, now).await?.0)
    }
    /// [`Store::login_lock`], and whether the lock is settling (see
    /// [`Reservation::Locked`]).
    async fn login_lock_state(
        &self,
        email: &str,
        policy: &LockoutPolicy,
        now: UnixTime,
    ) -> StoreResult<(Option<u32>, bool)>;
    /// The check of the attempt counted as failure number `failures` failed: a lock its
    /// reservation started (if the count is still that) holds, and is no longer settling.
    /// (A later lock that reached the same count would be settled too: its waiting
    /// logins then hear its 429 early.)
    async fn settle_login_lock(&self, email: &str, failures: u32) -> StoreResult<()>;
    /// A right password: the count and every lock it started go (also a hard lock
    /// that this very attempt's reservation set).
    async fn clear_login_failures(&self, email: &str, now: UnixTime) -> StoreResult<()>;
    /// An admin unlock or a reset: the count and every lock go, the hard one too.
    async fn unlock_login(&self, email: &str, now: UnixTime) -> StoreResult<()>;
    /// Counts a hit in `key`'s window; `Some(retry_after)` when over the limit.
    async fn hit_rate_limit(&self, key: &str, limit: RateLimit, now: UnixTime) -> StoreResult<Option<u32>>;

    /// Opens a session, records the login on the user and in the audit trail, clears
    /// the email's failure count and ends the oldest sessions beyond `device_limit`
    /// (0: unlimited), all in one transaction. Returns the user and the evicted ids.
    /// `None` when the user is no longer active or their password hash is no longer
    /// `s.verified_hash`: a reset or change that won the race ends every session, and
    /// a login checked against the old password must not open a new one after it.
    async fn open_session(&self, s: &NewSession, device_limit: u32) -> StoreResult<Option<(User, Vec<Uuid>)>>;
    /// Rotates a refresh token (see [`Rotation`]).
    async fn rotate_refresh(&self, r: &Rotate) -> StoreResult<Rotation>;
    /// A session and its user, for the Bearer check.
    async fn session_with_user(&self, sid: Uuid) -> StoreResult<Option<(Session, User)>>;
    /// Records a use of live session `sid` at `now`, unless one within
    /// [`LAST_USED_RESOLUTION`] of it is recorded.
    async fn touch_session(&self, sid: Uuid, now: UnixTime) -> StoreResult<()>;
    /// The user's live sessions, newest first.
    async fn list_sessions(&self, user_id: Uuid, now: UnixTime) -> StoreResult<Vec<Session>>;
    /// Ends one of the user's sessions at `event.at` and, when this call ended it,
    /// records `event` in the same commit; `false` if it is not theirs or not live.
    async fn end_session(&self, user_id: Uuid, sid: Uuid, reason: &str, event: &Event) -> StoreResult<bool>;
    /// Ends every live session of the user but `keep`; returns those ended.
    async fn end_sessions(
        &self,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: &str,
        now: UnixTime,
    ) -> StoreResult<Vec<Uuid>>;

    /// Stores a new API key by hash, unless the user already holds `max_keys` keys
    /// that are not revoked (`false`); atomic under concurrent creations.
    async fn create_api_key(&self, k: &ApiKey, key_hash: &str, max_keys: u32) -> StoreResult<bool>;
    /// The user's keys that are not revoked.
    async fn list_api_keys(&self, user_id: Uuid) -> StoreResult<Vec<ApiKey>>;
    /// Revokes one of the user's keys; `false` if it is not theirs or already revoked.
    async fn revoke_api_key(&self, user_id: Uuid, id: Uuid, now: UnixTime) -> StoreResult<bool>;
    /// The live key with this hash and its user.
    async fn api_key_user(&self, key_hash: &str, now: UnixTime) -> StoreResult<Option<(ApiKey, User)>>;

    /// Queues a mail, unless the same mail to the same address is already waiting for
    /// its first try (a resend while the first is queued sends one mail, not two).
    async fn enqueue_mail(&self, kind: MailKind, email: &str, now: UnixTime) -> StoreResult<()>;
    /// Claims the oldest due mail for `lease` seconds, counting a try; `None` if none.
    async fn claim_mail_job(&self, now: UnixTime, lease: i64) -> StoreResult<Option<MailJob>>;
    /// Removes a mail that was sent (or given up), if `lease` is still its claim.
    async fn finish_mail_job(&self, id: Uuid, lease: UnixTime) -> StoreResult<()>;
    /// Releases a mail to be tried again at `run_at`, if `lease` is still its claim.
    async fn retry_mail_job(&self, id: Uuid, lease: UnixTime, run_at: UnixTime) -> StoreResult<()>;

    /// Appends an audit event.
    async fn record_event(&self, e: &Event) -> StoreResult<()>;
    /// The user's latest events, newest first.
    async fn list_events(&self, user_id: Uuid, limit: u32) -> StoreResult<Vec<Event>> {
        Ok(self.events_page(user_id, limit, None).await?.into_iter().map(|(_, e)| e).collect())
    }
    /// Up to `limit` of the user's events, newest first, each with its id; with
    /// `before`, only those older than the event of that id.
    async fn events_page(&self, user_id: Uuid, limit: u32, before: Option<Uuid>) -> StoreResult<Vec<(Uuid, Event)>>;

    /// The signing key all instances share (storing `candidate` if there is none yet)
    /// and every key whose tokens are still accepted.
    async fn signing_keys(&self, candidate: &SigningKey) -> StoreResult<(SigningKey, Vec<SigningKey>)>;
    /// Deletes expired one-time tokens, rate-limit windows and refresh tokens, and
    /// failure counts untouched for 30 days (never a hard lock).
    async fn purge_expired(&self, now: UnixTime) -> StoreResult<u64>;
}

/// How to open the store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Largest pool.
    pub max_connections: u32,
    /// Seconds to wait for a pooled connection.
    pub acquire_timeout_secs: u32,
    /// PostgreSQL: sessions each instance remembers for the Bearer check; 0 turns it off.
    pub session_cache_entries: u32,
}

/// Opens the store for `url` (`sqlite://` or `postgres://`) and runs its migrations.
pub async fn open(url: &str, options: &StoreOptions) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    Ok(std::sync::Arc::new(sql::SqlStore::connect(url, options).await?))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::borrow::Cow;

    use super::is_transient_error;

    /// A database error with only a code, as a driver would report it.
    #[derive(Debug)]
    pub(crate) struct Coded(pub &'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    pub(crate) fn coded(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Coded(code)))
    }

    #[test]
    fn load_and_lost_connections_are_transient_other_failures_are_not() {
        // SQLite busy and locked, plain and extended (SQLITE_BUSY_TIMEOUT is 773).
        for code in ["5", "6", "773", "261", "517"] {
            assert!(is_transient_error(&coded(code)), "{code}");
        }
        // PostgreSQL: conflicts, timeouts, too many clients, lost or ended connections.
        for code in ["40001", "40P01", "55P03", "57014", "53300", "08006", "08003", "57P01", "57P03"] {
            assert!(is_transient_error(&coded(code)), "{code}");
        }
        // All-digit SQLSTATEs whose low byte is 5 or 6 are no SQLite busy; a protocol
        // violation, a unique violation and a syntax error are bugs, not load.
        for code in ["42501", "22021", "08P01", "23505", "42601", "19", "2067"] {
            assert!(!is_transient_error(&coded(code)), "{code}");
        }
        assert!(is_transient_error(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient_error(&sqlx::Error::RowNotFound));
    }
}
