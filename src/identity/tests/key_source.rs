//! The refresh rules over a substitute `KeySource`: in memory, counting its fetches, and
//! switchable to failing or hanging, so single flight (K-02), last-known-good (K-04, K-06) and
//! key removal (K-12, K-13) are tested on tokio's paused clock, without a network listener.

use async_trait::async_trait;

use super::*;
use crate::identity::keys::{FetchError, Fetched, KeySource, RefreshPolicy};

#[derive(Clone)]
enum Mode {
    Serve(Vec<Value>),
    Fail,
    Hang,
}

struct MemorySource {
    mode: Mutex<Mode>,
    fetches: AtomicUsize,
    /// How long each fetch takes, so that concurrent misses overlap one fetch.
    delay: Duration,
    policy: RefreshPolicy,
}

impl MemorySource {
    fn new(keys: Vec<Value>, min_refetch_interval: Duration, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            mode: Mutex::new(Mode::Serve(keys)),
            fetches: AtomicUsize::new(0),
            delay,
            policy: RefreshPolicy {
                refresh: Duration::from_secs(300),
                min_refetch_interval,
                max_staleness: Duration::from_secs(3600),
                fetch_timeout: Duration::from_secs(5),
            },
        })
    }
    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl KeySource for MemorySource {
    fn location(&self) -> &str {
        "memory://keys"
    }
    fn refresh_policy(&self) -> Option<RefreshPolicy> {
        Some(self.policy)
    }
    async fn fetch(&self) -> Result<Fetched, FetchError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mode = self.mode.lock().unwrap().clone();
        match mode {
            Mode::Serve(keys) => {
                let doc = json!({ "keys": keys }).to_string();
                let set = jwks::parse(doc.as_bytes(), &[Algorithm::ES256], "memory")?;
                Ok(Fetched { set, max_age: None })
            }
            Mode::Fail => Err(FetchError::Source("source is down".into())),
            Mode::Hang => std::future::pending().await,
        }
    }
}

fn memory_verifier(source: &Arc<MemorySource>) -> (Verifier, Arc<ManualClock>) {
    let clock = ManualClock::new(NOW);
    let src: Arc<dyn KeySource> = source.clone();
    let v = Verifier::with_key_sources(
        vec![settings("memory", ISS, Profile::Oidc, None)],
        CacheSettings::default(),
        clock.clone(),
        move |_| Some(Arc::clone(&src)),
    )
    .unwrap();
    (v, clock)
}

#[tokio::test(start_paused = true)]
async fn k02_concurrent_unknown_kid_lookups_share_one_fetch_of_any_source() {
    let old = Ec::new();
    let new = Ec::new();
    // No rate limit: only the single flight keeps the fetches to one.
    let source = MemorySource::new(vec![old.jwk("old")], Duration::ZERO, MISS_WAIT / 2);
    let (v, _) = memory_verifier(&source);
    v.start().await;
    assert_eq!(source.fetches(), 1);
    source.set(Mode::Serve(vec![old.jwk("old"), new.jwk("new")]));
    let token = sign_raw(&es_header("new"), &claims(json!({})), Signer::Ec(&new));
    assert_eq!(concurrent_codes(&v, &token, 200).await, vec!["ok"; 200]);
    assert_eq!(
        source.fetches(),
        2,
        "one start fetch plus one shared refetch"
    );
}

#[tokio::test(start_paused = true)]
async fn k04_k06_failing_or_hanging_source_keeps_the_last_good_keys() {
    let ec = Ec::new();
    let source = MemorySource::new(vec![ec.jwk("k1")], Duration::ZERO, Duration::ZERO);
    let (v, clock) = memory_verifier(&source);
    v.start().await;
    let good = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&ec));
    let miss = sign_raw(&es_header("nope"), &claims(json!({})), Signer::Ec(&ec));
    // A failure, then a valid but empty document: neither wipes the keys.
    for (mode, why) in [
        (Mode::Fail, "source is down"),
        (Mode::Serve(Vec::new()), "no usable key"),
    ] {
        let before = source.fetches();
        source.set(mode);
        assert_eq!(code_of(&v, &miss).await, "key_unknown");
        assert_eq!(source.fetches(), before + 1);
        assert_eq!(code_of(&v, &good).await, "ok");
        let errors = v.jwks_errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0]
                .1
                .starts_with("jwks fetch from `memory://keys` failed: ")
                && errors[0].1.contains(why),
            "{errors:?}"
        );
    }
    // A hanging source: the miss waits at most MISS_WAIT, known keys not at all.
    source.set(Mode::Hang);
    let t0 = tokio::time::Instant::now();
    assert_eq!(code_of(&v, &miss).await, "key_unknown");
    assert_eq!(t0.elapsed(), MISS_WAIT);
    assert_eq!(code_of(&v, &good).await, "ok");
    assert!(v.ready());
    // The core gives up on the hung fetch after the source's timeout and a grace second, so
    // the next miss can fetch again.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let errors = v.jwks_errors();
    assert!(errors[0].1.contains("no answer within 6s"), "{errors:?}");
    let before = source.fetches();
    assert_eq!(code_of(&v, &miss).await, "key_unknown");
    assert_eq!(source.fetches(), before + 1);
    // Past max staleness the last good keys are no longer trusted.
    let later = sign_raw(
        &es_header("k1"),
        &claims(json!({"exp": NOW + 7200, "iat": NOW + 3600})),
        Signer::Ec(&ec),
    );
    clock.set(NOW + 3600);
    assert_eq!(code_of(&v, &later).await, "ok");
    clock.set(NOW + 3601);
    assert_eq!(code_of(&v, &later).await, "key_unavailable");
    assert!(!v.ready());
}

#[tokio::test(start_paused = true)]
async fn k12_k13_key_removed_from_the_source_stops_verifying_after_refresh() {
    let k1 = Ec::new();
    let k2 = Ec::new();
    let source = MemorySource::new(vec![k1.jwk("k1")], Duration::from_secs(30), Duration::ZERO);
    let (v, _) = memory_verifier(&source);
    v.start().await;
    let t1 = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&k1));
    let t2 = sign_raw(&es_header("k2"), &claims(json!({})), Signer::Ec(&k2));
    v.verify(&t1).await.unwrap();
    // K2 published next to K1 is found by the refetch on its unknown kid.
    source.set(Mode::Serve(vec![k1.jwk("k1"), k2.jwk("k2")]));
    v.verify(&t2).await.unwrap();
    assert_eq!(source.fetches(), 2);
    // K1 removed: with no unknown-kid traffic, it verifies until the background refresh...
    source.set(Mode::Serve(vec![k2.jwk("k2")]));
    v.verify(&t1).await.unwrap();
    tokio::time::sleep(Duration::from_secs(301)).await;
    assert_eq!(source.fetches(), 3, "one background refresh");
    // ...which drops the key and the tokens verified with it.
    assert_eq!(v.verify(&t1).await.unwrap_err().code(), "key_unknown");
    v.verify(&t2).await.unwrap();
}
