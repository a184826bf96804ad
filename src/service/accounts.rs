//! Accounts: registration, email verification, login, password change and reset.
//!
//! Anti-enumeration: register, resend-verification and forgot-password answer the same
//! for every email and do the same work on the request path; whatever depends on
//! whether the account exists (issuing tokens, mailing) runs after the response, in
//! the background. Login hashes against a dummy for unknown emails.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::refused_locks::Refusal;
use super::{required, Checks, ClientMeta, Error, Result, Services, CODE_ATTEMPTS};
use crate::crypto::password::{Abandoned, HashPermit};
use crate::crypto::tokens;
use crate::domain::email::Email;
use crate::domain::lockout::Lock;
use crate::domain::password::{self, MAX_LOGIN_BYTES};
use crate::domain::user::{Role, Status, User};
use crate::domain::FieldError;
use crate::store::{MailKind, NewSession, NewUser, Reservation};

/// `POST /v1/auth/register`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterInput {
    /// Email address.
    pub email: Option<String>,
    /// Password: 8 to 256 characters, not a common one.
    #[schema(value_type = Option<String>)]
    pub password: Option<SecretString>,
    /// Display name, at most 200 characters.
    pub name: Option<String>,
}

/// `POST /v1/auth/login`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginInput {
    /// Email address.
    pub email: Option<String>,
    /// Password.
    #[schema(value_type = Option<String>)]
    pub password: Option<SecretString>,
}

/// `POST /v1/auth/verify-email`: `{token}` or `{email, code}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct VerifyEmailInput {
    /// The token from the mailed link.
    #[schema(value_type = Option<String>)]
    pub token: Option<SecretString>,
    /// Email address, with `code`.
    pub email: Option<String>,
    /// The 6-digit code from the mail.
    #[schema(value_type = Option<String>)]
    pub code: Option<SecretString>,
}

/// A body with only an email: resend-verification, forgot-password.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EmailInput {
    /// Email address.
    pub email: Option<String>,
}

/// `POST /v1/auth/password/reset`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ResetInput {
    /// The token from the reset mail.
    #[schema(value_type = Option<String>)]
    pub token: Option<SecretString>,
    /// The new password.
    #[schema(value_type = Option<String>)]
    pub password: Option<SecretString>,
}

/// `POST /v1/me/password`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChangePasswordInput {
    /// The password now in force.
    #[schema(value_type = Option<String>)]
    pub current_password: Option<SecretString>,
    /// The new password.
    #[schema(value_type = Option<String>)]
    pub new_password: Option<SecretString>,
}

/// A logged-in session's tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// The JWT.
    pub access_token: String,
    /// Its expiry.
    pub access_expires_at: i64,
    /// The opaque refresh token.
    pub refresh_token: String,
    /// Its expiry.
    pub refresh_expires_at: i64,
    /// The session.
    pub session_id: Uuid,
    /// The user.
    pub user: User,
}

/// Most bytes a mailed token or refresh token may have; longer cannot be ours.
pub const MAX_TOKEN_BYTES: usize = 512;

fn name_of(raw: Option<String>) -> Result<Option<String>, FieldError> {
    match raw.map(|n| n.trim().to_owned()) {
        Some(n) if n.chars().count() > 200 => Err(FieldError::new("name", "too_long", "use at most 200 characters")),
        Some(n) if n.chars().any(char::is_control) => Err(FieldError::new("name", "invalid", "no control characters")),
        Some(n) if n.is_empty() => Ok(None),
        other => Ok(other),
    }
}

fn new_password(raw: Option<SecretString>, email: Option<&str>, field: &str) -> Result<SecretString, FieldError> {
    let pw = required(raw, field)?;
    password::check_new(pw.expose_secret(), email, field)?;
    Ok(pw)
}

fn token_of(raw: Option<SecretString>, field: &str) -> Result<SecretString, FieldError> {
    let t = required(raw, field)?;
    if t.expose_secret().is_empty() {
        return Err(FieldError::new(field, "required", format!("{field} is required")));
    }
    Ok(t)
}

impl Services {
    /// Registers an account, or mails the owner of a taken email a notice.
    pub async fn register(&self, input: RegisterInput, meta: &ClientMeta) -> Result<()> {
        let mut c = Checks::default();
        let email = c.take(required(input.email, "email").and_then(|e| Email::parse_new(&e, "email")));
        let pw = c.take(new_password(input.password, email.as_ref().map(Email::as_str), "password"));
        let name = c.take(name_of(input.name));
        c.finish()?;
        let (Some(email), Some(pw), Some(name)) = (email, pw, name) else {
            return Err(Error::Validation(vec![]));
        };
        let hash = self.hasher.hash(self.hasher.admit()?, &pw).await?;
        let now = self.now();
        // The store queues the verification, or the notice to the owner of a taken
        // email, in the same transaction.
        self.store
            .register(
                NewUser {
                    id: Uuid::now_v7(),
                    email: email.to_string(),
                    name,
                    password_hash: Some(hash),
                    role: Role::User,
                    email_verified_at: None,
                    now,
                },
                Some(meta.ip.to_string()),
                meta.user_agent.clone(),
            )
            .await?;
        self.mail_wake.notify_one();
        Ok(())
    }

    /// Queues a fresh verification for every email alike; the worker sends it only to
    /// an unverified active account.
    pub async fn resend_verification(&self, input: EmailInput) -> Result<()> {
        let email = required(input.email, "email")
            .and_then(|e| Email::parse(&e, "email"))
            .map_err(|e| Error::Validation(vec![e]))?;
        self.queue_mail(MailKind::Verification, email.as_str()).await
    }

    /// Verifies an email by link token or by code.
    pub async fn verify_email(&self, input: VerifyEmailInput, meta: &ClientMeta) -> Result<User> {
        let now = self.now();
        let user = if let Some(token) = input.token {
            let token = token_of(Some(token), "token").map_err(|e| Error::Validation(vec![e]))?;
            if token.expose_secret().len() > MAX_TOKEN_BYTES {
                return Err(Error::InvalidToken);
            }
            self.store.verify_email_by_link(&tokens::hash_token(token.expose_secret()), now).await?
        } else {
            let mut c = Checks::default();
            let email = c.take(required(input.email, "email").and_then(|e| Email::parse(&e, "email")));
            let code = c.take(token_of(input.code, "code"));
            c.finish()?;
            let (Some(email), Some(code)) = (email, code) else {
                return Err(Error::Validation(vec![]));
            };
            let code = code.expose_secret().trim();
            if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::InvalidToken);
            }
            // The try is counted before the comparison, so parallel guesses cannot
            // get more than CODE_ATTEMPTS comparisons.
            match self.store.reserve_code_attempt(email.as_str(), CODE_ATTEMPTS, now).await? {
                Some(a) if tokens::ct_eq(&tokens::hash_code(&a.token_id.to_string(), code), &a.code_hash) => {
                    self.store.verify_email_by_code(a.token_id, now).await?
                }
                _ => None,
            }
        };
        let user = user.ok_or(Error::InvalidToken)?;
        self.audit(Some(&user), None, "email_verified", Some(meta), serde_json::json!({})).await;
        Ok(user)
    }

    /// The login of the contract, in its order: lockout, password, account state.
    /// (The per-IP rate limit runs before, in the HTTP layer.)
    ///
    /// Meant to run on a task of its own (see the route): once the password check has
    /// started, its outcome is acted on even if the request is `abandoned` meanwhile. A
    /// wrong password is then a failure like any other (recorded, its lock settled); a
    /// right one clears the count, as any right password does, and opens no session
    /// (nobody would hold it) unless the session's writes had begun. Without this, a
    /// right password whose client hung up during the check left its attempt counted:
    /// the fifth, a lock of the account. A request abandoned before its attempt is
    /// counted is not counted.
    pub async fn login(&self, input: LoginInput, meta: &ClientMeta, abandoned: &Abandoned) -> Result<Tokens> {
        let mut c = Checks::default();
        let email = c.take(required(input.email, "email").and_then(|e| Email::parse(&e, "email")));
        let pw = c.take(token_of(input.password, "password"));
        c.finish()?;
        let (Some(email), Some(pw)) = (email, pw) else {
            return Err(Error::Validation(vec![]));
        };
        let (permit, failures, user) = self.reserve_attempt(email.as_str(), abandoned).await?;
        let unchecked = self.unchecked_lockout(user.as_ref(), email.as_str(), failures, meta);
        let stored = user.as_ref().and_then(|u| u.password_hash.as_deref());
        // An over-long password cannot be right, but it costs the same dummy check.
        let stored = if pw.expose_secret().len() > MAX_LOGIN_BYTES { None } else { stored };
        let verified = self.hasher.verify(permit, &pw, stored, abandoned).await?;
        unchecked.disarm();
        let user = match user {
            Some(u) if verified => u,
            user => {
                self.audit(
                    user.as_ref(),
                    Some(email.as_str()),
                    "login_failed",
                    Some(meta),
                    serde_json::json!({"failures": failures}),
                )
                .await;
                self.failed_check(user.as_ref(), email.as_str(), failures, meta).await;
                return Err(Error::InvalidCredentials);
            }
        };
        if user.status != Status::Active || !user.email_verified() {
            // A right password is no guess, even when the account cannot log in. (On
            // success the session's transaction clears the count.)
            self.store.clear_login_failures(email.as_str(), self.now()).await?;
            // In the trail, as its 403 says it (it takes the right password, so nobody
            // else can fill the trail this way; refusals of a lock are not recorded).
            let reason = match user.status {
                Status::Active => "email_not_verified",
                Status::Deactivated => "account_deactivated",
                Status::Suspended => "account_suspended",
                Status::Deleted => "account_deleted",
            };
            let detail = serde_json::json!({"reason": reason});
            self.audit(Some(&user), Some(email.as_str()), "login_refused", Some(meta), detail).await;
        }
        match user.status {
            Status::Active => {}
            Status::Deactivated => return Err(Error::AccountDeactivated),
            Status::Suspended => return Err(Error::AccountSuspended),
            Status::Deleted => return Err(Error::AccountDeleted),
        }
        if !user.email_verified() {
            // Best effort: the answer is the 403 either way.
            match self.store.has_live_verification(user.id, self.now()).await {
                Ok(false) => {
                    if let Err(e) = self.queue_mail(MailKind::Verification, &user.email).await {
                        tracing::warn!(error = %e, "could not queue a verification mail");
                    }
                }
                Ok(true) => {}
                Err(e) => tracing::warn!(error = %e, "could not check for a live verification"),
            }
            return Err(Error::EmailNotVerified);
        }
        if abandoned.is_set() {
            // A right password clears the count as any does, but opens no session nobody
            // would hold. (A refused account's right password was acted on above, as any.)
            // The session's writes are the last step: once they begin they end.
            self.store.clear_login_failures(email.as_str(), self.now()).await?;
            return Err(Error::Abandoned);
        }
        self.open_session(&user, meta).await
    }

    /// The audit detail of the lock that failure number `failures` starts, if any.
    fn lockout_detail(&self, failures: u32) -> Option<serde_json::Value> {
        match self.policy.lockout.lock_after(failures) {
            Lock::None => None,
            Lock::For(seconds) => Some(serde_json::json!({"failures": failures, "seconds": seconds})),
            Lock::Hard => Some(serde_json::json!({"failures": failures, "permanent": true})),
        }
    }

    /// For an attempt counted as failure number `failures`: a guard that, if the attempt
    /// ends without a check (its request was given up while its check waited in the
    /// queue, so the check was skipped), records the lock its count started, marked
    /// `unchecked`. The lock holds either way; without this it would be missing from the
    /// trail. (A check that started ends and is acted on: see [`Services::login`].)
    fn unchecked_lockout(
        &self,
        user: Option<&User>,
        email: &str,
        failures: u32,
        meta: &ClientMeta,
    ) -> UncheckedLockout {
        let event = self.lockout_detail(failures).map(|mut detail| {
            detail["unchecked"] = serde_json::Value::Bool(true);
            (self.event(user, Some(email), "lockout", Some(meta), detail), email.to_owned(), failures)
        });
        UncheckedLockout { store: self.store.clone(), event }
    }

    /// A password check failed as failure number `failures`: if that started a lock, it
    /// is recorded, and settled for the logins waiting on it.
    async fn failed_check(&self, user: Option<&User>, email: &str, failures: u32, meta: &ClientMeta) {
        let Some(detail) = self.lockout_detail(failures) else { return };
        if let Err(e) = self.store.settle_login_lock(email, failures).await {
            // The waiting logins answer 429 once their wait is over.
            tracing::warn!(error = %e, "could not settle a login lock");
        }
        self.audit(user, Some(email), "lockout", Some(meta), detail).await;
    }

    /// A hashing place and a counted attempt for `email` (see `domain::lockout`), with
    /// the account if it has one: admission first (an attempt refused for overload is
    /// not counted), then the reservation. A lock that is settling (see
    /// [`Reservation::Locked`]) is waited for, its hashing place given up meanwhile,
    /// with reads of the lock alone, then the attempt is reserved again once the lock
    /// is gone; a lock that holds (or still settles after the wait) is 429. A request
    /// `abandoned` before its attempt is counted is not counted: nobody would hear
    /// its check.
    async fn reserve_attempt(&self, email: &str, abandoned: &Abandoned) -> Result<(HashPermit, u32, Option<User>)> {
        let policy = &self.policy.lockout;
        let mut settle = SettleWait::new();
        loop {
            if abandoned.is_set() {
                return Err(Error::Abandoned);
            }
            let Ok(permit) = self.hasher.admit() else { return Err(self.refused_for_overload(email).await) };
            let (mut lock, mut settling) = match self.store.reserve_login_for(email, policy, self.now()).await? {
                (Reservation::Allowed { failures }, user) => return Ok((permit, failures, user)),
                (Reservation::Locked { retry_after, settling }, _) => (Some(retry_after), settling),
            };
            drop(permit);
            while let Some(retry_after) = lock {
                if !settling || !settle.may_wait() {
                    return Err(Error::AccountLocked { retry_after });
                }
                settle.wait().await;
                (lock, settling) = self.store.login_lock_state(email, policy, self.now()).await?;
            }
        }
    }

    /// The answer to a login refused for overload: even when hashing is saturated, a
    /// locked email hears that it is locked (as read within the last second, see
    /// `refused_locks`).
    async fn refused_for_overload(&self, email: &str) -> Error {
        let now = self.now();
        let lock = match self.refused_locks.refusal(email, now) {
            Refusal::Known(lock) => lock,
            Refusal::Read => match self.store.login_lock(email, &self.policy.lockout, now).await {
                Ok(lock) => {
                    self.refused_locks.put(email, now, lock);
                    lock
                }
                Err(e) => {
                    self.refused_locks.read_failed(email);
                    return e.into();
                }
            },
        };
        lock.map_or(Error::Overloaded, |retry_after| Error::AccountLocked { retry_after })
    }

    /// Opens a session for a user whose credentials were checked.
    pub(crate) async fn open_session(&self, user: &User, meta: &ClientMeta) -> Result<Tokens> {
        let now = self.now();
        let refresh = tokens::new_refresh_token();
        let sid = Uuid::now_v7();
        let expires_at = now + self.policy.session_max_age;
        let refresh_expires_at = (now + self.policy.refresh_ttl).min(expires_at);
        let s = NewSession {
            id: sid,
            user_id: user.id,
            refresh_hash: tokens::hash_token(&refresh),
            refresh_expires_at,
            expires_at,
            ip: Some(meta.ip.to_string()),
            user_agent: meta.user_agent.clone(),
            geolocation: self.geo.as_ref().and_then(|g| g.locate(meta.ip)),
            verified_hash: user.password_hash.clone(),
            now,
        };
        // None: the password changed or the account stopped being active since the check.
        // (The store records the login and any evictions in the audit trail.)
        let (user, _evicted) =
            self.store.open_session(&s, self.policy.device_limit).await?.ok_or(Error::InvalidCredentials)?;
        let (access_token, access_expires_at) = self.tokens.issue(&user, sid, now)?;
        Ok(Tokens {
            access_token,
            access_expires_at,
            refresh_token: refresh,
            refresh_expires_at,
            session_id: sid,
            user,
        })
    }

    /// Queues a reset link for every email alike; the worker sends it only if an
    /// account (not deleted) has this email.
    pub async fn forgot_password(&self, input: EmailInput) -> Result<()> {
        let email = required(input.email, "email")
            .and_then(|e| Email::parse(&e, "email"))
            .map_err(|e| Error::Validation(vec![e]))?;
        self.queue_mail(MailKind::Reset, email.as_str()).await
    }

    /// Sets a new password from a reset token; ends every session, clears the lockout.
    pub async fn reset_password(&self, input: ResetInput, meta: &ClientMeta) -> Result<()> {
        let mut c = Checks::default();
        let token = c.take(token_of(input.token, "token"));
        let pw = c.take(new_password(input.password, None, "password"));
        c.finish()?;
        let (Some(token), Some(pw)) = (token, pw) else {
            return Err(Error::Validation(vec![]));
        };
        let token_hash = tokens::hash_token(token.expose_secret());
        // A bad token costs no hash: it could otherwise be used to fill the pool.
        if token.expose_secret().len() > MAX_TOKEN_BYTES
            || !self.store.reset_token_live(&token_hash, self.now()).await?
        {
            return Err(Error::InvalidToken);
        }
        let hash = self.hasher.hash(self.hasher.admit()?, &pw).await?;
        let (user, ended) =
            self.store.reset_password(&token_hash, &hash, self.now()).await?.ok_or(Error::InvalidToken)?;
        self.audit(Some(&user), None, "password_reset", Some(meta), serde_json::json!({})).await;
        self.audit_ended(&user, &ended, "password_reset", Some(meta)).await;
        // The store queued the notice in the same transaction.
        self.mail_wake.notify_one();
        Ok(())
    }

    /// Changes the caller's password; ends their other sessions. A wrong current
    /// password counts toward the lockout, so a stolen access token cannot be used
    /// to guess it. Like [`Services::login`], meant for a task of its own: a check
    /// that started is acted on even if the request is `abandoned` meanwhile (a right
    /// current password clears the count but changes nothing unless the change's
    /// writes had begun; the new password's hash is skipped or its result dropped).
    pub async fn change_password(
        &self,
        user: &User,
        session_id: Uuid,
        input: ChangePasswordInput,
        meta: &ClientMeta,
        abandoned: &Abandoned,
    ) -> Result<()> {
        let mut c = Checks::default();
        let current = c.take(token_of(input.current_password, "current_password"));
        let new = c.take(new_password(input.new_password, Some(&user.email), "new_password"));
        c.finish()?;
        let (Some(current), Some(new)) = (current, new) else {
            return Err(Error::Validation(vec![]));
        };
        let (permit, failures, _) = self.reserve_attempt(&user.email, abandoned).await?;
        let unchecked = self.unchecked_lockout(Some(user), &user.email, failures, meta);
        let stored = if current.expose_secret().len() > MAX_LOGIN_BYTES { None } else { user.password_hash.as_deref() };
        let verified = self.hasher.verify(permit, &current, stored, abandoned).await?;
        unchecked.disarm();
        if !verified {
            self.audit(Some(user), None, "password_change_failed", Some(meta), serde_json::json!({})).await;
            self.failed_check(Some(user), &user.email, failures, meta).await;
            return Err(Error::InvalidCredentials);
        }
        self.store.clear_login_failures(&user.email, self.now()).await?;
        // Skipped if the request is given up before it starts.
        let hash = self.hasher.hash_for(self.hasher.admit()?, &new, Some(abandoned)).await?;
        if abandoned.is_set() {
            return Err(Error::Abandoned);
        }
        let ended = self.store.change_password(user.id, &hash, Some(session_id), self.now()).await?;
        self.audit(Some(user), None, "password_changed", Some(meta), serde_json::json!({})).await;
        self.audit_ended(user, &ended, "password_changed", Some(meta)).await;
        // The store queued the notice in the same transaction.
        self.mail_wake.notify_one();
        Ok(())
    }

    /// Creates an account from the command line.
    pub async fn create_user_directly(
        &self,
        email: &str,
        pw: SecretString,
        role: Role,
        verified: bool,
    ) -> Result<User> {
        let email = Email::parse_new(email, "email").map_err(|e| Error::Validation(vec![e]))?;
        let pw = new_password(Some(pw), Some(email.as_str()), "password").map_err(|e| Error::Validation(vec![e]))?;
        let hash = self.hasher.hash(self.hasher.admit()?, &pw).await?;
        let now = self.now();
        let user = self
            .store
            .create_user(NewUser {
                id: Uuid::now_v7(),
                email: email.to_string(),
                name: None,
                password_hash: Some(hash),
                role,
                email_verified_at: verified.then_some(now),
                now,
            })
            .await?
            .ok_or_else(|| {
                Error::Validation(vec![FieldError::new("email", "taken", "an account with this email exists")])
            })?;
        self.audit(Some(&user), None, "registered", None, serde_json::json!({"via": "cli"})).await;
        Ok(user)
    }
}

/// See [`Services::unchecked_lockout`]: the event to record if dropped armed, and the
/// lock to settle (email, failures).
struct UncheckedLockout {
    store: std::sync::Arc<dyn crate::store::Store>,
    event: Option<(crate::store::Event, String, u32)>,
}

impl UncheckedLockout {
    /// The check ended: its own outcome records what happened.
    fn disarm(mut self) {
        self.event = None;
    }
}

impl Drop for UncheckedLockout {
    fn drop(&mut self) {
        let Some((event, email, failures)) = self.event.take() else { return };
        let store = self.store.clone();
        // A request's future is dropped on a runtime thread; outside one there is
        // nothing to record with.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // No check will settle it: the logins waiting on it hear 429 at once.
                if let Err(e) = store.settle_login_lock(&email, failures).await {
                    tracing::warn!(error = %e, "could not settle a login lock");
                }
                if let Err(err) = store.record_event(&event).await {
                    tracing::error!(error = %err, "could not record an audit event");
                }
            });
        }
    }
}

/// How long a login waits for a settling lock (see [`Reservation::Locked`]): the
/// attempt that started it is in the hashing queue, so it answers within the queue's
/// drain time (with the default queue, 8 hashes per worker: with the default hash about
/// 0.15 s on this session's machine, at 15-20 ms a hash); past this, the lock is
/// answered as it stands (its instance may have stopped mid-check, or the write that
/// settles it failed). The store stops calling a lock settling a little later anyway
/// (3 s).
const SETTLE_WAIT: Duration = Duration::from_secs(2);

/// The pauses between a waiting login's looks at a settling lock: from 10 ms, doubling
/// up to 160 ms, until [`SETTLE_WAIT`] is spent.
struct SettleWait {
    until: Instant,
    pause: Duration,
}

impl SettleWait {
    fn new() -> Self {
        Self { until: Instant::now() + SETTLE_WAIT, pause: Duration::from_millis(10) }
    }

    fn may_wait(&self) -> bool {
        Instant::now() + self.pause <= self.until
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(160));
    }
}
