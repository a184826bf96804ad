//! Extractors: the app-owned JSON body (our error format for bad bodies), the client's
//! address, and authentication (a Bearer session, an API key, an admin).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, USER_AGENT};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::{AppState, BODY_LIMIT};
use crate::config::TrustedProxies;
use crate::domain::user::Role;
use crate::domain::FieldError;
use crate::service::{Caller, ClientMeta, Error};

/// A JSON body, rejected in problem+json: 413, 415, `invalid_json`, `validation_failed`.
pub struct AppJson<T>(pub T);

/// JSON by its media type, in UTF-8: a `charset` other than UTF-8 (or ASCII, a part
/// of it) is not a body this service can read as sent (RFC 8259 JSON is UTF-8), so it
/// is 415, not parsed as UTF-8.
fn is_json(content_type: &str) -> bool {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let utf8 = parts.filter_map(|p| p.split_once('=')).all(|(k, v)| {
        let v = v.trim().trim_matches('"');
        !k.trim().eq_ignore_ascii_case("charset")
            || ["utf-8", "utf8", "us-ascii", "ascii"].iter().any(|c| v.eq_ignore_ascii_case(c))
    });
    utf8 && (essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")))
}

/// A JSON document read into a value, failing on an object with a name twice: which
/// one counts differs between parsers (serde_json keeps the last, others the first), so
/// a proxy or log in front could read another password or email than this service does.
struct UniqueNames(serde_json::Value);

impl<'de> serde::Deserialize<'de> for UniqueNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueNamesVisitor).map(UniqueNames)
    }
}

struct UniqueNamesVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueNamesVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        serde_json::Number::from_f64(v).map(serde_json::Value::Number).ok_or_else(|| E::custom("not a JSON number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueNames(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let UniqueNames(v) = map.next_value()?;
            if object.insert(name, v).is_some() {
                return Err(serde::de::Error::custom("a name appears twice in an object"));
            }
        }
        Ok(serde_json::Value::Object(object))
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = is_json(req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or(""));
        // The size first, whatever the content type: a body over the limit is 413 (read
        // no further than the limit), then a wrong content type 415. A client that
        // declares a body over the limit and waits to be told to go on (`Expect:
        // 100-continue`) is answered at once; any other is read up to the limit as it
        // sends (answering before would cut off its upload, and the answer with it),
        // and is 413 even if its body then never comes (the read times out).
        let headers = req.headers();
        let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let too_large = declared.is_some_and(|n| n > BODY_LIMIT as u64);
        let waits = headers.get(EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if too_large && waits {
            return Err(ApiError::PayloadTooLarge);
        }
        let bytes = match Bytes::from_request(req, state).await {
            Err(_) if too_large => return Err(ApiError::PayloadTooLarge),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(ApiError::PayloadTooLarge),
            _ if !json => return Err(ApiError::UnsupportedMediaType),
            Err(_) => return Err(ApiError::InvalidJson),
            Ok(bytes) => bytes,
        };
        let UniqueNames(value) = serde_json::from_slice(&bytes).map_err(|_| ApiError::InvalidJson)?;
        if !value.is_object() {
            return Err(Error::Validation(vec![FieldError::new(
                "body",
                "invalid_type",
                "the body must be a JSON object",
            )])
            .into());
        }
        if let Some(field) = nul_in(&value, "") {
            let e = FieldError::new(&field, "invalid_characters", "NUL characters are not allowed");
            return Err(Error::Validation(vec![e]).into());
        }
        serde_path_to_error::deserialize(value).map(AppJson).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { "body".to_owned() } else { field };
            let message = e.inner().to_string();
            Error::Validation(vec![FieldError::new(&field, "invalid_type", message)]).into()
        })
    }
}

/// The path of the first string (or key) holding a NUL character: no database column
/// can store it (PostgreSQL refuses it), so it is refused at the door.
fn nul_in(v: &serde_json::Value, path: &str) -> Option<String> {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        serde_json::Value::String(s) if s.contains('\0') => {
            Some(if path.is_empty() { "body".into() } else { path.into() })
        }
        serde_json::Value::Array(a) => a.iter().enumerate().find_map(|(i, x)| nul_in(x, &join(&i.to_string()))),
        serde_json::Value::Object(o) => {
            o.iter().find_map(
                |(k, x)| {
                    if k.contains('\0') {
                        Some(join(&k.replace('\0', "")))
                    } else {
                        nul_in(x, &join(k))
                    }
                },
            )
        }
        _ => None,
    }
}

/// The client's IP: the TCP peer, or from `X-Forwarded-For` when the peer is a trusted
/// proxy (the right-most address that is not itself a trusted proxy).
pub fn client_ip(headers: &HeaderMap, peer: Option<IpAddr>, trusted: &TrustedProxies) -> IpAddr {
    let peer = peer.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in forwarded.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => continue,
            Ok(ip) => return canonical(ip),
            Err(_) => return peer,
        }
    }
    peer
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The key under which an IP is rate limited: the address, or its /64 for IPv6,
/// since one IPv6 client commonly holds a whole /64.
pub fn rate_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("ip6:{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

fn peer(parts: &Parts) -> Option<IpAddr> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| canonical(c.0.ip()))
}

/// The client's address and user agent.
pub struct Client(pub ClientMeta);

impl FromRequestParts<AppState> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ip = client_ip(&parts.headers, peer(parts), &state.trusted_proxies);
        let user_agent =
            parts.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).map(|ua| ua.chars().take(256).collect());
        Ok(Client(ClientMeta { ip, user_agent }))
    }
}

/// Peer address for middleware that has the whole request.
pub fn request_ip(req: &Request, trusted: &TrustedProxies) -> IpAddr {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| canonical(c.0.ip()));
    client_ip(req.headers(), peer, trusted)
}

fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// A caller with a live session (Bearer access token).
pub struct SessionCaller(pub Caller);

impl FromRequestParts<AppState> for SessionCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(Error::Unauthorized)?;
        Ok(Self(state.services.authenticate_bearer(token).await?))
    }
}

/// A caller with a Bearer token or an `X-API-Key`.
pub struct AnyCaller(pub Caller);

impl FromRequestParts<AppState> for AnyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(key) = parts.headers.get("x-api-key") {
            let key = key.to_str().map_err(|_| Error::Unauthorized)?;
            return Ok(Self(state.services.authenticate_api_key(key.trim()).await?));
        }
        SessionCaller::from_request_parts(parts, state).await.map(|c| Self(c.0))
    }
}

/// A Bearer caller whose stored role is admin.
pub struct AdminCaller(pub Caller);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = SessionCaller::from_request_parts(parts, state).await?.0;
        if caller.user.role != Role::Admin {
            return Err(Error::Forbidden.into());
        }
        Ok(Self(caller))
    }
}

/// A UUID path parameter; anything else (even a path that is not valid UTF-8) is
/// simply not found.
pub struct PathId(pub uuid::Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await.map_err(|_| Error::NotFound)?;
        uuid::Uuid::parse_str(&raw).map(PathId).map_err(|_| Error::NotFound.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let t: TrustedProxies = "10.0.0.1".parse().unwrap();
        let ip = client_ip(&headers("1.2.3.4"), Some("9.9.9.9".parse().unwrap()), &t);
        assert_eq!(ip, "9.9.9.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_for_is_believed_from_trusted_proxies_rightmost_untrusted_first() {
        let t: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let ip = client_ip(&headers("6.6.6.6, 1.2.3.4, 10.0.0.7"), Some("10.0.0.1".parse().unwrap()), &t);
        assert_eq!(ip, "1.2.3.4".parse::<IpAddr>().unwrap());
        let junk = client_ip(&headers("nonsense"), Some("10.0.0.1".parse().unwrap()), &t);
        assert_eq!(junk, "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn ipv6_clients_share_a_key_per_64() {
        assert_eq!(
            rate_key("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            rate_key("2001:db8:1:2:ffff::1".parse().unwrap())
        );
        assert_eq!(rate_key("1.2.3.4".parse().unwrap()), "ip:1.2.3.4");
    }

    #[test]
    fn nul_characters_are_found_with_their_path() {
        let v = serde_json::json!({"a": "ok", "b": {"c": ["x", "y\u{0}"]}});
        assert_eq!(nul_in(&v, "").as_deref(), Some("b.c.1"));
        assert_eq!(nul_in(&serde_json::json!({"a": "fine"}), ""), None);
    }

    #[test]
    fn a_name_twice_in_an_object_is_found_at_any_depth_and_escaped() {
        let unique = |s: &str| serde_json::from_str::<UniqueNames>(s).is_ok();
        // What it reads is what serde_json's own value reads.
        for doc in [
            r#"{"a": 1, "b": {"a": 2, "c": [{"a": 3}, {"a": 4}]}, "d": null}"#,
            r#"[1, "x\u00e9\n", true, 2.5, -7, 18446744073709551615, {}, []]"#,
        ] {
            let UniqueNames(v) = serde_json::from_str(doc).unwrap();
            assert_eq!(v, serde_json::from_str::<serde_json::Value>(doc).unwrap(), "{doc}");
        }
        assert!(!unique(r#"{"a": 1, "a": 1}"#));
        assert!(!unique(r#"{"a": 1, "\u0061": 2}"#));
        assert!(!unique(r#"{"x": [{"k": 1}, {"k": 1, "k": 2}]}"#));
        assert!(!unique(r#"{"x": 1"#), "not JSON at all");
    }

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(is_json("application/json;charset=\"UTF-8\""));
        assert!(is_json("application/json; charset=utf8"));
        assert!(is_json("application/json; charset=US-ASCII"));
        assert!(is_json("application/json; charset=ascii"));
        assert!(!is_json("application/json; charset=latin1"));
        assert!(!is_json("application/json; charset=utf-16"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
    }
}
