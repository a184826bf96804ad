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

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rusqlite::{params, Connection, TransactionBehavior};

use super::sql::{answer_rotated, rotated_answer, RotateJob, SESSION_COLS, USER_COLS};
use super::sqlite_reads::{err, session_and_user};
use super::Rotation;

/// What became of a batch handed to the rotator.
pub(super) enum Outcome {
    /// The group committed and its rotations were answered; these jobs are left.
    Rest(Vec<RotateJob>),
    /// Nothing was written: the error, and every job.
    Failed(sqlx::Error, Vec<RotateJob>),
}

/// The rotation writer of one SQLite database file, owned by the batcher.
pub(super) struct SqliteRotator {
    conn: Connection,
    sql: Statements,
    grouped: Arc<AtomicU64>,
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
        // As the sqlx connections: every commit durable (FULL), even after a power cut.
        let conn = super::sqlite_counters::open_writer(path, "FULL")?;
        Ok(Self { conn, sql: Statements::new(), grouped })
    }

    /// Rotates what the group can of `jobs` and answers those; returns the rest. Runs on
    /// the calling thread: on a multi-threaded runtime its other tasks move to another
    /// thread meanwhile (handing the batch to a thread of its own cost a wake-up each
    /// way, more than the statements).
    pub(super) fn rotate(&mut self, jobs: Vec<RotateJob>) -> Outcome {
        super::sqlite_counters::on_this_thread(|| run(&mut self.conn, &self.sql, jobs, &self.grouped))
    }
}

/// One batch: the group in one transaction; on commit, its answers.
fn run(conn: &mut Connection, sql: &Statements, jobs: Vec<RotateJob>, grouped: &AtomicU64) -> Outcome {
    let group = conn.transaction_with_behavior(TransactionBehavior::Immediate).and_then(|tx| {
        let group = rotate_group(&tx, sql, &jobs)?;
        tx.commit()?;
        Ok(group)
    });
    match group {
        Ok(group) => Outcome::Rest(answer_rotated(jobs, group, grouped)),
        Err(e) => Outcome::Failed(err(e), jobs),
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
