//! Strict JWS compact parsing, before any key lookup or cryptography (docs/security.md
//! §1.0 steps 1–5): size and shape, strict base64url, strict header and payload JSON, the
//! header parameters no profile may use, and strict types for the registered claims.

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::error::{IdentityError, shown};
use crate::strict_json;

/// Longest token accepted, in bytes (docs/security.md §1.0 step 1).
pub const MAX_TOKEN_LEN: usize = 8192;
/// Longest decoded header accepted, in bytes.
pub const MAX_HEADER_LEN: usize = 1024;
/// Deepest JSON nesting accepted in the header, the payload and a key set.
pub const MAX_JSON_DEPTH: usize = 8;
/// Longest `kid` accepted, in bytes; it is only ever an opaque map key.
pub const MAX_KID_LEN: usize = 256;

/// base64url exactly as RFC 7515 writes it: URL alphabet, no padding, canonical trailing
/// bits. The stock `URL_SAFE_NO_PAD` engine tolerates nothing else either, but spelling the
/// configuration out keeps the guarantee from depending on a default.
pub const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(false),
);

/// Header parameters that would make the token carry its own keys, change how the payload is
/// read, or demand extensions we do not implement. Refused under every profile, whatever
/// their value (`crit: []` included): the sidecar understands no extension.
const FORBIDDEN_HEADER_PARAMS: &[&str] = &[
    "jku", "x5u", "jwk", "x5c", "crit", "zip", "enc", "cty", "b64",
];

/// Registered JOSE algorithm names that exist but that this verifier never accepts.
const UNSUPPORTED_ALGS: &[&str] = &["ES512", "ES256K", "Ed25519", "Ed448"];

/// The header, after the profile-independent checks.
#[derive(Debug, Clone)]
pub struct Header {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub typ: Option<String>,
    /// The first parameter other than `alg`, `kid`, `typ` (the SPIFFE profile refuses any).
    pub other_param: Option<String>,
}

/// Registered claims with strict types, plus the whole claim set for mapping.
#[derive(Debug, Clone)]
pub struct Claims {
    pub iss: Option<String>,
    pub sub: Option<String>,
    /// Empty when `aud` is absent; never empty when present (an empty array is refused).
    pub aud: Vec<String>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
    pub jti: Option<String>,
    pub all: Map<String, Value>,
}

/// A token whose structure passed; nothing about it is trusted yet.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub header: Header,
    pub claims: Claims,
    /// `header.payload`, the bytes the signature covers.
    pub signing_input: &'a str,
    /// The third segment, already known to be strict base64url.
    pub signature_b64: &'a str,
}

fn malformed(why: &str) -> IdentityError {
    IdentityError::TokenMalformed(why.to_owned())
}

/// Steps 1–5 of the pipeline.
pub fn parse(token: &str) -> Result<Parsed<'_>, IdentityError> {
    // Step 1: bound the work before splitting or allocating anything.
    if token.len() > MAX_TOKEN_LEN {
        return Err(IdentityError::TokenMalformed(format!(
            "token is longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    let bytes = token.as_bytes();
    let mut dots = [0usize; 2];
    let mut n = 0usize;
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'.' {
            if n == 2 {
                return Err(malformed("expected exactly 3 segments"));
            }
            dots[n] = i;
            n += 1;
        }
    }
    if n != 2 {
        return Err(malformed("expected exactly 3 segments"));
    }
    let header_b64 = &token[..dots[0]];
    let payload_b64 = &token[dots[0] + 1..dots[1]];
    let signature_b64 = &token[dots[1] + 1..];

    // Step 2: strict base64url.
    if header_b64.is_empty() || payload_b64.is_empty() {
        return Err(malformed("empty segment"));
    }
    let header_bytes = B64
        .decode(header_b64)
        .map_err(|_| malformed("header is not strict base64url"))?;
    let payload_bytes = B64
        .decode(payload_b64)
        .map_err(|_| malformed("payload is not strict base64url"))?;
    B64.decode(signature_b64)
        .map_err(|_| malformed("signature is not strict base64url"))?;

    // The header is read before an empty signature is refused, so the unsecured JWS of
    // RFC 7515 A.5 (`alg: none`, no signature) is named for what it is: `alg_not_allowed`
    // (SECURITY J-01). Any other empty signature is a stripped signature (J-34).
    let header = parse_header(&header_bytes)?;
    if signature_b64.is_empty() {
        return Err(malformed("empty signature segment"));
    }
    let claims = parse_claims(&payload_bytes)?;
    Ok(Parsed {
        header,
        claims,
        signing_input: &token[..dots[1]],
        signature_b64,
    })
}

fn header_invalid(why: impl Into<String>) -> IdentityError {
    IdentityError::HeaderInvalid(why.into())
}

/// Step 3 and the profile-independent half of step 4.
fn parse_header(bytes: &[u8]) -> Result<Header, IdentityError> {
    if bytes.len() > MAX_HEADER_LEN {
        return Err(header_invalid(format!(
            "header is longer than {MAX_HEADER_LEN} bytes"
        )));
    }
    let value =
        strict_json::parse(bytes, MAX_JSON_DEPTH).map_err(|e| header_invalid(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(header_invalid("header is not a JSON object"));
    };
    let alg = match map.get("alg") {
        None => return Err(header_invalid("`alg` is missing")),
        Some(Value::String(s)) => parse_alg(s)?,
        Some(_) => return Err(header_invalid("`alg` is not a string")),
    };
    if let Some(name) = FORBIDDEN_HEADER_PARAMS
        .iter()
        .find(|name| map.contains_key(**name))
    {
        return Err(IdentityError::HeaderParamForbidden((*name).to_owned()));
    }
    let kid = match map.get("kid") {
        None => None,
        Some(Value::String(s)) if s.len() <= MAX_KID_LEN => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(header_invalid(format!(
                "`kid` is longer than {MAX_KID_LEN} bytes"
            )));
        }
        Some(_) => return Err(header_invalid("`kid` is not a string")),
    };
    let typ = match map.get("typ") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(header_invalid("`typ` is not a string")),
    };
    let other_param = map
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
        .map(|k| shown(k));
    Ok(Header {
        alg,
        kid,
        typ,
        other_param,
    })
}

/// `alg` names are case-sensitive (RFC 7515 §4.1.1): `rs256` or `RS256 ` is junk, not RS256.
/// Every spelling of `none` is refused as an algorithm, before any key is looked up.
fn parse_alg(s: &str) -> Result<Algorithm, IdentityError> {
    let alg = match s {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        s if s.eq_ignore_ascii_case("none") => {
            return Err(IdentityError::alg(s, "unsecured tokens are never accepted"));
        }
        s if UNSUPPORTED_ALGS.contains(&s) => {
            return Err(IdentityError::alg(s, "not supported"));
        }
        s => {
            return Err(header_invalid(format!(
                "`alg` `{}` is not a known algorithm",
                shown(s)
            )));
        }
    };
    Ok(alg)
}

fn claims_invalid(why: impl Into<String>) -> IdentityError {
    IdentityError::ClaimsInvalid(why.into())
}

/// Step 5: strict payload JSON and strict registered-claim types. Numeric dates are integers
/// only: a float `exp` is refused rather than rounded (docs/security.md §1.1).
fn parse_claims(bytes: &[u8]) -> Result<Claims, IdentityError> {
    let value =
        strict_json::parse(bytes, MAX_JSON_DEPTH).map_err(|e| claims_invalid(e.to_string()))?;
    let Value::Object(all) = value else {
        return Err(claims_invalid("payload is not a JSON object"));
    };
    claims_from_map(all)
}

/// The registered claims of a claim set, with their strict types.
pub fn claims_from_map(all: Map<String, Value>) -> Result<Claims, IdentityError> {
    let string = |name: &str| -> Result<Option<String>, IdentityError> {
        match all.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(claims_invalid(format!("`{name}` is not a string"))),
        }
    };
    let date = |name: &str| -> Result<Option<i64>, IdentityError> {
        match all.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
                claims_invalid(format!(
                    "`{name}` `{}` is not a 64-bit integer",
                    shown(&n.to_string())
                ))
            }),
            Some(_) => Err(claims_invalid(format!("`{name}` is not an integer"))),
        }
    };
    let aud = match all.get("aud") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(claims_invalid("`aud` holds a value that is not a string")),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => return Err(claims_invalid("`aud` is an empty array")),
        Some(_) => {
            return Err(claims_invalid(
                "`aud` is neither a string nor an array of strings",
            ));
        }
    };
    Ok(Claims {
        iss: string("iss")?,
        sub: string("sub")?,
        aud,
        exp: date("exp")?,
        nbf: date("nbf")?,
        iat: date("iat")?,
        jti: string("jti")?,
        all,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        B64.encode(s)
    }

    fn tok(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64(payload))
    }

    const PAYLOAD: &str = r#"{"iss":"i","sub":"s","exp":10}"#;

    fn code(token: &str) -> &'static str {
        match parse(token) {
            Ok(_) => "ok",
            Err(e) => e.code(),
        }
    }

    #[test]
    fn j02_alg_missing_or_junk_is_header_invalid() {
        for h in [
            r#"{}"#,
            r#"{"alg":""}"#,
            r#"{"alg":1}"#,
            r#"{"alg":null}"#,
            r#"{"alg":["RS256"]}"#,
            r#"{"alg":"RS256 "}"#,
            r#"{"alg":"rs256"}"#,
            r#"{"alg":"es256"}"#,
        ] {
            assert_eq!(code(&tok(h, PAYLOAD)), "header_invalid", "{h}");
        }
        assert_eq!(code(&tok(r#"{"alg":"ES256"}"#, PAYLOAD)), "ok");
    }

    #[test]
    fn j24_base64url_strictness() {
        let h = b64(r#"{"alg":"ES256"}"#);
        let p = b64(PAYLOAD);
        for t in [
            format!("{h}=.{p}.c2ln"),
            format!("{h}.{p}.c2ln="),
            format!("{h}.{p}.c2l+"),
            format!("{h}.{p}.c2l/"),
            format!("{h}.{p} .c2ln"),
            format!("{h}.{p}\n.c2ln"),
            format!("{h}.{p}.c2l"), // "si" with non-zero trailing bits (canonical: "c2k")
        ] {
            assert_eq!(code(&t), "token_malformed", "{t}");
        }
    }

    #[test]
    fn j25_wrong_structure() {
        let h = b64(r#"{"alg":"ES256"}"#);
        let p = b64(PAYLOAD);
        for t in [
            h.clone(),
            format!("{h}.{p}"),
            format!("{h}.{p}.c2ln.c2ln"),
            format!("{h}.{p}.c2ln.c2ln.c2ln"),
            format!(".{p}.c2ln"),
            format!("{h}..c2ln"),
            r#"{"payload":"e30","signatures":[]}"#.to_owned(),
        ] {
            assert_eq!(code(&t), "token_malformed", "{t}");
        }
    }

    #[test]
    fn j26_oversize_and_dot_floods_rejected_fast() {
        let start = std::time::Instant::now();
        let big = "a".repeat(1 << 20);
        assert_eq!(code(&big), "token_malformed");
        let dots = ".".repeat(1 << 20);
        assert_eq!(code(&dots), "token_malformed");
        // A dot flood under the size cap stops at the third dot.
        assert_eq!(code(&".".repeat(8000)), "token_malformed");
        assert!(start.elapsed() < std::time::Duration::from_millis(50));
        let big_header = tok(
            &format!(r#"{{"alg":"ES256","x":"{}"}}"#, "a".repeat(1100)),
            PAYLOAD,
        );
        assert_eq!(code(&big_header), "header_invalid");
    }

    #[test]
    fn j34_empty_signature_segment_rejected() {
        let h = b64(r#"{"alg":"ES256"}"#);
        let p = b64(PAYLOAD);
        assert_eq!(code(&format!("{h}.{p}.")), "token_malformed");
    }

    #[test]
    fn j14_date_claims_strict_types() {
        for p in [
            r#"{"exp":"10"}"#,
            r#"{"exp":10.5}"#,
            r#"{"exp":1e300}"#,
            r#"{"exp":true}"#,
            r#"{"exp":null}"#,
            r#"{"exp":9223372036854775808}"#,
            r#"{"nbf":"1"}"#,
            r#"{"iat":1.0}"#,
            r#"{"aud":[]}"#,
            r#"{"aud":1}"#,
            r#"{"aud":["a",1]}"#,
            r#"{"sub":1}"#,
            r#"{"iss":null}"#,
            r#"{"jti":1}"#,
            r#"[]"#,
        ] {
            assert_eq!(code(&tok(r#"{"alg":"ES256"}"#, p)), "claims_invalid", "{p}");
        }
        assert_eq!(code(&tok(r#"{"alg":"ES256"}"#, r#"{"exp":-5}"#)), "ok");
    }
}
