//! Why a token or an issuer configuration was refused: one variant per stable reason code
//! (docs/security.md §1.0), each message naming the field and the offending value.

use std::path::PathBuf;

/// Caller-controlled text made safe to echo (shared with request-body errors).
pub(crate) use crate::strict_json::shown;

/// Every reason a token is refused. [`IdentityError::code`] is the stable reason used in 401
/// bodies and audit records; the message is for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no bearer token in the request")]
    Missing,
    #[error("more than one credential in the request")]
    Ambiguous,
    #[error("malformed token: {0}")]
    TokenMalformed(String),
    #[error("invalid token header: {0}")]
    HeaderInvalid(String),
    #[error("header parameter `{0}` is not accepted")]
    HeaderParamForbidden(String),
    #[error("algorithm `{alg}` is not allowed: {reason}")]
    AlgNotAllowed { alg: String, reason: String },
    #[error("issuer `{0}` is not trusted")]
    IssuerUnknown(String),
    #[error("issuer `{issuer}` has no key `{kid}`")]
    KeyUnknown { issuer: String, kid: String },
    #[error("issuer `{0}` has no usable keys")]
    KeyUnavailable(String),
    #[error("signature verification failed")]
    SignatureInvalid,
    #[error("invalid claims: {0}")]
    ClaimsInvalid(String),
    #[error("token expired at {exp} (now {now}, leeway {leeway}s)")]
    TokenExpired { exp: i64, now: i64, leeway: u64 },
    #[error("token not valid before `{claim}` {at} (now {now}, leeway {leeway}s)")]
    TokenNotYetValid {
        claim: &'static str,
        at: i64,
        now: i64,
        leeway: u64,
    },
    #[error("token lifetime {lifetime}s exceeds the maximum of {max}s")]
    TokenLifetimeExcessive { lifetime: i128, max: u64 },
    #[error("`iss` `{0}` does not match the issuer")]
    IssMismatch(String),
    #[error("{0}")]
    AudMismatch(String),
    #[error("invalid `sub`: {0}")]
    SubInvalid(String),
    #[error("{0}")]
    ProfileViolation(String),
    /// An identity a proxy asserts (Envoy's `jwt_authn` payload, an mTLS peer) from a caller
    /// that did not prove it is an enforcement point.
    #[error("{0}")]
    AssertionUntrusted(String),
}

impl IdentityError {
    /// The stable snake_case reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "token_missing",
            Self::Ambiguous => "token_ambiguous",
            Self::TokenMalformed(_) => "token_malformed",
            Self::HeaderInvalid(_) => "header_invalid",
            Self::HeaderParamForbidden(_) => "header_param_forbidden",
            Self::AlgNotAllowed { .. } => "alg_not_allowed",
            Self::IssuerUnknown(_) => "issuer_unknown",
            Self::KeyUnknown { .. } => "key_unknown",
            Self::KeyUnavailable(_) => "key_unavailable",
            Self::SignatureInvalid => "signature_invalid",
            Self::ClaimsInvalid(_) => "claims_invalid",
            Self::TokenExpired { .. } => "token_expired",
            Self::TokenNotYetValid { .. } => "token_not_yet_valid",
            Self::TokenLifetimeExcessive { .. } => "token_lifetime_excessive",
            Self::IssMismatch(_) => "iss_mismatch",
            Self::AudMismatch(_) => "aud_mismatch",
            Self::SubInvalid(_) => "sub_invalid",
            Self::ProfileViolation(_) => "profile_violation",
            Self::AssertionUntrusted(_) => "assertion_untrusted",
        }
    }

    pub(crate) fn alg(alg: &str, reason: impl Into<String>) -> Self {
        Self::AlgNotAllowed {
            alg: shown(alg),
            reason: reason.into(),
        }
    }
}

/// An issuer configuration the verifier cannot use; names the issuer and the field.
#[derive(Debug, thiserror::Error)]
pub enum IdentityConfigError {
    #[error("issuer `{issuer}`: `{field}`: {message}")]
    Invalid {
        issuer: String,
        field: &'static str,
        message: String,
    },
    #[error("issuer `{issuer}`: cannot read jwks file `{}`: {source}", path.display())]
    JwksFileRead {
        issuer: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("issuer `{issuer}`: jwks file `{}`: {message}", path.display())]
    JwksFileInvalid {
        issuer: String,
        path: PathBuf,
        message: String,
    },
}

impl IdentityConfigError {
    pub(crate) fn invalid(issuer: &str, field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            issuer: issuer.to_owned(),
            field,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_lowercase_and_name_values() {
        let e = IdentityError::TokenExpired {
            exp: 1_700_000_000,
            now: 1_700_000_100,
            leeway: 60,
        };
        assert_eq!(
            e.to_string(),
            "token expired at 1700000000 (now 1700000100, leeway 60s)"
        );
        assert_eq!(e.code(), "token_expired");
    }
}
