//! Development tokens: ES256 JWTs signed with the dev key in `config/dev/`, for local runs
//! and tests only (`mandate dev token`). Never configure the dev key set in production.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

/// Why a dev token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum DevTokenError {
    #[error("signing key is not an EC P-256 PKCS#8 PEM: {0}")]
    Key(jsonwebtoken::errors::Error),
    #[error("signing failed: {0}")]
    Sign(jsonwebtoken::errors::Error),
    #[error("`ttl` of {0}s does not fit a unix time")]
    Ttl(u64),
}

/// Mint an ES256 token with `iss`, `aud`, `sub`, `iat = now`, `exp = now + ttl`, a UUIDv7
/// `jti`, plus `extra` claims (which cannot override those registered ones).
#[expect(
    clippy::too_many_arguments,
    reason = "each claim is its own argument in the contract the CLI uses"
)]
pub fn mint(
    signing_key_pem: &[u8],
    kid: &str,
    iss: &str,
    aud: &str,
    sub: &str,
    extra: Map<String, Value>,
    ttl: Duration,
    now: i64,
) -> Result<String, DevTokenError> {
    let key = EncodingKey::from_ec_pem(signing_key_pem).map_err(DevTokenError::Key)?;
    let exp = i64::try_from(ttl.as_secs())
        .ok()
        .and_then(|t| now.checked_add(t))
        .ok_or(DevTokenError::Ttl(ttl.as_secs()))?;
    let mut claims = extra;
    claims.insert("iss".into(), Value::from(iss));
    claims.insert("aud".into(), Value::from(aud));
    claims.insert("sub".into(), Value::from(sub));
    claims.insert("iat".into(), Value::from(now));
    claims.insert("exp".into(), Value::from(exp));
    claims.insert("jti".into(), Value::from(uuid::Uuid::now_v7().to_string()));
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, &key).map_err(DevTokenError::Sign)
}
