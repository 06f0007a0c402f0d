//! API keys: `Authorization: Bearer <key>` on every route but `/health`, `/ready`, `/metrics`,
//! `/openapi.json` and `/docs`. Keys are compared in constant time against every configured key,
//! so neither timing nor the position of a match tells anything about a key.
//!
//! Keys may be named (`API_KEYS=billing:k1,accounts:k2`): the name is the producer. It goes
//! into logs and the envelope, and it scopes `Idempotency-Key`s, so one client can neither
//! replay nor probe another's keys. A bare key gets the name `key-<first 8 hex of its SHA-256>`:
//! stable across restarts and reorderings, and it reveals nothing usable about the key.

use crate::error::ApiError;
use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::header,
    middleware::Next,
    web, HttpMessage, ResponseError,
};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The producer a request was authenticated as (request extension set by [`require_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Producer(pub String);

impl Producer {
    /// The producer when authentication is off.
    pub fn anonymous() -> Producer {
        Producer("anonymous".into())
    }
}

/// The configured keys with their names. Empty = authentication off (a warning is logged at
/// start).
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<(String, Vec<u8>)>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl ApiKeys {
    /// Parses `API_KEYS`: comma-separated entries, each `name:key` or a bare key. An entry
    /// whose part before the first `:` is not a name (letters, digits, `-_.`) is a bare key.
    /// Errors never repeat a key.
    pub fn parse(raw: &str) -> Result<ApiKeys, String> {
        let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
        for (i, entry) in raw.split(',').map(str::trim).enumerate().filter(|(_, e)| !e.is_empty()) {
            let (name, key) = match entry.split_once(':') {
                Some((name, key)) if is_name(name) => (name.to_string(), key.trim()),
                _ => (format!("key-{}", &crate::routes::hex(&Sha256::digest(entry.as_bytes()))[..8]), entry),
            };
            if key.is_empty() {
                return Err(format!("entry {} (`{name}:`) has no key after the name", i + 1));
            }
            if keys.iter().any(|(n, _)| *n == name) {
                return Err(format!("the name `{name}` is given to two keys; every key needs its own name"));
            }
            keys.push((name, key.as_bytes().to_vec()));
        }
        Ok(ApiKeys(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The name of the key `presented` matches. Every key is compared, without
    /// short-circuiting or branching on a match.
    pub fn producer(&self, presented: &[u8]) -> Option<&str> {
        let mut hit = subtle::Choice::from(0u8);
        let mut index = 0u32;
        for (i, (_, key)) in self.0.iter().enumerate() {
            let eq = key.as_slice().ct_eq(presented);
            index.conditional_assign(&(i as u32), eq);
            hit |= eq;
        }
        bool::from(hit).then(|| self.0[index as usize].0.as_str())
    }

    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.producer(presented).is_some()
    }
}

/// Routes without a key: probes, metrics and the API's own description (nothing in them is a
/// producer's data).
fn is_open(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics" | "/openapi.json" | "/docs") || path.starts_with("/docs/")
}

/// The credentials of a `Bearer` authorization header. The scheme is case-insensitive
/// (RFC 7235 §2.1); the key is taken as sent, without surrounding blanks.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

pub async fn require_key(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let keys = req.app_data::<web::Data<ApiKeys>>().map(|k| k.get_ref().clone()).unwrap_or_default();
    if keys.is_empty() || is_open(req.path()) {
        req.extensions_mut().insert(Producer::anonymous());
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    }
    let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
    let error = match presented.map(|key| keys.producer(key.as_bytes())) {
        Some(Some(name)) => {
            req.extensions_mut().insert(Producer(name.to_string()));
            return next.call(req).await.map(ServiceResponse::map_into_left_body);
        }
        Some(None) => "the API key is not valid",
        None => "an API key is required: send `Authorization: Bearer <key>`",
    };
    let mut res = ApiError::Unauthorized(error.into()).error_response();
    res.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    Ok(req.into_response(res).map_into_right_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = ApiKeys::parse(" k1 , second-key,,").unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts(b"k1"));
        assert!(keys.accepts(b"second-key"));
        assert!(!keys.accepts(b"k"));
        assert!(!keys.accepts(b"k1 "));
        assert!(!keys.accepts(b""));
        assert!(ApiKeys::parse("").unwrap().is_empty());
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)", "keys never show in logs");
    }

    #[test]
    fn named_keys_name_their_producer() {
        let keys = ApiKeys::parse("billing:k-b,accounts:k-a,bare-key").unwrap();
        assert_eq!(keys.producer(b"k-b"), Some("billing"));
        assert_eq!(keys.producer(b"k-a"), Some("accounts"));
        assert_eq!(keys.producer(b"billing:k-b"), None, "the name is not part of the key");
        let bare = keys.producer(b"bare-key").unwrap();
        assert!(bare.starts_with("key-") && bare.len() == 12 && !bare.contains("bare"), "{bare}");
        assert_eq!(ApiKeys::parse("bare-key").unwrap().producer(b"bare-key"), Some(bare), "stable");
        // A key with a colon whose first part is not a name stays one bare key.
        assert!(ApiKeys::parse("a b:c").unwrap().accepts(b"a b:c"));
        let dup = ApiKeys::parse("x:sec1,x:sec2").unwrap_err();
        assert!(dup.contains("`x`") && !dup.contains("sec"), "{dup}");
        assert!(ApiKeys::parse("x:").is_err());
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer k", "bearer k", "BEARER k", "bEaReR   k "] {
            assert_eq!(bearer(v), Some("k"), "{v}");
        }
        assert_eq!(bearer("Basic k"), None);
        assert_eq!(bearer("Bearerk"), None);
    }
}
