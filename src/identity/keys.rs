//! Where each issuer's keys come from (a file loaded once, a URL refreshed in the background,
//! a configured HMAC secret) and the rules that bound fetching: coalesced, rate-limited
//! refetch on an unknown `kid`, last-known-good up to a maximum staleness (shared/SECURITY.md
//! K-01..K-14).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use jsonwebtoken::{Algorithm, DecodingKey};
use reqwest::header::{ACCEPT, CACHE_CONTROL, CONTENT_LENGTH};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio::time::Instant;

use super::error::IdentityConfigError;
use super::jwks::{self, KeySet, MAX_JWKS_BYTES};
use super::{IssuerSettings, JwksSource};
use crate::clock::Clock;

/// How long a request that missed a `kid` waits for the refetch it triggered or joined. The
/// decision path must stay far below Envoy's 200 ms ext_authz timeout (K-05); a fetch that
/// takes longer still completes in the background and serves later requests.
pub const MISS_WAIT: Duration = Duration::from_millis(100);
/// Default and largest bound on one JWKS fetch, connection and TLS handshake included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest wait after a failed fetch before the next background attempt.
pub const FAILURE_COOLDOWN: Duration = Duration::from_secs(5);
/// Longest wait between background attempts after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Bounds for a server's `Cache-Control: max-age` (K-14): a remote party can neither make
/// the sidecar poll it more often than every 30 s nor keep a key set for more than an hour.
pub const REFRESH_MIN: Duration = Duration::from_secs(30);
pub const REFRESH_MAX: Duration = Duration::from_secs(3600);
/// Shortest configurable refresh period (the operator's choice, unlike `max-age`).
pub const CONFIGURED_REFRESH_MIN: Duration = Duration::from_secs(1);

/// Called when a refresh removed keys, so principals verified with them leave the cache.
pub type OnKeysRemoved = Arc<dyn Fn() + Send + Sync>;

/// A key set and when it was fetched (injected-clock seconds; `None`: from a file, never
/// stale).
#[derive(Debug)]
struct Loaded {
    set: Arc<KeySet>,
    fetched_at: Option<i64>,
}

/// The result of the latest completed fetch, published to every waiter.
#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    generation: u64,
    ok: bool,
    max_age: Option<Duration>,
}

#[derive(Debug, Default)]
struct Flight {
    in_flight: bool,
    last_miss_fetch: Option<Instant>,
}

struct UrlSource {
    url: reqwest::Url,
    /// `url` without userinfo, for logs and errors.
    shown_url: String,
    refresh: Duration,
    min_refetch_interval: Duration,
    max_staleness: Duration,
    fetch_timeout: Duration,
    client: reqwest::Client,
    flight: Mutex<Flight>,
    done: watch::Sender<Outcome>,
    fetches: AtomicU64,
    /// Why the latest fetch failed (naming the URL); `None` after a success.
    last_error: Mutex<Option<String>>,
}

/// One issuer's settings and keys.
pub struct IssuerKeys {
    pub settings: IssuerSettings,
    loaded: ArcSwapOption<Loaded>,
    hmac: Option<Arc<DecodingKey>>,
    url: Option<UrlSource>,
    clock: Arc<dyn Clock>,
    on_removed: OnKeysRemoved,
    started: AtomicBool,
}

impl std::fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("issuer", &self.settings.name)
            .field("keys", &self.loaded.load().as_ref().map(|l| l.set.len()))
            .finish_non_exhaustive()
    }
}

fn is_hmac(alg: &Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// A server's `max-age`, clamped into [`REFRESH_MIN`], [`REFRESH_MAX`].
pub fn clamp_refresh(d: Duration) -> Duration {
    d.clamp(REFRESH_MIN, REFRESH_MAX)
}

/// The wait before the next background refresh after a good fetch: the configured period,
/// shortened (never lengthened) by the server's clamped `max-age`, so a removed key is
/// dropped within the configured period whatever the server says (K-13, K-14).
pub fn refresh_delay(configured: Duration, max_age: Option<Duration>) -> Duration {
    max_age.map_or(configured, |m| clamp_refresh(m).min(configured))
}

/// An error and its sources, `: `-joined (reqwest's own message omits the TLS cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// The CA certificates in a PEM file, each checked to be a usable trust anchor.
fn ca_certs(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let shown = path.display();
    let mut roots = rustls::RootCertStore::empty();
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("`{shown}`: {e}"))? {
        let cert = cert.map_err(|e| format!("`{shown}`: {e}"))?;
        roots
            .add(cert.clone())
            .map_err(|e| format!("`{shown}`: not a usable CA certificate: {e}"))?;
        certs.push(
            reqwest::Certificate::from_der(cert.as_ref())
                .map_err(|e| format!("`{shown}`: {}", error_chain(&e)))?,
        );
    }
    if certs.is_empty() {
        return Err(format!("`{shown}` holds no PEM certificate"));
    }
    Ok(certs)
}

/// `max-age` from a `Cache-Control` value, if there is one.
pub fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("max-age") {
            return None;
        }
        let secs: u64 = value.trim().trim_matches('"').parse().ok()?;
        Some(Duration::from_secs(secs))
    })
}

/// The wait before the next background attempt after `failures` failures in a row.
pub fn backoff(failures: u32, min_refetch_interval: Duration, refresh: Duration) -> Duration {
    let base = min_refetch_interval.max(FAILURE_COOLDOWN);
    let factor = 1u32 << failures.saturating_sub(1).min(10);
    base.saturating_mul(factor)
        .min(MAX_BACKOFF)
        .min(refresh.max(base))
}

fn loopback_host(url: &reqwest::Url) -> bool {
    matches!(url.host_str(), Some("127.0.0.1" | "[::1]" | "localhost"))
}

impl IssuerKeys {
    /// Validate one issuer's key settings; a `File` source is read now.
    pub fn new(
        settings: IssuerSettings,
        clock: Arc<dyn Clock>,
        on_removed: OnKeysRemoved,
    ) -> Result<Self, IdentityConfigError> {
        let name = settings.name.clone();
        let invalid = |field, msg: String| IdentityConfigError::invalid(&name, field, msg);
        if settings.algorithms.is_empty() {
            return Err(invalid(
                "algorithms",
                "at least one algorithm is required".into(),
            ));
        }
        let wants_hmac = settings.algorithms.iter().any(is_hmac);
        let wants_keys = settings.algorithms.iter().any(|a| !is_hmac(a));
        // HMAC only with a configured secret of at least 256 bits (RFC 7518 §3.2); never
        // from a key set, so a public key can never be used as an HMAC secret (J-03).
        let hmac = match (&settings.hmac_secret, wants_hmac) {
            (Some(s), true) if s.len() >= 32 => Some(Arc::new(
                DecodingKey::from_secret(s).map_err(|e| invalid("hmac_secret", e.to_string()))?,
            )),
            (Some(_), true) => {
                return Err(invalid("hmac_secret", "must be at least 32 bytes".into()));
            }
            (None, true) => {
                return Err(invalid(
                    "algorithms",
                    "HS256/HS384/HS512 require `hmac_secret`".into(),
                ));
            }
            (Some(_), false) => {
                return Err(invalid(
                    "hmac_secret",
                    "set, but no HS* algorithm is allowed".into(),
                ));
            }
            (None, false) => None,
        };
        let mut loaded = None;
        let mut url = None;
        match (&settings.jwks, wants_keys) {
            (None, true) => {
                return Err(invalid(
                    "jwks",
                    "asymmetric algorithms require a jwks source".into(),
                ));
            }
            (Some(_), false) => {
                return Err(invalid(
                    "jwks",
                    "set, but only HS* algorithms are allowed".into(),
                ));
            }
            (None, false) => {}
            (Some(JwksSource::File(path)), true) => {
                let bytes =
                    std::fs::read(path).map_err(|source| IdentityConfigError::JwksFileRead {
                        issuer: name.clone(),
                        path: path.clone(),
                        source,
                    })?;
                let set = jwks::parse(&bytes, &settings.algorithms, &name).map_err(|e| {
                    IdentityConfigError::JwksFileInvalid {
                        issuer: name.clone(),
                        path: path.clone(),
                        message: e.to_string(),
                    }
                })?;
                loaded = Some(Arc::new(Loaded {
                    set: Arc::new(set),
                    fetched_at: None,
                }));
            }
            (
                Some(JwksSource::Url {
                    url: raw,
                    refresh,
                    min_refetch_interval,
                    max_staleness,
                    fetch_timeout,
                    ca_file,
                }),
                true,
            ) => {
                let parsed = reqwest::Url::parse(raw)
                    .map_err(|e| invalid("jwks.url", format!("`{raw}` is not a URL: {e}")))?;
                let loopback = loopback_host(&parsed);
                // Plain HTTP would let anyone on the path swap the keys; only a loopback test
                // server is exempt.
                if !(parsed.scheme() == "https" || (parsed.scheme() == "http" && loopback)) {
                    return Err(invalid(
                        "jwks.url",
                        format!("`{raw}` must be https (http only on a loopback host)"),
                    ));
                }
                if fetch_timeout.is_zero() || *fetch_timeout > FETCH_TIMEOUT {
                    return Err(invalid(
                        "jwks_fetch_timeout",
                        format!(
                            "must be above 0 and at most {}",
                            humantime::format_duration(FETCH_TIMEOUT)
                        ),
                    ));
                }
                let mut builder = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(*fetch_timeout)
                    .connect_timeout(*fetch_timeout);
                if loopback {
                    builder = builder.no_proxy();
                }
                if let Some(path) = ca_file {
                    if parsed.scheme() != "https" {
                        return Err(invalid(
                            "jwks_ca_file",
                            format!("set, but `{raw}` is not https"),
                        ));
                    }
                    // Only these roots: a private issuer's keys are not trusted on the word
                    // of any public CA.
                    let certs = ca_certs(path).map_err(|m| invalid("jwks_ca_file", m))?;
                    builder = builder.tls_certs_only(certs);
                }
                let client = builder
                    .build()
                    .map_err(|e| invalid("jwks.url", format!("http client: {e}")))?;
                let mut shown = parsed.clone();
                let _ = shown.set_password(None);
                let _ = shown.set_username("");
                url = Some(UrlSource {
                    shown_url: shown.to_string(),
                    url: parsed,
                    refresh: (*refresh).clamp(CONFIGURED_REFRESH_MIN, REFRESH_MAX),
                    min_refetch_interval: *min_refetch_interval,
                    max_staleness: *max_staleness,
                    fetch_timeout: *fetch_timeout,
                    client,
                    flight: Mutex::new(Flight::default()),
                    done: watch::Sender::new(Outcome::default()),
                    fetches: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                });
            }
        }
        Ok(Self {
            settings,
            loaded: ArcSwapOption::new(loaded),
            hmac,
            url,
            clock,
            on_removed,
            started: AtomicBool::new(false),
        })
    }

    pub fn is_url(&self) -> bool {
        self.url.is_some()
    }

    pub fn hmac_key(&self) -> Option<&Arc<DecodingKey>> {
        self.hmac.as_ref()
    }

    /// The key set, unless none was ever loaded or the last good one is past max staleness.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        let loaded = self.loaded.load_full()?;
        if let (Some(at), Some(src)) = (loaded.fetched_at, &self.url) {
            let age = self.clock.now_unix().saturating_sub(at);
            let max = i64::try_from(src.max_staleness.as_secs()).unwrap_or(i64::MAX);
            // Fail closed: keys older than the staleness bound may have been revoked long
            // ago, so the issuer becomes unavailable rather than trusted forever.
            if age > max {
                return None;
            }
        }
        Some(Arc::clone(&loaded.set))
    }

    /// True when this issuer can verify something now.
    pub fn ready(&self) -> bool {
        let needs_keys = self.settings.algorithms.iter().any(|a| !is_hmac(a));
        !needs_keys || self.current().is_some()
    }

    /// Why the latest JWKS fetch failed (naming the URL), if it did.
    pub fn last_error(&self) -> Option<String> {
        let src = self.url.as_ref()?;
        src.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// JWKS fetches attempted so far (tests and metrics).
    pub fn fetch_count(&self) -> u64 {
        self.url
            .as_ref()
            .map_or(0, |u| u.fetches.load(Ordering::Relaxed))
    }

    /// A request missed a `kid` (or found no keys): join the fetch in flight, or start one
    /// if the rate limit allows, and wait at most [`MISS_WAIT`] for it.
    pub async fn refetch_on_miss(self: &Arc<Self>) {
        let Some(src) = &self.url else { return };
        let mut rx = src.done.subscribe();
        let seen = rx.borrow_and_update().generation;
        {
            let mut flight = src.flight.lock().unwrap_or_else(PoisonError::into_inner);
            if !flight.in_flight {
                // Unknown kids are attacker-controlled: at most one fetch per interval,
                // however many distinct kids arrive (K-01).
                if flight
                    .last_miss_fetch
                    .is_some_and(|t| t.elapsed() < src.min_refetch_interval)
                {
                    return;
                }
                flight.in_flight = true;
                flight.last_miss_fetch = Some(Instant::now());
                // Spawned, so the fetch completes even if this request gives up waiting.
                let me = Arc::clone(self);
                tokio::spawn(async move { me.fetch_and_store().await });
            }
        }
        let _ = tokio::time::timeout(MISS_WAIT, rx.wait_for(|o| o.generation != seen)).await;
    }

    /// Fetch now unless a fetch is in flight, and wait for whichever completes.
    async fn fetch_coalesced(self: &Arc<Self>) -> Outcome {
        let Some(src) = &self.url else {
            return Outcome::default();
        };
        let mut rx = src.done.subscribe();
        let seen = rx.borrow_and_update().generation;
        let start = {
            let mut flight = src.flight.lock().unwrap_or_else(PoisonError::into_inner);
            !std::mem::replace(&mut flight.in_flight, true)
        };
        if start {
            return self.fetch_and_store().await;
        }
        let wait = src.fetch_timeout + Duration::from_secs(1);
        match tokio::time::timeout(wait, rx.wait_for(|o| o.generation != seen)).await {
            Ok(Ok(o)) => *o,
            _ => Outcome::default(),
        }
    }

    /// One fetch; the caller has set `in_flight`. Publishes the outcome and clears the flag.
    async fn fetch_and_store(&self) -> Outcome {
        let Some(src) = &self.url else {
            return Outcome::default();
        };
        src.fetches.fetch_add(1, Ordering::Relaxed);
        let result = self.fetch(src).await;
        let (ok, max_age) = match result {
            Ok((set, max_age)) => {
                *src.last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                let removed = self
                    .loaded
                    .load()
                    .as_ref()
                    .is_some_and(|old| old.set.has_keys_missing_from(&set));
                self.loaded.store(Some(Arc::new(Loaded {
                    set: Arc::new(set),
                    fetched_at: Some(self.clock.now_unix()),
                })));
                if removed {
                    (self.on_removed)();
                }
                (true, max_age)
            }
            Err(message) => {
                // Keep the last good keys: an outage or a bad document must not revoke
                // every key at once (K-04, K-06).
                tracing::warn!(issuer = %self.settings.name, url = %src.shown_url, %message,
                    "jwks fetch failed; keeping the last good key set");
                *src.last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(format!(
                    "jwks fetch from `{}` failed: {message}",
                    src.shown_url
                ));
                (false, None)
            }
        };
        let mut flight = src.flight.lock().unwrap_or_else(PoisonError::into_inner);
        flight.in_flight = false;
        let mut outcome = Outcome::default();
        src.done.send_modify(|o| {
            o.generation += 1;
            o.ok = ok;
            o.max_age = max_age;
            outcome = *o;
        });
        outcome
    }

    async fn fetch(&self, src: &UrlSource) -> Result<(KeySet, Option<Duration>), String> {
        let mut resp = src
            .client
            .get(src.url.clone())
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("request failed: {}", error_chain(&e.without_url())))?;
        // Redirects are not followed (K-11): a 3xx is a failure like any non-200.
        if resp.status() != reqwest::StatusCode::OK {
            return Err(format!("status {}", resp.status()));
        }
        let max_age = resp
            .headers()
            .get(CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age);
        let declared = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_JWKS_BYTES) {
            return Err(format!("body is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading body: {}", error_chain(&e.without_url())))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("body is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set = jwks::parse(&body, &self.settings.algorithms, &self.settings.name)
            .map_err(|e| e.to_string())?;
        Ok((set, max_age))
    }

    /// First fetch now, then background refresh for as long as the verifier lives.
    pub async fn start(self: &Arc<Self>) {
        let Some(src) = &self.url else { return };
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let first = self.fetch_coalesced().await;
        let refresh = src.refresh;
        let min_refetch = src.min_refetch_interval;
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failures = u32::from(!first.ok);
            let mut outcome = first;
            loop {
                let delay = if outcome.ok {
                    refresh_delay(refresh, outcome.max_age)
                } else {
                    backoff(failures, min_refetch, refresh)
                };
                tokio::time::sleep(delay).await;
                // The verifier is gone: stop refreshing for it.
                let Some(me) = weak.upgrade() else { return };
                outcome = me.fetch_coalesced().await;
                failures = if outcome.ok {
                    0
                } else {
                    failures.saturating_add(1)
                };
            }
        });
    }
}
