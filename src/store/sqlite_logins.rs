//! SQLite: a login's writes (the user row, the session and its refresh token, the
//! cleared failures, the audit events, the evictions past the device limit), and a
//! logout's (the end and its audit event), each in one transaction on a read-write
//! rusqlite connection of their own, on the calling thread. (Logouts through sqlx ran
//! 1.5–1.8k a second in the bench, 3.0k here; 2026-12-07.)
//!
//! Through sqlx each of the transaction's seven or more statements was a hand-off to its
//! SQLite worker thread and back: two thread wake-ups each, across CPUs at 40–55 µs
//! apiece on these machines, for statements that take microseconds. Here the whole
//! transaction runs start to finish on one thread, under `block_in_place`.
//!
//! The caller holds the writer's turn (`sql::Turn`) meanwhile, so SQLite's writes stay
//! one at a time and none waits in SQLite's busy handler. The commit is
//! `synchronous = FULL`, like the sqlx writer's: an answered login survives a power cut.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::sql::{
    eviction_detail, login_detail, END_OWN_SESSION_SQL, END_SESSION_SQL, INSERT_EVENT_SQL, USER_FIELDS,
    ZERO_THROTTLE_SQL,
};
use super::sqlite_counters::{numbered, on_this_thread, open_writer};
use super::sqlite_reads::{err, user_at, uuid};
use super::{Event, NewSession};
use crate::domain::user::User;

/// The login writer of one SQLite database file.
pub(super) struct SqliteLogins {
    conn: Mutex<rusqlite::Connection>,
    record_login: String,
    zero_throttle: String,
    insert_event: String,
    end_session: String,
    end_own_session: String,
    held_sessions: String,
}

impl SqliteLogins {
    /// Opens the database file at `path` (already migrated).
    pub(super) fn open(path: &Path) -> Result<Self, sqlx::Error> {
        Ok(Self {
            conn: Mutex::new(open_writer(path, "FULL")?),
            // The user row first: it serialises logins of the same user, and returns the
            // user as the login leaves it.
            record_login: format!(
                "UPDATE users SET last_login_at = ?1, last_login_geo = ?2 \
                 WHERE id = ?3 AND status = 'active' AND (?4 = '' OR password_hash = ?4) RETURNING {}",
                *USER_FIELDS
            ),
            zero_throttle: numbered(ZERO_THROTTLE_SQL),
            insert_event: numbered(INSERT_EVENT_SQL),
            end_session: numbered(END_SESSION_SQL),
            end_own_session: numbered(END_OWN_SESSION_SQL),
            // Newest first; the device limit keeps the first `device_limit`.
            held_sessions: format!(
                "SELECT id FROM sessions s WHERE user_id = ?1 AND ended_at IS NULL AND expires_at > ?2 \
                 AND {} ORDER BY created_at DESC, id DESC",
                super::sql::held("?2")
            ),
        })
    }

    /// See [`super::Store::end_session`]: the end and, if this call ended the session,
    /// its event, in one transaction. The caller holds the writer's turn.
    pub(super) fn end_recorded(&self, user_id: Uuid, sid: Uuid, reason: &str, e: &Event) -> Result<bool, sqlx::Error> {
        on_this_thread(|| {
            let mut conn = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
            let ended = tx
                .prepare_cached(&self.end_own_session)
                .and_then(|mut st| st.execute(params![e.at, reason, sid.to_string(), user_id.to_string()]))
                .map_err(err)?
                > 0;
            if ended {
                tx.prepare_cached(&self.insert_event)
                    .and_then(|mut st| {
                        st.execute(params![
                            Uuid::now_v7().to_string(),
                            e.user_id.map(|u| u.to_string()),
                            e.email,
                            e.kind,
                            e.at,
                            e.ip,
                            e.user_agent,
                            e.detail.to_string()
                        ])
                    })
                    .map_err(err)?;
            }
            tx.commit().map_err(err)?;
            Ok(ended)
        })
    }

    /// See [`super::Store::open_session`]. The caller holds the writer's turn.
    pub(super) fn open_session(
        &self,
        s: &NewSession,
        device_limit: u32,
    ) -> Result<Option<(User, Vec<Uuid>)>, sqlx::Error> {
        on_this_thread(|| {
            // A panic elsewhere while it was held left nothing half done: rusqlite rolls
            // back a transaction it drops.
            let mut conn = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.write(&mut conn, s, device_limit).map_err(err)
        })
    }

    fn write(
        &self,
        conn: &mut rusqlite::Connection,
        s: &NewSession,
        device_limit: u32,
    ) -> rusqlite::Result<Option<(User, Vec<Uuid>)>> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (sid, uid) = (s.id.to_string(), s.user_id.to_string());
        let user = tx
            .prepare_cached(&self.record_login)?
            .query_row(
                params![
                    s.now,
                    s.geolocation.as_ref().map(|g| g.to_string()),
                    uid,
                    s.verified_hash.as_deref().unwrap_or("")
                ],
                |r| user_at(r, 0),
            )
            .optional()?;
        // The transaction rolls back when dropped.
        let Some(user) = user else { return Ok(None) };
        tx.prepare_cached(
            "INSERT INTO sessions (id, user_id, created_at, last_used_at, expires_at, ip, user_agent) \
             VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![sid, uid, s.now, s.expires_at, s.ip, s.user_agent])?;
        tx.prepare_cached(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![s.refresh_hash, sid, s.now, s.refresh_expires_at])?;
        tx.prepare_cached(&self.zero_throttle)?.execute(params![user.email, s.now])?;
        let mut events = tx.prepare_cached(&self.insert_event)?;
        let mut event = |kind: &str, detail: serde_json::Value| {
            events.execute(params![
                Uuid::now_v7().to_string(),
                uid,
                user.email,
                kind,
                s.now,
                s.ip,
                s.user_agent,
                detail.to_string()
            ])
        };
        event("login", login_detail(s))?;
        let mut evicted = Vec::new();
        if device_limit > 0 {
            let live: Vec<Uuid> = tx
                .prepare_cached(&self.held_sessions)?
                .query_map(params![uid, s.now], |r| uuid(r, 0))?
                .collect::<Result<_, _>>()?;
            let mut end = tx.prepare_cached(&self.end_session)?;
            for id in live.iter().skip(device_limit as usize) {
                // Only sessions this login ended: one ended meanwhile keeps its end.
                if end.execute(params![s.now, "evicted", id.to_string()])? > 0 {
                    event("session_ended", eviction_detail(*id))?;
                    evicted.push(*id);
                }
            }
        }
        drop(events);
        tx.commit()?;
        Ok(Some((user, evicted)))
    }
}
