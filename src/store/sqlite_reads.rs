//! The hot reads on SQLite (a session and its user for every authenticated request, a
//! user by email for every login), done with a read-only rusqlite connection owned by
//! the calling thread.
//!
//! sqlx hands every SQLite query to a worker thread and back, which costs more than
//! the query itself (a point select by primary key takes microseconds). Here each
//! runtime thread keeps its own read-only connection and runs the select inline. WAL
//! readers never wait for the writer, so this does not block the runtime; and since it
//! reads the database itself, an ended session is refused at once, as before.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};
use uuid::Uuid;

use super::Session;
use crate::domain::user::User;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static CONNECTIONS: RefCell<HashMap<u64, Connection>> = RefCell::new(HashMap::new());
}

/// Reads of one SQLite database file.
pub struct SqliteReads {
    id: u64,
    path: PathBuf,
}

pub(super) fn err(e: rusqlite::Error) -> sqlx::Error {
    // A busy or locked database is load, not a fault: keep it recognisable as such
    // (StoreError::is_transient answers 503 for a pool timeout).
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => sqlx::Error::PoolTimedOut,
        _ => sqlx::Error::Protocol(format!("sqlite read: {e}")),
    }
}

pub(super) fn uuid(row: &Row<'_>, col: usize) -> rusqlite::Result<Uuid> {
    let s: String = row.get(col)?;
    Uuid::parse_str(&s)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

fn parsed<T: FromStr<Err = String>>(row: &Row<'_>, col: usize) -> rusqlite::Result<T> {
    let s: String = row.get(col)?;
    s.parse().map_err(|e: String| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
}

fn json(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

impl SqliteReads {
    /// Reads of the database file at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), path }
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, sqlx::Error> {
        CONNECTIONS.with(|cell| {
            let mut conns = cell.borrow_mut();
            if !conns.contains_key(&self.id) {
                // Stores come and go in tests; a thread keeps a bounded number.
                if conns.len() >= 16 {
                    conns.clear();
                }
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(err)?;
                c.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
                conns.insert(self.id, c);
            }
            let c = conns.get(&self.id).ok_or_else(|| sqlx::Error::Protocol("sqlite read: no connection".into()))?;
            f(c).map_err(err)
        })
    }

    /// A session and its user, by session id.
    pub fn session_with_user(&self, sql: &str, sid: Uuid) -> Result<Option<(Session, User)>, sqlx::Error> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            stmt.query_row([sid.to_string()], session_and_user).optional()
        })
    }

    /// A user by email; `sql` selects `USER_COLS` with the email as its parameter.
    pub fn user_by_email(&self, sql: &str, email: &str) -> Result<Option<User>, sqlx::Error> {
        self.with(|c| c.prepare_cached(sql)?.query_row([email], |r| user_at(r, 0)).optional())
    }
}

/// A session and its user from a row that starts with `SESSION_COLS` then `USER_COLS`,
/// read by position (looking columns up by name cost more than the query).
pub(super) fn session_and_user(r: &Row<'_>) -> rusqlite::Result<(Session, User)> {
    let session = Session {
        id: uuid(r, 0)?,
        user_id: uuid(r, 1)?,
        created_at: r.get(2)?,
        last_used_at: r.get(3)?,
        expires_at: r.get(4)?,
        ip: r.get(5)?,
        user_agent: r.get(6)?,
        ended_at: r.get(7)?,
    };
    Ok((session, user_at(r, 8)?))
}

/// A user from the columns of `USER_COLS`, in their order, starting at column `at`.
pub(super) fn user_at(r: &Row<'_>, at: usize) -> rusqlite::Result<User> {
    Ok(User {
        id: uuid(r, at)?,
        email: r.get(at + 1)?,
        name: r.get(at + 2)?,
        password_hash: r.get(at + 3)?,
        role: parsed(r, at + 4)?,
        status: parsed(r, at + 5)?,
        email_verified_at: r.get(at + 6)?,
        created_at: r.get(at + 7)?,
        updated_at: r.get(at + 8)?,
        last_login_at: r.get(at + 9)?,
        last_login_geolocation: json(r.get(at + 10)?),
        metadata: json(r.get(at + 11)?).unwrap_or_else(|| serde_json::json!({})),
    })
}
