//! The token verifier: the whole pipeline of docs/security.md §1.0, each step its own check
//! in order, and the verified-token cache that makes the hot path a hash and a lookup.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use moka::Expiry;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::error::{IdentityConfigError, IdentityError, shown};
use super::jwks::Lookup;
use super::jws::{self, Claims, Header};
#[cfg(test)]
use super::keys::KeySource;
use super::keys::{IssuerKeys, OnKeysRemoved};
use super::{IssuerSettings, Profile};
use crate::clock::Clock;
use crate::metrics::{Lookups, Metrics};
use crate::vocabulary::Principal;

/// Longest `sub` accepted, in bytes (SPIFFE IDs are capped at 2048 as well).
const MAX_SUB_LEN: usize = 2048;
/// Deepest RFC 8693 `act` chain accepted.
const MAX_ACT_DEPTH: usize = 8;

const SPIFFE_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Verified-token cache sizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    pub max_entries: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
        }
    }
}

type TokenCache = moka::sync::Cache<[u8; 32], Arc<Principal>>;

/// Verifies bearer tokens against the configured issuers. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    issuers: Vec<Arc<IssuerKeys>>,
    /// Exact `iss` bytes to the issuer's index.
    by_iss: HashMap<String, usize>,
    cache: TokenCache,
    clock: Arc<dyn Clock>,
    /// Where verifications and cache lookups are counted, once telemetry is wired.
    metrics: std::sync::OnceLock<Metrics>,
    /// Token cache hits and misses.
    lookups: Lookups,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuers", &self.inner.issuers)
            .field("cached", &self.inner.cache.entry_count())
            .finish()
    }
}

/// Cache entries expire at the token's `exp`, measured with the injected clock.
struct ExpireAtExp {
    clock: Arc<dyn Clock>,
}

impl Expiry<[u8; 32], Arc<Principal>> for ExpireAtExp {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Principal>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let left = value.expires_at.saturating_sub(self.clock.now_unix());
        Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
    }
}

fn check_settings(s: &IssuerSettings) -> Result<(), IdentityConfigError> {
    let bad = |field, msg: &str| Err(IdentityConfigError::invalid(&s.name, field, msg));
    if s.name.is_empty() {
        return bad("name", "must not be empty");
    }
    if s.issuer.is_empty() {
        return bad("issuer", "must not be empty");
    }
    if s.audiences.is_empty() || s.audiences.iter().any(String::is_empty) {
        return bad("audiences", "at least one non-empty audience is required");
    }
    if s.principal_type.is_empty() {
        return bad("principal_type", "must not be empty");
    }
    if s.profile == Profile::Spiffe {
        if let Some(a) = s.algorithms.iter().find(|a| !SPIFFE_ALGS.contains(a)) {
            return Err(IdentityConfigError::invalid(
                &s.name,
                "algorithms",
                format!("`{a:?}` is not allowed for JWT-SVIDs (RS/ES/PS only)"),
            ));
        }
        match &s.trust_domain {
            Some(td) if valid_trust_domain(td) => {}
            Some(td) => {
                return Err(IdentityConfigError::invalid(
                    &s.name,
                    "trust_domain",
                    format!("`{}` is not a valid SPIFFE trust domain", shown(td)),
                ));
            }
            None => return bad("trust_domain", "required for the spiffe profile"),
        }
    }
    Ok(())
}

impl Verifier {
    /// Load `File` issuers now; URL issuers start empty and are fetched by [`Verifier::start`].
    pub fn new(
        issuers: Vec<IssuerSettings>,
        cache: CacheSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IdentityConfigError> {
        Self::build(issuers, cache, clock, IssuerKeys::new)
    }

    /// As [`Verifier::new`], with each issuer's keys from the source `source_for` gives it
    /// (`None`: HMAC only) instead of its `jwks` setting: how tests substitute a key source.
    #[cfg(test)]
    pub(crate) fn with_key_sources(
        issuers: Vec<IssuerSettings>,
        cache: CacheSettings,
        clock: Arc<dyn Clock>,
        mut source_for: impl FnMut(&IssuerSettings) -> Option<Arc<dyn KeySource>>,
    ) -> Result<Self, IdentityConfigError> {
        Self::build(issuers, cache, clock, |s, clock, on_removed| {
            let source = source_for(&s);
            IssuerKeys::with_source(s, source, clock, on_removed)
        })
    }

    fn build(
        issuers: Vec<IssuerSettings>,
        cache: CacheSettings,
        clock: Arc<dyn Clock>,
        mut issuer_keys: impl FnMut(
            IssuerSettings,
            Arc<dyn Clock>,
            OnKeysRemoved,
        ) -> Result<IssuerKeys, IdentityConfigError>,
    ) -> Result<Self, IdentityConfigError> {
        let token_cache: TokenCache = moka::sync::Cache::builder()
            .max_capacity(cache.max_entries)
            .expire_after(ExpireAtExp {
                clock: Arc::clone(&clock),
            })
            .build();
        // Simplest correct answer to a key removal: forget every verified token, so none
        // verified with a withdrawn key outlives the refresh that withdrew it (K-12, K-13).
        let on_removed: OnKeysRemoved = {
            let c = token_cache.clone();
            Arc::new(move || c.invalidate_all())
        };
        let mut by_iss = HashMap::new();
        let mut names = HashSet::new();
        let mut keyed = Vec::with_capacity(issuers.len());
        for (i, s) in issuers.into_iter().enumerate() {
            check_settings(&s)?;
            if !names.insert(s.name.clone()) {
                return Err(IdentityConfigError::invalid(
                    &s.name,
                    "name",
                    "configured twice",
                ));
            }
            if by_iss.insert(s.issuer.clone(), i).is_some() {
                return Err(IdentityConfigError::invalid(
                    &s.name,
                    "issuer",
                    format!("`{}` is configured twice", s.issuer),
                ));
            }
            keyed.push(Arc::new(issuer_keys(
                s,
                Arc::clone(&clock),
                Arc::clone(&on_removed),
            )?));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                issuers: keyed,
                by_iss,
                cache: token_cache,
                clock,
                metrics: std::sync::OnceLock::new(),
                lookups: Lookups::default(),
            }),
        })
    }

    /// First fetch of every URL issuer (concurrently, each bounded by the fetch timeout),
    /// then background refresh.
    pub async fn start(&self) {
        let mut set = tokio::task::JoinSet::new();
        for issuer in self.inner.issuers.iter().filter(|i| i.is_refreshed()) {
            let issuer = Arc::clone(issuer);
            set.spawn(async move { issuer.start().await });
        }
        while set.join_next().await.is_some() {}
    }

    /// True when every issuer can verify tokens now.
    pub fn ready(&self) -> bool {
        self.inner.issuers.iter().all(|i| i.ready())
    }

    pub fn issuer_names(&self) -> Vec<String> {
        self.inner
            .issuers
            .iter()
            .map(|i| i.settings.name.clone())
            .collect()
    }

    /// Issuers (by name) whose latest JWKS fetch failed, each with why (naming the URL).
    pub fn jwks_errors(&self) -> Vec<(String, String)> {
        self.inner
            .issuers
            .iter()
            .filter_map(|i| i.last_error().map(|e| (i.settings.name.clone(), e)))
            .collect()
    }

    /// Count verifications and token cache lookups in `metrics` from now on (the first call
    /// wins).
    pub fn record_into(&self, metrics: Metrics) {
        let _ = self.inner.metrics.set(metrics);
    }

    fn metrics(&self) -> &Metrics {
        self.inner.metrics.get().unwrap_or(Metrics::off())
    }

    /// Token cache (hits, misses) so far.
    pub fn cache_counts(&self) -> (u64, u64) {
        self.inner.lookups.counts()
    }

    /// JWKS fetches attempted and failed, by issuer name, for the issuers that fetch.
    pub fn fetch_counts(&self) -> Vec<(String, u64, u64)> {
        self.inner
            .issuers
            .iter()
            .filter(|i| i.is_refreshed())
            .map(|i| (i.settings.name.clone(), i.fetch_count(), i.fetch_failures()))
            .collect()
    }

    /// JWKS fetches attempted for `issuer` (by name) so far.
    pub fn fetch_count(&self, issuer: &str) -> u64 {
        self.inner
            .issuers
            .iter()
            .find(|i| i.settings.name == issuer)
            .map_or(0, |i| i.fetch_count())
    }

    /// The hot path: a cache hit costs a SHA-256 and a lookup.
    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>, IdentityError> {
        // Hashing an oversized token would be wasted work; the pipeline refuses it anyway.
        if token.len() <= jws::MAX_TOKEN_LEN {
            let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if let Some(p) = self.inner.cache.get(&key) {
                // The cache's own expiry runs on its timer; this check makes `exp` exact.
                if p.expires_at > self.inner.clock.now_unix() {
                    self.inner.lookups.record(true);
                    return Ok(p);
                }
                self.inner.cache.invalidate(&key);
            }
            self.inner.lookups.record(false);
            let mut p = self.verify_uncached(token).await?;
            p.credential_digest = Some(key);
            let p = Arc::new(p);
            self.inner.cache.insert(key, Arc::clone(&p));
            return Ok(p);
        }
        self.verify_uncached(token).await.map(Arc::new)
    }

    /// The full pipeline, without the cache; counted by issuer and result.
    pub async fn verify_uncached(&self, token: &str) -> Result<Principal, IdentityError> {
        let mut issuer = None;
        let result = self.pipeline(token, &mut issuer).await;
        self.counted(issuer, result)
    }

    /// Count a verification that reached `issuer` (`None`: refused before one was found).
    fn counted(
        &self,
        issuer: Option<&str>,
        result: Result<Principal, IdentityError>,
    ) -> Result<Principal, IdentityError> {
        let code = result.as_ref().err().map_or("ok", IdentityError::code);
        let issuer = issuer.unwrap_or("none");
        self.metrics().token_verified(issuer, code);
        // One line per refusal, with the reason; never the credential (a reason quotes a
        // claim only through `shown`, bounded and escaped).
        if let Err(e) = &result {
            tracing::info!(issuer, code, reason = %e, "credential refused");
        }
        result
    }

    async fn pipeline<'a>(
        &'a self,
        token: &str,
        seen: &mut Option<&'a str>,
    ) -> Result<Principal, IdentityError> {
        // Steps 1–5: structure, before anything is looked up.
        let parsed = jws::parse(token)?;
        let Header {
            alg,
            kid,
            typ,
            other_param,
        } = parsed.header;
        let claims = parsed.claims;

        // Step 6: route by the unverified `iss`; an unknown issuer costs no I/O.
        let issuer = self.issuer_of(&claims)?;
        let s = &issuer.settings;
        *seen = Some(&s.name);

        // Step 4, profile half: header parameters and `typ`.
        check_header_profile(s, other_param.as_deref(), typ.as_deref())?;

        // Step 7: the algorithm comes from configuration, never from the token.
        if !s.algorithms.contains(&alg) {
            return Err(IdentityError::alg(
                &format!("{alg:?}"),
                format!("issuer `{}` does not allow it", s.name),
            ));
        }

        // Step 8: key lookup, scoped to this issuer.
        let key = find_key(issuer, kid.as_deref(), alg).await?;

        // Step 9: signature.
        let valid = jsonwebtoken::crypto::verify(
            parsed.signature_b64,
            parsed.signing_input.as_bytes(),
            &key,
            alg,
        )
        .unwrap_or(false);
        // Fail closed: a key/alg the backend refuses is a failed signature, never a pass.
        if !valid {
            return Err(IdentityError::SignatureInvalid);
        }

        admit(s, &claims, self.inner.clock.now_unix())
    }

    /// The principal of a claim set another verifier checked the signature of: the payload
    /// Envoy's `jwt_authn` filter verified and put in the `ext_authz` `metadata_context`.
    /// Everything after the signature is checked here as for a token (issuer, times,
    /// audience, `sub`, profile, claim mapping), so Envoy's filter being configured more
    /// loosely than the issuer here (another audience, a longer lifetime) admits nothing
    /// more. The caller decides whether the message came from someone entitled to say so.
    pub fn principal_from_verified_claims(
        &self,
        payload: Map<String, Value>,
    ) -> Result<Principal, IdentityError> {
        let claims = match jws::claims_from_map(payload) {
            Ok(c) => c,
            Err(e) => return self.counted(None, Err(e)),
        };
        let issuer = match self.issuer_of(&claims) {
            Ok(i) => i,
            Err(e) => return self.counted(None, Err(e)),
        };
        let s = &issuer.settings;
        self.counted(
            Some(&s.name),
            admit(s, &claims, self.inner.clock.now_unix()),
        )
    }

    /// The configured issuer whose exact `iss` the claims name.
    fn issuer_of(&self, claims: &Claims) -> Result<&Arc<IssuerKeys>, IdentityError> {
        let iss = claims
            .iss
            .as_deref()
            .ok_or_else(|| IdentityError::ClaimsInvalid("`iss` is missing".into()))?;
        self.inner
            .by_iss
            .get(iss)
            .and_then(|i| self.inner.issuers.get(*i))
            .ok_or_else(|| IdentityError::IssuerUnknown(shown(iss)))
    }

    /// The principal of an mTLS peer whose SPIFFE ID the proxy verified
    /// (`attributes.source.principal`), read with issuer `issuer`'s trust domain, principal
    /// type and SPIFFE profile attributes (`trust_domain`, `path`). It carries no claims.
    pub fn peer_principal(
        &self,
        issuer: &str,
        spiffe_id: &str,
    ) -> Result<Principal, IdentityError> {
        let found = self
            .inner
            .issuers
            .iter()
            .map(|i| &i.settings)
            .find(|s| s.name == issuer && s.profile == Profile::Spiffe);
        let Some(s) = found else {
            return self.counted(None, Err(IdentityError::IssuerUnknown(shown(issuer))));
        };
        self.counted(Some(&s.name), peer_admit(s, spiffe_id))
    }
}

/// The principal of SPIFFE ID `spiffe_id` under `s`, with no claims but its `sub`.
fn peer_admit(s: &IssuerSettings, spiffe_id: &str) -> Result<Principal, IdentityError> {
    let sub = check_sub(Some(spiffe_id))?;
    let claims = Claims {
        iss: Some(s.issuer.clone()),
        sub: Some(sub.to_owned()),
        aud: Vec::new(),
        exp: None,
        nbf: None,
        iat: None,
        jti: None,
        all: Map::new(),
    };
    let attrs = check_profile(s, sub, &claims)?;
    build_principal(s, sub, &claims, attrs)
}

/// Steps 10–12, for a claim set whose signature is verified: times, `iss`, audience, `sub`,
/// the profile's own rules, then the principal.
fn admit(s: &IssuerSettings, claims: &Claims, now: i64) -> Result<Principal, IdentityError> {
    check_times(s, claims, now)?;
    let iss = claims.iss.as_deref().unwrap_or_default();
    if iss != s.issuer {
        return Err(IdentityError::IssMismatch(shown(iss)));
    }
    check_audience(s, claims)?;
    let sub = check_sub(claims.sub.as_deref())?;
    let profile_attrs = check_profile(s, sub, claims)?;
    build_principal(s, sub, claims, profile_attrs)
}

fn check_sub(sub: Option<&str>) -> Result<&str, IdentityError> {
    match sub {
        None => Err(IdentityError::SubInvalid("`sub` is missing".into())),
        Some("") => Err(IdentityError::SubInvalid("`sub` is empty".into())),
        Some(sub) if sub.len() > MAX_SUB_LEN => Err(IdentityError::SubInvalid(format!(
            "`sub` is longer than {MAX_SUB_LEN} bytes"
        ))),
        Some(sub) => Ok(sub),
    }
}

/// The key for (issuer, kid, alg), going through the bounded refetch on a miss.
async fn find_key(
    issuer: &Arc<IssuerKeys>,
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<Arc<jsonwebtoken::DecodingKey>, IdentityError> {
    let name = &issuer.settings.name;
    if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return issuer
            .hmac_key()
            .cloned()
            .ok_or_else(|| IdentityError::KeyUnavailable(name.clone()));
    }
    let mut refetched = false;
    loop {
        let Some(set) = issuer.current() else {
            if issuer.is_refreshed() && !refetched {
                refetched = true;
                issuer.refetch_on_miss().await;
                continue;
            }
            return Err(IdentityError::KeyUnavailable(name.clone()));
        };
        match set.lookup(kid, alg) {
            Lookup::Found(k) => return Ok(Arc::clone(k)),
            Lookup::WrongAlg => {
                return Err(IdentityError::alg(
                    &format!("{alg:?}"),
                    "the key is bound to another algorithm".to_owned(),
                ));
            }
            Lookup::Ambiguous => {
                return Err(IdentityError::KeyUnknown {
                    issuer: name.clone(),
                    kid: "(none; several keys could apply)".into(),
                });
            }
            Lookup::Unknown if issuer.is_refreshed() && !refetched => {
                refetched = true;
                issuer.refetch_on_miss().await;
            }
            Lookup::Unknown => {
                return Err(IdentityError::KeyUnknown {
                    issuer: name.clone(),
                    kid: kid.map_or_else(|| "(none)".to_owned(), shown),
                });
            }
        }
    }
}

fn check_header_profile(
    s: &IssuerSettings,
    other_param: Option<&str>,
    typ: Option<&str>,
) -> Result<(), IdentityError> {
    if s.profile == Profile::Spiffe {
        // JWT-SVID: "Any header not described here MUST NOT be included".
        if let Some(p) = other_param {
            return Err(IdentityError::HeaderParamForbidden(p.to_owned()));
        }
        if let Some(t) = typ
            && t != "JWT"
            && t != "JOSE"
        {
            return Err(IdentityError::HeaderInvalid(format!(
                "`typ` `{}` is not accepted for JWT-SVIDs",
                shown(t)
            )));
        }
        return Ok(());
    }
    let accepted = if s.typ.is_empty() {
        // Default: untyped, plain JWT, or an RFC 9068 access token.
        typ.is_none_or(|t| t == "JWT" || t == "at+jwt")
    } else {
        typ.is_some_and(|t| s.typ.iter().any(|want| want == t))
    };
    if !accepted {
        return Err(IdentityError::HeaderInvalid(format!(
            "`typ` `{}` is not accepted by issuer `{}`",
            shown(typ.unwrap_or("(absent)")),
            s.name
        )));
    }
    Ok(())
}

/// Step 10. Boundaries: a token is expired from `exp + leeway` on (that second included), and
/// not yet valid while `now + leeway < nbf`.
fn check_times(s: &IssuerSettings, c: &Claims, now: i64) -> Result<(), IdentityError> {
    let leeway = s.leeway.as_secs();
    let lw = i64::try_from(leeway).unwrap_or(i64::MAX);
    let exp = c
        .exp
        .ok_or_else(|| IdentityError::ClaimsInvalid("`exp` is missing".into()))?;
    if now >= exp.saturating_add(lw) {
        return Err(IdentityError::TokenExpired { exp, now, leeway });
    }
    if let Some(nbf) = c.nbf
        && now.saturating_add(lw) < nbf
    {
        return Err(IdentityError::TokenNotYetValid {
            claim: "nbf",
            at: nbf,
            now,
            leeway,
        });
    }
    if let Some(iat) = c.iat
        && iat > now.saturating_add(lw)
    {
        return Err(IdentityError::TokenNotYetValid {
            claim: "iat",
            at: iat,
            now,
            leeway,
        });
    }
    let lifetime = i128::from(exp) - i128::from(c.iat.unwrap_or(now));
    let max = s.max_lifetime.as_secs();
    if lifetime > i128::from(max) {
        return Err(IdentityError::TokenLifetimeExcessive { lifetime, max });
    }
    Ok(())
}

fn check_audience(s: &IssuerSettings, c: &Claims) -> Result<(), IdentityError> {
    if c.aud.is_empty() {
        return Err(IdentityError::AudMismatch("`aud` is missing".into()));
    }
    if !c.aud.iter().any(|a| s.audiences.contains(a)) {
        let want = s.audiences.first().map_or("", String::as_str);
        return Err(IdentityError::AudMismatch(format!(
            "`aud` does not contain `{}`",
            shown(want)
        )));
    }
    Ok(())
}

/// Step 12; returns the profile's own attributes.
fn check_profile(
    s: &IssuerSettings,
    sub: &str,
    c: &Claims,
) -> Result<Map<String, Value>, IdentityError> {
    let mut attrs = Map::new();
    match s.profile {
        Profile::Spiffe => {
            let (td, path) = parse_spiffe_id(sub).map_err(|why| {
                IdentityError::SubInvalid(format!("`{}` is not a SPIFFE ID: {why}", shown(sub)))
            })?;
            if Some(td) != s.trust_domain.as_deref() {
                return Err(IdentityError::SubInvalid(format!(
                    "trust domain `{}` is not `{}`",
                    shown(td),
                    s.trust_domain.as_deref().unwrap_or_default()
                )));
            }
            attrs.insert("trust_domain".into(), Value::String(td.to_owned()));
            attrs.insert("path".into(), Value::String(path.to_owned()));
        }
        Profile::Kubernetes => {
            let violation = |m: &str| IdentityError::ProfileViolation(m.to_owned());
            let Some(Value::Object(k8s)) = c.all.get("kubernetes.io") else {
                return Err(violation("`kubernetes.io` claim is missing"));
            };
            let namespace = match k8s.get("namespace") {
                Some(Value::String(n)) if !n.is_empty() => n,
                _ => return Err(violation("`kubernetes.io.namespace` is missing")),
            };
            let sa = match k8s.get("serviceaccount") {
                Some(Value::Object(sa)) => match sa.get("name") {
                    Some(Value::String(n)) if !n.is_empty() => n,
                    _ => return Err(violation("`kubernetes.io.serviceaccount.name` is missing")),
                },
                _ => return Err(violation("`kubernetes.io.serviceaccount` is missing")),
            };
            attrs.insert("namespace".into(), Value::String(namespace.clone()));
            attrs.insert("service_account".into(), Value::String(sa.clone()));
            if let Some(Value::Object(pod)) = k8s.get("pod")
                && let Some(Value::String(name)) = pod.get("name")
            {
                attrs.insert("pod".into(), Value::String(name.clone()));
            }
        }
        Profile::Oidc => {
            // OIDC Core §2: with several audiences, `azp` says which party the token is for.
            if c.aud.len() > 1 && !c.all.contains_key("azp") {
                return Err(IdentityError::ProfileViolation(
                    "`azp` is required when `aud` has several values".into(),
                ));
            }
        }
    }
    Ok(attrs)
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
}

/// Split a SPIFFE ID (SPIFFE-ID spec §2) into trust domain and path, refusing anything the
/// spec does not allow: the comparison downstream is byte-exact, so there is no normalizing.
pub fn parse_spiffe_id(id: &str) -> Result<(&str, &str), &'static str> {
    if !id.is_ascii() {
        return Err("non-ASCII characters");
    }
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or("scheme must be `spiffe://`")?;
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if td.is_empty() {
        return Err("trust domain is empty");
    }
    // Catches ports, userinfo, upper case and percent-encoding in the authority.
    if !valid_trust_domain(td) {
        return Err("trust domain has characters outside [a-z0-9.-_]");
    }
    if path.is_empty() {
        return Ok((td, path));
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Err("path has an empty segment");
        }
        if segment == "." || segment == ".." {
            return Err("path has a `.` or `..` segment");
        }
        // Catches `?`, `#` and `%` along with anything else outside the grammar.
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err("path has characters outside [A-Za-z0-9.-_]");
        }
    }
    Ok((td, path))
}

/// Look up a dotted claim path; claim names may themselves hold dots (`kubernetes.io`), so
/// at each level the longest matching name wins.
fn claim_at<'a>(obj: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    let dots = path.match_indices('.').map(|(i, _)| i).collect::<Vec<_>>();
    for &i in dots.iter().rev() {
        if let Some(Value::Object(inner)) = obj.get(&path[..i])
            && let Some(v) = claim_at(inner, &path[i + 1..])
        {
            return Some(v);
        }
    }
    None
}

fn act_chain(c: &Claims) -> Result<Vec<String>, IdentityError> {
    let mut actors = Vec::new();
    let mut current = c.all.get("act");
    while let Some(act) = current {
        if actors.len() == MAX_ACT_DEPTH {
            return Err(IdentityError::ClaimsInvalid(format!(
                "`act` chain is deeper than {MAX_ACT_DEPTH}"
            )));
        }
        let Value::Object(act) = act else {
            return Err(IdentityError::ClaimsInvalid(
                "`act` is not an object".into(),
            ));
        };
        match act.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => actors.push(s.clone()),
            _ => {
                return Err(IdentityError::ClaimsInvalid(
                    "`act.sub` is missing or not a string".into(),
                ));
            }
        }
        current = act.get("act");
    }
    Ok(actors)
}

fn build_principal(
    s: &IssuerSettings,
    sub: &str,
    c: &Claims,
    profile_attrs: Map<String, Value>,
) -> Result<Principal, IdentityError> {
    let mut attributes = Map::new();
    for (attr, path) in &s.claims {
        if let Some(v) = claim_at(&c.all, path) {
            attributes.insert(attr.clone(), v.clone());
        }
    }
    if let Some(Value::String(g)) = attributes.get("groups") {
        let one = Value::Array(vec![Value::String(g.clone())]);
        attributes.insert("groups".into(), one);
    }
    let actors = act_chain(c)?;
    if let Some(first) = actors.first() {
        attributes.insert("actor".into(), Value::String(first.clone()));
        attributes.insert(
            "actors".into(),
            Value::Array(actors.iter().cloned().map(Value::String).collect()),
        );
    }
    // Profile attributes are verified facts; they win over a mapped claim of the same name.
    attributes.extend(profile_attrs);
    let owner = attributes
        .get("owner")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let groups = match attributes.get("groups") {
        Some(Value::Array(gs)) => gs
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let entity = crate::policy::values::entity_from_json(
        "token",
        &s.principal_type,
        sub,
        &attributes,
        HashSet::new(),
    )
    .map_err(|e| IdentityError::ClaimsInvalid(e.to_string()))?;
    Ok(Principal {
        kind: s.principal_type.clone(),
        id: sub.to_owned(),
        issuer: s.name.clone(),
        token_id: c.jti.clone(),
        expires_at: c.exp.unwrap_or(0),
        attributes,
        actors,
        owner,
        groups,
        multi_audience: c.aud.len() > 1,
        credential_digest: None,
        entities: Arc::new(
            crate::policy::values::store_of(&entity)
                .map_err(|e| IdentityError::ClaimsInvalid(e.to_string()))?,
        ),
        entity: Arc::new(entity),
    })
}
