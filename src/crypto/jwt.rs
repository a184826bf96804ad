//! Access tokens: JWTs signed with Ed25519 (EdDSA), and the keys that sign them.
//!
//! Header `{alg: EdDSA, typ: at+jwt, kid}`; claims `iss, sub, aud, exp, iat, jti, sid,
//! email, role`. Verification pins all of it: the algorithm, a known `kid`, `typ`, the
//! issuer and audience, and the expiry against the injected clock with no leeway
//! (the tokens are checked by the service that issued them; other services verify
//! with the JWKS and choose their own leeway).

use std::collections::HashMap;
use std::sync::Mutex;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::clock::UnixTime;
use crate::domain::user::User;

/// Seconds of clock skew allowed on `exp` when this service checks its own tokens.
pub const LEEWAY: i64 = 0;
/// The `typ` header of access tokens (RFC 9068).
pub const TYP: &str = "at+jwt";

/// A signing key as stored: the PKCS#8 private key and the raw public key.
#[derive(Clone)]
pub struct SigningKey {
    /// Key id, the first 16 characters of the public key's SHA-256 in base64url.
    pub kid: String,
    /// PKCS#8 v2 DER of the Ed25519 private key.
    pub private_pkcs8: Vec<u8>,
    /// The 32-byte public key.
    pub public: Vec<u8>,
    /// When it was made.
    pub created_at: UnixTime,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh Ed25519 key.
    pub fn generate(now: UnixTime) -> anyhow::Result<Self> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("could not generate an Ed25519 key"))?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|_| anyhow::anyhow!("could not read the generated key"))?;
        let public = pair.public_key().as_ref().to_vec();
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(&public))[..16].to_owned();
        Ok(Self { kid, private_pkcs8: doc.as_ref().to_vec(), public, created_at: now })
    }

    /// The key with its private part encrypted under `kek` (AES-256-GCM, the kid as
    /// associated data), as it is stored when a key-encryption key is configured.
    pub fn sealed(&self, kek: &KeyEncryptionKey) -> anyhow::Result<Self> {
        let mut nonce = [0u8; 12];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| anyhow::anyhow!("no randomness for a nonce"))?;
        let mut data = self.private_pkcs8.clone();
        kek.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(self.kid.as_bytes()), &mut data)
            .map_err(|_| anyhow::anyhow!("could not encrypt the signing key"))?;
        let private_pkcs8 = [SEALED_MARK, &nonce, &data].concat();
        Ok(Self { private_pkcs8, ..self.clone() })
    }

    /// The key as read from storage, decrypted when it was stored encrypted.
    pub fn opened(self, kek: Option<&KeyEncryptionKey>) -> anyhow::Result<Self> {
        let Some(rest) = self.private_pkcs8.strip_prefix(SEALED_MARK) else {
            self.check_pair()?;
            return Ok(self);
        };
        let kek = kek.ok_or_else(|| {
            anyhow::anyhow!("the signing keys are encrypted: set GATEHOUSE_KEY_ENCRYPTION_KEY (key_encryption_key)")
        })?;
        if rest.len() < 12 + 16 {
            anyhow::bail!("stored signing key {} is truncated", self.kid);
        }
        let (nonce, sealed) = rest.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow::anyhow!("bad nonce"))?;
        let mut data = sealed.to_vec();
        let plain = kek
            .0
            .open_in_place(nonce, Aad::from(self.kid.as_bytes()), &mut data)
            .map_err(|_| {
                anyhow::anyhow!(
                    "signing key {} does not open with GATEHOUSE_KEY_ENCRYPTION_KEY (key_encryption_key): wrong key?",
                    self.kid
                )
            })?
            .to_vec();
        let opened = Self { private_pkcs8: plain, ..self };
        opened.check_pair()?;
        Ok(opened)
    }

    /// The private key must belong to the stored public key and kid.
    fn check_pair(&self) -> anyhow::Result<()> {
        let pair = Ed25519KeyPair::from_pkcs8(&self.private_pkcs8)
            .map_err(|_| anyhow::anyhow!("stored signing key {} is not an Ed25519 key", self.kid))?;
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(pair.public_key().as_ref()))[..16].to_owned();
        if pair.public_key().as_ref() != self.public.as_slice() || kid != self.kid {
            anyhow::bail!("stored signing key {} does not match its public key", self.kid);
        }
        Ok(())
    }

    /// Whether the private part is stored encrypted.
    pub fn is_sealed(&self) -> bool {
        self.private_pkcs8.starts_with(SEALED_MARK)
    }
}

const SEALED_MARK: &[u8] = b"GHKEK1";

/// A key-encryption key for signing keys at rest: 32 bytes, given base64-encoded.
pub struct KeyEncryptionKey(LessSafeKey);

impl KeyEncryptionKey {
    /// Parses the base64 text of 32 random bytes.
    pub fn parse(b64: &str) -> Result<Self, String> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| "must be base64 (e.g. `openssl rand -base64 32`)".to_owned())?;
        let key = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| "must be exactly 32 bytes".to_owned())?;
        Ok(Self(LessSafeKey::new(key)))
    }
}

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyEncryptionKey(..)")
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    /// Issuer: the public URL.
    pub iss: String,
    /// The user id.
    pub sub: Uuid,
    /// Audience.
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Token id.
    pub jti: Uuid,
    /// Session id.
    pub sid: Uuid,
    /// The user's email when issued.
    pub email: String,
    /// The user's role when issued.
    pub role: String,
}

/// Why a token was refused; callers answer all of them the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid access token")]
pub struct InvalidToken;

/// Issues and checks access tokens.
pub struct AccessTokens {
    kid: String,
    encoding: EncodingKey,
    decoding: HashMap<String, DecodingKey>,
    validation: Validation,
    jwks: serde_json::Value,
    issuer: String,
    audience: String,
    ttl: i64,
    verified: Mutex<HashMap<[u8; 32], AccessClaims>>,
}

/// Tokens remembered as verified; beyond this the memory is simply cleared.
const VERIFIED_CACHE_MAX: usize = 100_000;

impl AccessTokens {
    /// Signs with `active`; accepts tokens of every key in `all`.
    pub fn new(
        active: &SigningKey,
        all: &[SigningKey],
        issuer: String,
        audience: String,
        ttl: i64,
    ) -> anyhow::Result<Self> {
        let mut decoding = HashMap::new();
        let mut keys = Vec::new();
        for k in all.iter().chain(std::iter::once(active)) {
            let x = URL_SAFE_NO_PAD.encode(&k.public);
            decoding.insert(k.kid.clone(), DecodingKey::from_ed_components(&x)?);
            if !keys.iter().any(|j: &serde_json::Value| j["kid"] == k.kid.as_str()) {
                keys.push(serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "x": x, "kid": k.kid, "alg": "EdDSA", "use": "sig"
                }));
            }
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&issuer]);
        validation.set_audience(&[&audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        // Expiry is checked against the injected clock below, not the system time.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        Ok(Self {
            kid: active.kid.clone(),
            encoding: EncodingKey::from_ed_der(&active.private_pkcs8),
            decoding,
            validation,
            jwks: serde_json::json!({ "keys": keys }),
            issuer,
            audience,
            ttl,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Lifetime of new tokens in seconds.
    pub fn ttl(&self) -> i64 {
        self.ttl
    }

    /// The issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The public keys as a JWK set.
    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// Signs an access token for `user` in session `sid`; returns it and its expiry.
    pub fn issue(&self, user: &User, sid: Uuid, now: UnixTime) -> anyhow::Result<(String, i64)> {
        let exp = now + self.ttl;
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: user.id,
            aud: self.audience.clone(),
            exp,
            iat: now,
            jti: Uuid::now_v7(),
            sid,
            email: user.email.clone(),
            role: user.role.as_str().to_owned(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(TYP.to_owned());
        header.kid = Some(self.kid.clone());
        Ok((jsonwebtoken::encode(&header, &claims, &self.encoding)?, exp))
    }

    /// Checks signature, algorithm, key, type, issuer, audience and expiry.
    ///
    /// A client sends the same token for its whole life, so a token that passed the
    /// signature check is remembered by its SHA-256 and only its expiry is checked
    /// again: the signature check is the most expensive step of an authenticated
    /// request. Only exact byte-for-byte repeats of verified tokens hit this memory.
    pub fn verify(&self, token: &str, now: UnixTime) -> Result<AccessClaims, InvalidToken> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let remembered = self.verified.lock().ok().and_then(|m| m.get(&digest).cloned());
        let claims = match remembered {
            Some(c) => c,
            None => {
                let c = self.verify_signature(token)?;
                if let Ok(mut m) = self.verified.lock() {
                    if m.len() >= VERIFIED_CACHE_MAX {
                        m.retain(|_, v| v.exp > now);
                        // Unless that freed a good share, start afresh: a full map must
                        // not be scanned again on every insert.
                        if m.len() >= VERIFIED_CACHE_MAX * 9 / 10 {
                            m.clear();
                        }
                    }
                    m.insert(digest, c.clone());
                }
                c
            }
        };
        if claims.exp + LEEWAY <= now {
            return Err(InvalidToken);
        }
        Ok(claims)
    }

    fn verify_signature(&self, token: &str) -> Result<AccessClaims, InvalidToken> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| InvalidToken)?;
        if header.alg != Algorithm::EdDSA || header.typ.as_deref() != Some(TYP) {
            return Err(InvalidToken);
        }
        let key = header.kid.as_ref().and_then(|k| self.decoding.get(k)).ok_or(InvalidToken)?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation).map_err(|_| InvalidToken)?;
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::user::{Role, Status};

    fn user() -> User {
        User {
            id: Uuid::now_v7(),
            email: "a@example.com".into(),
            name: None,
            password_hash: None,
            role: Role::User,
            status: Status::Active,
            email_verified_at: Some(0),
            created_at: 0,
            updated_at: 0,
            last_login_at: None,
            last_login_geolocation: None,
            metadata: serde_json::json!({}),
        }
    }

    fn tokens(key: &SigningKey) -> AccessTokens {
        AccessTokens::new(key, &[], "http://gh.test".into(), "gatehouse".into(), 3600).unwrap()
    }

    #[test]
    fn issued_tokens_verify_until_they_expire() {
        let key = SigningKey::generate(0).unwrap();
        let t = tokens(&key);
        let sid = Uuid::now_v7();
        let (jwt, exp) = t.issue(&user(), sid, 1000).unwrap();
        assert_eq!(exp, 4600);
        let claims = t.verify(&jwt, 1001).unwrap();
        assert_eq!(claims.sid, sid);
        assert_eq!(claims.role, "user");
        assert!(t.verify(&jwt, 4599).is_ok());
        assert!(t.verify(&jwt, 4600).is_err());
        assert!(t.verify(&jwt, 4601).is_err(), "a remembered token still expires");
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.kid.as_deref(), Some(key.kid.as_str()));
    }

    #[test]
    fn tokens_of_another_key_issuer_or_audience_are_refused() {
        let (k1, k2) = (SigningKey::generate(0).unwrap(), SigningKey::generate(0).unwrap());
        let (jwt, _) = tokens(&k2).issue(&user(), Uuid::now_v7(), 0).unwrap();
        assert!(tokens(&k1).verify(&jwt, 1).is_err());
        let other_iss = AccessTokens::new(&k1, &[], "http://evil".into(), "gatehouse".into(), 60).unwrap();
        let (jwt, _) = other_iss.issue(&user(), Uuid::now_v7(), 0).unwrap();
        assert!(tokens(&k1).verify(&jwt, 1).is_err());
        let other_aud = AccessTokens::new(&k1, &[], "http://gh.test".into(), "other".into(), 60).unwrap();
        let (jwt, _) = other_aud.issue(&user(), Uuid::now_v7(), 0).unwrap();
        assert!(tokens(&k1).verify(&jwt, 1).is_err());
    }

    #[test]
    fn an_unsigned_or_tampered_token_is_refused() {
        let key = SigningKey::generate(0).unwrap();
        let t = tokens(&key);
        let (jwt, _) = t.issue(&user(), Uuid::now_v7(), 0).unwrap();
        let mut parts: Vec<&str> = jwt.split('.').collect();
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"at+jwt"}"#);
        parts[0] = &none_header;
        assert!(t.verify(&parts.join("."), 1).is_err());
        assert!(t.verify(&jwt, 1).is_ok(), "verified once, remembered");
        let tampered = format!("{}x", jwt);
        assert!(t.verify(&tampered, 1).is_err());
        assert!(t.verify("garbage", 1).is_err());
    }

    #[test]
    fn a_sealed_key_opens_only_with_its_key_encryption_key() {
        let key = SigningKey::generate(0).unwrap();
        let kek = KeyEncryptionKey::parse(&base64::engine::general_purpose::STANDARD.encode([7u8; 32])).unwrap();
        let sealed = key.sealed(&kek).unwrap();
        assert_ne!(sealed.private_pkcs8, key.private_pkcs8);
        assert!(!sealed.private_pkcs8.windows(16).any(|w| key.private_pkcs8.windows(16).any(|k| k == w)));
        assert_eq!(sealed.clone().opened(Some(&kek)).unwrap().private_pkcs8, key.private_pkcs8);
        let other = KeyEncryptionKey::parse(&base64::engine::general_purpose::STANDARD.encode([8u8; 32])).unwrap();
        assert!(sealed.clone().opened(Some(&other)).is_err());
        let err = sealed.opened(None).unwrap_err().to_string();
        assert!(err.contains("GATEHOUSE_KEY_ENCRYPTION_KEY"), "{err}");
        // A key stored in clear (no key-encryption key configured) opens as it is.
        assert_eq!(key.clone().opened(Some(&kek)).unwrap().private_pkcs8, key.private_pkcs8);
        assert!(KeyEncryptionKey::parse("c2hvcnQ=").is_err());
    }

    #[test]
    fn jwks_lists_the_public_key() {
        let key = SigningKey::generate(0).unwrap();
        let t = tokens(&key);
        let k = &t.jwks()["keys"][0];
        assert_eq!(k["kty"], "OKP");
        assert_eq!(k["crv"], "Ed25519");
        assert_eq!(k["kid"], key.kid.as_str());
        assert!(k.get("d").is_none(), "no private part");
    }
}
