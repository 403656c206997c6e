//! The grant cache on the hot path: every escalating check asks whether an active grant binds
//! exactly its request (docs/design.md §4). Without a cache that is one or two store round
//! trips per check; with it, a repeat is a hash-map lookup.
//!
//! Keyed by binding hash, an entry holds either the active grant with its approvers (id and
//! rationale, for the audit record), or a *negative* entry: "no active grant", so an agent that
//! escalates again and again does not read the grant table each time.
//!
//! Bounds, so a cached answer is never older than the facts allow:
//! - a grant entry never outlives the grant's `expires_at`, nor [`MAX_ENTRY_TTL`]; a hit is
//!   checked again against the engine's clock ([`Grant::is_active`]), so a clock that jumps
//!   forward expires it at once (SECURITY A-12, R-04d);
//! - a negative entry lives at most `negative_ttl` (a safety net: invalidation is what makes
//!   a new grant visible, not the timeout);
//! - the cache holds at most `max_entries` entries (0 turns it off).
//!
//! Invalidation:
//! - a change made through this process (an approval that creates a grant, a revocation)
//!   invalidates its binding hash at once ([`GrantCache::invalidate`]);
//! - with PostgreSQL, other processes change grants too: the store sends the binding hash on a
//!   notification channel in the transaction that creates or revokes a grant, and each
//!   process's listener (`crate::store`) invalidates it here. While that listener is not
//!   connected (start-up, connection lost, a ping unanswered), nothing cached is trusted:
//!   [`GrantCache::distrust`] makes every lookup go to the store, and
//!   [`GrantCache::trust`] flushes everything once the listener hears again, since
//!   notifications sent in between are lost;
//! - with SQLite one process owns the file, so its own invalidations are all there are: the
//!   cache is trusted from the start. Two `mandate serve` processes on one SQLite file are
//!   not supported (they would not see each other's grants until an entry expires).
//!
//! A lookup that raced an invalidation never stores what it read: every invalidation bumps an
//! epoch, and an entry fetched under an older epoch is dropped again right after its insert.
//! Whatever the cache does, doubt ends in a store read or an escalation, never in an allow.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{ApprovalStore, Grant, StoreError, Verdict};
use crate::audit::Approver;

/// The longest any entry is kept, whatever the grant's expiry (SECURITY R-04c: cached answers
/// within 60 s).
pub const MAX_ENTRY_TTL: Duration = Duration::from_secs(60);

/// Size and negative-entry lifetime of a [`GrantCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantCacheSettings {
    /// Binding hashes kept; 0 turns the cache off (every lookup reads the store).
    pub max_entries: u64,
    /// How long "no active grant" is believed without asking the store again.
    pub negative_ttl: Duration,
}

impl Default for GrantCacheSettings {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            negative_ttl: Duration::from_secs(5),
        }
    }
}

/// An active grant and who approved it (approving reviews, in the order recorded).
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveGrant {
    pub grant: Grant,
    pub approvers: Vec<Approver>,
}

/// A cached answer: `None` is a negative entry.
#[derive(Debug, Clone)]
struct Entry {
    grant: Option<Arc<ActiveGrant>>,
    ttl: Duration,
}

/// Each entry expires after its own TTL, fixed when it is (re)inserted.
#[derive(Debug)]
struct PerEntry;

impl moka::Expiry<String, Entry> for PerEntry {
    fn expire_after_create(&self, _: &String, value: &Entry, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        value: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The grant cache (see the module documentation).
#[derive(Debug)]
pub struct GrantCache {
    /// `None` when turned off.
    entries: Option<moka::sync::Cache<String, Entry>>,
    negative_ttl: Duration,
    /// Bumped by every invalidation, flush and loss of trust.
    epoch: AtomicU64,
    /// False while changes made elsewhere might go unheard: lookups bypass the cache.
    trusted: AtomicBool,
}

impl GrantCache {
    /// A cache that starts `trusted` (a store no other process writes) or not (it waits for
    /// [`trust`](Self::trust) from the change listener).
    pub fn new(settings: GrantCacheSettings, trusted: bool) -> Self {
        let entries = (settings.max_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(settings.max_entries)
                .expire_after(PerEntry)
                .build()
        });
        Self {
            entries,
            negative_ttl: settings.negative_ttl.min(MAX_ENTRY_TTL),
            epoch: AtomicU64::new(0),
            trusted: AtomicBool::new(trusted),
        }
    }

    /// The active grant for `binding_hash` at `now`, with its approvers: from the cache when
    /// it may be trusted, else from `store` (and then cached).
    pub async fn active(
        &self,
        store: &dyn ApprovalStore,
        binding_hash: &str,
        now: i64,
    ) -> Result<Option<Arc<ActiveGrant>>, StoreError> {
        self.get_or_fetch(binding_hash, now, || fetch(store, binding_hash, now))
            .await
    }

    /// [`active`](Self::active) with the store read given as `fetch`.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        binding_hash: &str,
        now: i64,
        fetch: F,
    ) -> Result<Option<Arc<ActiveGrant>>, StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<ActiveGrant>, StoreError>>,
    {
        let Some(entries) = &self.entries else {
            return Ok(fetch().await?.map(Arc::new));
        };
        // Read before the store is: an invalidation from now on keeps this read out.
        let epoch = self.epoch.load(Ordering::SeqCst);
        let trusted = self.trusted.load(Ordering::SeqCst);
        if trusted && let Some(entry) = entries.get(binding_hash) {
            match entry.grant {
                None => return Ok(None),
                Some(g) if g.grant.is_active(now) => return Ok(Some(g)),
                // Expired by the engine's clock before moka's: ask the store.
                Some(_) => {}
            }
        }
        let fetched = fetch().await?.map(Arc::new);
        if trusted {
            self.insert(entries, binding_hash, fetched.clone(), now, epoch);
        }
        Ok(fetched)
    }

    fn insert(
        &self,
        entries: &moka::sync::Cache<String, Entry>,
        binding_hash: &str,
        grant: Option<Arc<ActiveGrant>>,
        now: i64,
        epoch: u64,
    ) {
        let Some(ttl) = entry_ttl(grant.as_deref(), now, self.negative_ttl) else {
            return;
        };
        entries.insert(binding_hash.to_owned(), Entry { grant, ttl });
        // An invalidation (or loss of trust) since the read: what was read may be stale.
        if self.epoch.load(Ordering::SeqCst) != epoch || !self.trusted.load(Ordering::SeqCst) {
            entries.invalidate(binding_hash);
        }
    }

    /// Forget what is cached for `binding_hash`: a grant for it was created or revoked.
    pub fn invalidate(&self, binding_hash: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(entries) = &self.entries {
            entries.invalidate(binding_hash);
        }
    }

    /// Changes made elsewhere may go unheard from now on: bypass the cache until
    /// [`trust`](Self::trust).
    pub fn distrust(&self) {
        self.trusted.store(false, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Changes are heard again: flush everything (what changed meanwhile was not heard) and
    /// use the cache again.
    pub fn trust(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(entries) = &self.entries {
            entries.invalidate_all();
        }
        self.trusted.store(true, Ordering::SeqCst);
    }

    /// Whether lookups may be answered from the cache now.
    pub fn is_trusted(&self) -> bool {
        self.trusted.load(Ordering::SeqCst)
    }

    /// What is cached for `binding_hash`, trusted or not: `Some(None)` is a negative entry
    /// (for tests and diagnostics).
    pub fn peek(&self, binding_hash: &str) -> Option<Option<Arc<ActiveGrant>>> {
        self.entries.as_ref()?.get(binding_hash).map(|e| e.grant)
    }
}

/// How long to keep an answer read at `now`: a grant until its expiry, "none" for
/// `negative_ttl`, never past [`MAX_ENTRY_TTL`]; `None` when it is not worth keeping.
fn entry_ttl(grant: Option<&ActiveGrant>, now: i64, negative_ttl: Duration) -> Option<Duration> {
    let ttl = match grant {
        None => negative_ttl,
        Some(g) => {
            let left = u64::try_from(g.grant.expires_at.saturating_sub(now)).ok()?;
            Duration::from_secs(left)
        }
    };
    Some(ttl.min(MAX_ENTRY_TTL)).filter(|t| !t.is_zero())
}

/// The store's answer: the active grant and its approving reviews.
async fn fetch(
    store: &dyn ApprovalStore,
    binding_hash: &str,
    now: i64,
) -> Result<Option<ActiveGrant>, StoreError> {
    let Some(grant) = store.active_grant(binding_hash, now).await? else {
        return Ok(None);
    };
    let approvers = store
        .reviews(grant.request_id)
        .await?
        .into_iter()
        .filter(|r| r.verdict == Verdict::Approve)
        .map(|r| Approver {
            id: r.approver_id,
            rationale: r.rationale,
        })
        .collect();
    Ok(Some(ActiveGrant { grant, approvers }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use uuid::Uuid;

    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn grant(expires_at: i64) -> ActiveGrant {
        ActiveGrant {
            grant: Grant {
                id: Uuid::new_v4(),
                request_id: Uuid::new_v4(),
                binding_hash: "h".into(),
                policy_version: "v1".into(),
                created_at: NOW,
                expires_at,
                revoked_at: None,
            },
            approvers: vec![Approver {
                id: "alice".into(),
                rationale: "ok".into(),
            }],
        }
    }

    fn cache(negative_ttl: Duration) -> GrantCache {
        GrantCache::new(
            GrantCacheSettings {
                max_entries: 100,
                negative_ttl,
            },
            true,
        )
    }

    /// A fake store read: counts its calls and answers `answer`.
    struct Store {
        calls: AtomicUsize,
        answer: std::sync::Mutex<Option<ActiveGrant>>,
    }

    impl Store {
        fn new(answer: Option<ActiveGrant>) -> Self {
            Self {
                calls: AtomicUsize::new(0),
                answer: std::sync::Mutex::new(answer),
            }
        }
        fn set(&self, answer: Option<ActiveGrant>) {
            *self.answer.lock().unwrap() = answer;
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        async fn lookup(
            &self,
            cache: &GrantCache,
            now: i64,
        ) -> Result<Option<Arc<ActiveGrant>>, StoreError> {
            cache
                .get_or_fetch("h", now, || async {
                    self.calls.fetch_add(1, Ordering::SeqCst);
                    Ok(self.answer.lock().unwrap().clone())
                })
                .await
        }
    }

    #[tokio::test]
    async fn a_negative_entry_spares_the_store_until_its_ttl_ends() {
        let c = cache(Duration::from_millis(150));
        let s = Store::new(None);
        for _ in 0..5 {
            assert!(s.lookup(&c, NOW).await.unwrap().is_none());
        }
        assert_eq!(s.calls(), 1, "one store read for five escalations");
        assert!(matches!(c.peek("h"), Some(None)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(s.lookup(&c, NOW).await.unwrap().is_none());
        assert_eq!(s.calls(), 2, "the negative entry expired");
    }

    #[tokio::test]
    async fn a_grant_is_served_from_the_cache_with_its_approvers() {
        let c = cache(Duration::from_secs(5));
        let s = Store::new(Some(grant(NOW + 600)));
        let first = s.lookup(&c, NOW).await.unwrap().unwrap();
        let second = s.lookup(&c, NOW + 1).await.unwrap().unwrap();
        assert_eq!(first, second);
        assert_eq!(second.approvers[0].id, "alice");
        assert_eq!(s.calls(), 1);
    }

    #[tokio::test]
    async fn a12_a_cached_grant_is_not_used_at_or_past_its_expiry() {
        let c = cache(Duration::from_secs(5));
        let s = Store::new(Some(grant(NOW + 600)));
        assert!(s.lookup(&c, NOW).await.unwrap().is_some());
        // The clock jumps past the grant's end (SECURITY R-04d): the entry is not believed,
        // the store is asked, and it knows no active grant.
        s.set(None);
        assert!(s.lookup(&c, NOW + 600).await.unwrap().is_none());
        assert_eq!(s.calls(), 2);
    }

    #[test]
    fn a12_entries_never_outlive_the_grant_nor_the_bounds() {
        let neg = Duration::from_secs(5);
        assert_eq!(
            entry_ttl(Some(&grant(NOW + 30)), NOW, neg),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            entry_ttl(Some(&grant(NOW + 86_400)), NOW, neg),
            Some(MAX_ENTRY_TTL)
        );
        assert_eq!(entry_ttl(Some(&grant(NOW)), NOW, neg), None);
        assert_eq!(entry_ttl(Some(&grant(NOW - 1)), NOW, neg), None);
        assert_eq!(entry_ttl(None, NOW, neg), Some(neg));
        assert_eq!(entry_ttl(None, NOW, Duration::ZERO), None);
        assert_eq!(
            entry_ttl(None, NOW, Duration::from_secs(3600)),
            Some(MAX_ENTRY_TTL)
        );
    }

    #[tokio::test]
    async fn a_grant_expiring_in_one_second_leaves_the_cache_with_it() {
        let c = cache(Duration::from_secs(5));
        let s = Store::new(Some(grant(NOW + 1)));
        assert!(s.lookup(&c, NOW).await.unwrap().is_some());
        assert!(c.peek("h").is_some());
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(c.peek("h").is_none(), "moka dropped it with the grant");
    }

    #[tokio::test]
    async fn invalidation_makes_a_new_grant_visible_at_once() {
        let c = cache(Duration::from_secs(60));
        let s = Store::new(None);
        assert!(s.lookup(&c, NOW).await.unwrap().is_none());
        s.set(Some(grant(NOW + 600)));
        assert!(s.lookup(&c, NOW).await.unwrap().is_none(), "still cached");
        c.invalidate("h");
        assert!(s.lookup(&c, NOW).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a12_invalidation_makes_a_revoked_grant_allow_nothing_more() {
        let c = cache(Duration::from_secs(60));
        let s = Store::new(Some(grant(NOW + 600)));
        assert!(s.lookup(&c, NOW).await.unwrap().is_some());
        s.set(None);
        c.invalidate("h");
        assert!(s.lookup(&c, NOW).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_read_that_raced_an_invalidation_is_not_kept() {
        let c = cache(Duration::from_secs(60));
        // The store answers "no grant", then a grant is created and invalidated before the
        // lookup stores the answer: the stale negative entry must not stay.
        let got = c
            .get_or_fetch("h", NOW, || async {
                c.invalidate("h");
                Ok(None)
            })
            .await
            .unwrap();
        assert!(got.is_none());
        assert!(c.peek("h").is_none(), "a stale answer was cached");
    }

    #[tokio::test]
    async fn while_distrusted_every_lookup_reads_the_store_and_trust_flushes() {
        let c = cache(Duration::from_secs(60));
        let s = Store::new(Some(grant(NOW + 600)));
        assert!(s.lookup(&c, NOW).await.unwrap().is_some());
        c.distrust();
        // Revoked elsewhere while nobody listened: the cached grant must not be used.
        s.set(None);
        for _ in 0..3 {
            assert!(s.lookup(&c, NOW).await.unwrap().is_none());
        }
        assert_eq!(s.calls(), 4, "each lookup went to the store");
        c.trust();
        assert!(
            c.peek("h").is_none(),
            "trust flushed what was cached before"
        );
        assert!(s.lookup(&c, NOW).await.unwrap().is_none());
        assert!(s.lookup(&c, NOW).await.unwrap().is_none());
        assert_eq!(
            s.calls(),
            5,
            "trusted again: one read, then the negative entry"
        );
    }

    #[tokio::test]
    async fn a_read_that_raced_a_loss_of_trust_is_not_kept() {
        let c = cache(Duration::from_secs(60));
        let got = c
            .get_or_fetch("h", NOW, || async {
                c.distrust();
                Ok(Some(grant(NOW + 600)))
            })
            .await
            .unwrap();
        assert!(got.is_some());
        c.trust();
        assert!(c.peek("h").is_none());
    }

    #[tokio::test]
    async fn an_untrusted_cache_starts_empty_and_a_disabled_one_always_reads() {
        let c = GrantCache::new(GrantCacheSettings::default(), false);
        let s = Store::new(None);
        s.lookup(&c, NOW).await.unwrap();
        s.lookup(&c, NOW).await.unwrap();
        assert_eq!(s.calls(), 2);
        assert!(c.peek("h").is_none());
        let off = GrantCache::new(
            GrantCacheSettings {
                max_entries: 0,
                negative_ttl: Duration::from_secs(5),
            },
            true,
        );
        let s = Store::new(None);
        s.lookup(&off, NOW).await.unwrap();
        s.lookup(&off, NOW).await.unwrap();
        assert_eq!(s.calls(), 2);
    }

    #[tokio::test]
    async fn a_store_error_is_returned_and_nothing_is_cached() {
        let c = cache(Duration::from_secs(60));
        let err = c
            .get_or_fetch("h", NOW, || async {
                Err(StoreError::Unavailable("down".into()))
            })
            .await;
        assert!(err.is_err());
        assert!(c.peek("h").is_none());
    }
}
