//! What every test binary shares: the two backends and a fresh database on each.

use std::path::Path;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server URL for tests; panics (fails the test) when it is not set.
pub fn postgres_url() -> String {
    std::env::var("GATEHOUSE_TEST_POSTGRES_URL")
        .expect("GATEHOUSE_TEST_POSTGRES_URL must point at a PostgreSQL database for the postgres tests")
}

/// A fresh database URL: a SQLite file in `dir`, or a new schema on the test server.
pub async fn fresh_database(backend: Backend, dir: &Path) -> String {
    match backend {
        Backend::Sqlite => format!("sqlite://{}?mode=rwc", dir.join("gatehouse.db").display()),
        Backend::Postgres => {
            let base = postgres_url();
            let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
            let pool = sqlx::PgPool::connect(&base).await.expect("connect to the test PostgreSQL");
            sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await.expect("create schema");
            pool.close().await;
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}options=-c%20search_path%3D{schema}")
        }
    }
}

/// Runs an async test body on both backends: `sqlite` always, `postgres` as an
/// ignored test that `--include-ignored` runs and that fails without a database.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "PostgreSQL: run with GATEHOUSE_TEST_POSTGRES_URL and --include-ignored (scripts/test.sh does)"]
            async fn postgres() {
                super::$name($crate::common::Backend::Postgres).await
            }
        }
    )*};
}

/// Tests of what only PostgreSQL has, as ignored tests that `--include-ignored` runs
/// (as `both_backends!`'s PostgreSQL half).
#[macro_export]
macro_rules! postgres_only {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "PostgreSQL: run with GATEHOUSE_TEST_POSTGRES_URL and --include-ignored (scripts/test.sh does)"]
            async fn postgres() {
                super::$name().await
            }
        }
    )*};
}
