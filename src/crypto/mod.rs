//! Cryptography: password hashing on a bounded pool, signed access tokens and their
//! keys, and opaque random tokens stored only as hashes.

pub mod jwt;
pub mod password;
pub mod tokens;
