//! Store tests: every `Store` operation as business behaviour, on SQLite and
//! PostgreSQL, including races between two store instances on one database.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;
mod support;

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
