//! [`Store`] over sqlx's `Any` driver: one set of queries for SQLite and PostgreSQL.
//! Both schemas use only TEXT and 64-bit integers, so rows decode the same way.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Executor, Row};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::one_per_key::OnePerKey;
use super::pg_direct::{AnyQuery, Direct, IDLE_BEFORE_PING};
use super::session_cache::SessionCache;
use super::sqlite_rotations::{Outcome, SqliteRotator};
use super::*;
use crate::domain::lockout::Lock;

/// The SQL store.
pub struct SqlStore {
    /// Reads.
    pool: AnyPool,
    /// Writes and transactions. For SQLite a single connection: SQLite has one writer
    /// anyway, and queueing for it here (in order, asynchronously) avoids its busy
    /// handler, whose sleeps of up to 100 ms made the tail latency of writes.
    writer: AnyPool,
    /// SQLite's writer's turn (see [`Turn`]).
    turn: Turn,
    /// PostgreSQL: the hot statements' own connections (see [`PgHot`]).
    pg_hot: Option<Arc<PgHot>>,
    /// Refresh rotations go through a group-commit batcher.
    rotations: mpsc::Sender<RotateJob>,
    /// Rotations done by a group statement (the rest went one by one).
    grouped: Arc<AtomicU64>,
    /// SQLite: the counters' writes on a connection without fsync waits
    /// (see `sqlite_counters`).
    sqlite_counters: Option<super::sqlite_counters::SqliteCounters>,
    /// SQLite: a login's transaction on a connection of its own (see `sqlite_logins`).
    sqlite_logins: Option<super::sqlite_logins::SqliteLogins>,
    /// SQLite only: the hot read on the calling thread (see `sqlite_reads`).
    sqlite_reads: Option<super::sqlite_reads::SqliteReads>,
    /// PostgreSQL only: remembered sessions, kept exact by notifications, leases and
    /// acknowledged writes (see `session_cache`).
    cache: Option<Arc<SessionCache>>,
    /// The task that listens for those notifications and renews the lease; stopped with the store.
    _listener: Option<AbortOnDrop>,
    backend: &'static str,
}

/// PostgreSQL: the connections of the hottest statements, outside sqlx's pool (see
/// `pg_direct`): the counters', the logins' and the lock reads' sets a quarter of
/// `max_connections` each (at least two), the rotations' two.
struct PgHot {
    /// Counters: lockout reservations and per-IP rate limits. They commit without
    /// waiting for the WAL flush (`synchronous_commit = off`; a flush costs about 0.4 ms
    /// of CPU on these machines). A successful login's session commit, and the audit
    /// event of a failed one when it is written, flush the WAL up to the reservation
    /// (PostgreSQL flushes in order). What a crash of PostgreSQL itself, of its machine
    /// or a failover can lose is the counts of up to three `wal_writer_delay`s (600 ms
    /// by default): a few guesses more for whoever can cause one. A crash of Gatehouse
    /// loses nothing.
    fast: Direct,
    /// The lock read of a locked email's logins and of logins refused for overload (once
    /// a second per email since `refused_locks`; before, hundreds a second). Apart from the
    /// counters': a reservation waits on its email's row while another login of that
    /// email commits (through its WAL flush), and a few busy emails (one reservation
    /// each per instance, see `email_turns`) could then hold every counters' connection;
    /// a read waits on no row. (On the counters' connections, before `email_turns`, with
    /// an 80 ms hold of a flooded email's row once a second, a 503's p99 was 29 and
    /// 42 ms, against 6.0 and 12.1 ms apart; and a locked email's 429 became a 503 when
    /// the wait reached the acquire timeout.)
    reads: Direct,
    /// A login's session write, and the end of one's own session with its audit event
    /// (logout): durable at commit.
    logins: Direct,
    /// The refresh rotation batches (two run at once), durable at commit: apart from
    /// the logins', so that logins waiting on a user's row lock cannot hold up
    /// rotations, nor the other way round.
    rotations: Direct,
    /// Each email's reservations one at a time (see `one_per_key`).
    email_turns: OnePerKey,
    /// Each user's session writes one at a time (see `one_per_key`).
    user_turns: OnePerKey,
}

/// PostgreSQL rotation batches in flight at once (one gathers while the other commits).
const ROTATION_BATCHES_AT_ONCE: u32 = 2;

/// PostgreSQL's advisory lock key of changes to users' roles, states and verification
/// (the ASCII of "gh:admin"): taken by each such change, so the last admin able to act
/// ([`ACTING_ADMIN`]) stays one.
const ADMIN_CHANGES_LOCK: i64 = 0x6768_3a61_646d_696e;

/// A user row that is an admin able to log in and act: the last such admin stays one.
const ACTING_ADMIN: &str = "role = 'admin' AND status = 'active' AND email_verified_at IS NOT NULL";

/// How long a lock a reservation started stays settling unless its attempt's failure
/// settles it first (see `Reservation::Locked`): longer than the service waits for it
/// (2 s), and short, since an attempt whose instance stopped mid-check never settles it.
const SETTLING_SECONDS: i64 = 3;

/// Every PostgreSQL connection's session settings.
macro_rules! pg_setup {
    () => {
        "SET statement_timeout = '10s'; SET idle_in_transaction_session_timeout = '30s';"
    };
}
const PG_SETUP: &str = pg_setup!();

/// The counters' connections' settings (see [`PgHot::fast`]).
const PG_FAST_SETUP: &str = concat!(pg_setup!(), " SET synchronous_commit = off;");

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore").field("backend", &self.backend).finish_non_exhaustive()
    }
}

pub(super) const USER_COLS: &str = "u.id, u.email, u.name, u.password_hash, u.role, u.status, u.email_verified_at, \
    u.created_at, u.updated_at, u.last_login_at, u.last_login_geo, u.metadata";
static USER_BY_EMAIL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {USER_COLS} FROM users u WHERE u.email = $1"));
/// [`USER_COLS`] unqualified, for `RETURNING` (SQLite takes no table name there).
pub(super) static USER_FIELDS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| USER_COLS.replace("u.", ""));
pub(super) const SESSION_COLS: &str = "s.id AS s_id, s.user_id AS s_user_id, s.created_at AS s_created_at, \
    s.last_used_at AS s_last_used_at, s.expires_at AS s_expires_at, s.ip AS s_ip, \
    s.user_agent AS s_user_agent, s.ended_at AS s_ended_at";
const KEY_COLS: &str = "k.id AS k_id, k.user_id AS k_user_id, k.name AS k_name, k.prefix AS k_prefix, \
    k.created_at AS k_created_at, k.expires_at AS k_expires_at, k.last_used_at AS k_last_used_at";

fn uuid(row: &AnyRow, col: &str) -> Result<Uuid, sqlx::Error> {
    let s: String = row.try_get(col)?;
    Uuid::parse_str(&s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn parse<T: FromStr<Err = String>>(row: &AnyRow, col: &str) -> Result<T, sqlx::Error> {
    let s: String = row.try_get(col)?;
    s.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))
}

fn json(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

fn user_from(row: &AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: uuid(row, "id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        password_hash: row.try_get("password_hash")?,
        role: parse(row, "role")?,
        status: parse(row, "status")?,
        email_verified_at: row.try_get("email_verified_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_login_at: row.try_get("last_login_at")?,
        last_login_geolocation: json(row.try_get("last_login_geo")?),
        metadata: json(row.try_get("metadata")?).unwrap_or_else(|| serde_json::json!({})),
    })
}

fn session_from(row: &AnyRow) -> Result<Session, sqlx::Error> {
    Ok(Session {
        id: uuid(row, "s_id")?,
        user_id: uuid(row, "s_user_id")?,
        created_at: row.try_get("s_created_at")?,
        last_used_at: row.try_get("s_last_used_at")?,
        expires_at: row.try_get("s_expires_at")?,
        ip: row.try_get("s_ip")?,
        user_agent: row.try_get("s_user_agent")?,
        ended_at: row.try_get("s_ended_at")?,
    })
}

fn key_from(row: &AnyRow) -> Result<ApiKey, sqlx::Error> {
    Ok(ApiKey {
        id: uuid(row, "k_id")?,
        user_id: uuid(row, "k_user_id")?,
        name: row.try_get("k_name")?,
        prefix: row.try_get("k_prefix")?,
        created_at: row.try_get("k_created_at")?,
        expires_at: row.try_get("k_expires_at")?,
        last_used_at: row.try_get("k_last_used_at")?,
    })
}

fn ids(rows: &[AnyRow]) -> Result<Vec<Uuid>, sqlx::Error> {
    rows.iter().map(|r| uuid(r, "id")).collect()
}

/// SQLite's one writer: every write takes this turn first, so that writes through sqlx
/// and through the rusqlite connections run one at a time and none waits in SQLite's busy
/// handler. Taking it is a lock; holding the sqlx writer connection as the turn, as
/// before, cost a hand-off to sqlx's worker thread and back at every release (sqlx pings
/// a connection it takes back). A write that waits longer than the pool's acquire
/// timeout for it gets the pool's timeout error (answered 503), as it did waiting for
/// the connection. PostgreSQL has none: its writes lock rows.
#[derive(Clone, Default)]
struct Turn(Option<(Arc<tokio::sync::Mutex<()>>, Duration)>);

type TurnGuard = tokio::sync::OwnedMutexGuard<()>;

impl Turn {
    fn sqlite(acquire_timeout: Duration) -> Self {
        Self(Some((Arc::new(tokio::sync::Mutex::new(())), acquire_timeout)))
    }

    async fn take(&self) -> Result<Option<TurnGuard>, sqlx::Error> {
        let Some((lock, timeout)) = &self.0 else { return Ok(None) };
        match tokio::time::timeout(*timeout, lock.clone().lock_owned()).await {
            Ok(guard) => Ok(Some(guard)),
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }
}

/// A write transaction, in the writer's turn.
struct Tx {
    /// Open until `commit` or `rollback` take it.
    tx: Option<sqlx::Transaction<'static, sqlx::Any>>,
    turn: Option<TurnGuard>,
    writer: AnyPool,
}

impl Tx {
    async fn commit(mut self) -> Result<(), sqlx::Error> {
        match self.tx.take() {
            Some(tx) => tx.commit().await,
            None => Ok(()),
        }
    }
    async fn rollback(mut self) -> Result<(), sqlx::Error> {
        match self.tx.take() {
            Some(tx) => tx.rollback().await,
            None => Ok(()),
        }
    }
}

impl Drop for Tx {
    /// Dropped open (an early return, an error): sqlx rolls the transaction back on its
    /// connection, asynchronously. The turn is kept until that connection is back in the
    /// pool, after the rollback, so that the next writer never meets this transaction's
    /// lock in SQLite's busy handler.
    fn drop(&mut self) {
        let (Some(tx), Some(turn)) = (self.tx.take(), self.turn.take()) else { return };
        drop(tx);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let writer = self.writer.clone();
            runtime.spawn(async move {
                let _back = writer.acquire().await;
                drop(turn);
            });
        }
    }
}

/// A write connection, in the writer's turn (it runs single statements, so it holds no
/// lock once a statement has answered).
struct WriteConn {
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
    _turn: Option<TurnGuard>,
}

impl std::ops::Deref for Tx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        self.tx.as_deref().expect("a transaction is open until commit or rollback take it")
    }
}
impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.tx.as_deref_mut().expect("a transaction is open until commit or rollback take it")
    }
}
impl std::ops::Deref for WriteConn {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}
impl std::ops::DerefMut for WriteConn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

async fn user_in(tx: &mut Tx, id: Uuid) -> Result<Option<User>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {USER_COLS} FROM users u WHERE u.id = $1"))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(user_from).transpose()
}

async fn end_sessions_in(
    tx: &mut Tx,
    user_id: Uuid,
    keep: Option<Uuid>,
    reason: &str,
    now: UnixTime,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let rows = sqlx::query(
        "UPDATE sessions SET ended_at = $1, end_reason = $2 \
         WHERE user_id = $3 AND ended_at IS NULL AND id <> $4 RETURNING id",
    )
    .bind(now)
    .bind(reason)
    .bind(user_id.to_string())
    .bind(keep.map(|k| k.to_string()).unwrap_or_default())
    .fetch_all(&mut **tx)
    .await?;
    ids(&rows)
}

async fn consume_token(tx: &mut Tx, cond: &str, arg: String, now: UnixTime) -> Result<Option<Uuid>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "UPDATE one_time_tokens SET used_at = $1 WHERE {cond} AND used_at IS NULL AND expires_at > $1 RETURNING user_id"
    ))
    .bind(now)
    .bind(arg)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(|r| uuid(r, "user_id")).transpose()
}

async fn supersede(tx: &mut Tx, user_id: Uuid, kinds: &[TokenKind], now: UnixTime) -> Result<(), sqlx::Error> {
    for k in kinds {
        sqlx::query("UPDATE one_time_tokens SET used_at = $1 WHERE user_id = $2 AND kind = $3 AND used_at IS NULL")
            .bind(now)
            .bind(user_id.to_string())
            .bind(k.as_str())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn insert_token(
    tx: &mut Tx,
    user_id: Uuid,
    kind: TokenKind,
    t: &NewOneTimeToken,
    now: UnixTime,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO one_time_tokens (id, user_id, kind, token_hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(t.id.to_string())
    .bind(user_id.to_string())
    .bind(kind.as_str())
    .bind(&t.token_hash)
    .bind(now)
    .bind(t.expires_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Inserts a user unless the email is taken; the new user, or `None`.
async fn insert_user(conn: &mut AnyConnection, u: &NewUser) -> Result<Option<User>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "INSERT INTO users (id, email, name, password_hash, role, status, email_verified_at, created_at, updated_at, metadata) \
         VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $7, '{{}}') ON CONFLICT (email) DO NOTHING RETURNING {}",
        USER_COLS.replace("u.", "")
    ))
    .bind(u.id.to_string())
    .bind(&u.email)
    .bind(&u.name)
    .bind(&u.password_hash)
    .bind(u.role.as_str())
    .bind(u.email_verified_at)
    .bind(u.now)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(user_from).transpose()
}

pub(super) const INSERT_EVENT_SQL: &str =
    "INSERT INTO events (id, user_id, email, kind, at, ip, user_agent, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Appends an audit event inside the caller's connection or transaction.
async fn insert_event(conn: &mut AnyConnection, e: &Event) -> Result<(), sqlx::Error> {
    bind_event(sqlx::query(INSERT_EVENT_SQL), e).execute(&mut *conn).await?;
    Ok(())
}

/// Binds an event's row (a new id first) as the next eight parameters.
fn bind_event<'q>(q: AnyQuery<'q>, e: &'q Event) -> AnyQuery<'q> {
    q.bind(Uuid::now_v7().to_string())
        .bind(e.user_id.map(|u| u.to_string()))
        .bind(&e.email)
        .bind(&e.kind)
        .bind(e.at)
        .bind(&e.ip)
        .bind(&e.user_agent)
        .bind(e.detail.to_string())
}

/// Ends session `$3` if it is user `$4`'s and live, at `$1` for reason `$2`.
pub(super) const END_OWN_SESSION_SQL: &str =
    "UPDATE sessions SET ended_at = $1, end_reason = $2 WHERE id = $3 AND user_id = $4 AND ended_at IS NULL";

/// PostgreSQL: [`END_OWN_SESSION_SQL`] and, if it ended the session, the event `$5`…`$12`
/// (see [`bind_event`]); a row when it ended it.
static PG_END_RECORDED_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH ended AS ({END_OWN_SESSION_SQL} RETURNING id) \
         INSERT INTO events (id, user_id, email, kind, at, ip, user_agent, detail) \
         SELECT $5, $6, $7, $8, $9, $10, $11, $12 FROM ended RETURNING id"
    )
});

fn bind_end_own<'q>(q: AnyQuery<'q>, user_id: Uuid, sid: Uuid, reason: &'q str, now: UnixTime) -> AnyQuery<'q> {
    q.bind(now).bind(reason).bind(sid.to_string()).bind(user_id.to_string())
}

async fn insert_mail_job(
    conn: &mut AnyConnection,
    kind: MailKind,
    email: &str,
    now: UnixTime,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO mail_jobs (id, kind, email, created_at, run_at) VALUES ($1, $2, $3, $4, $4)")
        .bind(Uuid::now_v7().to_string())
        .bind(kind.as_str())
        .bind(email)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Marks the user verified (keeping the first verification time) and returns them.
async fn mark_verified(tx: &mut Tx, user_id: Uuid, now: UnixTime) -> Result<Option<User>, sqlx::Error> {
    sqlx::query(
        "UPDATE users SET email_verified_at = COALESCE(email_verified_at, $1), \
         updated_at = CASE WHEN email_verified_at IS NULL THEN $1 ELSE updated_at END WHERE id = $2",
    )
    .bind(now)
    .bind(user_id.to_string())
    .execute(&mut **tx)
    .await?;
    supersede(tx, user_id, &[TokenKind::VerifyLink, TokenKind::VerifyCode], now).await?;
    user_in(tx, user_id).await
}

impl SqlStore {
    /// Connects, configures each connection and runs the backend's migrations.
    pub async fn connect(url: &str, options: &StoreOptions) -> anyhow::Result<Self> {
        let StoreOptions { max_connections, acquire_timeout_secs, session_cache_entries } = *options;
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            "postgres"
        } else if url.starts_with("sqlite:") {
            "sqlite"
        } else {
            anyhow::bail!("GATEHOUSE_DATABASE_URL must start with sqlite:// or postgres://");
        };
        // SQLite needs a file: its hot paths open connections of their own to it (and an
        // identity service in memory would lose every account when it stops).
        let file = match backend {
            "sqlite" => Some(sqlite_path(url)?),
            _ => None,
        };
        if let Some(parent) = file.as_ref().and_then(|p| p.parent()) {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
            }
        }
        // A SQLite URL without a mode creates its file, as the default one does: a new
        // deployment names a file that does not exist yet.
        let url = match backend {
            "sqlite" => sqlite_creating(url),
            _ => url.to_owned(),
        };
        // No statement text in logs: slow statements would otherwise be logged with SQL.
        let opts = AnyConnectOptions::from_str(&url)
            .map_err(|_| anyhow::anyhow!("GATEHOUSE_DATABASE_URL is not a valid database URL"))?
            .log_statements(log::LevelFilter::Off)
            .log_slow_statements(log::LevelFilter::Off, Duration::from_secs(1));
        let pool_options = |max: u32| {
            AnyPoolOptions::new()
                .max_connections(max)
                .min_connections(u32::from(backend == "sqlite"))
                // A connection is tested before use only after lying idle (a restarted
                // server), not on every use: under load that test was a round trip
                // per statement. (A SQLite connection is a file: nothing to test.)
                .test_before_acquire(false)
                .before_acquire(move |conn, meta| {
                    Box::pin(async move {
                        if backend != "sqlite" && meta.idle_for > IDLE_BEFORE_PING {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                })
                .acquire_timeout(Duration::from_secs(acquire_timeout_secs.into()))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if backend == "sqlite" {
                            // WAL for concurrent readers; FULL so that an acknowledged
                            // write survives even a power cut, not only a killed process.
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                            )
                            .await?;
                        } else {
                            conn.execute(PG_SETUP).await?;
                        }
                        Ok(())
                    })
                })
        };
        let cannot_open = |e: sqlx::Error| anyhow::anyhow!("cannot open the {backend} database: {e}");
        let pool = pool_options(max_connections).connect_with(opts.clone()).await.map_err(cannot_open)?;
        let (writer, pg_hot) = if backend == "sqlite" {
            (pool_options(1).connect_with(opts).await.map_err(cannot_open)?, None)
        } else {
            let (size, wait) = (max_connections.div_ceil(4).max(2), Duration::from_secs(acquire_timeout_secs.into()));
            let hot = PgHot {
                fast: Direct::new(opts.clone(), size, PG_FAST_SETUP, wait),
                reads: Direct::new(opts.clone(), size, PG_SETUP, wait),
                logins: Direct::new(opts.clone(), size, PG_SETUP, wait),
                rotations: Direct::new(opts, ROTATION_BATCHES_AT_ONCE, PG_SETUP, wait),
                email_turns: OnePerKey::default(),
                user_turns: OnePerKey::default(),
            };
            (pool.clone(), Some(Arc::new(hot)))
        };
        let migrator = if backend == "sqlite" {
            sqlx::migrate!("migrations/sqlite")
        } else {
            sqlx::migrate!("migrations/postgres")
        };
        // sqlx has no migration lock for SQLite: an instance that lost the race to a
        // simultaneous start finds the migration applied when it tries again.
        if migrator.run(&writer).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            migrator.run(&writer).await.map_err(|e| anyhow::anyhow!("migrating the {backend} database failed: {e}"))?;
        }
        let sqlite_reads = file.clone().map(super::sqlite_reads::SqliteReads::new);
        let cannot_open_for =
            |what: &str, e: sqlx::Error| anyhow::anyhow!("cannot open the sqlite database for {what}: {e}");
        let sqlite_counters = file
            .as_deref()
            .map(super::sqlite_counters::SqliteCounters::open)
            .transpose()
            .map_err(|e| cannot_open_for("counters", e))?;
        let sqlite_logins = file
            .as_deref()
            .map(super::sqlite_logins::SqliteLogins::open)
            .transpose()
            .map_err(|e| cannot_open_for("logins", e))?;
        let grouped = Arc::new(AtomicU64::new(0));
        let rotator = file
            .as_deref()
            .map(|path| SqliteRotator::open(path, grouped.clone()))
            .transpose()
            .map_err(|e| cannot_open_for("rotations", e))?;
        let turn = if backend == "sqlite" {
            Turn::sqlite(Duration::from_secs(acquire_timeout_secs.into()))
        } else {
            Turn::default()
        };
        let rotations = spawn_rotation_batcher(writer.clone(), pg_hot.clone(), turn.clone(), rotator, grouped.clone());
        // On PostgreSQL always: without a capacity it remembers nothing, but its writes
        // still wait for the other instances' acknowledgements.
        let cache = (backend == "postgres").then(|| SessionCache::new(session_cache_entries as usize));
        // Held from here on, so that it stops even if this function is cancelled.
        let listener = cache.as_ref().map(|c| AbortOnDrop(tokio::spawn(c.clone().listen(url.to_owned()))));
        if let Some(cache) = &cache {
            // Start with the memory in use when the database allows; without it the
            // instance works the same, only reading every session from the database.
            if !cache.wait_listening(Duration::from_secs(2)).await {
                tracing::warn!("not listening for session changes yet: reading every session from the database");
            }
        }
        Ok(Self {
            pool,
            writer,
            turn,
            pg_hot,
            rotations,
            grouped,
            sqlite_counters,
            sqlite_logins,
            sqlite_reads,
            cache,
            _listener: listener,
            backend,
        })
    }

    /// After committing a write that ends a session or changes a user: returns when no
    /// instance can answer a Bearer check from a memory older than the write (see
    /// `session_cache`).
    async fn settle(&self) {
        if let Some(cache) = &self.cache {
            cache.settle(&self.pool).await;
        }
    }

    async fn begin(&self) -> Result<Tx, sqlx::Error> {
        let turn = self.turn.take().await?;
        Ok(Tx { tx: Some(self.writer.begin().await?), turn, writer: self.writer.clone() })
    }

    /// The write connection, in the writer's turn.
    async fn write(&self) -> Result<WriteConn, sqlx::Error> {
        let turn = self.turn.take().await?;
        Ok(WriteConn { conn: self.writer.acquire().await?, _turn: turn })
    }

    /// A counter's statement (`$1` the key, then integers) and its first row's integers:
    /// on SQLite through `sqlite_counters` in the writer's turn, on PostgreSQL on the
    /// counters' connections.
    async fn count(&self, sql: &str, key: &str, ints: &[i64]) -> Result<Option<Vec<i64>>, sqlx::Error> {
        if let Some(counters) = &self.sqlite_counters {
            let _turn = self.turn.take().await?;
            let mut params = vec![rusqlite::types::Value::Text(key.to_owned())];
            params.extend(ints.iter().map(|&i| rusqlite::types::Value::Integer(i)));
            return counters.first_row(sql, params);
        }
        let mut query = sqlx::query(sql).bind(key);
        for &i in ints {
            query = query.bind(i);
        }
        let hot = self.pg_hot.as_ref().ok_or(sqlx::Error::PoolClosed)?;
        let row = hot.fast.first_row(query).await?;
        row.map(|r| (0..r.columns().len()).map(|i| r.try_get::<i64, _>(i)).collect()).transpose()
    }

    /// How many refresh rotations a group statement did since the store opened (the
    /// others went one by one): lets tests see that grouping works, not only its fallback.
    pub fn grouped_rotations(&self) -> u64 {
        self.grouped.load(AtomicOrdering::Relaxed)
    }
}

/// A task that stops when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The condition that session `s` is still held at `now` (a parameter): its current
/// refresh token has not expired. A session unused for longer than the refresh token's
/// life cannot be renewed: it is neither listed nor counted against the device limit
/// (migration 0010 says the same for PostgreSQL's login).
pub(super) fn held(now: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.session_id = s.id AND t.rotated_at IS NULL \
         AND t.expires_at > {now})"
    )
}

/// `url` with `mode=rwc` (create the file if missing) unless it names a mode.
fn sqlite_creating(url: &str) -> String {
    match url.split_once('?') {
        Some((_, query)) if query.split('&').any(|kv| kv.starts_with("mode=")) => url.to_owned(),
        Some((_, "")) => format!("{url}mode=rwc"),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    }
}

/// The file of a SQLite URL as sqlx names it (the URL normalised, its path then
/// percent-decoded), so that the store's own rusqlite connections open the very file
/// the pool opens; an error for a database in memory or a URL sqlx cannot read.
fn sqlite_path(url: &str) -> anyhow::Result<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.split('&').any(|kv| kv == "mode=memory") {
        anyhow::bail!("GATEHOUSE_DATABASE_URL: SQLite needs a file (sqlite://path/to/gatehouse.db), not memory");
    }
    let unreadable = |e: &dyn std::fmt::Display| anyhow::anyhow!("GATEHOUSE_DATABASE_URL: {e}");
    let parsed = url::Url::parse(url).map_err(|e| unreadable(&e))?;
    let options =
        <sqlx::sqlite::SqliteConnectOptions as ConnectOptions>::from_url(&parsed).map_err(|e| unreadable(&e))?;
    Ok(options.get_filename().to_path_buf())
}

#[async_trait]
impl Store for SqlStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        self.backend
    }

    fn memory_reads(&self) -> Option<MemoryReads> {
        self.cache.as_ref().and_then(|c| c.reads())
    }

    async fn close(&self) {
        if let Some(cache) = &self.cache {
            cache.retire(&self.pool).await;
        }
    }

    async fn create_user(&self, u: NewUser) -> StoreResult<Option<User>> {
        Ok(insert_user(&mut *self.write().await?, &u).await?)
    }

    async fn register(&self, u: NewUser, ip: Option<String>, user_agent: Option<String>) -> StoreResult<Option<User>> {
        let mut tx = self.begin().await?;
        let user = insert_user(&mut tx, &u).await?;
        let kind = if user.is_some() { MailKind::Verification } else { MailKind::AlreadyRegistered };
        insert_mail_job(&mut tx, kind, &u.email, u.now).await?;
        sqlx::query(
            "INSERT INTO events (id, user_id, email, kind, at, ip, user_agent, detail) \
             SELECT $1, u.id, u.email, CASE WHEN u.id = $3 THEN 'registered' ELSE 'registration_attempt' END, $4, $5, $6, '{}' \
             FROM users u WHERE u.email = $2",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(&u.email)
        .bind(u.id.to_string())
        .bind(u.now)
        .bind(ip)
        .bind(user_agent)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(user)
    }

    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>> {
        let row = sqlx::query(&format!("SELECT {USER_COLS} FROM users u WHERE u.id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(user_from).transpose()?)
    }

    async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
        if let Some(reads) = &self.sqlite_reads {
            return Ok(reads.user_by_email(&USER_BY_EMAIL, email)?);
        }
        let row = sqlx::query(&USER_BY_EMAIL).bind(email).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(user_from).transpose()?)
    }

    async fn list_users(&self, f: &UserFilter) -> StoreResult<Vec<User>> {
        let pattern = f.email.as_ref().map(|e| {
            let escaped = e.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            format!("%{escaped}%")
        });
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLS} FROM users u WHERE ($1 = '' OR u.email LIKE $1 ESCAPE '\\') \
             AND ($2 = '' OR u.status = $2) AND u.id > $3 ORDER BY u.id LIMIT $4"
        ))
        .bind(pattern.unwrap_or_default())
        .bind(f.status.map(|s| s.as_str()).unwrap_or(""))
        .bind(f.after.map(|a| a.to_string()).unwrap_or_default())
        .bind(i64::from(f.limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(user_from).collect::<Result<_, _>>()?)
    }

    async fn patch_user(&self, id: Uuid, p: &UserPatch, now: UnixTime) -> StoreResult<Patched> {
        let mut tx = self.begin().await?;
        // What can make an admin one who cannot act as one: the role, the state, and
        // the verification (an unverified account cannot log in).
        let admins_may_change = p.role.is_some() || p.status.is_some() || p.email_verified == Some(false);
        if admins_may_change && self.backend == "postgres" {
            // One such change at a time, so that two admins demoting each other at
            // once cannot each count the other as the one left (READ COMMITTED: the
            // count below, after the lock, sees every earlier change committed).
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(ADMIN_CHANGES_LOCK).execute(&mut *tx).await?;
        }
        let was_admin: Option<i64> = if admins_may_change {
            // A write, not a read: on SQLite a transaction that reads first fails at its
            // first write while another process (a `gatehouse` command) writes.
            sqlx::query_scalar(&format!(
                "UPDATE users SET updated_at = updated_at WHERE id = $1 \
                 RETURNING CASE WHEN {ACTING_ADMIN} THEN 1 ELSE 0 END"
            ))
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
        } else {
            None
        };
        let (name_set, name) = match &p.name {
            Some(n) => (1i64, n.clone()),
            None => (0, None),
        };
        let verified: i64 = match p.email_verified {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        let row = sqlx::query(
            "UPDATE users SET \
               status = COALESCE($2, status), role = COALESCE($3, role), \
               name = CASE WHEN $4 = 1 THEN $5 ELSE name END, \
               metadata = COALESCE($6, metadata), \
               email_verified_at = CASE WHEN $7 = 1 THEN COALESCE(email_verified_at, $8) WHEN $7 = 2 THEN NULL ELSE email_verified_at END, \
               updated_at = $8 \
             WHERE id = $1 RETURNING id",
        )
        .bind(id.to_string())
        .bind(p.status.map(|s| s.as_str()))
        .bind(p.role.map(|r| r.as_str()))
        .bind(name_set)
        .bind(name)
        .bind(p.metadata.as_ref().map(|m| m.to_string()))
        .bind(verified)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_none() {
            return Ok(Patched::NotFound);
        }
        if was_admin.unwrap_or(0) > 0 {
            let left: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM users WHERE {ACTING_ADMIN}"))
                .fetch_one(&mut *tx)
                .await?;
            if left == 0 {
                // This change made the last one something else. Dropping the
                // transaction rolls it back.
                return Ok(Patched::LastAdmin);
            }
        }
        let ended = match p.status {
            Some(s) if s != Status::Active => {
                end_sessions_in(&mut tx, id, None, &format!("account_{}", s.as_str()), now).await?
            }
            _ => Vec::new(),
        };
        let user = user_in(&mut tx, id).await?;
        tx.commit().await?;
        self.settle().await;
        Ok(user.map_or(Patched::NotFound, |u| Patched::Changed(Box::new(u), ended)))
    }

    async fn change_password(
        &self,
        user_id: Uuid,
        hash: &str,
        keep: Option<Uuid>,
        now: UnixTime,
    ) -> StoreResult<Vec<Uuid>> {
        let mut tx = self.begin().await?;
        let row = sqlx::query("UPDATE users SET password_hash = $1, updated_at = $2 WHERE id = $3 RETURNING email")
            .bind(hash)
            .bind(now)
            .bind(user_id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let ended = end_sessions_in(&mut tx, user_id, keep, "password_changed", now).await?;
        supersede(&mut tx, user_id, &[TokenKind::Reset], now).await?;
        if let Some(row) = row {
            let email: String = row.try_get("email")?;
            insert_mail_job(&mut tx, MailKind::PasswordChanged, &email, now).await?;
        }
        tx.commit().await?;
        self.settle().await;
        Ok(ended)
    }

    async fn issue_verification(
        &self,
        user_id: Uuid,
        link: &NewOneTimeToken,
        code: &NewOneTimeToken,
        now: UnixTime,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        // Writing the user row first serialises issues for one user, so the supersede
        // below sees every earlier code (PostgreSQL, READ COMMITTED).
        sqlx::query("UPDATE users SET updated_at = updated_at WHERE id = $1")
            .bind(user_id.to_string())
            .execute(&mut *tx)
            .await?;
        supersede(&mut tx, user_id, &[TokenKind::VerifyLink, TokenKind::VerifyCode], now).await?;
        insert_token(&mut tx, user_id, TokenKind::VerifyLink, link, now).await?;
        insert_token(&mut tx, user_id, TokenKind::VerifyCode, code, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn has_live_verification(&self, user_id: Uuid, now: UnixTime) -> StoreResult<bool> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM one_time_tokens WHERE user_id = $1 AND kind = 'verify_link' \
             AND used_at IS NULL AND expires_at > $2",
        )
        .bind(user_id.to_string())
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    async fn verify_email_by_link(&self, token_hash: &str, now: UnixTime) -> StoreResult<Option<User>> {
        let mut tx = self.begin().await?;
        let Some(user_id) =
            consume_token(&mut tx, "token_hash = $2 AND kind = 'verify_link'", token_hash.to_owned(), now).await?
        else {
            return Ok(None);
        };
        let user = mark_verified(&mut tx, user_id, now).await?;
        tx.commit().await?;
        self.settle().await;
        Ok(user)
    }

    async fn reserve_code_attempt(
        &self,
        email: &str,
        max_attempts: u32,
        now: UnixTime,
    ) -> StoreResult<Option<CodeAttempt>> {
        let row = sqlx::query(
            "UPDATE one_time_tokens SET attempts = attempts + 1 WHERE id = ( \
                SELECT t.id FROM one_time_tokens t JOIN users u ON u.id = t.user_id \
                WHERE u.email = $1 AND t.kind = 'verify_code' AND t.used_at IS NULL \
                  AND t.expires_at > $2 AND t.attempts < $3 \
                  AND (SELECT COALESCE(SUM(b.attempts), 0) FROM one_time_tokens b \
                       WHERE b.user_id = t.user_id AND b.kind = 'verify_code' AND b.created_at > $2 - 86400) < $3 * 2 \
                ORDER BY t.created_at DESC, t.id DESC LIMIT 1) \
             AND attempts < $3 AND used_at IS NULL RETURNING id, token_hash",
        )
        .bind(email)
        .bind(now)
        .bind(i64::from(max_attempts))
        .fetch_optional(&mut *self.write().await?)
        .await?;
        Ok(match row {
            Some(r) => Some(CodeAttempt { token_id: uuid(&r, "id")?, code_hash: r.try_get("token_hash")? }),
            None => None,
        })
    }

    async fn verify_email_by_code(&self, token_id: Uuid, now: UnixTime) -> StoreResult<Option<User>> {
        let mut tx = self.begin().await?;
        let Some(user_id) =
            consume_token(&mut tx, "id = $2 AND kind = 'verify_code'", token_id.to_string(), now).await?
        else {
            return Ok(None);
        };
        let user = mark_verified(&mut tx, user_id, now).await?;
        tx.commit().await?;
        self.settle().await;
        Ok(user)
    }

    async fn issue_reset(&self, user_id: Uuid, t: &NewOneTimeToken, now: UnixTime) -> StoreResult<()> {
        // Earlier links stay valid until used or expired: a flood of forgot-password
        // requests must not kill the link the owner is about to open. Using one
        // (reset_password) retires the others.
        let mut tx = self.begin().await?;
        insert_token(&mut tx, user_id, TokenKind::Reset, t, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn reset_token_live(&self, token_hash: &str, now: UnixTime) -> StoreResult<bool> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM one_time_tokens WHERE token_hash = $1 AND kind = 'reset' \
             AND used_at IS NULL AND expires_at > $2",
        )
        .bind(token_hash)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    async fn reset_password(
        &self,
        token_hash: &str,
        hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<(User, Vec<Uuid>)>> {
        let mut tx = self.begin().await?;
        let Some(user_id) =
            consume_token(&mut tx, "token_hash = $2 AND kind = 'reset'", token_hash.to_owned(), now).await?
        else {
            return Ok(None);
        };
        let row = sqlx::query(
            "UPDATE users SET password_hash = $1, updated_at = $2, email_verified_at = COALESCE(email_verified_at, $2) \
             WHERE id = $3 AND status <> 'deleted' RETURNING email",
        )
        .bind(hash)
        .bind(now)
        .bind(user_id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let email: String = row.try_get("email")?;
        let ended = end_sessions_in(&mut tx, user_id, None, "password_reset", now).await?;
        zero_throttle(&mut tx, &email, now).await?;
        supersede(&mut tx, user_id, &[TokenKind::Reset], now).await?;
        insert_mail_job(&mut tx, MailKind::PasswordChanged, &email, now).await?;
        // Whoever may have had the account kept no way back in through a key.
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(user_id.to_string())
            .execute(&mut *tx)
            .await?;
        let user = user_in(&mut tx, user_id).await?;
        tx.commit().await?;
        self.settle().await;
        Ok(user.map(|u| (u, ended)))
    }

    async fn reserve_login_for(
        &self,
        email: &str,
        policy: &LockoutPolicy,
        now: UnixTime,
    ) -> StoreResult<(Reservation, Option<User>)> {
        // One statement counts the attempt and starts the lock it earns, under the row's
        // lock, unless a lock is active: this is what keeps concurrent guesses exact, on
        // every instance, and costs one round trip.
        let (until, hard) = policy.lock_sql("(login_throttle.failures + 1)", "$2", "login_throttle.locked_until");
        let (first_until, first_hard): (i64, i64) = match policy.lock_after(1) {
            Lock::None => (0, 0),
            Lock::For(s) => (now + i64::from(s), 0),
            Lock::Hard => (0, 1),
        };
        let upsert = format!(
            "INSERT INTO login_throttle (email, failures, locked_until, hard_locked, updated_at, settling_until) \
             VALUES ($1, 1, $3, $4, $2, $2 + {SETTLING_SECONDS}) \
             ON CONFLICT (email) DO UPDATE SET failures = login_throttle.failures + 1, updated_at = $2, \
               locked_until = {until}, hard_locked = {hard}, settling_until = $2 + {SETTLING_SECONDS} \
             WHERE login_throttle.hard_locked = 0 AND login_throttle.locked_until <= $2 \
             RETURNING failures"
        );
        let counted = if let Some(hot) = &self.pg_hot {
            // The account is read in the same round trip (in the statement's snapshot,
            // see the trait's doc).
            let sql =
                format!("WITH r AS ({upsert}) SELECT r.failures, {USER_COLS} FROM r LEFT JOIN users u ON u.email = $1");
            let query = sqlx::query(&sql).bind(email).bind(now).bind(first_until).bind(first_hard);
            let _turn = hot.email_turns.take(email).await;
            match hot.fast.first_row(query).await? {
                Some(row) => {
                    let user =
                        row.try_get::<Option<String>, _>("id")?.is_some().then(|| user_from(&row)).transpose()?;
                    Some((row.try_get::<i64, _>("failures")?, user))
                }
                None => None,
            }
        } else {
            // SQLite: the count on the counters' connection, the account on this
            // thread's reader, neither a hand-off to another thread.
            match self.count(&upsert, email, &[now, first_until, first_hard]).await? {
                Some(row) => {
                    Some((row.first().copied().ok_or(sqlx::Error::RowNotFound)?, self.user_by_email(email).await?))
                }
                None => None,
            }
        };
        if let Some((failures, user)) = counted {
            return Ok((Reservation::Allowed { failures: u32::try_from(failures).unwrap_or(u32::MAX) }, user));
        }
        // Locked. If the lock ended meanwhile (or the row was purged), the answer is the
        // shortest wait.
        let (lock, settling) = self.login_lock_state(email, policy, now).await?;
        Ok((Reservation::Locked { retry_after: lock.unwrap_or(1), settling }, None))
    }

    async fn login_lock_state(
        &self,
        email: &str,
        policy: &LockoutPolicy,
        now: UnixTime,
    ) -> StoreResult<(Option<u32>, bool)> {
        let query =
            sqlx::query("SELECT locked_until, hard_locked, settling_until FROM login_throttle WHERE email = $1")
                .bind(email);
        // On PostgreSQL on connections of its own: this is what a locked email's every
        // login reads, and a refused one's once a second (see `refused_locks`); the
        // pool's ping when it takes a connection back would double its round trips.
        let row = match &self.pg_hot {
            Some(hot) => hot.reads.first_row(query).await?,
            None => query.fetch_optional(&self.pool).await?,
        };
        let Some(row) = row else { return Ok((None, false)) };
        let (until, hard): (i64, i64) = (row.try_get("locked_until")?, row.try_get("hard_locked")?);
        let lock = if hard != 0 {
            Some(policy.hard_retry_after())
        } else if until > now {
            Some(u32::try_from(until - now).unwrap_or(u32::MAX))
        } else {
            None
        };
        Ok((lock, lock.is_some() && row.try_get::<i64, _>("settling_until")? > now))
    }

    async fn settle_login_lock(&self, email: &str, failures: u32) -> StoreResult<()> {
        // On the counters' connections, as the reservation that started the lock.
        let sql = "UPDATE login_throttle SET settling_until = 0 WHERE email = $1 AND failures = $2";
        self.count(sql, email, &[i64::from(failures)]).await?;
        Ok(())
    }

    async fn clear_login_failures(&self, email: &str, now: UnixTime) -> StoreResult<()> {
        sqlx::query(ZERO_THROTTLE_SQL).bind(email).bind(now).execute(&mut *self.write().await?).await?;
        Ok(())
    }

    async fn unlock_login(&self, email: &str, now: UnixTime) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        zero_throttle(&mut tx, email, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn hit_rate_limit(&self, key: &str, limit: RateLimit, now: UnixTime) -> StoreResult<Option<u32>> {
        let per = i64::from(limit.per_seconds);
        let window = now - now.rem_euclid(per);
        let row = self
            .count(
                "INSERT INTO rate_limits (key, window_start, hits) VALUES ($1, $2, 1) \
                 ON CONFLICT (key) DO UPDATE SET \
                   hits = CASE WHEN excluded.window_start > rate_limits.window_start THEN 1 ELSE rate_limits.hits + 1 END, \
                   window_start = CASE WHEN excluded.window_start > rate_limits.window_start \
                                  THEN excluded.window_start ELSE rate_limits.window_start END \
                 RETURNING hits, window_start",
                key,
                &[window],
            )
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        // An instance whose clock lags counts into the newer window, never resets it.
        let [hits, window] = row[..] else { return Err(sqlx::Error::RowNotFound.into()) };
        Ok((hits > i64::from(limit.requests)).then(|| u32::try_from((window + per - now).clamp(1, per)).unwrap_or(1)))
    }

    async fn open_session(&self, s: &NewSession, device_limit: u32) -> StoreResult<Option<(User, Vec<Uuid>)>> {
        if let Some(hot) = &self.pg_hot {
            let opened = {
                let _turn = hot.user_turns.take(&s.user_id.to_string()).await;
                pg_open_session(&hot.logins, s, device_limit).await?
            };
            // Sessions ended by the device limit: as any other end. Otherwise only the
            // user's last login changed: every instance, this one too, updates the user
            // it remembers when the notification arrives (0008); forgetting the user
            // here made every Bearer check of a user who logs in often read PostgreSQL.
            if opened.as_ref().is_some_and(|(_, evicted)| !evicted.is_empty()) {
                self.settle().await;
            }
            return Ok(opened);
        }
        let logins = self.sqlite_logins.as_ref().ok_or(sqlx::Error::PoolClosed)?;
        let _turn = self.turn.take().await?;
        Ok(logins.open_session(s, device_limit)?)
    }

    async fn rotate_refresh(&self, r: &Rotate) -> StoreResult<Rotation> {
        let (reply, rx) = oneshot::channel();
        self.rotations.send((r.clone(), reply)).await.map_err(|_| sqlx::Error::PoolClosed)?;
        let rotation = rx.await.map_err(|_| sqlx::Error::PoolClosed)??;
        if matches!(rotation, Rotation::Reused { .. }) {
            // The reuse ended the session.
            self.settle().await;
        }
        Ok(rotation)
    }

    async fn session_with_user(&self, sid: Uuid) -> StoreResult<Option<(Session, User)>> {
        let sql = format!(
            "SELECT {SESSION_COLS}, {USER_COLS} FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1"
        );
        if let Some(reads) = &self.sqlite_reads {
            return Ok(reads.session_with_user(&sql, sid)?);
        }
        let cache = self.cache.as_deref();
        if let Some(cache) = cache {
            if let Some(hit) = cache.get(sid) {
                return Ok(Some(hit));
            }
        }
        let epoch = cache.and_then(SessionCache::epoch);
        let row = sqlx::query(&sql).bind(sid.to_string()).fetch_optional(&self.pool).await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (session, user) = (session_from(&row)?, user_from(&row)?);
        if let (Some(cache), Some(epoch)) = (cache, epoch) {
            cache.put(epoch, session.clone(), user.clone());
        }
        Ok(Some((session, user)))
    }

    async fn list_sessions(&self, user_id: Uuid, now: UnixTime) -> StoreResult<Vec<Session>> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM sessions s WHERE s.user_id = $1 AND s.ended_at IS NULL AND s.expires_at > $2 \
             AND {held} ORDER BY s.created_at DESC, s.id DESC",
            held = held("$2")
        ))
        .bind(user_id.to_string())
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(session_from).collect::<Result<_, _>>()?)
    }

    async fn end_session(&self, user_id: Uuid, sid: Uuid, reason: &str, event: &Event) -> StoreResult<bool> {
        let ended = if let Some(hot) = &self.pg_hot {
            // One statement, one commit, on the logins' connections (no pool pings).
            let query =
                bind_event(bind_end_own(sqlx::query(&PG_END_RECORDED_SQL), user_id, sid, reason, event.at), event);
            hot.logins.first_row(query).await?.is_some()
        } else {
            // SQLite: one transaction in the writer's turn, on the logins' connection (a
            // CTE cannot update there).
            let logins = self.sqlite_logins.as_ref().ok_or(sqlx::Error::PoolClosed)?;
            let _turn = self.turn.take().await?;
            logins.end_recorded(user_id, sid, reason, event)?
        };
        // Even when another request ended it first (or this one's earlier try, whose
        // wait was cut short): the answer must not come before every instance knows.
        self.settle().await;
        Ok(ended)
    }

    async fn end_sessions(
        &self,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: &str,
        now: UnixTime,
    ) -> StoreResult<Vec<Uuid>> {
        let mut tx = self.begin().await?;
        let ended = end_sessions_in(&mut tx, user_id, keep, reason, now).await?;
        tx.commit().await?;
        // Even when nothing was left to end (see `end_session`).
        self.settle().await;
        Ok(ended)
    }

    async fn create_api_key(&self, k: &ApiKey, key_hash: &str, max_keys: u32) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        // The user row first: concurrent creations for one user count one after another.
        sqlx::query("UPDATE users SET updated_at = updated_at WHERE id = $1")
            .bind(k.user_id.to_string())
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL")
            .bind(k.user_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        if row.try_get::<i64, _>("n")? >= i64::from(max_keys) {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(k.id.to_string())
        .bind(k.user_id.to_string())
        .bind(&k.name)
        .bind(&k.prefix)
        .bind(key_hash)
        .bind(k.created_at)
        .bind(k.expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn list_api_keys(&self, user_id: Uuid) -> StoreResult<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLS} FROM api_keys k WHERE k.user_id = $1 AND k.revoked_at IS NULL ORDER BY k.created_at, k.id"
        ))
        .bind(user_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(key_from).collect::<Result<_, _>>()?)
    }

    async fn revoke_api_key(&self, user_id: Uuid, id: Uuid, now: UnixTime) -> StoreResult<bool> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL")
                .bind(now)
                .bind(id.to_string())
                .bind(user_id.to_string())
                .execute(&mut *self.write().await?)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn touch_session(&self, sid: Uuid, now: UnixTime) -> StoreResult<()> {
        Ok(touch_session_in(&mut *self.write().await?, sid, now).await?)
    }

    async fn api_key_user(&self, key_hash: &str, now: UnixTime) -> StoreResult<Option<(ApiKey, User)>> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLS}, {USER_COLS} FROM api_keys k JOIN users u ON u.id = k.user_id \
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $2)"
        ))
        .bind(key_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let (key, user) = (key_from(&row)?, user_from(&row)?);
        if key.last_used_at.is_none_or(|t| use_is_due(t, now)) {
            sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                .bind(now)
                .bind(key.id.to_string())
                .execute(&mut *self.write().await?)
                .await?;
        }
        Ok(Some((key, user)))
    }

    async fn enqueue_mail(&self, kind: MailKind, email: &str, now: UnixTime) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO mail_jobs (id, kind, email, created_at, run_at) SELECT $1, $2, $3, $4, $4 \
             WHERE NOT EXISTS (SELECT 1 FROM mail_jobs WHERE kind = $2 AND email = $3 AND attempts = 0)",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(kind.as_str())
        .bind(email)
        .bind(now)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(())
    }

    async fn claim_mail_job(&self, now: UnixTime, lease: i64) -> StoreResult<Option<MailJob>> {
        // PostgreSQL: concurrent workers skip each other's rows instead of queueing on
        // the same one (SQLite has one writer anyway).
        let skip_locked = if self.backend == "postgres" { "FOR UPDATE SKIP LOCKED" } else { "" };
        // Only kinds this version knows: a newer version's mail waits for that version.
        let known = MailKind::ALL.iter().map(|k| format!("'{}'", k.as_str())).collect::<Vec<_>>().join(", ");
        let row = sqlx::query(&format!(
            "UPDATE mail_jobs SET claimed_until = $2, attempts = attempts + 1 WHERE id = ( \
                SELECT id FROM mail_jobs WHERE run_at <= $1 AND (claimed_until IS NULL OR claimed_until < $1) \
                  AND kind IN ({known}) \
                ORDER BY run_at, id LIMIT 1 {skip_locked}) \
             AND (claimed_until IS NULL OR claimed_until < $1) RETURNING id, kind, email, attempts"
        ))
        .bind(now)
        .bind(now + lease)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let kind: String = row.try_get("kind")?;
        let kind = MailKind::parse(&kind).ok_or_else(|| sqlx::Error::Decode("unknown mail kind".into()))?;
        Ok(Some(MailJob {
            id: uuid(&row, "id")?,
            kind,
            email: row.try_get("email")?,
            attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
            lease: now + lease,
        }))
    }

    async fn finish_mail_job(&self, id: Uuid, lease: UnixTime) -> StoreResult<()> {
        sqlx::query("DELETE FROM mail_jobs WHERE id = $1 AND claimed_until = $2")
            .bind(id.to_string())
            .bind(lease)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    async fn retry_mail_job(&self, id: Uuid, lease: UnixTime, run_at: UnixTime) -> StoreResult<()> {
        sqlx::query("UPDATE mail_jobs SET run_at = $3, claimed_until = NULL WHERE id = $1 AND claimed_until = $2")
            .bind(id.to_string())
            .bind(lease)
            .bind(run_at)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    async fn record_event(&self, e: &Event) -> StoreResult<()> {
        Ok(insert_event(&mut *self.write().await?, e).await?)
    }

    async fn events_page(&self, user_id: Uuid, limit: u32, before: Option<Uuid>) -> StoreResult<Vec<(Uuid, Event)>> {
        let rows = sqlx::query(
            "SELECT id, user_id, email, kind, at, ip, user_agent, detail FROM events \
             WHERE user_id = $1 AND ($3 = '' OR id < $3) ORDER BY id DESC LIMIT $2",
        )
        .bind(user_id.to_string())
        .bind(i64::from(limit))
        .bind(before.map(|id| id.to_string()).unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let uid: Option<String> = r.try_get("user_id")?;
                let id: String = r.try_get("id")?;
                let id = Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                Ok((
                    id,
                    Event {
                        user_id: uid.and_then(|u| Uuid::parse_str(&u).ok()),
                        email: r.try_get("email")?,
                        kind: r.try_get("kind")?,
                        at: r.try_get("at")?,
                        ip: r.try_get("ip")?,
                        user_agent: r.try_get("user_agent")?,
                        detail: json(r.try_get("detail")?).unwrap_or_else(|| serde_json::json!({})),
                    },
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError)
    }

    async fn signing_keys(&self, candidate: &SigningKey) -> StoreResult<(SigningKey, Vec<SigningKey>)> {
        // Racing instances all try to insert; the unique active slot lets one win.
        sqlx::query(
            "INSERT INTO signing_keys (kid, alg, private_key, public_key, created_at, active_slot) \
             VALUES ($1, 'EdDSA', $2, $3, $4, 1) ON CONFLICT DO NOTHING",
        )
        .bind(&candidate.kid)
        .bind(STANDARD.encode(&candidate.private_pkcs8))
        .bind(STANDARD.encode(&candidate.public))
        .bind(candidate.created_at)
        .execute(&mut *self.write().await?)
        .await?;
        let rows = sqlx::query(
            "SELECT kid, private_key, public_key, created_at, active_slot FROM signing_keys ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut active = None;
        let mut all = Vec::new();
        for r in &rows {
            let decode = |col: &str| -> Result<Vec<u8>, sqlx::Error> {
                let s: String = r.try_get(col)?;
                STANDARD.decode(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
            };
            let key = SigningKey {
                kid: r.try_get("kid")?,
                private_pkcs8: decode("private_key")?,
                public: decode("public_key")?,
                created_at: r.try_get("created_at")?,
            };
            if r.try_get::<Option<i64>, _>("active_slot")? == Some(1) {
                active = Some(key.clone());
            }
            all.push(key);
        }
        let active = active.ok_or(sqlx::Error::RowNotFound)?;
        Ok((active, all))
    }

    async fn purge_expired(&self, now: UnixTime) -> StoreResult<u64> {
        let mut n = 0;
        for (sql, arg) in [
            ("DELETE FROM one_time_tokens WHERE expires_at < $1", now - 86_400),
            ("DELETE FROM rate_limits WHERE window_start < $1", now - 86_400),
            ("DELETE FROM refresh_tokens WHERE expires_at < $1", now),
            // Failure counts of emails nobody tried for 30 days, unless hard-locked.
            (
                "DELETE FROM login_throttle WHERE hard_locked = 0 AND locked_until < $1 AND updated_at < $1",
                now - 30 * 86_400,
            ),
        ] {
            n += sqlx::query(sql).bind(arg).execute(&mut *self.write().await?).await?.rows_affected();
        }
        Ok(n)
    }
}

/// One rotation inside the caller's transaction. `Invalid` means nothing may be kept:
/// the caller rolls back; every other outcome is committed.
async fn rotate_in(conn: &mut AnyConnection, r: &Rotate) -> Result<Rotation, sqlx::Error> {
    let rotated = sqlx::query(
        "UPDATE refresh_tokens SET rotated_at = $2, successor_sealed = $3 \
         WHERE token_hash = $1 AND rotated_at IS NULL AND expires_at > $2 RETURNING session_id",
    )
    .bind(&r.old_hash)
    .bind(r.now)
    .bind(&r.sealed)
    .fetch_optional(&mut *conn)
    .await?;
    let (sid, rotated_at, sealed) = match rotated {
        Some(row) => (uuid(&row, "session_id")?, None, None),
        None => {
            let row = sqlx::query(
                // A rotated token past its own expiry is simply invalid, as after a purge.
                "SELECT session_id, rotated_at, successor_sealed FROM refresh_tokens \
                 WHERE token_hash = $1 AND expires_at > $2",
            )
            .bind(&r.old_hash)
            .bind(r.now)
            .fetch_optional(&mut *conn)
            .await?;
            let Some(row) = row else {
                return Ok(Rotation::Invalid);
            };
            let rotated_at: Option<i64> = row.try_get("rotated_at")?;
            let Some(rotated_at) = rotated_at else {
                return Ok(Rotation::Invalid);
            };
            let sealed: Option<String> = row.try_get("successor_sealed")?;
            (uuid(&row, "session_id")?, Some(rotated_at), sealed)
        }
    };
    let row = sqlx::query(&format!(
        "SELECT {SESSION_COLS}, {USER_COLS} FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1"
    ))
    .bind(sid.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(Rotation::Invalid);
    };
    let (session, user) = (session_from(&row)?, user_from(&row)?);
    let live = session.is_live(r.now) && user.status == Status::Active;
    let refresh_expires_at = (r.now + r.ttl).min(session.expires_at);
    let out = match (rotated_at, sealed) {
        (None, _) if live => {
            sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&r.new_hash)
            .bind(sid.to_string())
            .bind(r.now)
            .bind(refresh_expires_at)
            .execute(&mut *conn)
            .await?;
            let (out, touch) = rotated_answer(session, user, r.now, refresh_expires_at);
            if touch {
                touch_session_in(conn, sid, r.now).await?;
            }
            out
        }
        (None, _) => Rotation::Invalid,
        // This very rotation already done (a group statement that committed and then
        // failed to answer, say): its own answer, never reuse.
        (Some(_), Some(sealed)) if live && sealed == r.sealed => {
            let refresh_expires_at = successor_expiry(conn, sid, refresh_expires_at).await?;
            Rotation::Rotated { session, user, refresh_expires_at }
        }
        (Some(at), Some(sealed)) if live && r.grace > 0 && r.now - at <= r.grace => {
            let refresh_expires_at = successor_expiry(conn, sid, refresh_expires_at).await?;
            Rotation::Grace { sealed, session, user, refresh_expires_at }
        }
        (Some(_), _) if session.ended_at.is_none() => {
            end_sessions_by_id(conn, sid, "refresh_token_reused", r.now).await?;
            Rotation::Reused { session_id: sid, user_id: session.user_id }
        }
        (Some(_), _) => Rotation::Invalid,
    };
    Ok(out)
}

/// Records a use of live session `sid` at `now`, unless one within the resolution of it
/// (or a later one) is recorded: never backwards, whatever a caller read before.
async fn touch_session_in(conn: &mut AnyConnection, sid: Uuid, now: UnixTime) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE sessions SET last_used_at = $1 \
         WHERE id = $2 AND ended_at IS NULL AND last_used_at <= $1 - {LAST_USED_RESOLUTION}"
    ))
    .bind(now)
    .bind(sid.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// The answer to an ordinary rotation at `now`, and whether the session's `last_used_at`
/// is to be written: it is kept to the minute (a statement saved on most refreshes).
pub(super) fn rotated_answer(
    session: Session,
    user: User,
    now: UnixTime,
    refresh_expires_at: UnixTime,
) -> (Rotation, bool) {
    let touch = use_is_due(session.last_used_at, now);
    let last_used_at = if touch { now } else { session.last_used_at };
    (Rotation::Rotated { session: Session { last_used_at, ..session }, user, refresh_expires_at }, touch)
}

/// The expiry of the session's current refresh token (`default` if it has none).
async fn successor_expiry(conn: &mut AnyConnection, sid: Uuid, default: UnixTime) -> Result<UnixTime, sqlx::Error> {
    let row = sqlx::query(
        "SELECT expires_at FROM refresh_tokens WHERE session_id = $1 AND rotated_at IS NULL \
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(sid.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some(row) => row.try_get("expires_at")?,
        None => default,
    })
}

pub(super) type RotateJob = (Rotate, oneshot::Sender<Result<Rotation, sqlx::Error>>);

/// One rotation in its own transaction.
async fn rotate_alone(writer: &AnyPool, r: &Rotate) -> Result<Rotation, sqlx::Error> {
    let mut tx = writer.begin().await?;
    let out = rotate_in(&mut tx, r).await?;
    if matches!(out, Rotation::Invalid) {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(out)
}

/// Group commit of refresh rotations: a task takes every rotation waiting at that
/// moment (up to 64) and answers them all after one durable commit; while it runs, the
/// next batch gathers. A rotation is never answered before its commit.
///
/// SQLite has one writer, so one batch at a time. PostgreSQL runs two at once: a batch
/// gathers while the other waits for its commit.
fn spawn_rotation_batcher(
    writer: AnyPool,
    pg_hot: Option<Arc<PgHot>>,
    turn: Turn,
    mut rotator: Option<SqliteRotator>,
    grouped: Arc<AtomicU64>,
) -> mpsc::Sender<RotateJob> {
    let (tx, mut rx) = mpsc::channel::<RotateJob>(1024);
    let slots =
        Arc::new(tokio::sync::Semaphore::new(if pg_hot.is_some() { ROTATION_BATCHES_AT_ONCE as usize } else { 1 }));
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let mut jobs = vec![first];
            while jobs.len() < 64 {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            // A client that went away before its rotation started keeps its token.
            jobs.retain(|(_, reply)| !reply.is_closed());
            if jobs.is_empty() {
                continue;
            }
            if let Some(hot) = &pg_hot {
                let (writer, hot, grouped) = (writer.clone(), hot.clone(), grouped.clone());
                tokio::spawn(async move {
                    run_pg_rotation_batch(&writer, &hot.rotations, jobs, &grouped).await;
                    drop(slot);
                });
            } else {
                // One batch at a time: run it here rather than hand it to another task.
                run_sqlite_rotation_batch(&writer, &turn, rotator.as_mut(), jobs).await;
                drop(slot);
            }
        }
    });
    tx
}

/// PostgreSQL: the batch's ordinary rotations (token current, session live, account
/// active) in one statement, so one round trip and one commit for the lot. The others
/// (grace, reuse, invalid), and all of them if the statement fails otherwise than under
/// load (a deadlock with another instance's batch, say), go through [`rotate_alone`],
/// each in its own transaction, concurrently; the batch's slot is held until they are
/// done. If the statement committed before failing, [`rotate_in`] recognises each job's
/// own rotation. Under load (a pool timeout) every job gets the error, answered 503.
async fn run_pg_rotation_batch(writer: &AnyPool, conns: &Direct, jobs: Vec<RotateJob>, grouped: &AtomicU64) {
    let rotated = match pg_rotate_batch(conns, &jobs).await {
        Ok(rotated) => rotated,
        Err(e) if is_transient_error(&e) => return fail_all(jobs, &e),
        Err(e) => {
            tracing::warn!(error = %e, "rotation batch failed; rotating one by one");
            HashMap::new()
        }
    };
    let mut alone = tokio::task::JoinSet::new();
    for (r, reply) in answer_rotated(jobs, rotated, grouped) {
        let writer = writer.clone();
        alone.spawn(async move {
            let _ = reply.send(rotate_alone(&writer, &r).await);
        });
    }
    while alone.join_next().await.is_some() {}
}

/// Answers the jobs a group rotated (`rotated`, by index in `jobs`), after adding them
/// to `grouped` (so that an answer implies the count); returns the others, in order.
pub(super) fn answer_rotated(
    jobs: Vec<RotateJob>,
    mut rotated: HashMap<usize, Rotation>,
    grouped: &AtomicU64,
) -> Vec<RotateJob> {
    grouped.fetch_add(rotated.len() as u64, AtomicOrdering::Relaxed);
    let mut rest = Vec::new();
    for (i, (r, reply)) in jobs.into_iter().enumerate() {
        match rotated.remove(&i) {
            Some(rotation) => {
                let _ = reply.send(Ok(rotation));
            }
            None => rest.push((r, reply)),
        }
    }
    rest
}

/// The rotations performed, by index in `jobs`. Mirrors the ordinary case of
/// [`rotate_in`]; a token presented twice in one batch is rotated once (PostgreSQL
/// updates a row once per statement), and the other presentation gets the grace answer.
async fn pg_rotate_batch(conns: &Direct, jobs: &[RotateJob]) -> Result<HashMap<usize, Rotation>, sqlx::Error> {
    let input: Vec<serde_json::Value> = jobs
        .iter()
        .enumerate()
        .map(|(i, (r, _))| {
            serde_json::json!({"i": i, "old_hash": r.old_hash, "new_hash": r.new_hash,
                               "sealed": r.sealed, "at": r.now, "ttl": r.ttl})
        })
        .collect();
    let sql = format!(
        // Token, then session, then user, each looked up by its key in a subquery the
        // planner may neither flatten nor reorder (OFFSET 0, LATERAL). The LIMIT tells
        // the planner the batch's size (at most 64, one prepared statement per size):
        // without it, it guesses 100 rows for the JSON and, on a young table whose
        // statistics lag its growth, updates through a sequential scan and a hash join.
        "WITH j AS ( \
           SELECT * FROM json_to_recordset($1::json) \
             AS j(i BIGINT, old_hash TEXT, new_hash TEXT, sealed TEXT, at BIGINT, ttl BIGINT) LIMIT {n}), \
         live AS MATERIALIZED ( \
           SELECT j.i, j.old_hash, j.new_hash, j.sealed, j.at, \
             LEAST(j.at + j.ttl, s.expires_at) AS refresh_expires_at, {SESSION_COLS}, {USER_COLS} \
           FROM j \
           CROSS JOIN LATERAL (SELECT session_id FROM refresh_tokens \
             WHERE token_hash = j.old_hash AND rotated_at IS NULL AND expires_at > j.at OFFSET 0) t \
           CROSS JOIN LATERAL (SELECT * FROM sessions \
             WHERE id = t.session_id AND ended_at IS NULL AND expires_at > j.at OFFSET 0) s \
           CROSS JOIN LATERAL (SELECT * FROM users WHERE id = s.user_id AND status = 'active' OFFSET 0) u), \
         rotated AS ( \
           UPDATE refresh_tokens t SET rotated_at = live.at, successor_sealed = live.sealed \
           FROM live WHERE t.token_hash = live.old_hash AND t.rotated_at IS NULL \
           RETURNING live.*), \
         inserted AS ( \
           INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) \
           SELECT new_hash, s_id, at, refresh_expires_at FROM rotated), \
         touched AS ( \
           UPDATE sessions s SET last_used_at = r.at FROM rotated r \
           WHERE s.id = r.s_id AND r.at - s.last_used_at >= {LAST_USED_RESOLUTION}) \
         SELECT * FROM rotated",
        n = jobs.len()
    );
    let query = sqlx::query(&sql).bind(serde_json::Value::Array(input).to_string());
    let rows = conns.all_rows(query).await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in &rows {
        let i: i64 = row.try_get("i")?;
        let rotation =
            rotated_answer(session_from(row)?, user_from(row)?, row.try_get("at")?, row.try_get("refresh_expires_at")?)
                .0;
        out.insert(usize::try_from(i).unwrap_or(usize::MAX), rotation);
    }
    Ok(out)
}

/// SQLite: the batch's ordinary rotations by the rotator (see `sqlite_rotations`),
/// answered at its commit; then the others (grace, reuse, invalid, a token presented
/// twice) one by one through sqlx. The writer's turn is held throughout, so that no
/// other write interleaves (SQLite has one writer).
async fn run_sqlite_rotation_batch(
    writer: &AnyPool,
    turn: &Turn,
    rotator: Option<&mut SqliteRotator>,
    jobs: Vec<RotateJob>,
) {
    let _turn = match turn.take().await {
        Ok(turn) => turn,
        Err(e) => return fail_all(jobs, &e),
    };
    let rest = match rotator {
        None => jobs,
        Some(rotator) => match rotator.rotate(jobs) {
            Outcome::Rest(rest) => rest,
            // Under load the rest would only wait the same way.
            Outcome::Failed(e, jobs) if is_transient_error(&e) => return fail_all(jobs, &e),
            Outcome::Failed(e, jobs) => {
                tracing::warn!(error = %e, "rotation group failed; rotating one by one");
                jobs
            }
        },
    };
    if rest.is_empty() {
        return;
    }
    match writer.acquire().await {
        Ok(mut conn) => rotate_one_by_one(&mut conn, rest).await,
        Err(e) => fail_all(rest, &e),
    }
}

/// Answers every job with `e`, keeping its kind: under load a pool timeout (answered
/// 503), otherwise a failure of the batch.
fn fail_all(jobs: Vec<RotateJob>, e: &sqlx::Error) {
    for (_, reply) in jobs {
        let failed = if is_transient_error(e) {
            sqlx::Error::PoolTimedOut
        } else {
            sqlx::Error::Protocol(format!("rotation batch failed: {e}"))
        };
        let _ = reply.send(Err(failed));
    }
}

/// One transaction, each job in its own savepoint, in arrival order; one commit
/// answers them all.
async fn rotate_one_by_one(conn: &mut AnyConnection, jobs: Vec<RotateJob>) {
    let mut results: Vec<Result<Rotation, sqlx::Error>> = Vec::with_capacity(jobs.len());
    let committed: Result<(), sqlx::Error> = async {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        for (r, _) in &jobs {
            let mut sp = sqlx::Connection::begin(&mut *tx).await?;
            match rotate_in(&mut sp, r).await {
                Ok(Rotation::Invalid) => {
                    sp.rollback().await?;
                    results.push(Ok(Rotation::Invalid));
                }
                Ok(out) => {
                    sp.commit().await?;
                    results.push(Ok(out));
                }
                Err(e) => {
                    sp.rollback().await?;
                    // Under load (busy, timeouts) the rest would only wait the same way.
                    let transient = is_transient_error(&e);
                    results.push(Err(e));
                    if transient {
                        break;
                    }
                }
            }
        }
        tx.commit().await
    }
    .await;
    match committed {
        // Jobs after a transient failure get a pool timeout, answered 503.
        Ok(()) => {
            let mut results = results.into_iter();
            for (_, reply) in jobs {
                let _ = reply.send(results.next().unwrap_or(Err(sqlx::Error::PoolTimedOut)));
            }
        }
        Err(e) => fail_all(jobs, &e),
    }
}

/// PostgreSQL: a login's writes in one call of `gatehouse_open_session` (migration
/// 0004), the same steps as [`SqlStore::open_session`]'s transaction in one round trip.
async fn pg_open_session(
    conns: &Direct,
    s: &NewSession,
    device_limit: u32,
) -> Result<Option<(User, Vec<Uuid>)>, sqlx::Error> {
    let call = sqlx::query("SELECT * FROM gatehouse_open_session($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)");
    let row = bind_session(call, s)
        .bind(&s.refresh_hash)
        .bind(s.refresh_expires_at)
        .bind(s.geolocation.as_ref().map(|g| g.to_string()))
        .bind(s.verified_hash.clone().unwrap_or_default())
        .bind(i64::from(device_limit))
        .bind(login_detail(s).to_string());
    let Some(row) = conns.first_row(row).await? else { return Ok(None) };
    let evicted: Option<String> = row.try_get("evicted")?;
    let evicted = evicted
        .iter()
        .flat_map(|e| e.split(','))
        .filter(|id| !id.is_empty())
        .map(|id| Uuid::parse_str(id).map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .collect::<Result<_, _>>()?;
    Ok(Some((user_from(&row)?, evicted)))
}

pub(super) fn login_detail(s: &NewSession) -> serde_json::Value {
    serde_json::json!({"session_id": s.id})
}

pub(super) fn eviction_detail(id: Uuid) -> serde_json::Value {
    serde_json::json!({"session_id": id, "reason": "evicted"})
}

/// Binds a new session's row as `$1` to `$6`: id, user, now, expiry, IP, user agent.
fn bind_session<'q>(q: AnyQuery<'q>, s: &'q NewSession) -> AnyQuery<'q> {
    q.bind(s.id.to_string()).bind(s.user_id.to_string()).bind(s.now).bind(s.expires_at).bind(&s.ip).bind(&s.user_agent)
}

pub(super) const ZERO_THROTTLE_SQL: &str =
    "UPDATE login_throttle SET failures = 0, locked_until = 0, hard_locked = 0, updated_at = $2 WHERE email = $1";

/// Clears an email's count and every lock. The row is zeroed, not deleted, so that a
/// concurrent reservation always finds it (PostgreSQL does not lock a row that
/// `ON CONFLICT` merely saw).
async fn zero_throttle(tx: &mut Tx, email: &str, now: UnixTime) -> Result<(), sqlx::Error> {
    sqlx::query(ZERO_THROTTLE_SQL).bind(email).bind(now).execute(&mut **tx).await?;
    Ok(())
}

pub(super) const END_SESSION_SQL: &str =
    "UPDATE sessions SET ended_at = $1, end_reason = $2 WHERE id = $3 AND ended_at IS NULL";

/// Ends the session `sid` unless it has ended already; says whether this ended it.
async fn end_sessions_by_id(
    conn: &mut AnyConnection,
    sid: Uuid,
    reason: &str,
    now: UnixTime,
) -> Result<bool, sqlx::Error> {
    let ended = sqlx::query(END_SESSION_SQL).bind(now).bind(reason).bind(sid.to_string()).execute(&mut *conn).await?;
    Ok(ended.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{sqlite_creating, sqlite_path};
    use crate::store::StoreOptions;

    /// A file name the URL spells percent-encoded, as sqlx reads it: the pool and the
    /// store's own rusqlite connections open one file (before, the rusqlite ones looked
    /// for `my%20gatehouse.db`, and the store did not open).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_percent_encoded_sqlite_file_name_is_one_file_for_every_connection() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/my%20gatehouse.db?mode=rwc", dir.path().display());
        let options = StoreOptions { max_connections: 2, acquire_timeout_secs: 5, session_cache_entries: 0 };
        let store = crate::store::open(&url, &options).await.expect("the store opens");
        store.ping().await.unwrap();
        let mut files: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        files.sort();
        assert_eq!(files[0], "my gatehouse.db", "{files:?}");
        assert!(files.iter().all(|f| f.starts_with("my gatehouse.db")), "{files:?}");
    }

    #[test]
    fn the_sqlite_file_is_named_as_sqlx_names_it_and_memory_is_refused() {
        assert_eq!(sqlite_path("sqlite:///x/my%20g.db?mode=rwc").unwrap(), Path::new("/x/my g.db"));
        assert_eq!(sqlite_path("sqlite://data/g.db").unwrap(), Path::new("data/g.db"));
        assert_eq!(sqlite_path("sqlite:g.db").unwrap(), Path::new("g.db"));
        // The URL is normalised first, as sqlx's Any driver does.
        assert_eq!(sqlite_path("sqlite://data/../g.db").unwrap(), Path::new("data/g.db"));
        for memory in ["sqlite::memory:", "sqlite://", "sqlite://g.db?mode=memory", "sqlite://?mode=memory"] {
            let e = sqlite_path(memory).unwrap_err().to_string();
            assert!(e.contains("needs a file"), "{memory}: {e}");
        }
    }

    #[test]
    fn a_sqlite_url_without_a_mode_creates_its_file_and_a_named_mode_is_kept() {
        assert_eq!(sqlite_creating("sqlite:///x/g.db"), "sqlite:///x/g.db?mode=rwc");
        assert_eq!(sqlite_creating("sqlite:///x/g.db?"), "sqlite:///x/g.db?mode=rwc");
        assert_eq!(sqlite_creating("sqlite://g.db?cache=shared"), "sqlite://g.db?cache=shared&mode=rwc");
        assert_eq!(sqlite_creating("sqlite:///x/g.db?mode=ro"), "sqlite:///x/g.db?mode=ro");
        assert_eq!(sqlite_creating("sqlite:///x/g.db?a=1&mode=rw"), "sqlite:///x/g.db?a=1&mode=rw");
    }
}
