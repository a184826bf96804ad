//! PostgreSQL: connections of the store's own for its hottest statements (a login's
//! reservation and its session, a batch of refresh rotations).
//!
//! sqlx 0.8's pool pings a connection when it hands it out (unless told not to) and
//! again, always, when it takes it back: two round trips around every statement, each a
//! wake-up of a PostgreSQL backend and of this process. A login's two statements were
//! six round trips. Here a connection comes back without a round trip and is pinged
//! before use only if it lay idle for more than [`IDLE_BEFORE_PING`] (a restarted
//! server). What sqlx's release ping guards against, a connection left mid-statement by
//! a dropped future or broken by an I/O error, is handled by not reusing it: a
//! [`Lease`] returns its connection only through [`Lease::give_back`] with a result
//! that leaves the connection usable; otherwise the connection is closed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::any::AnyConnectOptions;
use sqlx::AnyConnection;
use sqlx::{ConnectOptions, Connection, Executor};
use tokio::sync::{Semaphore, SemaphorePermit};

/// A connection idle for longer than this is pinged before use.
pub const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// At most `size` connections, opened when first needed.
pub struct Direct {
    idle: Mutex<Vec<(AnyConnection, Instant)>>,
    permits: Semaphore,
    opts: AnyConnectOptions,
    /// Run on each new connection (session settings).
    setup: &'static str,
    acquire_timeout: Duration,
}

/// A connection taken from a [`Direct`]; closed on drop unless given back.
pub struct Lease<'a> {
    conn: Option<AnyConnection>,
    home: &'a Direct,
    _permit: SemaphorePermit<'a>,
}

impl Direct {
    pub fn new(opts: AnyConnectOptions, size: u32, setup: &'static str, acquire_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(usize::try_from(size.max(1)).unwrap_or(1)),
            opts,
            setup,
            acquire_timeout,
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(AnyConnection, Instant)>> {
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A connection, waiting at most the acquire timeout for one to be free and to
    /// open ([`sqlx::Error::PoolTimedOut`], as from sqlx's pool, answered 503).
    pub async fn acquire(&self) -> Result<Lease<'_>, sqlx::Error> {
        let deadline = tokio::time::Instant::now() + self.acquire_timeout;
        let permit = tokio::time::timeout_at(deadline, self.permits.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            // The most recently used first: it is the likeliest to be alive and warm.
            let popped = self.idle().pop();
            let Some((mut conn, since)) = popped else { break };
            if since.elapsed() <= IDLE_BEFORE_PING {
                return Ok(Lease { conn: Some(conn), home: self, _permit: permit });
            }
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, conn.ping()).await {
                return Ok(Lease { conn: Some(conn), home: self, _permit: permit });
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
        Ok(Lease { conn: Some(conn), home: self, _permit: permit })
    }
}

impl Lease<'_> {
    /// The connection, for one or more statements.
    pub fn conn(&mut self) -> &mut AnyConnection {
        self.conn.as_mut().expect("a lease holds its connection until it is given back or dropped")
    }

    /// Ends the lease with the result of its last statement: the connection goes back
    /// for reuse unless that result says it may be broken.
    pub fn give_back<T>(mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if result.as_ref().err().is_none_or(|e| !may_be_broken(e)) {
            if let Some(conn) = self.conn.take() {
                self.home.idle().push((conn, Instant::now()));
            }
        }
        result
    }
}

/// Whether a connection may be unusable after this error. An error the server reported
/// about a statement (or a row the application could not decode) leaves the connection
/// in step with the server: sqlx reads up to the server's ReadyForQuery before the next
/// statement. An error about the connection itself (class 08, or 57P01 to 57P03: the
/// server shutting down) does not.
fn may_be_broken(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            code.starts_with("08") || code.starts_with("57P")
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

    #[test]
    fn errors_of_the_connection_close_it_errors_of_the_statement_do_not() {
        assert!(may_be_broken(&sqlx::Error::Io(std::io::Error::other("reset"))));
        assert!(may_be_broken(&sqlx::Error::Protocol("unexpected message".into())));
        assert!(may_be_broken(&sqlx::Error::PoolTimedOut));
        assert!(!may_be_broken(&sqlx::Error::RowNotFound));
        assert!(!may_be_broken(&sqlx::Error::ColumnNotFound("id".into())));
    }
}
