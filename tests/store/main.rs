//! Store tests: every `Store` operation as business behaviour, on SQLite and
//! PostgreSQL, including races between two store instances on one database.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;
mod support;

/// Tests of what only PostgreSQL has, as ignored tests that `--include-ignored` runs
/// (defined before the modules that use it).
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

mod api_keys;
mod concurrency;
mod connections;
mod lockout;
mod mail_queue;
mod maintenance;
mod refresh;
mod reset;
mod session_cache;
mod sessions;
mod users;
mod verification;
