//! Where each issuer's keys come from and the rules that bound fetching them. The identity
//! core owns the [`KeySource`] trait (a file and a URL implement it in `sources`; a test may
//! substitute its own), and over any source applies one set of rules: coalesced,
//! rate-limited refetch on an unknown `kid`, background refresh, last-known-good up to a
//! maximum staleness (docs/security.md K-01..K-14). An issuer's HMAC secret is held here
//! too, apart from any key set, so a public key never becomes an HMAC secret (J-03).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::watch;
use tokio::time::Instant;

use super::IssuerSettings;
use super::error::IdentityConfigError;
use super::jwks::{JwksError, KeySet};
use super::sources;
use crate::clock::Clock;

/// How long a request that missed a `kid` waits for the refetch it triggered or joined. The
/// decision path must stay far below Envoy's 200 ms ext_authz timeout (K-05); a fetch that
/// takes longer still completes in the background and serves later requests.
pub const MISS_WAIT: Duration = Duration::from_millis(100);
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
/// Time past a source's own fetch timeout after which a fetch counts as failed. The URL
/// source's client times out first; this bounds any source, so one that hangs cannot hold
/// the single flight forever.
const FETCH_GRACE: Duration = Duration::from_secs(1);

/// Called when a refresh removed keys, so principals verified with them leave the cache.
pub type OnKeysRemoved = Arc<dyn Fn() + Send + Sync>;

/// Where one issuer's validated key set comes from.
#[async_trait]
pub trait KeySource: Send + Sync {
    /// Where the keys come from, for logs and errors; never carries credentials.
    fn location(&self) -> &str;
    /// How the refresh rules treat this source; `None`: it is read once, when built, and its
    /// keys never go stale (a file).
    fn refresh_policy(&self) -> Option<RefreshPolicy>;
    /// Keys at hand without waiting when the issuer is built (a file read at startup).
    fn loaded(&self) -> Option<KeySet> {
        None
    }
    /// Fetch and validate the key set now. At most one fetch per issuer runs at a time.
    async fn fetch(&self) -> Result<Fetched, FetchError>;
}

/// A validated key set, as one fetch returned it.
#[derive(Debug)]
pub struct Fetched {
    pub set: KeySet,
    /// How long the source says the set stays fresh (`Cache-Control: max-age`); it can only
    /// shorten the refresh period (K-13, K-14).
    pub max_age: Option<Duration>,
}

/// What the refresh rules need to know about a source that can be fetched again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// Longest time between background refreshes (clamped into 1 s..1 h).
    pub refresh: Duration,
    /// At most one refetch for an unknown `kid` per this interval.
    pub min_refetch_interval: Duration,
    /// Last good keys are used at most this long after the last successful fetch.
    pub max_staleness: Duration,
    /// The source's own bound on one fetch.
    pub fetch_timeout: Duration,
}

/// Why one fetch produced no key set; the last good set stays in use (K-04, K-06).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The document was refused whole (K-06..K-10).
    #[error(transparent)]
    Invalid(#[from] JwksError),
    /// The source failed to deliver a document (unreachable, a non-200 answer, too large).
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
    /// No answer within the source's fetch timeout and [`FETCH_GRACE`].
    #[error("no answer within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
}

/// A key set and when it was fetched (injected-clock seconds; `None`: from a source that is
/// never refreshed, never stale).
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

/// A source that is fetched again, and the state of its fetches.
struct Refreshed {
    source: Arc<dyn KeySource>,
    policy: RefreshPolicy,
    flight: Mutex<Flight>,
    done: watch::Sender<Outcome>,
    fetches: AtomicU64,
    /// Fetches that failed (timed out, refused, a bad document).
    failures: AtomicU64,
    /// Why the latest fetch failed (naming the source); `None` after a success.
    last_error: Mutex<Option<String>>,
}

/// One issuer's settings and keys.
pub struct IssuerKeys {
    pub settings: IssuerSettings,
    loaded: ArcSwapOption<Loaded>,
    hmac: Option<Arc<DecodingKey>>,
    refreshed: Option<Refreshed>,
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

/// The wait before the next background attempt after `failures` failures in a row.
pub fn backoff(failures: u32, min_refetch_interval: Duration, refresh: Duration) -> Duration {
    let base = min_refetch_interval.max(FAILURE_COOLDOWN);
    let factor = 1u32 << failures.saturating_sub(1).min(10);
    base.saturating_mul(factor)
        .min(MAX_BACKOFF)
        .min(refresh.max(base))
}

/// Check that the allowed algorithms, the HMAC secret and the presence of a key source
/// agree; the prepared HMAC key, if HS* is allowed.
fn check_keys(
    settings: &IssuerSettings,
    has_source: bool,
) -> Result<Option<Arc<DecodingKey>>, IdentityConfigError> {
    let invalid = |field, msg: String| IdentityConfigError::invalid(&settings.name, field, msg);
    if settings.algorithms.is_empty() {
        return Err(invalid(
            "algorithms",
            "at least one algorithm is required".into(),
        ));
    }
    let wants_hmac = settings.algorithms.iter().any(is_hmac);
    let wants_keys = settings.algorithms.iter().any(|a| !is_hmac(a));
    // HMAC only with a configured secret of at least 256 bits (RFC 7518 §3.2); never from a
    // key set, so a public key can never be used as an HMAC secret (J-03).
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
    match (has_source, wants_keys) {
        (false, true) => Err(invalid(
            "jwks",
            "asymmetric algorithms require a jwks source".into(),
        )),
        (true, false) => Err(invalid(
            "jwks",
            "set, but only HS* algorithms are allowed".into(),
        )),
        _ => Ok(hmac),
    }
}

impl IssuerKeys {
    /// Validate one issuer's key settings and build the source its `jwks` setting names; a
    /// file is read now.
    pub fn new(
        settings: IssuerSettings,
        clock: Arc<dyn Clock>,
        on_removed: OnKeysRemoved,
    ) -> Result<Self, IdentityConfigError> {
        // The settings are checked before any file is read or URL parsed.
        check_keys(&settings, settings.jwks.is_some())?;
        let source = settings
            .jwks
            .as_ref()
            .map(|jwks| sources::from_config(&settings.name, &settings.algorithms, jwks))
            .transpose()?;
        Self::with_source(settings, source, clock, on_removed)
    }

    /// One issuer whose keys come from `source` (`None`: HMAC only) rather than from its
    /// `jwks` setting.
    pub fn with_source(
        settings: IssuerSettings,
        source: Option<Arc<dyn KeySource>>,
        clock: Arc<dyn Clock>,
        on_removed: OnKeysRemoved,
    ) -> Result<Self, IdentityConfigError> {
        let hmac = check_keys(&settings, source.is_some())?;
        let loaded = source.as_ref().and_then(|s| s.loaded());
        let refreshed = source.and_then(|source| {
            let policy = source.refresh_policy()?;
            Some(Refreshed {
                source,
                policy: RefreshPolicy {
                    refresh: policy.refresh.clamp(CONFIGURED_REFRESH_MIN, REFRESH_MAX),
                    ..policy
                },
                flight: Mutex::new(Flight::default()),
                done: watch::Sender::new(Outcome::default()),
                fetches: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                last_error: Mutex::new(None),
            })
        });
        let fetched_at = refreshed.as_ref().map(|_| clock.now_unix());
        let loaded = loaded.map(|set| {
            Arc::new(Loaded {
                set: Arc::new(set),
                fetched_at,
            })
        });
        Ok(Self {
            settings,
            loaded: ArcSwapOption::new(loaded),
            hmac,
            refreshed,
            clock,
            on_removed,
            started: AtomicBool::new(false),
        })
    }

    /// True when the keys come from a source that is fetched again (a URL).
    pub fn is_refreshed(&self) -> bool {
        self.refreshed.is_some()
    }

    pub fn hmac_key(&self) -> Option<&Arc<DecodingKey>> {
        self.hmac.as_ref()
    }

    /// The key set, unless none was ever loaded or the last good one is past max staleness.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        let loaded = self.loaded.load_full()?;
        if let (Some(at), Some(r)) = (loaded.fetched_at, &self.refreshed) {
            let age = self.clock.now_unix().saturating_sub(at);
            let max = i64::try_from(r.policy.max_staleness.as_secs()).unwrap_or(i64::MAX);
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

    /// Why the latest JWKS fetch failed (naming the source), if it did.
    pub fn last_error(&self) -> Option<String> {
        self.refreshed
            .as_ref()?
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// JWKS fetches attempted so far (tests and metrics).
    pub fn fetch_count(&self) -> u64 {
        self.refreshed
            .as_ref()
            .map_or(0, |r| r.fetches.load(Ordering::Relaxed))
    }

    /// JWKS fetches that failed so far.
    pub fn fetch_failures(&self) -> u64 {
        self.refreshed
            .as_ref()
            .map_or(0, |r| r.failures.load(Ordering::Relaxed))
    }

    /// A request missed a `kid` (or found no keys): join the fetch in flight, or start one
    /// if the rate limit allows, and wait at most [`MISS_WAIT`] for it.
    pub async fn refetch_on_miss(self: &Arc<Self>) {
        let Some(r) = &self.refreshed else { return };
        let mut rx = r.done.subscribe();
        let seen = rx.borrow_and_update().generation;
        {
            let mut flight = r.flight.lock().unwrap_or_else(PoisonError::into_inner);
            if !flight.in_flight {
                // Unknown kids are attacker-controlled: at most one fetch per interval,
                // however many distinct kids arrive (K-01).
                if flight
                    .last_miss_fetch
                    .is_some_and(|t| t.elapsed() < r.policy.min_refetch_interval)
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
        let Some(r) = &self.refreshed else {
            return Outcome::default();
        };
        let mut rx = r.done.subscribe();
        let seen = rx.borrow_and_update().generation;
        let start = {
            let mut flight = r.flight.lock().unwrap_or_else(PoisonError::into_inner);
            !std::mem::replace(&mut flight.in_flight, true)
        };
        if start {
            return self.fetch_and_store().await;
        }
        let wait = r.policy.fetch_timeout + FETCH_GRACE;
        match tokio::time::timeout(wait, rx.wait_for(|o| o.generation != seen)).await {
            Ok(Ok(o)) => *o,
            _ => Outcome::default(),
        }
    }

    /// One fetch; the caller has set `in_flight`. Publishes the outcome and clears the flag.
    async fn fetch_and_store(&self) -> Outcome {
        let Some(r) = &self.refreshed else {
            return Outcome::default();
        };
        r.fetches.fetch_add(1, Ordering::Relaxed);
        let bound = r.policy.fetch_timeout + FETCH_GRACE;
        let result = tokio::time::timeout(bound, r.source.fetch())
            .await
            .unwrap_or(Err(FetchError::TimedOut(bound)));
        let (ok, max_age) = match result {
            Ok(Fetched { set, max_age }) => {
                *r.last_error.lock().unwrap_or_else(PoisonError::into_inner) = None;
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
            Err(e) => {
                r.failures.fetch_add(1, Ordering::Relaxed);
                let message = e.to_string();
                // Keep the last good keys: an outage or a bad document must not revoke
                // every key at once (K-04, K-06).
                tracing::warn!(issuer = %self.settings.name, url = %r.source.location(),
                    %message, "jwks fetch failed; keeping the last good key set");
                *r.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(format!(
                    "jwks fetch from `{}` failed: {message}",
                    r.source.location()
                ));
                (false, None)
            }
        };
        let mut flight = r.flight.lock().unwrap_or_else(PoisonError::into_inner);
        flight.in_flight = false;
        let mut outcome = Outcome::default();
        r.done.send_modify(|o| {
            o.generation += 1;
            o.ok = ok;
            o.max_age = max_age;
            outcome = *o;
        });
        outcome
    }

    /// First fetch now, then background refresh for as long as the verifier lives.
    pub async fn start(self: &Arc<Self>) {
        let Some(r) = &self.refreshed else { return };
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let first = self.fetch_coalesced().await;
        let refresh = r.policy.refresh;
        let min_refetch = r.policy.min_refetch_interval;
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
