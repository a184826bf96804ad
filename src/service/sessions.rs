//! Sessions and refresh tokens.
//!
//! # Policy
//!
//! * Every login opens a session with an opaque refresh token (256 random bits,
//!   stored as SHA-256). A user holds at most `device_limit` live sessions: the login
//!   that would exceed it ends the oldest, in the same transaction that opens the new
//!   one, so parallel logins never leave more alive.
//! * Refresh rotates: the presented token dies and a successor is returned. The old
//!   row keeps the successor sealed with the old token itself (see
//!   `crypto::tokens::seal`), so within `refresh_grace` seconds the old token returns
//!   that same successor (parallel tabs, retries) and never a second chain, while a
//!   database reader learns nothing usable. After the grace window, a rotated token
//!   is reuse: the whole session ends and the answer is `refresh_token_reused`.
//! * A session ends on logout, eviction, reuse, password change or reset, or when its
//!   user stops being active. It expires after `refresh_token_ttl` idle seconds (the
//!   refresh token's life) or `session_max_age` seconds in all.
//! * Access tokens carry the session id; every Bearer request reads the session and
//!   user (one indexed join, or the session memory on PostgreSQL), so an ended
//!   session's tokens stop at once here.
//! * A session's `last_used_at` is its last Bearer request or refresh, to the minute:
//!   a request a minute or more after the recorded use writes it, after the answer,
//!   and each instance tries at most once a minute per session ([`RecentTouches`]),
//!   however many requests read the old time and whether or not the write succeeds.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::accounts::{Tokens, MAX_TOKEN_BYTES};
use super::{required, Caller, ClientMeta, Error, Result, Services};
use crate::clock::UnixTime;
use crate::crypto::tokens;
use crate::domain::user::Status;
use crate::store::{use_is_due, Rotate, Rotation, Session};

/// `POST /v1/auth/refresh`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshInput {
    /// The refresh token.
    #[schema(value_type = Option<String>)]
    pub refresh_token: Option<SecretString>,
}

impl Services {
    /// Rotates a refresh token (see the module policy).
    pub async fn refresh(&self, input: RefreshInput, meta: &ClientMeta) -> Result<Tokens> {
        let old = required(input.refresh_token, "refresh_token").map_err(|e| Error::Validation(vec![e]))?;
        let old = old.expose_secret();
        if old.is_empty() || old.len() > MAX_TOKEN_BYTES {
            return Err(Error::InvalidRefreshToken);
        }
        let new = tokens::new_refresh_token();
        let sealed = tokens::seal(&new, old).ok_or(Error::InvalidRefreshToken)?;
        let now = self.now();
        let r = Rotate {
            old_hash: tokens::hash_token(old),
            new_hash: tokens::hash_token(&new),
            sealed,
            ttl: self.policy.refresh_ttl,
            grace: self.policy.refresh_grace,
            now,
        };
        let (refresh_token, session, user, refresh_expires_at) = match self.store.rotate_refresh(&r).await? {
            Rotation::Rotated { session, user, refresh_expires_at } => (new, session, user, refresh_expires_at),
            Rotation::Grace { sealed, session, user, refresh_expires_at } => {
                let successor = tokens::unseal(&sealed, old).ok_or(Error::InvalidRefreshToken)?;
                (successor, session, user, refresh_expires_at)
            }
            Rotation::Reused { session_id, user_id } => {
                if let Some(user) = self.store.user_by_id(user_id).await? {
                    self.audit(
                        Some(&user),
                        None,
                        "refresh_token_reused",
                        Some(meta),
                        serde_json::json!({"session_id": session_id}),
                    )
                    .await;
                    self.audit_ended(&user, &[session_id], "refresh_token_reused", Some(meta)).await;
                }
                return Err(Error::RefreshTokenReused);
            }
            Rotation::Invalid => return Err(Error::InvalidRefreshToken),
        };
        let (access_token, access_expires_at) = self.tokens.issue(&user, session.id, now)?;
        Ok(Tokens { access_token, access_expires_at, refresh_token, refresh_expires_at, session_id: session.id, user })
    }

    /// Checks a Bearer access token and its session.
    pub async fn authenticate_bearer(&self, jwt: &str) -> Result<Caller> {
        let now = self.now();
        let claims = self.tokens.verify(jwt, now).map_err(|_| Error::Unauthorized)?;
        let (session, user) = self.store.session_with_user(claims.sid).await?.ok_or(Error::SessionEnded)?;
        if session.user_id != claims.sub {
            return Err(Error::Unauthorized);
        }
        if !session.is_live(now) || user.status != Status::Active {
            return Err(Error::SessionEnded);
        }
        if use_is_due(session.last_used_at, now) && self.recent_touches.claim(session.id, now) {
            // The session's last use, to the minute, written after the answer: never a
            // wait for SQLite's writer on the request's path, nor a failed request.
            let (store, sid) = (self.store.clone(), session.id);
            tokio::spawn(async move {
                if let Err(e) = store.touch_session(sid, now).await {
                    tracing::warn!(error = %e, "could not record a session's use");
                }
            });
        }
        Ok(Caller { user, session_id: Some(session.id) })
    }

    /// Ends the caller's session.
    pub async fn logout(&self, caller: &Caller, meta: &ClientMeta) -> Result<()> {
        let sid = caller.session_id.ok_or(Error::Unauthorized)?;
        self.end_recorded(caller, sid, "logout", meta).await?;
        Ok(())
    }

    /// The caller's sessions still held (see the store's list), newest first, and the
    /// calling session in any case: with a refresh token life shorter than the access
    /// token's, its token can outlive its place, and a session in use is listed.
    pub async fn sessions(&self, caller: &Caller) -> Result<Vec<Session>> {
        let now = self.now();
        let mut list = self.store.list_sessions(caller.user.id, now).await?;
        if let Some(sid) = caller.session_id.filter(|sid| !list.iter().any(|s| s.id == *sid)) {
            if let Some((own, _)) = self.store.session_with_user(sid).await?.filter(|(s, _)| s.is_live(now)) {
                list.push(own);
                list.sort_by_key(|s| std::cmp::Reverse((s.created_at, s.id)));
            }
        }
        Ok(list)
    }

    /// Ends one of the caller's sessions; someone else's is not found.
    pub async fn end_session(&self, caller: &Caller, sid: Uuid, meta: &ClientMeta) -> Result<()> {
        if !self.end_recorded(caller, sid, "ended_by_user", meta).await? {
            return Err(Error::NotFound);
        }
        Ok(())
    }

    /// Ends every session of the caller but the current one.
    pub async fn end_other_sessions(&self, caller: &Caller, meta: &ClientMeta) -> Result<()> {
        let ended = self.store.end_sessions(caller.user.id, caller.session_id, "ended_by_user", self.now()).await?;
        self.audit_ended(&caller.user, &ended, "ended_by_user", Some(meta)).await;
        Ok(())
    }
}

/// The sessions whose use this instance tried to record in the last minute: at most one
/// attempt a minute per session, even while the write fails or other requests still
/// read the old `last_used_at` (another instance's memory before its notification).
#[derive(Default)]
pub struct RecentTouches(std::sync::Mutex<std::collections::HashMap<Uuid, UnixTime>>);

/// Attempts remembered before they are all forgotten.
const RECENT_TOUCHES_KEPT: usize = 100_000;

impl RecentTouches {
    /// Whether to record a use of `sid` at `now`: no attempt for it within the
    /// resolution.
    pub fn claim(&self, sid: Uuid, now: UnixTime) -> bool {
        let mut recent = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.get(&sid).is_some_and(|&at| !use_is_due(at, now)) {
            return false;
        }
        if recent.len() >= RECENT_TOUCHES_KEPT {
            // Start again, once every so many sessions (no scan on a request's path): a
            // session claimed twice within a minute costs a write that changes nothing,
            // the write's own condition keeping the database at one a minute.
            recent.clear();
        }
        recent.insert(sid, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_use_is_claimed_once_a_minute_per_session() {
        let recent = RecentTouches::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(recent.claim(a, 1000));
        assert!(!recent.claim(a, 1000), "one attempt, however many requests");
        assert!(!recent.claim(a, 1059));
        assert!(recent.claim(b, 1059), "sessions are claimed apart");
        assert!(recent.claim(a, 1060), "a minute later");
    }
}
