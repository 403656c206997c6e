//! Workload identity: who is asking, proven by a JWT from a configured, trusted issuer
//! (docs/design.md §2, docs/security.md §1).
//!
//! The types below are the contract the rest of the crate uses. The pipeline lives in the
//! submodules, each one step of it:
//!
//! - [`crate::strict_json`] (shared with the API's request bodies): duplicate-rejecting,
//!   depth-limited JSON for untrusted bytes.
//! - `jws`: compact-serialization parsing before any cryptography (size, shape, base64url,
//!   header and claim types, forbidden header parameters).
//! - `jwks`: key-set documents to validated keys, each bound to its algorithms.
//! - `keys`: the `KeySource` trait and, over any source, refresh, bounded refetch on an
//!   unknown `kid` and last-known-good; HMAC secrets.
//! - `sources`: the configured key sources, a JWKS file and a JWKS URL.
//! - `verify`: the [`Verifier`] and its verified-token cache.
//! - [`dev`]: dev-token minting with the key in `config/dev/`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub mod dev;
mod error;
pub(crate) mod jwks;
mod jws;
mod keys;
mod sources;
#[cfg(test)]
mod tests;
mod verify;

pub use error::{IdentityConfigError, IdentityError};
pub use keys::MISS_WAIT;
pub use verify::{CacheSettings, Verifier, parse_spiffe_id};

/// Which token profile an issuer follows; each applies its own extra checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// SPIFFE JWT-SVID: `sub` is a SPIFFE ID in `trust_domain`; header params alg/kid/typ only;
    /// RS/ES/PS algorithms only.
    Spiffe,
    /// Kubernetes projected service account token: the `kubernetes.io` claims are required.
    Kubernetes,
    /// Any OIDC / OAuth2 JWT access token.
    Oidc,
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    File(PathBuf),
    Url {
        url: String,
        /// Longest time between background refreshes (1 s to 1 h). A server's
        /// `Cache-Control: max-age` may shorten it (never below 30 s), never lengthen it.
        refresh: Duration,
        /// At most one refetch for an unknown `kid` per this interval.
        min_refetch_interval: Duration,
        /// Last good keys are used at most this long after the last successful fetch.
        max_staleness: Duration,
        /// Bound on one fetch, connection and TLS handshake included (at most 5 s).
        fetch_timeout: Duration,
        /// PEM file of the CA certificates trusted for this URL, instead of the system's
        /// roots (`None`: the system's roots).
        ca_file: Option<PathBuf>,
    },
}

/// One trusted issuer, as validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuerSettings {
    /// Short name used in audit records and errors (`dev`, `spire`, `k8s`).
    pub name: String,
    /// Exact `iss` value.
    pub issuer: String,
    pub profile: Profile,
    /// At least one must be in the token's `aud`.
    pub audiences: Vec<String>,
    /// Allowed `alg` values; never `none`; HS* only with `hmac_secret`.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub jwks: Option<JwksSource>,
    /// Shared secret for HS* (at least 32 bytes).
    pub hmac_secret: Option<Vec<u8>>,
    pub leeway: Duration,
    /// Longest accepted `exp - iat` (or `exp - now` when `iat` is absent).
    pub max_lifetime: Duration,
    /// SPIFFE trust domain (required for the SPIFFE profile).
    pub trust_domain: Option<String>,
    /// Cedar entity type of principals from this issuer.
    pub principal_type: String,
    /// Cedar attribute name -> claim name (dotted path allowed, e.g. `kubernetes.io.namespace`).
    pub claims: BTreeMap<String, String>,
    /// Accepted `typ` header values (empty: any of `JWT`, `at+jwt`, absent).
    pub typ: Vec<String>,
}
