//! SQLite: the ordinary refresh rotations of a batch, written with a read-write rusqlite
//! connection of their own, on the batcher's thread.
//!
//! Through sqlx, every statement is a hand-off to its SQLite worker thread and back. On
//! batches of about 15 rotations (32 clients refreshing) this was measured at 0.6 ms for
//! `BEGIN`, about 0.5 ms for each of the four statements and 1.6 ms for the commit: 4–5 ms
//! a batch, one batch at a time, which bounded refresh throughput while the cores sat
//! partly idle. Here the group's transaction runs start to finish on one thread, and its
//! rotations are answered as soon as it commits.
//!
//! SQLite has one writer. The batcher holds the writer's turn (`sql::Turn`) while this
//! connection writes, so writes stay one at a time and none waits in SQLite's busy
//! handler. What the group does not rotate (grace, reuse, invalid, a token presented
//! twice) is handed back and goes one by one through sqlx.
//!
//! The group commits without an fsync (`synchronous = NORMAL`: in WAL mode a commit is
//! then a `write` of its frames to the WAL file, safe from a crash of the process but
//! not yet from a power cut), and its answers wait for a flush of the WAL file
//! ([`Flushing::answer`]) that runs after the writer's turn is given back: the next
//! group writes while this one's frames reach the disk (pipelined group commit). An
//! fsync of the file flushes what every connection wrote to it, so a rotation is
//! durable before it is answered, as when the commit itself flushed. A checkpoint
//! flushes the WAL before it copies it (so NORMAL), and SQLite removes the WAL file only
//! when the last connection closes, so the file opened once stays the database's WAL.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::{params, Connection, TransactionBehavior};

use super::sql::{rotated_answer, rotated_of, Reply, RotateJob, SESSION_COLS, USER_COLS};
use super::sqlite_reads::{err, session_and_user};
use super::Rotation;

/// What became of a batch handed to the rotator.
pub(super) enum Outcome {
    /// The group committed; its rotations are answered once flushed; these jobs are left.
    Committed(Flushing, Vec<RotateJob>),
    /// Nothing was written: the error, and every job.
    Failed(sqlx::Error, Vec<RotateJob>),
}

/// A committed group's rotations, to be answered once the WAL file is flushed.
pub(super) struct Flushing {
    wal: Arc<File>,
    answers: Vec<(Reply, Rotation)>,
    grouped: Arc<AtomicU64>,
}

/// The rotation writer of one SQLite database file, owned by the batcher.
pub(super) struct SqliteRotator {
    conn: Connection,
    sql: Statements,
    grouped: Arc<AtomicU64>,
    /// The database's WAL file.
    wal: Arc<File>,
}

/// The group's statements, each driven by a JSON list (see [`rotate_group`]).
struct Statements {
    rotate: String,
    winners: String,
    successors: String,
    touch: String,
}

impl Statements {
    fn new() -> Self {
        let field = |f: &str| format!("json_extract(j.value, '$.{f}')");
        let (old, new, sealed, at) = (field("old_hash"), field("new_hash"), field("sealed"), field("at"));
        let (sid, exp, touch) = (field("sid"), field("expires_at"), field("touch"));
        Self {
            rotate: format!(
                "UPDATE refresh_tokens SET rotated_at = {at}, successor_sealed = {sealed} FROM json_each(?1) j \
                 WHERE refresh_tokens.token_hash = {old} AND refresh_tokens.rotated_at IS NULL \
                   AND refresh_tokens.expires_at > {at} \
                   AND EXISTS (SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id \
                               WHERE s.id = refresh_tokens.session_id AND s.ended_at IS NULL \
                                 AND s.expires_at > {at} AND u.status = 'active') \
                 RETURNING token_hash"
            ),
            // `CROSS JOIN` fixes SQLite's loop order: each token, its session and user by
            // key. The token comes last, after the columns `session_and_user` reads.
            winners: format!(
                "SELECT {SESSION_COLS}, {USER_COLS}, t.token_hash \
                 FROM json_each(?1) j CROSS JOIN refresh_tokens t CROSS JOIN sessions s CROSS JOIN users u \
                 WHERE t.token_hash = {old} AND s.id = t.session_id AND u.id = s.user_id"
            ),
            successors: format!(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) \
                 SELECT {new}, {sid}, {at}, {exp} FROM json_each(?1) j"
            ),
            touch: format!(
                "UPDATE sessions SET last_used_at = {at} FROM json_each(?1) j WHERE sessions.id = {sid} AND {touch}"
            ),
        }
    }
}

impl SqliteRotator {
    /// Opens the database file at `path` (already migrated). Rotations done by the
    /// group are added to `grouped`.
    pub(super) fn open(path: &Path, grouped: Arc<AtomicU64>) -> Result<Self, sqlx::Error> {
        // Durable through the flush that follows each commit (see the module's doc).
        let conn = super::sqlite_counters::open_writer(path, "NORMAL")?;
        // Opening a database in WAL mode creates its WAL file, if need be.
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = Arc::new(File::open(&wal)?);
        Ok(Self { conn, sql: Statements::new(), grouped, wal })
    }

    /// Rotates what the group can of `jobs`; returns those rotations, committed, to be
    /// answered once flushed, and the rest. Runs on the calling thread: on a
    /// multi-threaded runtime its other tasks move to another thread meanwhile (handing
    /// the batch to a thread of its own cost a wake-up each way, more than the
    /// statements).
    pub(super) fn rotate(&mut self, jobs: Vec<RotateJob>) -> Outcome {
        let committed = super::sqlite_counters::on_this_thread(|| {
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate).and_then(|tx| {
                let group = rotate_group(&tx, &self.sql, &jobs)?;
                tx.commit()?;
                Ok(group)
            })
        });
        match committed {
            Ok(group) => {
                let (answers, rest) = rotated_of(jobs, group);
                Outcome::Committed(Flushing { wal: self.wal.clone(), answers, grouped: self.grouped.clone() }, rest)
            }
            Err(e) => Outcome::Failed(err(e), jobs),
        }
    }
}

impl Flushing {
    /// Flushes the WAL file, then answers the group's rotations (with an error if the
    /// flush failed: the clients keep their tokens, whose grace answers the successor).
    pub(super) async fn answer(self) {
        let wal = self.wal;
        let flushed = match tokio::task::spawn_blocking(move || wal.sync_data()).await {
            Ok(flushed) => flushed,
            Err(e) => Err(std::io::Error::other(e)),
        };
        if let Err(e) = &flushed {
            tracing::error!(error = %e, "flushing the SQLite WAL file failed");
        } else {
            self.grouped.fetch_add(self.answers.len() as u64, Ordering::Relaxed);
        }
        for (reply, rotation) in self.answers {
            let answer = match &flushed {
                Ok(()) => Ok(rotation),
                Err(e) => Err(sqlx::Error::Io(std::io::Error::new(e.kind(), e.to_string()))),
            };
            let _ = reply.send(answer);
        }
    }
}

/// The ordinary rotations of a batch (token current, session live, account active), by
/// index in `jobs`. Mirrors the ordinary case of `rotate_in`: the write first, whose
/// RETURNING names the tokens it rotated; then their sessions and users; then the
/// successors and the sessions' last use. A token presented twice in the batch takes
/// part once, at its first presentation; the others are left for one by one (grace),
/// as in arrival order.
fn rotate_group(
    tx: &rusqlite::Transaction<'_>,
    sql: &Statements,
    jobs: &[RotateJob],
) -> rusqlite::Result<HashMap<usize, Rotation>> {
    let mut by_token: HashMap<&str, usize> = HashMap::with_capacity(jobs.len());
    let mut input = Vec::with_capacity(jobs.len());
    for (i, (r, _)) in jobs.iter().enumerate() {
        if let std::collections::hash_map::Entry::Vacant(first) = by_token.entry(r.old_hash.as_str()) {
            first.insert(i);
            input.push(serde_json::json!({"old_hash": r.old_hash, "sealed": r.sealed, "at": r.now}));
        }
    }
    let winners: Vec<serde_json::Value> = tx
        .prepare_cached(&sql.rotate)?
        .query_map(params![serde_json::Value::Array(input).to_string()], |row| row.get::<_, String>(0))?
        .map(|t| t.map(|t| serde_json::json!({"old_hash": t})))
        .collect::<rusqlite::Result<_>>()?;
    let mut group = HashMap::with_capacity(winners.len());
    if winners.is_empty() {
        return Ok(group);
    }
    let mut changes = Vec::with_capacity(winners.len());
    let mut stmt = tx.prepare_cached(&sql.winners)?;
    let mut rows = stmt.query(params![serde_json::Value::Array(winners).to_string()])?;
    while let Some(row) = rows.next()? {
        let token: String = row.get(20)?;
        let Some(&idx) = by_token.get(token.as_str()) else { continue };
        let r = &jobs[idx].0;
        let (session, user) = session_and_user(row)?;
        let (sid, refresh_expires_at) = (session.id, (r.now + r.ttl).min(session.expires_at));
        let (rotation, touch) = rotated_answer(session, user, r.now, refresh_expires_at);
        changes.push(serde_json::json!({
            "new_hash": r.new_hash, "sid": sid, "at": r.now, "expires_at": refresh_expires_at, "touch": touch,
        }));
        group.insert(idx, rotation);
    }
    let changes = serde_json::Value::Array(changes).to_string();
    tx.prepare_cached(&sql.successors)?.execute(params![changes])?;
    tx.prepare_cached(&sql.touch)?.execute(params![changes])?;
    Ok(group)
}
