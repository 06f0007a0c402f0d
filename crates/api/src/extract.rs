//! Reading a JSON request body with exact status codes: 415 for a content type other than
//! `application/json` or any `Content-Encoding`, 413 past the size limit, 408 when the body
//! does not arrive in time, 400 for malformed JSON, 422 naming the field for wrong types,
//! duplicate, unknown or invalid fields.

use crate::error::{ApiError, FieldError};
use actix_web::{http::header, web, HttpRequest};
use futures_util::StreamExt;
use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::{cell::RefCell, collections::HashSet, fmt, time::Duration};
use validator::{Validate, ValidationErrors};

/// How much of a body the API reads, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub bytes: usize,
    /// From the handler's start to the body's last byte: a client that announces more than it
    /// sends gets 408 instead of holding a connection forever.
    pub timeout: Duration,
}

/// A parsed and validated request, with its JSON value (for the idempotency hash).
pub struct Parsed<T> {
    pub body: T,
    pub value: serde_json::Value,
}

/// The top-level fields a request body may have: any other is reported beside the invalid and
/// missing ones, all in one 422.
pub trait Fields {
    const FIELDS: &'static [&'static str];
}

/// Unknown fields named one by one in a 422, at most; the rest are counted.
const MAX_UNKNOWN_LISTED: usize = 20;

/// Reads, parses and validates a JSON body into `T`.
pub async fn json_body<T>(req: &HttpRequest, payload: web::Payload, limits: BodyLimits) -> Result<Parsed<T>, ApiError>
where
    T: DeserializeOwned + Validate + Fields,
{
    check_content_type(req)?;
    let body = tokio::time::timeout(limits.timeout, read_body(req, payload, limits.bytes))
        .await
        .map_err(|_| ApiError::RequestTimeout(limits.timeout))??;
    parse(&body)
}

async fn read_body(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    if let Some(len) =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::MalformedJson(format!("could not read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Parses and validates an in-memory body.
pub fn parse<T>(body: &[u8]) -> Result<Parsed<T>, ApiError>
where
    T: DeserializeOwned + Validate + Fields,
{
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::MalformedJson(format!("the body is not valid JSON: {e}")))?;
    if let Some(field) = duplicate_key(body) {
        return Err(ApiError::field(&field, "appears more than once in the object; send each field once"));
    }
    let Some(object) = value.as_object() else {
        return Err(ApiError::field("", "the body must be a JSON object"));
    };
    if let Some((field, _)) = object.iter().find(|(k, v)| k.contains('\0') || has_nul(v)) {
        return Err(ApiError::field(field, "must not contain NUL characters (\\u0000)"));
    }
    // Unknown fields are set aside and reported with whatever else is wrong.
    let (known, unknown): (Vec<_>, Vec<_>) = object.iter().partition(|(k, _)| T::FIELDS.contains(&k.as_str()));
    let mut errors: Vec<FieldError> = unknown
        .iter()
        .take(MAX_UNKNOWN_LISTED)
        .map(|(k, _)| FieldError {
            field: k.to_string(),
            message: format!("is not a field of this request (expected one of: {})", T::FIELDS.join(", ")),
        })
        .collect();
    if unknown.len() > MAX_UNKNOWN_LISTED {
        errors.push(FieldError {
            field: String::new(),
            message: format!("and {} more unknown fields", unknown.len() - MAX_UNKNOWN_LISTED),
        });
    }
    let known = serde_json::Value::Object(known.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let parsed: Result<T, _> = serde_path_to_error::deserialize(known);
    match parsed {
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            errors.push(FieldError { field, message: clean_serde_message(&e.into_inner().to_string()) });
        }
        Ok(parsed) => {
            if let Err(e) = parsed.validate() {
                errors.extend(field_errors(&e));
            }
            if errors.is_empty() {
                return Ok(Parsed { body: parsed, value });
            }
        }
    }
    errors.sort_by(|a, b| a.field.cmp(&b.field).then(a.message.cmp(&b.message)));
    Err(ApiError::validation(errors))
}

/// Whether a string (or key) anywhere in `value` holds a NUL: Postgres cannot store one in text
/// or jsonb (status, inbox), so such a request could never be delivered everywhere.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// `application/json` only (parameters such as `charset=utf-8` allowed): other `+json` types
/// promise semantics (JSON:API, problem details) this API does not have. The body must come
/// as sent: no `Content-Encoding` is decoded, so one (other than `identity`) is refused
/// rather than read as if it were plain.
fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    for encoding in req.headers().get_all(header::CONTENT_ENCODING) {
        let raw = String::from_utf8_lossy(encoding.as_bytes());
        if !raw.split(',').all(|e| e.trim().eq_ignore_ascii_case("identity")) {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding `{}` is not supported: send the body uncompressed",
                raw.escape_debug()
            )));
        }
    }
    let raw = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" {
        Ok(())
    } else if raw.is_empty() {
        Err(ApiError::UnsupportedMediaType("Content-Type must be application/json (none was sent)".into()))
    } else {
        Err(ApiError::UnsupportedMediaType(format!("Content-Type must be application/json, not `{raw}`")))
    }
}

/// The path (`to`, `payload.name`, `payload.items[2].id`) of the first key that appears twice
/// in one object of a valid JSON document. serde_json keeps the last occurrence silently, while
/// a gateway in front of us may read the first: both must see the same request.
fn duplicate_key(body: &[u8]) -> Option<String> {
    let found = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = Dups { path: String::new(), found: &found }.deserialize(&mut de);
    found.into_inner()
}

struct Dups<'a> {
    path: String,
    found: &'a RefCell<Option<String>>,
}

impl Dups<'_> {
    fn child(&self, path: String) -> Dups<'_> {
        Dups { path, found: self.found }
    }
}

impl<'de> DeserializeSeed<'de> for Dups<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Dups<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq.next_element_seed(self.child(format!("{}[{i}]", self.path)))?.is_some() {
            i += 1;
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() { key.clone() } else { format!("{}.{key}", self.path) };
            if !seen.insert(key) {
                *self.found.borrow_mut() = Some(path);
                return Err(de::Error::custom("duplicate key"));
            }
            map.next_value_seed(self.child(path))?;
        }
        Ok(())
    }
}

/// serde's messages mention Rust types; keep them but drop the trailing position noise.
fn clean_serde_message(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Flattens validator's errors into a sorted per-field list.
pub fn field_errors(errors: &ValidationErrors) -> Vec<FieldError> {
    let mut out: Vec<FieldError> = errors
        .field_errors()
        .iter()
        .flat_map(|(field, errs)| {
            errs.iter().map(move |e| FieldError {
                field: field.to_string(),
                message: e.message.as_ref().map(|m| m.to_string()).unwrap_or_else(|| e.code.to_string()),
            })
        })
        .collect();
    out.sort_by(|a, b| a.field.cmp(&b.field).then(a.message.cmp(&b.message)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_422_lists_unknown_invalid_and_missing_fields_at_once() {
        let body = br#"{"to": "not-an-address", "subjct": "hi", "extra": 1}"#;
        let Err(ApiError::Validation { fields, .. }) = parse::<crate::routes::EmailRequest>(body) else {
            panic!("a 422 was expected");
        };
        let named: std::collections::BTreeSet<&str> = fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(named, ["body", "extra", "subject", "subjct", "to"].into(), "{fields:?}");
        let many = format!("{{{}}}", (0..100).map(|i| format!("\"x{i}\": 1")).collect::<Vec<_>>().join(","));
        let Err(ApiError::Validation { fields, .. }) = parse::<crate::routes::EmailRequest>(many.as_bytes()) else {
            panic!("a 422 was expected");
        };
        assert!(fields.len() < 30 && fields.iter().any(|f| f.message == "and 80 more unknown fields"), "{fields:?}");
    }

    #[test]
    fn duplicate_keys_are_found_with_their_path() {
        assert_eq!(duplicate_key(br#"{"to":"a@x.io","to":"b@x.io"}"#).as_deref(), Some("to"));
        assert_eq!(duplicate_key(br#"{"payload":{"a":1,"b":{"c":1,"c":2}}}"#).as_deref(), Some("payload.b.c"));
        assert_eq!(duplicate_key(br#"{"p":[{"a":1},{"a":1,"a":2}]}"#).as_deref(), Some("p[1].a"));
        assert_eq!(duplicate_key(br#"{"a":{"x":1},"b":{"x":1},"c":[1,"s",null,true,1.5,-3]}"#), None);
    }
}
