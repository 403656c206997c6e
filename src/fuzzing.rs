//! Entry points for the standing fuzz targets (docs/security.md §3.6, F-01 to F-04): thin
//! wrappers that reach the private parsers, each checking its oracle and returning what it
//! saw wrong as a [`Violation`], never panicking itself.
//!
//! Two drivers call them: the cargo-fuzz crate in `fuzz/` (libFuzzer, coverage-guided) and
//! the stable, seeded mutator of `tests/fuzz.rs`. Both start from the seed corpus committed
//! in `fuzz/seeds/<target>/`. Not part of Mandate's interface: hidden from the docs, and
//! nothing else in the crate calls it.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::body::Body as _;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use crate::api::{ApiError, authzen, body, http};
use crate::clock::{Clock, ManualClock};
use crate::decision::Engine;
use crate::identity::jwks::{self, MAX_JWKS_BYTES, MAX_JWKS_KEYS};
use crate::identity::{CacheSettings, IssuerSettings, JwksSource, Profile, Verifier};
use crate::policy::Bundle;
use crate::service::Caller;
use crate::vocabulary::{CheckRequest, Outcome, Principal};

/// The fixed clock of every target (2027-01-15): the committed valid tokens were minted at
/// this time and stay valid against it forever.
pub const CLOCK: i64 = 1_800_000_000;
/// The shared secret of the HS256 issuer of the token target.
pub const HMAC_SECRET: &[u8] = b"mandate-fuzz-hmac-secret-0123456789abcdef";
/// Exact `iss` of the ES256 OIDC issuer (the dev key set).
pub const OIDC_ISSUER: &str = "https://dev.mandate.invalid";
/// Exact `iss` of the ES256 SPIFFE issuer (the same key set; trust domain `example.org`).
pub const SPIFFE_ISSUER: &str = "https://svid.mandate.invalid";
/// Exact `iss` of the HS256 issuer.
pub const HMAC_ISSUER: &str = "https://hmac.mandate.invalid";

/// An oracle that failed: what a target saw that must never happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Violation(pub String);

/// A target that could not be set up (a missing seed file or key set).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fuzz target setup: {0}")]
pub struct SetupError(pub String);

fn violation(message: impl Into<String>) -> Result<(), Violation> {
    Err(Violation(message.into()))
}

/// Stable codes are snake_case ASCII: `token_malformed`, `invalid_request`.
fn is_code(code: &str) -> bool {
    !code.is_empty()
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

const ALL_ALGS: &[Algorithm] = &[
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// F-01: the whole verification pipeline of docs/security.md §1.0 with fixed keys and a
/// fixed clock. Three issuers: ES256 OIDC and ES256 SPIFFE on the key set at `jwks_file`,
/// and HS256 OIDC on [`HMAC_SECRET`].
pub struct Tokens {
    verifier: Verifier,
    runtime: tokio::runtime::Runtime,
    known_valid: HashSet<Vec<u8>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("known_valid", &self.known_valid.len())
            .finish_non_exhaustive()
    }
}

fn issuer(name: &str, iss: &str, profile: Profile, alg: Algorithm) -> IssuerSettings {
    let claims: BTreeMap<String, String> = [("owner", "owner"), ("groups", "groups")]
        .into_iter()
        .map(|(a, c)| (a.to_owned(), c.to_owned()))
        .collect();
    IssuerSettings {
        name: name.to_owned(),
        issuer: iss.to_owned(),
        profile,
        audiences: vec!["mandate".to_owned()],
        algorithms: vec![alg],
        jwks: None,
        hmac_secret: None,
        leeway: Duration::from_secs(30),
        max_lifetime: Duration::from_secs(3600),
        trust_domain: None,
        principal_type: "Agent".to_owned(),
        claims,
        typ: Vec::new(),
    }
}

impl Tokens {
    /// The verifier over the key set at `jwks_file`; `known_valid` are the tokens that do
    /// verify (the committed `valid-*` seeds). Every other input must be refused.
    pub fn new(
        jwks_file: &Path,
        known_valid: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<Self, SetupError> {
        let mut oidc = issuer("dev", OIDC_ISSUER, Profile::Oidc, Algorithm::ES256);
        oidc.jwks = Some(JwksSource::File(jwks_file.to_owned()));
        let mut svid = issuer("svid", SPIFFE_ISSUER, Profile::Spiffe, Algorithm::ES256);
        svid.jwks = Some(JwksSource::File(jwks_file.to_owned()));
        svid.trust_domain = Some("example.org".to_owned());
        let mut hmac = issuer("hmac", HMAC_ISSUER, Profile::Oidc, Algorithm::HS256);
        hmac.hmac_secret = Some(HMAC_SECRET.to_vec());
        let clock: Arc<dyn Clock> = ManualClock::new(CLOCK);
        let verifier = Verifier::new(vec![oidc, svid, hmac], CacheSettings::default(), clock)
            .map_err(|e| SetupError(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| SetupError(e.to_string()))?;
        Ok(Self {
            verifier,
            runtime,
            known_valid: known_valid.into_iter().collect(),
        })
    }

    /// Verify `data` as a bearer token: never `Ok` unless it is a known-valid token; every
    /// refusal carries a stable code and a message.
    pub fn check(&self, data: &[u8]) -> Result<(), Violation> {
        // A bearer header is visible ASCII; what is not even UTF-8 never reaches the verifier.
        let Ok(token) = std::str::from_utf8(data) else {
            return Ok(());
        };
        match self.runtime.block_on(self.verifier.verify_uncached(token)) {
            Ok(p) if self.known_valid.contains(data) => {
                if p.id.is_empty() {
                    return violation("a verified token gave a principal with no id");
                }
                Ok(())
            }
            Ok(p) => violation(format!(
                "a token that is not a known-valid seed verified (principal `{}`, issuer `{}`)",
                p.id, p.issuer
            )),
            Err(e) if !is_code(e.code()) || e.to_string().is_empty() => {
                violation(format!("refusal without a code or message: {e:?}"))
            }
            Err(_) => Ok(()),
        }
    }
}

/// F-02: a key-set document, read as each kind of issuer would read it (every algorithm,
/// ES256 only, RSA only). No panic; a document over the size cap or with too many keys is
/// never accepted; every key found answers lookups.
pub fn jwks(data: &[u8]) -> Result<(), Violation> {
    let rsa = [Algorithm::RS256, Algorithm::PS256];
    for allowed in [ALL_ALGS, &[Algorithm::ES256][..], &rsa[..]] {
        match jwks::parse(data, allowed, "fuzz") {
            Ok(_) if data.len() > MAX_JWKS_BYTES => {
                return violation(format!(
                    "a key set of {} bytes was accepted (cap {MAX_JWKS_BYTES})",
                    data.len()
                ));
            }
            Ok(set) if set.len() > MAX_JWKS_KEYS => {
                return violation(format!("{} keys accepted", set.len()));
            }
            Ok(set) => {
                for alg in ALL_ALGS {
                    let _ = set.lookup(None, *alg);
                    let _ = set.lookup(Some("dev-1"), *alg);
                }
            }
            Err(e) if e.to_string().is_empty() => {
                return violation("a key set refused without a message");
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// F-04: the native check body and the AuthZEN body, parsed as each kind of caller sends
/// them, and every request that parses decided by the engine on the bundle given.
pub struct Bodies {
    engine: Engine,
    callers: [Caller; 2],
}

impl std::fmt::Debug for Bodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bodies").finish_non_exhaustive()
    }
}

impl Bodies {
    /// The engine on the bundle in `bundle_dir` (the example bundle), at [`CLOCK`]; an agent
    /// caller and an enforcement point.
    pub fn new(bundle_dir: &Path) -> Result<Self, SetupError> {
        let bundle = Bundle::load(bundle_dir).map_err(|e| SetupError(e.to_string()))?;
        let mut attrs = Map::new();
        attrs.insert("owner".into(), Value::from("bob"));
        let agent = Principal::from_parts("Agent", "agent-1", "dev", attrs)
            .map_err(|e| SetupError(e.to_string()))?;
        Ok(Self {
            engine: Engine::new(Arc::new(bundle), ManualClock::new(CLOCK)),
            callers: [
                Caller::Agent(Arc::new(agent)),
                Caller::EnforcementPoint {
                    name: "fuzz".to_owned(),
                },
            ],
        })
    }

    /// A `POST /v1/check` body. Besides the common oracle, the one-pass reader must answer
    /// what the field-by-field reader answers wherever it answers at all.
    pub fn check_body(&self, data: &[u8]) -> Result<(), Violation> {
        for caller in &self.callers {
            match http::parse_check(caller, data) {
                Ok(req) => self.decided(&req)?,
                Err(e) => well_formed(&e)?,
            }
        }
        if let Some((action, resource, context)) = body::quick_check(data) {
            match http::read_check(data) {
                Ok((None, a, r, c)) if a == action && r == resource && c == context => {}
                other => {
                    return violation(format!(
                        "the one-pass reader gave ({action:?}, {resource:?}, {context:?}), \
                         the field-by-field reader {other:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// A `POST /access/v1/evaluation(s)` body: single or boxcarred.
    pub fn authzen_body(&self, data: &[u8]) -> Result<(), Violation> {
        let map = match body::parse_object(data) {
            Ok(map) => map,
            Err(e) => return well_formed(&e),
        };
        for caller in &self.callers {
            match authzen::requests(caller, &map) {
                Ok(items) => {
                    for item in items {
                        match item {
                            Ok(req) => self.decided(&req)?,
                            Err(e) => well_formed(&e)?,
                        }
                    }
                }
                Err(e) => well_formed(&e)?,
            }
        }
        Ok(())
    }

    /// A decision is exactly one outcome, with reasons, an approval requirement exactly when
    /// it escalates, and the version of the bundle that made it.
    fn decided(&self, req: &CheckRequest) -> Result<(), Violation> {
        let d = self.engine.decide(req);
        if d.reasons.is_empty() || d.reasons.iter().any(|r| !is_code(r.code)) {
            return violation(format!("a decision without proper reasons: {d:?}"));
        }
        if (d.outcome == Outcome::Escalate) != d.approval.is_some() {
            return violation(format!("approval requirement and outcome disagree: {d:?}"));
        }
        if d.policy_version.is_empty() {
            return violation("a decision without a policy version");
        }
        Ok(())
    }
}

/// Every refusal of a body is a 4xx with a stable code and a message, and renders as the
/// JSON error body the API documents.
fn well_formed(e: &ApiError) -> Result<(), Violation> {
    if !e.status.is_client_error() {
        return violation(format!("a body refused with status {}: {e:?}", e.status));
    }
    // A field may be named by the empty string: that is the member the body sent, `{"": 1}`.
    if !is_code(e.code) || e.message.is_empty() {
        return violation(format!("a malformed refusal: {e:?}"));
    }
    let resp = e.clone().into_response();
    if resp.status() != e.status {
        return violation(format!("the response status is not the error's: {e:?}"));
    }
    let mut body = resp.into_body();
    let mut cx = Context::from_waker(Waker::noop());
    let bytes = match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => return violation(format!("the error body is not one ready frame: {e:?}")),
    };
    let json: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(err) => return violation(format!("the error body is not JSON ({err}): {e:?}")),
    };
    if json["error"] != e.code || json["message"] != e.message.as_str() {
        return violation(format!("the error body {json} does not say {e:?}"));
    }
    Ok(())
}

const MANIFEST: &[u8] = b"name = \"fuzz\"\nrevision = \"1\"\n";

/// F-03: a policy bundle, written into a directory of its own and loaded as `Bundle::load`
/// loads any bundle. The input is up to five parts separated by NUL bytes: the policies
/// (`policies.cedar`), the schema, `entities.json`, a test file (`tests/fuzz.yaml`) and the
/// manifest (a valid one when absent). A refusal names at least one problem, each with a
/// message; a bundle that loads prints every policy in a form that parses back to the same
/// policy (parse ∘ print = id), and its test cases run.
#[derive(Debug)]
pub struct Bundles {
    dir: PathBuf,
}

impl Bundles {
    /// Use `dir` (created if missing, owned by this target: its files are overwritten).
    pub fn new(dir: PathBuf) -> Result<Self, SetupError> {
        std::fs::create_dir_all(dir.join("tests")).map_err(|e| SetupError(e.to_string()))?;
        Ok(Self { dir })
    }

    pub fn load(&self, data: &[u8]) -> Result<(), Violation> {
        let parts: Vec<&[u8]> = data.splitn(5, |b| *b == 0).collect();
        let part = |i: usize| parts.get(i).copied().filter(|p| !p.is_empty());
        let files: [(&str, Option<&[u8]>); 5] = [
            ("policies.cedar", part(0)),
            ("schema.cedarschema", part(1)),
            ("entities.json", part(2)),
            ("tests/fuzz.yaml", part(3)),
            ("manifest.toml", Some(part(4).unwrap_or(MANIFEST))),
        ];
        for (name, content) in files {
            let path = self.dir.join(name);
            let written = match content {
                Some(c) => std::fs::write(&path, c),
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                },
            };
            if let Err(e) = written {
                return violation(format!("cannot write `{}`: {e}", path.display()));
            }
        }
        match Bundle::load(&self.dir) {
            Err(e) if e.problems.is_empty() => violation("a bundle refused with no problem"),
            Err(e) if e.problems.iter().any(|p| p.message.is_empty()) => {
                violation(format!("a problem without a message: {e}"))
            }
            Err(_) => Ok(()),
            Ok(bundle) => round_trip(bundle),
        }
    }
}

fn round_trip(bundle: Bundle) -> Result<(), Violation> {
    for policy in bundle.policy_set().policies() {
        let text = policy.to_string();
        let again = match cedar_policy::Policy::parse(None, &text) {
            Ok(p) => p,
            Err(e) => return violation(format!("a loaded policy prints as `{text}`: {e}")),
        };
        match (policy.to_json(), again.to_json()) {
            (Ok(a), Ok(b)) if a == b => {}
            (a, b) => {
                return violation(format!(
                    "policy `{}` does not survive print and parse: {a:?} became {b:?}",
                    policy.id()
                ));
            }
        }
    }
    // The bundle's own test cases run through the engine without a panic.
    let _ = crate::decision::cases::run(&Arc::new(bundle));
    Ok(())
}
