//! API tests through the real HTTP surface, on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;
mod helpers;

mod admin;
mod api_keys;
mod errors_and_ops;
mod geolocation;
mod hardening;
mod lockout;
mod login;
mod registration;
mod sessions;
