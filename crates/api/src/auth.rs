//! API keys: `Authorization: Bearer <key>` on every route but `/health` and `/ready`. Keys are
//! compared in constant time against every configured key, so neither timing nor the position
//! of a match tells anything about a key.

use crate::error::ApiError;
use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::header,
    middleware::Next,
    web, ResponseError,
};
use subtle::ConstantTimeEq;

/// The configured keys. Empty = authentication off (a warning is logged at start).
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    pub fn parse(raw: &str) -> ApiKeys {
        ApiKeys(raw.split(',').map(str::trim).filter(|k| !k.is_empty()).map(|k| k.as_bytes().to_vec()).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn accepts(&self, presented: &[u8]) -> bool {
        // Fold over all keys without short-circuiting.
        self.0.iter().fold(0u8, |hit, key| hit | key.as_slice().ct_eq(presented).unwrap_u8()) == 1
    }
}

fn is_open(path: &str) -> bool {
    matches!(path, "/health" | "/ready")
}

pub async fn require_key(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let keys = req.app_data::<web::Data<ApiKeys>>().map(|k| k.get_ref().clone()).unwrap_or_default();
    if keys.is_empty() || is_open(req.path()) {
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let error = match presented {
        Some(key) if keys.accepts(key.as_bytes()) => {
            return next.call(req).await.map(ServiceResponse::map_into_left_body)
        }
        Some(_) => "the API key is not valid",
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
        let keys = ApiKeys::parse(" k1 , second-key,,");
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts(b"k1"));
        assert!(keys.accepts(b"second-key"));
        assert!(!keys.accepts(b"k"));
        assert!(!keys.accepts(b"k1 "));
        assert!(!keys.accepts(b""));
        assert!(ApiKeys::parse("").is_empty());
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)", "keys never show in logs");
    }
}
