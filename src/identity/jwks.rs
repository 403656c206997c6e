//! JWKS documents to verification keys (docs/security.md K-06..K-10, J-30, J-31): parsed
//! with the strict JSON pass, bounded in size, every key validated once at load and bound to
//! exactly one algorithm family, its `DecodingKey` prepared so the hot path never re-parses.

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, ED25519, ParsedPublicKey,
    VerificationAlgorithm,
};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::error::shown;
use super::jws::{B64, MAX_JSON_DEPTH, MAX_KID_LEN};
use crate::strict_json;

/// Largest key-set document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys accepted in one document.
pub const MAX_JWKS_KEYS: usize = 100;
/// Smallest RSA modulus accepted (RFC 7518 §3.3), in bits.
const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus the verifier handles, in bits.
const MAX_RSA_BITS: usize = 8192;

/// Members that only a private key has. A published key set holding them is an issuer
/// incident: the key is dropped and the event logged.
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

const RSA_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// One usable verification key.
#[derive(Debug, Clone)]
pub struct VerifyKey {
    /// `kid`, an opaque map key (never a path, never a query).
    pub kid: Option<String>,
    /// The algorithms this key may verify: one for EC and OKP keys and for keys with a JWK
    /// `alg`; the issuer's allowed RS/PS algorithms for RSA keys without one.
    pub algs: Vec<Algorithm>,
    pub key: Arc<DecodingKey>,
    /// The public key material, to tell a rotated key from an unchanged one.
    pub fingerprint: Vec<u8>,
}

/// The usable keys of one issuer, as loaded from one document.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
    by_kid: HashMap<String, usize>,
}

/// The outcome of a key lookup.
#[derive(Debug)]
pub enum Lookup<'a> {
    Found(&'a Arc<DecodingKey>),
    /// The key exists but is bound to other algorithms.
    WrongAlg,
    Unknown,
    /// No `kid`, and more than one key could verify the algorithm.
    Ambiguous,
}

impl KeySet {
    pub fn new(keys: Vec<VerifyKey>) -> Self {
        let by_kid = keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| k.kid.clone().map(|kid| (kid, i)))
            .collect();
        Self { keys, by_kid }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup<'_> {
        match kid {
            Some(kid) => match self.by_kid.get(kid).and_then(|i| self.keys.get(*i)) {
                Some(k) if k.algs.contains(&alg) => Lookup::Found(&k.key),
                Some(_) => Lookup::WrongAlg,
                None => Lookup::Unknown,
            },
            None => {
                // Without a kid, only an unambiguous key may be used.
                let mut usable = self.keys.iter().filter(|k| k.algs.contains(&alg));
                match (usable.next(), usable.next()) {
                    (Some(k), None) => Lookup::Found(&k.key),
                    (Some(_), Some(_)) => Lookup::Ambiguous,
                    (None, _) if self.keys.is_empty() => Lookup::Unknown,
                    (None, _) => Lookup::WrongAlg,
                }
            }
        }
    }

    /// True when some key of `self` is absent from `newer` (same kid and material).
    pub fn has_keys_missing_from(&self, newer: &KeySet) -> bool {
        self.keys.iter().any(|old| {
            !newer
                .keys
                .iter()
                .any(|k| k.kid == old.kid && k.fingerprint == old.fingerprint)
        })
    }
}

/// Why a whole document was refused (the last good key set stays in use).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("document is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("document is not strict JSON: {0}")]
    Json(String),
    #[error("document is not a key set: {0}")]
    Shape(&'static str),
    #[error("document holds {0} keys, more than {MAX_JWKS_KEYS}")]
    TooManyKeys(usize),
    #[error("document holds no usable key")]
    NoUsableKeys,
}

/// Parse a key set for `issuer`, keeping only keys usable with `allowed`.
pub fn parse(bytes: &[u8], allowed: &[Algorithm], issuer: &str) -> Result<KeySet, JwksError> {
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge);
    }
    let doc =
        strict_json::parse(bytes, MAX_JSON_DEPTH).map_err(|e| JwksError::Json(e.to_string()))?;
    let Some(Value::Array(entries)) = doc.get("keys") else {
        return Err(JwksError::Shape("`keys` is not an array"));
    };
    if entries.len() > MAX_JWKS_KEYS {
        return Err(JwksError::TooManyKeys(entries.len()));
    }
    let mut keys = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let Value::Object(jwk) = entry else {
            tracing::warn!(issuer, index, "jwks entry is not an object; ignored");
            continue;
        };
        match parse_key(jwk, allowed) {
            Ok(key) => keys.push(key),
            Err(Skip::Ignore(why)) => {
                tracing::debug!(issuer, index, reason = %why, "jwks key ignored");
            }
            Err(Skip::Drop(why)) => {
                tracing::warn!(issuer, index, reason = %why, "jwks key dropped");
            }
        }
    }
    // A kid naming two keys is ambiguous: neither may be chosen by it.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for k in &keys {
        if let Some(kid) = &k.kid {
            *counts.entry(kid.as_str()).or_default() += 1;
        }
    }
    let duplicated: Vec<String> = counts
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(kid, _)| kid.to_owned())
        .collect();
    if !duplicated.is_empty() {
        for kid in &duplicated {
            tracing::warn!(issuer, kid = %shown(kid), "duplicate jwks kid; all keys with it dropped");
        }
        keys.retain(|k| k.kid.as_ref().is_none_or(|kid| !duplicated.contains(kid)));
    }
    if keys.is_empty() {
        return Err(JwksError::NoUsableKeys);
    }
    Ok(KeySet::new(keys))
}

/// Why one key was left out.
enum Skip {
    /// Not for us (RFC 7517 §5: ignore what is not understood).
    Ignore(String),
    /// Meant for us but unsafe or broken.
    Drop(String),
}

fn str_member<'a>(jwk: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, Skip> {
    match jwk.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Skip::Drop(format!("`{name}` is not a string"))),
    }
}

fn b64_member(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, Skip> {
    let s = str_member(jwk, name)?.ok_or_else(|| Skip::Drop(format!("`{name}` is missing")))?;
    B64.decode(s)
        .map_err(|_| Skip::Drop(format!("`{name}` is not strict base64url")))
}

fn alg_from_name(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

fn parse_key(jwk: &Map<String, Value>, allowed: &[Algorithm]) -> Result<VerifyKey, Skip> {
    let kid = match str_member(jwk, "kid")? {
        Some(k) if k.len() > MAX_KID_LEN => {
            return Err(Skip::Drop(format!(
                "`kid` is longer than {MAX_KID_LEN} bytes"
            )));
        }
        k => k.map(str::to_owned),
    };
    let kty = str_member(jwk, "kty")?.unwrap_or_default();
    if !matches!(kty, "RSA" | "EC" | "OKP") {
        return Err(Skip::Ignore(format!("`kty` `{}` is not used", shown(kty))));
    }
    if let Some(u) = str_member(jwk, "use")?
        && u != "sig"
    {
        return Err(Skip::Ignore(format!("`use` is `{}`", shown(u))));
    }
    if let Some(ops) = jwk.get("key_ops") {
        let verifies = matches!(ops, Value::Array(ops) if ops.iter().any(|o| o == "verify"));
        if !verifies {
            return Err(Skip::Ignore("`key_ops` does not include `verify`".into()));
        }
    }
    if let Some(m) = PRIVATE_MEMBERS.iter().find(|m| jwk.contains_key(**m)) {
        return Err(Skip::Drop(format!(
            "private key member `{m}` published; the issuer's key is exposed"
        )));
    }
    let jwk_alg = match str_member(jwk, "alg")? {
        None => None,
        Some(name) => Some(
            alg_from_name(name)
                .ok_or_else(|| Skip::Ignore(format!("`alg` `{}` is not supported", shown(name))))?,
        ),
    };
    let (algs, key, fingerprint) = match kty {
        "RSA" => rsa_key(jwk, jwk_alg, allowed)?,
        "EC" => ec_key(jwk, jwk_alg)?,
        _ => okp_key(jwk, jwk_alg)?,
    };
    let algs: Vec<Algorithm> = algs.into_iter().filter(|a| allowed.contains(a)).collect();
    if algs.is_empty() {
        return Err(Skip::Ignore(
            "the key's algorithm is not allowed for this issuer".into(),
        ));
    }
    Ok(VerifyKey {
        kid,
        algs,
        key: Arc::new(key),
        fingerprint,
    })
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[first..]
}

type Prepared = (Vec<Algorithm>, DecodingKey, Vec<u8>);

fn rsa_key(
    jwk: &Map<String, Value>,
    jwk_alg: Option<Algorithm>,
    allowed: &[Algorithm],
) -> Result<Prepared, Skip> {
    let algs: Vec<Algorithm> = match jwk_alg {
        Some(a) if RSA_ALGS.contains(&a) => vec![a],
        Some(a) => return Err(Skip::Drop(format!("`alg` `{a:?}` does not fit an RSA key"))),
        None => RSA_ALGS
            .iter()
            .copied()
            .filter(|a| allowed.contains(a))
            .collect(),
    };
    if algs.is_empty() {
        return Err(Skip::Ignore("issuer allows no RSA algorithm".into()));
    }
    let n_raw = b64_member(jwk, "n")?;
    let e_raw = b64_member(jwk, "e")?;
    let n = strip_leading_zeros(&n_raw);
    let e = strip_leading_zeros(&e_raw);
    let bits = n.first().map_or(0, |top| {
        (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
    });
    if bits < MIN_RSA_BITS {
        return Err(Skip::Drop(format!(
            "RSA modulus of {bits} bits is below {MIN_RSA_BITS}"
        )));
    }
    if bits > MAX_RSA_BITS {
        return Err(Skip::Drop(format!(
            "RSA modulus of {bits} bits is above {MAX_RSA_BITS}"
        )));
    }
    if n.last().is_none_or(|b| b & 1 == 0) {
        return Err(Skip::Drop("RSA modulus is even".into()));
    }
    let e_odd = e.last().is_some_and(|b| b & 1 == 1);
    if !e_odd || e == [1] || e.len() > 4 {
        return Err(Skip::Drop("RSA exponent is even, 1 or too large".into()));
    }
    let key = DecodingKey::from_rsa_raw_components(n, e);
    let mut fingerprint = n.to_vec();
    fingerprint.extend_from_slice(e);
    Ok((algs, key, fingerprint))
}

fn ec_key(jwk: &Map<String, Value>, jwk_alg: Option<Algorithm>) -> Result<Prepared, Skip> {
    let crv = str_member(jwk, "crv")?.unwrap_or_default();
    let (alg, len, check): (Algorithm, usize, &'static dyn VerificationAlgorithm) = match crv {
        "P-256" => (Algorithm::ES256, 32, &ECDSA_P256_SHA256_FIXED),
        "P-384" => (Algorithm::ES384, 48, &ECDSA_P384_SHA384_FIXED),
        other => {
            return Err(Skip::Ignore(format!(
                "`crv` `{}` is not supported",
                shown(other)
            )));
        }
    };
    // The curve decides the algorithm; a JWK `alg` naming another one is contradictory.
    if jwk_alg.is_some_and(|a| a != alg) {
        return Err(Skip::Drop(format!("`alg` does not match `crv` `{crv}`")));
    }
    let x = b64_member(jwk, "x")?;
    let y = b64_member(jwk, "y")?;
    if x.len() != len || y.len() != len {
        return Err(Skip::Drop(format!(
            "`x` and `y` must be {len} bytes for `{crv}`"
        )));
    }
    let mut point = Vec::with_capacity(1 + 2 * len);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    // Off-curve and identity points are refused here, once, rather than at every verify.
    ParsedPublicKey::new(check, &point)
        .map_err(|_| Skip::Drop("EC point is not on the curve".into()))?;
    let key = DecodingKey::from_ec_der(&point);
    Ok((vec![alg], key, point))
}

fn okp_key(jwk: &Map<String, Value>, jwk_alg: Option<Algorithm>) -> Result<Prepared, Skip> {
    let crv = str_member(jwk, "crv")?.unwrap_or_default();
    if crv != "Ed25519" {
        return Err(Skip::Ignore(format!(
            "`crv` `{}` is not supported",
            shown(crv)
        )));
    }
    if jwk_alg.is_some_and(|a| a != Algorithm::EdDSA) {
        return Err(Skip::Drop("`alg` does not match `crv` `Ed25519`".into()));
    }
    let x = b64_member(jwk, "x")?;
    if x.len() != 32 {
        return Err(Skip::Drop("`x` must be 32 bytes for `Ed25519`".into()));
    }
    ParsedPublicKey::new(&ED25519, &x).map_err(|_| Skip::Drop("Ed25519 key is invalid".into()))?;
    let key = DecodingKey::from_ed_der(&x);
    Ok((vec![Algorithm::EdDSA], key, x))
}
