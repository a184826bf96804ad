//! Opaque random tokens (refresh tokens, mailed links, API keys, codes): how they are
//! made, how they are hashed for storage, and how a successor refresh token is sealed
//! so that only the holder of its predecessor can read it back.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::rngs::OsRng;
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    OsRng.fill_bytes(&mut b);
    b
}

/// A refresh token: 256 random bits, base64url.
pub fn new_refresh_token() -> String {
    URL_SAFE_NO_PAD.encode(random::<32>())
}

/// A token for a mailed link: 256 random bits in hex (no punctuation, so it survives
/// any mail client and never splits on a word boundary).
pub fn new_link_token() -> String {
    hex(&random::<32>())
}

/// A 6-digit code, uniformly drawn.
pub fn new_code() -> String {
    format!("{:06}", OsRng.gen_range(0..1_000_000u32))
}

/// An API key and its public prefix: `gh_<8 hex>_<256 random bits base64url>`.
pub fn new_api_key() -> (String, String) {
    let prefix = format!("gh_{}", hex(&random::<4>()));
    let key = format!("{prefix}_{}", URL_SAFE_NO_PAD.encode(random::<32>()));
    (key, prefix)
}

/// SHA-256 in hex: how every opaque token is stored. The tokens carry 256 random
/// bits, so a fast hash is enough; nobody can reverse or guess them.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// A code's stored hash, salted with its row id so equal codes differ.
pub fn hash_code(token_id: &str, code: &str) -> String {
    hash_token(&format!("{token_id}:{code}"))
}

/// Constant-time equality of two strings.
pub fn ct_eq(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn pad_for(old: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"gatehouse refresh successor seal\0");
    h.update(old.as_bytes());
    h.finalize().into()
}

/// Seals `successor` (a refresh token) with a pad derived from `old`, the token it
/// replaces. The database keeps the sealed form; only someone presenting `old` can
/// open it, which is what the grace window needs and a database reader does not have.
pub fn seal(successor: &str, old: &str) -> Option<String> {
    let raw = URL_SAFE_NO_PAD.decode(successor).ok()?;
    let pad = pad_for(old);
    if raw.len() != pad.len() {
        return None;
    }
    let sealed: Vec<u8> = raw.iter().zip(pad.iter()).map(|(a, b)| a ^ b).collect();
    Some(URL_SAFE_NO_PAD.encode(sealed))
}

/// Opens what [`seal`] made.
pub fn unseal(sealed: &str, old: &str) -> Option<String> {
    let raw = URL_SAFE_NO_PAD.decode(sealed).ok()?;
    let pad = pad_for(old);
    if raw.len() != pad.len() {
        return None;
    }
    let open: Vec<u8> = raw.iter().zip(pad.iter()).map(|(a, b)| a ^ b).collect();
    Some(URL_SAFE_NO_PAD.encode(open))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_distinct() {
        let a = new_refresh_token();
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert_ne!(a, new_refresh_token());
        let l = new_link_token();
        assert_eq!(l.len(), 64);
        assert!(l.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn codes_have_six_digits() {
        for _ in 0..100 {
            let c = new_code();
            assert_eq!(c.len(), 6);
            assert!(c.chars().all(|c| c.is_ascii_digit()));
        }
    }

    #[test]
    fn api_keys_start_with_their_prefix() {
        let (key, prefix) = new_api_key();
        assert!(key.starts_with(&format!("{prefix}_")));
        assert_eq!(prefix.len(), 11);
    }

    #[test]
    fn hashing_is_stable_and_not_the_token() {
        let t = new_refresh_token();
        assert_eq!(hash_token(&t), hash_token(&t));
        assert_ne!(hash_token(&t), t);
        assert_ne!(hash_code("a", "123456"), hash_code("b", "123456"));
    }

    #[test]
    fn only_the_predecessor_opens_the_sealed_successor() {
        let (old, next) = (new_refresh_token(), new_refresh_token());
        let sealed = seal(&next, &old).unwrap();
        assert_ne!(sealed, next);
        assert_eq!(unseal(&sealed, &old).unwrap(), next);
        assert_ne!(unseal(&sealed, &new_refresh_token()).unwrap(), next);
    }

    #[test]
    fn ct_eq_compares_whole_strings() {
        assert!(ct_eq("abc", "abc"));
        assert!(!ct_eq("abc", "abd"));
        assert!(!ct_eq("abc", "abcd"));
    }
}
