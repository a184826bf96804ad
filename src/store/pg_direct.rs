//! PostgreSQL: connections of the store's own for its hottest statements (a login's
//! reservation and its session, a batch of refresh rotations).
//!
//! sqlx 0.8's pool pings a connection when it hands it out (unless told not to) and
//! again, always, when it takes it back: two round trips around every statement, each a
//! wake-up of a PostgreSQL backend and of this process. A login's two statements were
//! six round trips. Here a connection comes back without a round trip and is pinged
//! before use only if it lay idle for more than [`IDLE_BEFORE_PING`] (a restarted
//! server). What sqlx's release ping is for is kept where it is needed:
//!
//! - A [`Lease`] returns its connection at once only through [`Lease::give_back`],
//!   with the result of a statement read to its end (use `fetch_all`, not
//!   `fetch_optional`, which leaves the statement's tail, possibly an error raised at
//!   commit, for the next user of the connection to read as its own).
//! - A lease dropped before that (a cancelled request) hands its connection, with its
//!   place, to a task that waits for the abandoned statement to end (a ping, at most
//!   [`DRAIN_LIMIT`]) and then returns it; so no more than `size` server processes
//!   ever work for the set.
//! - A connection that failed in a way that may have broken it is closed, as is one
//!   older than [`MAX_LIFETIME`] (after a failover, say).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::any::{AnyConnectOptions, AnyRow};
use sqlx::postgres::{PgDatabaseError, PgSeverity};
use sqlx::AnyConnection;
use sqlx::{ConnectOptions, Connection, Executor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A connection idle for longer than this is pinged before use.
pub const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// How long an abandoned statement may take to end before its connection is closed.
const DRAIN_LIMIT: Duration = Duration::from_secs(15);

/// A connection is closed rather than reused after this long (sqlx's pool default).
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// An open connection: since when it exists, since when it lies idle.
struct Idle {
    conn: AnyConnection,
    opened: Instant,
    since: Instant,
}

type IdleList = Arc<Mutex<Vec<Idle>>>;

/// A statement with its arguments, for the Any driver.
pub type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn locked(idle: &IdleList) -> std::sync::MutexGuard<'_, Vec<Idle>> {
    idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// At most `size` connections, opened when first needed.
pub struct Direct {
    idle: IdleList,
    permits: Arc<Semaphore>,
    opts: AnyConnectOptions,
    /// Run on each new connection (session settings).
    setup: &'static str,
    acquire_timeout: Duration,
}

/// A connection taken from a [`Direct`], with its place in it.
pub struct Lease {
    conn: Option<(AnyConnection, Instant)>,
    idle: IdleList,
    permit: Option<OwnedSemaphorePermit>,
}

impl Direct {
    pub fn new(opts: AnyConnectOptions, size: u32, setup: &'static str, acquire_timeout: Duration) -> Self {
        Self {
            idle: Arc::default(),
            permits: Arc::new(Semaphore::new(usize::try_from(size.max(1)).unwrap_or(1))),
            opts,
            setup,
            acquire_timeout,
        }
    }

    /// A connection, waiting at most the acquire timeout for one to be free and to
    /// open ([`sqlx::Error::PoolTimedOut`], as from sqlx's pool, answered 503).
    async fn acquire(&self) -> Result<Lease, sqlx::Error> {
        let deadline = tokio::time::Instant::now() + self.acquire_timeout;
        let permit = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let lease = |conn, opened| Lease { conn: Some((conn, opened)), idle: self.idle.clone(), permit: Some(permit) };
        loop {
            // The most recently used first: it is the likeliest to be alive and warm.
            let popped = locked(&self.idle).pop();
            let Some(Idle { mut conn, opened, since }) = popped else { break };
            if opened.elapsed() > MAX_LIFETIME {
                continue;
            }
            if since.elapsed() <= IDLE_BEFORE_PING {
                return Ok(lease(conn, opened));
            }
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, conn.ping()).await {
                return Ok(lease(conn, opened));
            }
            // Dead (or too slow to answer): dropped, which closes its socket.
        }
        let conn = tokio::time::timeout_at(deadline, async {
            let mut conn = self.opts.connect().await?;
            conn.execute(self.setup).await?;
            Ok::<_, sqlx::Error>(conn)
        })
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
        Ok(lease(conn, Instant::now()))
    }

    /// Runs `query` on a connection of the set, reading it to its end; its first row.
    pub async fn first_row<'q>(&self, query: AnyQuery<'q>) -> Result<Option<AnyRow>, sqlx::Error> {
        Ok(self.all_rows(query).await?.into_iter().next())
    }

    /// Runs `query` on a connection of the set; its rows.
    pub async fn all_rows<'q>(&self, query: AnyQuery<'q>) -> Result<Vec<AnyRow>, sqlx::Error> {
        let mut lease = self.acquire().await?;
        let rows = query.fetch_all(lease.conn()).await;
        lease.give_back(rows)
    }
}

impl Lease {
    /// The connection, for one or more statements, each read to its end.
    fn conn(&mut self) -> &mut AnyConnection {
        &mut self.conn.as_mut().expect("a lease holds its connection until it ends").0
    }

    /// Ends the lease with the result of its last statement: the connection goes back
    /// for reuse unless that result says it may be broken.
    fn give_back<T>(mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        let conn = self.conn.take();
        if result.as_ref().err().is_none_or(|e| !may_be_broken(e)) {
            if let Some((conn, opened)) = conn {
                locked(&self.idle).push(Idle { conn, opened, since: Instant::now() });
            }
        }
        result
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Given back (or closed): the place is free as the permit drops.
        let Some((mut conn, opened)) = self.conn.take() else { return };
        // Abandoned mid-statement: the server is still running the statement. Its
        // connection keeps its place until the statement is over, then is reused.
        let (idle, permit) = (self.idle.clone(), self.permit.take());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(DRAIN_LIMIT, conn.ping()).await {
                locked(&idle).push(Idle { conn, opened, since: Instant::now() });
            }
            drop(permit);
        });
    }
}

/// Whether a connection may be unusable after this error. An error the server reported
/// about a statement (or a row the application could not decode) leaves the connection
/// in step with the server: sqlx reads up to the server's ReadyForQuery before the next
/// statement. An error that ends the server's process (severity FATAL or PANIC: the
/// server shutting down, a lost connection) does not, nor does a server that has
/// become read-only (25006: a failover left this connection on a standby).
fn may_be_broken(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let fatal = db
                .try_downcast_ref::<PgDatabaseError>()
                .is_some_and(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic));
            let code = db.code().unwrap_or_default();
            fatal || code.starts_with("08") || code.starts_with("57P") || code == "25006"
        }
        sqlx::Error::RowNotFound
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. } => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::tests::coded;

    #[test]
    fn errors_of_the_connection_close_it_errors_of_the_statement_do_not() {
        for code in ["08006", "57P01", "25006"] {
            assert!(may_be_broken(&coded(code)), "{code}");
        }
        for code in ["23505", "57014", "40001", "42601"] {
            assert!(!may_be_broken(&coded(code)), "{code}");
        }
        assert!(may_be_broken(&sqlx::Error::Io(std::io::Error::other("reset"))));
        assert!(may_be_broken(&sqlx::Error::Protocol("unexpected message".into())));
        assert!(may_be_broken(&sqlx::Error::PoolTimedOut));
        assert!(!may_be_broken(&sqlx::Error::RowNotFound));
        assert!(!may_be_broken(&sqlx::Error::ColumnNotFound("id".into())));
    }
}
