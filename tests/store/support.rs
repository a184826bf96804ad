//! Shared fixtures: a fresh store per test, a second instance on the same database,
//! and builders for the store's request structs. Times are plain Unix seconds.

use std::sync::Arc;

use gatehouse::crypto::tokens;
use gatehouse::domain::lockout::LockoutPolicy;
use gatehouse::domain::user::{Role, User};
use gatehouse::store::{Event, NewOneTimeToken, NewSession, NewUser, Rotate, Store, StoreOptions};
use uuid::Uuid;

pub use crate::common::{fresh_database, Backend};

/// A fixed "now" for every test; SQL never reads the clock.
pub const T0: i64 = 1_800_000_000;
/// Refresh token lifetime used by the tests.
pub const REFRESH_TTL: i64 = 30 * 86_400;
/// Absolute session lifetime used by the tests.
pub const SESSION_TTL: i64 = 90 * 86_400;
/// Refresh grace window used by the tests.
pub const GRACE: i64 = 30;

/// The store options of every test store.
const OPTIONS: StoreOptions = StoreOptions { max_connections: 8, acquire_timeout_secs: 5, session_cache_entries: 1000 };

/// A fresh database and a store on it.
pub struct Db {
    pub url: String,
    pub store: Arc<dyn Store>,
    pub _dir: tempfile::TempDir,
}

impl Db {
    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = fresh_database(backend, dir.path()).await;
        let store = open(&url).await;
        Self { url, store, _dir: dir }
    }

    /// Another store instance on the same database, as a second process would have.
    pub async fn another_instance(&self) -> Arc<dyn Store> {
        open(&self.url).await
    }
}

pub async fn open(url: &str) -> Arc<dyn Store> {
    gatehouse::store::open(url, &OPTIONS).await.expect("open store")
}

/// The SQL store itself, for what only it tells (how rotations were grouped).
pub async fn open_sql(url: &str) -> Arc<gatehouse::store::sql::SqlStore> {
    Arc::new(gatehouse::store::sql::SqlStore::connect(url, &OPTIONS).await.expect("open store"))
}

/// A user to create with the given email, created at `T0`.
pub fn new_user(email: &str) -> NewUser {
    NewUser {
        id: Uuid::now_v7(),
        email: email.to_owned(),
        name: Some("Test User".to_owned()),
        password_hash: Some("$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".to_owned()),
        role: Role::User,
        email_verified_at: None,
        now: T0,
    }
}

/// Creates an unverified user.
pub async fn user(store: &dyn Store, email: &str) -> User {
    store.create_user(new_user(email)).await.unwrap().expect("email is free")
}

/// A mailed one-time secret and the row to store for it.
pub fn one_time(expires_at: i64) -> (String, NewOneTimeToken) {
    let secret = tokens::new_link_token();
    let t = NewOneTimeToken { id: Uuid::new_v4(), token_hash: tokens::hash_token(&secret), expires_at };
    (secret, t)
}

/// A verification code and the row to store for it (hashed with its row id).
pub fn one_time_code(expires_at: i64) -> (String, NewOneTimeToken) {
    let code = tokens::new_code();
    let id = Uuid::new_v4();
    let t = NewOneTimeToken { id, token_hash: tokens::hash_code(&id.to_string(), &code), expires_at };
    (code, t)
}

/// An opened session: its id and its first refresh token.
#[derive(Debug, Clone)]
pub struct Opened {
    pub id: Uuid,
    pub refresh: String,
}

/// A session for `user_id` opened at `now`, with the default lifetimes.
pub fn new_session(user_id: Uuid, now: i64) -> (Opened, NewSession) {
    let refresh = tokens::new_refresh_token();
    let id = Uuid::new_v4();
    let s = NewSession {
        id,
        user_id,
        refresh_hash: tokens::hash_token(&refresh),
        refresh_expires_at: now + REFRESH_TTL,
        expires_at: now + SESSION_TTL,
        ip: Some("192.0.2.7".to_owned()),
        user_agent: Some("store-tests/1".to_owned()),
        geolocation: None,
        verified_hash: None,
        now,
    };
    (Opened { id, refresh }, s)
}

/// Opens a session without a device limit.
pub async fn login(store: &dyn Store, user_id: Uuid, now: i64) -> Opened {
    let (opened, s) = new_session(user_id, now);
    store.open_session(&s, 0).await.unwrap().expect("session opened");
    opened
}

/// Logs out of session `sid` of `user_id` at `now` (with its audit event); whether this
/// call ended it.
pub async fn logout(store: &dyn Store, user_id: Uuid, sid: Uuid, now: i64) -> bool {
    let event = Event {
        user_id: Some(user_id),
        email: None,
        kind: "session_ended".into(),
        at: now,
        ip: None,
        user_agent: None,
        detail: serde_json::json!({"session_id": sid, "reason": "logout"}),
    };
    store.end_session(user_id, sid, "logout", &event).await.unwrap()
}

/// A rotation of `old` at `now` and the successor it would install.
pub fn rotate(old: &str, now: i64) -> (Rotate, String) {
    let next = tokens::new_refresh_token();
    let r = Rotate {
        old_hash: tokens::hash_token(old),
        new_hash: tokens::hash_token(&next),
        sealed: tokens::seal(&next, old).unwrap(),
        ttl: REFRESH_TTL,
        grace: GRACE,
        now,
    };
    (r, next)
}

/// A lockout policy from a tier list such as `5:60,10:300`.
pub fn policy(tiers: &str, hard_limit: u32) -> LockoutPolicy {
    LockoutPolicy { tiers: tiers.parse().unwrap(), hard_limit }
}

/// The default policy: 5:60, 10:300, 20:3600, hard at 100.
pub fn default_policy() -> LockoutPolicy {
    policy("5:60,10:300,20:3600", 100)
}
