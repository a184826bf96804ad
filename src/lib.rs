//! Gatehouse: a self-hosted identity service.
//!
//! Dependencies point one way: `http -> service -> {domain, store, crypto, mail, clock}`.

/// Builds the application (state and router) from settings; the only constructor.
pub mod app;
/// The command line: serve, migrate, user create.
pub mod cli;
/// The one place that reads the time.
pub mod clock;
/// Settings: a TOML file, then `GATEHOUSE_*` variables.
pub mod config;
/// Password hashing, access tokens, signing keys, opaque tokens.
pub mod crypto;
/// Pure types and rules: email, password policy, user, lockout.
pub mod domain;
/// The HTTP surface: routes, problem+json errors, extractors, rate limit, OpenAPI.
pub mod http;
/// Outgoing mail: templates, the queue, file, SMTP and log transports.
pub mod mail;
/// The use cases: accounts, sessions, API keys, admin.
pub mod service;
/// Persistence: the Store trait and its SQL implementation for SQLite and PostgreSQL.
pub mod store;
