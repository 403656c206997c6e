//! Workload identity: who is asking, proven by a JWT from a configured, trusted issuer
//! (shared/DESIGN.md §2, shared/SECURITY.md §1).
//!
//! The types below are the contract the rest of the crate uses. The pipeline lives in the
//! submodules, each one step of it:
//!
//! - [`crate::strict_json`] (shared with the API's request bodies): duplicate-rejecting,
//!   depth-limited JSON for untrusted bytes.
//! - `jws`: compact-serialization parsing before any cryptography (size, shape, base64url,
//!   header and claim types, forbidden header parameters).
//! - `jwks`: key-set documents to validated keys, each bound to its algorithms.
//! - `keys`: key sources (file, URL with refresh and bounded refetch, HMAC secret).
//! - `verify`: the [`Verifier`] and its verified-token cache.
//! - [`dev`]: dev-token minting with the key in `config/dev/`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

pub mod dev;
mod error;
mod jwks;
mod jws;
mod keys;
#[cfg(test)]
mod tests;
mod verify;

pub use error::{IdentityConfigError, IdentityError};
pub use keys::MISS_WAIT;
pub use verify::{CacheSettings, Verifier, parse_spiffe_id};

/// A verified caller, ready for policy evaluation. Built once per verified token and cached
/// with it, so the hot path never rebuilds it.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Cedar entity type, from the issuer's `principal_type` (e.g. `Agent`).
    pub kind: String,
    /// Cedar entity id: the token's `sub` (a SPIFFE ID for JWT-SVIDs).
    pub id: String,
    /// The configured name of the issuer that vouched for this principal (or `pep:<name>`
    /// when a trusted enforcement point named the subject).
    pub issuer: String,
    /// `jti`, when the token has one.
    pub token_id: Option<String>,
    /// `exp` (unix seconds); the cache never keeps the principal past it.
    pub expires_at: i64,
    /// The principal's Cedar attributes (mapped claims plus profile attributes), as JSON.
    pub attributes: Map<String, Value>,
    /// RFC 8693 `act` chain: the current actor first, then prior actors.
    pub actors: Vec<String>,
    /// The owner (claim mapped to `owner`), used by approvals for separation of duties.
    pub owner: Option<String>,
    /// Groups (claim mapped to `groups`), used by approver checks.
    pub groups: Vec<String>,
    /// True when `aud` held more than one audience (SVID §6.2 replay risk: flagged in audit).
    pub multi_audience: bool,
    /// SHA-256 of the token this principal was verified from, when it came through the
    /// token cache: it stands for the whole credential in decision-cache keys, so the token
    /// is hashed once per request, not twice.
    pub credential_digest: Option<[u8; 32]>,
    /// The Cedar entity, built once.
    pub entity: Arc<cedar_policy::Entity>,
    /// An entity store holding only this principal, built once: a check whose resource
    /// needs no entity of its own evaluates against it without building a store.
    pub entities: Arc<cedar_policy::Entities>,
}

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

impl Principal {
    /// A principal named by a trusted party instead of a token: an enforcement point passing
    /// an AuthZEN subject, or a policy test case. `issuer` says who vouched for it.
    pub fn from_parts(
        kind: &str,
        id: &str,
        issuer: &str,
        attributes: Map<String, Value>,
    ) -> Result<Self, crate::policy::values::ValueError> {
        let entity = crate::policy::values::entity_from_json(
            "subject.properties",
            kind,
            id,
            &attributes,
            Default::default(),
        )?;
        let owner = attributes
            .get("owner")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let groups = match attributes.get("groups") {
            Some(Value::String(g)) => vec![g.clone()],
            Some(Value::Array(gs)) => gs
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            kind: kind.to_owned(),
            id: id.to_owned(),
            issuer: issuer.to_owned(),
            token_id: None,
            expires_at: i64::MAX,
            attributes,
            actors: Vec::new(),
            owner,
            groups,
            multi_audience: false,
            credential_digest: None,
            entities: Arc::new(crate::policy::values::store_of(&entity)?),
            entity: Arc::new(entity),
        })
    }
}
