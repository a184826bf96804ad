//! SQLite: the counters' writes (lockout reservations, per-IP rate limits) on a rusqlite
//! connection of their own that commits without an fsync (`synchronous = NORMAL`).
//!
//! The caller holds the writer's turn (`sql::Turn`) meanwhile, so SQLite's writes stay
//! one at a time (no busy waits) and a count is as exact as before. Durability: the commit
//! is in the WAL file before the answer, so a crash of Gatehouse loses nothing; the next
//! commit of the sqlx writer or the rotator (`synchronous = FULL`) fsyncs the WAL file,
//! this commit's frames included. A login that checks a password makes such a commit
//! before it answers (its session, or its failure's audit event when that is written),
//! so only a power cut or an OS crash can lose counts, those since the last such commit.
//! Before, each count cost an fsync of its own: one per login, and one per rate-limited
//! request.

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::sqlite_reads::err;

/// The counters' connection to one SQLite database file.
pub(super) struct SqliteCounters {
    conn: Mutex<Connection>,
}

impl SqliteCounters {
    /// Opens the database file at `path` (already migrated).
    pub(super) fn open(path: &Path) -> Result<Self, sqlx::Error> {
        Ok(Self { conn: Mutex::new(open_writer(path, "NORMAL")?) })
    }

    /// Runs one statement written for sqlx (`$1` parameters) and returns the integer
    /// columns of its first row, if any. The caller holds the writer's turn.
    ///
    /// Inline, not under `block_in_place` (which hands the runtime thread's work to
    /// another thread, a wake-up across CPUs): a commit without fsync is a write to the
    /// WAL file's page cache, microseconds. The commit that crosses the WAL's
    /// auto-checkpoint size (about once in a thousand) checkpoints and fsyncs, about a
    /// millisecond on these disks. Only when the database is locked by something outside
    /// the turn (an operator's `sqlite3`, a backup, `gatehouse migrate`) does the statement
    /// wait, and then under `block_in_place`, in SQLite's busy handler.
    pub(super) fn first_row(&self, sql: &str, params: Vec<Value>) -> Result<Option<Vec<i64>>, sqlx::Error> {
        let run = |wait: Duration| {
            // A panic elsewhere while it was held left nothing half done: rusqlite rolls
            // back an unfinished statement.
            let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            conn.busy_timeout(wait)?;
            let mut stmt = conn.prepare_cached(&numbered(sql))?;
            let columns = stmt.column_count();
            stmt.query_row(rusqlite::params_from_iter(params.iter()), |row| (0..columns).map(|i| row.get(i)).collect())
                .optional()
        };
        match run(Duration::ZERO) {
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
                on_this_thread(|| run(BUSY_WAIT)).map_err(err)
            }
            other => other.map_err(err),
        }
    }
}

/// How long a rusqlite writer waits for a lock held outside the writer's turn.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// A statement written for sqlx (`$1` parameters) in rusqlite's numbering: `$1` is a
/// name to SQLite, numbered by first appearance; `?1` is a number.
pub(super) fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

/// A read-write rusqlite connection to the database file at `path` (already migrated),
/// in WAL mode with the given `synchronous` level.
pub(super) fn open_writer(path: &Path, synchronous: &str) -> Result<Connection, sqlx::Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(err)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON; \
         PRAGMA busy_timeout = 10000;"
    ))
    .map_err(err)?;
    Ok(conn)
}

/// Runs blocking SQLite work on the calling thread: on a multi-threaded runtime its
/// other tasks move to another thread meanwhile.
pub(super) fn on_this_thread<T>(run: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(run),
        _ => run(),
    }
}
