//! A circuit breaker in front of the approval store (SECURITY R-04a). Every store operation
//! is bounded by `timeout`; a timeout or an outage opens the breaker, and while it is open
//! every operation fails at once with [`StoreError::Unavailable`] (escalations deny with
//! `escalation_unavailable` in microseconds instead of each waiting out a lock or a dead
//! connection). A background probe retries every `probe_interval` with a write that changes
//! nothing, and closes the breaker when it succeeds. Checks that need no approval never touch
//! the store, so an outage costs them nothing.
//!
//! Refusals by rule (not found, conflict, rate limited, corrupt rows) are answers, not
//! outages: they pass through and leave the breaker as it is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    ApprovalRequest, ApprovalStore, Grant, ListFilter, NewRequest, Review, ReviewOutcome,
    StoreCounts, StoreError,
};
use crate::audit::Checkpoint;

/// How the breaker bounds store operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSettings {
    /// Longest one store operation may take before it counts as an outage
    /// (`store.timeout`).
    pub timeout: Duration,
    /// How often an open breaker probes the store (`store.probe_interval`).
    pub probe_interval: Duration,
}

impl Default for GuardSettings {
    fn default() -> Self {
        // Long enough for a store write under load (a synchronous commit behind a busy
        // disk can take a second), short enough that the one escalation that discovers an
        // outage is not the 5 s of a lock or connection timeout; every later one fails at
        // once.
        Self {
            timeout: Duration::from_secs(2),
            probe_interval: Duration::from_secs(1),
        }
    }
}

/// An [`ApprovalStore`] that fails fast while the store behind it is out.
#[derive(Debug)]
pub struct GuardedStore {
    inner: Arc<dyn ApprovalStore>,
    settings: GuardSettings,
    state: Arc<Breaker>,
}

#[derive(Debug, Default)]
struct Breaker {
    open: AtomicBool,
    /// Why it opened: what `/readyz` and every fast failure say.
    reason: Mutex<String>,
}

impl GuardedStore {
    pub fn new(inner: Arc<dyn ApprovalStore>, settings: GuardSettings) -> Self {
        Self {
            inner,
            settings,
            state: Arc::new(Breaker::default()),
        }
    }

    /// `None` while the store answers; else why it is considered out.
    pub fn outage(&self) -> Option<String> {
        if !self.state.open.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.state
                .reason
                .lock()
                .map_or_else(|_| String::new(), |r| r.clone()),
        )
    }

    /// Run one store operation under the breaker.
    async fn guard<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if let Some(reason) = self.outage() {
            // Fail closed and fast: the caller denies (or answers 503) without waiting.
            return Err(StoreError::Unavailable(format!(
                "failing fast while the store is out ({reason}); probing every {}",
                humantime::format_duration(self.settings.probe_interval)
            )));
        }
        let result = match tokio::time::timeout(self.settings.timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(self.settings.timeout)
            ))),
        };
        if let Err(StoreError::Unavailable(reason)) = &result {
            self.trip(reason.clone());
        }
        result
    }

    /// Open the breaker (once) and start the probe that will close it.
    fn trip(&self, reason: String) {
        if let Ok(mut r) = self.state.reason.lock() {
            *r = reason.clone();
        }
        if self.state.open.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(reason = %reason, "approval store out: escalations deny at once until it answers again");
        let (inner, state, settings) = (self.inner.clone(), self.state.clone(), self.settings);
        // A probe needs a runtime; outside one (never in the server) the breaker simply
        // stays open, which fails closed.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(probe(inner, state, settings));
        }
    }
}

/// Retry the store every `probe_interval` until it takes a write again, then close.
async fn probe(inner: Arc<dyn ApprovalStore>, state: Arc<Breaker>, settings: GuardSettings) {
    loop {
        tokio::time::sleep(settings.probe_interval).await;
        // A write transaction that changes nothing: a read alone would pass while a writer
        // holds SQLite's lock.
        let answer = tokio::time::timeout(settings.timeout, inner.expire_due(i64::MIN)).await;
        match answer {
            Ok(Ok(_)) => {
                state.open.store(false, Ordering::Release);
                tracing::info!("approval store answers again");
                return;
            }
            Ok(Err(e)) => {
                if let Ok(mut r) = state.reason.lock() {
                    *r = e.to_string();
                }
            }
            Err(_) => {}
        }
    }
}

#[async_trait]
impl ApprovalStore for GuardedStore {
    async fn create_or_get_pending(
        &self,
        req: NewRequest,
    ) -> Result<(ApprovalRequest, bool), StoreError> {
        self.guard(self.inner.create_or_get_pending(req)).await
    }
    async fn get(&self, id: Uuid) -> Result<Option<ApprovalRequest>, StoreError> {
        self.guard(self.inner.get(id)).await
    }
    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<ApprovalRequest>, StoreError> {
        self.guard(self.inner.get_many(ids)).await
    }
    async fn list(&self, filter: ListFilter) -> Result<Vec<ApprovalRequest>, StoreError> {
        self.guard(self.inner.list(filter)).await
    }
    async fn reviews(&self, id: Uuid) -> Result<Vec<Review>, StoreError> {
        self.guard(self.inner.reviews(id)).await
    }
    async fn review(&self, review: Review, now: i64) -> Result<ReviewOutcome, StoreError> {
        self.guard(self.inner.review(review, now)).await
    }
    async fn cancel(&self, id: Uuid, now: i64) -> Result<ApprovalRequest, StoreError> {
        self.guard(self.inner.cancel(id, now)).await
    }
    async fn expire_due(&self, now: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
        self.guard(self.inner.expire_due(now)).await
    }
    async fn fallback_due(&self, now: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
        self.guard(self.inner.fallback_due(now)).await
    }
    async fn active_grant(
        &self,
        binding_hash: &str,
        now: i64,
    ) -> Result<Option<Grant>, StoreError> {
        self.guard(self.inner.active_grant(binding_hash, now)).await
    }
    async fn get_grant(&self, id: Uuid) -> Result<Option<Grant>, StoreError> {
        self.guard(self.inner.get_grant(id)).await
    }
    async fn grants(&self, active_only: bool, now: i64) -> Result<Vec<Grant>, StoreError> {
        self.guard(self.inner.grants(active_only, now)).await
    }
    async fn revoke_grant(&self, id: Uuid, now: i64) -> Result<Grant, StoreError> {
        self.guard(self.inner.revoke_grant(id, now)).await
    }
    async fn put_checkpoint(&self, log_id: &str, cp: &Checkpoint) -> Result<(), StoreError> {
        self.guard(self.inner.put_checkpoint(log_id, cp)).await
    }
    async fn checkpoints(&self, log_id: &str) -> Result<Vec<Checkpoint>, StoreError> {
        self.guard(self.inner.checkpoints(log_id)).await
    }
    async fn counts(&self, now: i64) -> Result<StoreCounts, StoreError> {
        self.guard(self.inner.counts(now)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose every answer is what the test says, counting calls.
    #[derive(Debug, Default)]
    struct Scripted {
        down: AtomicBool,
        hang: AtomicBool,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Scripted {
        async fn answer<T: Default>(&self) -> Result<T, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("connection refused".into()));
            }
            Ok(T::default())
        }
    }

    #[async_trait]
    impl ApprovalStore for Scripted {
        async fn create_or_get_pending(
            &self,
            _: NewRequest,
        ) -> Result<(ApprovalRequest, bool), StoreError> {
            Err(StoreError::Unavailable("not scripted".into()))
        }
        async fn get(&self, _: Uuid) -> Result<Option<ApprovalRequest>, StoreError> {
            self.answer().await
        }
        async fn get_many(&self, _: &[Uuid]) -> Result<Vec<ApprovalRequest>, StoreError> {
            self.answer().await
        }
        async fn list(&self, _: ListFilter) -> Result<Vec<ApprovalRequest>, StoreError> {
            self.answer().await
        }
        async fn reviews(&self, _: Uuid) -> Result<Vec<Review>, StoreError> {
            self.answer().await
        }
        async fn review(&self, _: Review, _: i64) -> Result<ReviewOutcome, StoreError> {
            Err(StoreError::Unavailable("not scripted".into()))
        }
        async fn cancel(&self, _: Uuid, _: i64) -> Result<ApprovalRequest, StoreError> {
            Err(StoreError::Unavailable("not scripted".into()))
        }
        async fn expire_due(&self, _: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
            self.answer().await
        }
        async fn fallback_due(&self, _: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
            self.answer().await
        }
        async fn active_grant(&self, _: &str, _: i64) -> Result<Option<Grant>, StoreError> {
            self.answer().await
        }
        async fn get_grant(&self, _: Uuid) -> Result<Option<Grant>, StoreError> {
            self.answer().await
        }
        async fn grants(&self, _: bool, _: i64) -> Result<Vec<Grant>, StoreError> {
            self.answer().await
        }
        async fn revoke_grant(&self, _: Uuid, _: i64) -> Result<Grant, StoreError> {
            Err(StoreError::Unavailable("not scripted".into()))
        }
        async fn put_checkpoint(&self, _: &str, _: &Checkpoint) -> Result<(), StoreError> {
            self.answer().await
        }
        async fn checkpoints(&self, _: &str) -> Result<Vec<Checkpoint>, StoreError> {
            self.answer().await
        }
        async fn counts(&self, _: i64) -> Result<StoreCounts, StoreError> {
            self.answer().await
        }
    }

    fn guarded(store: Arc<Scripted>) -> GuardedStore {
        GuardedStore::new(
            store,
            GuardSettings {
                timeout: Duration::from_millis(200),
                probe_interval: Duration::from_secs(1),
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn r04a_a_hung_store_opens_the_breaker_and_later_calls_fail_at_once() {
        let store = Arc::new(Scripted::default());
        let g = guarded(store.clone());
        assert!(g.active_grant("h", 0).await.is_ok());
        store.hang.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        assert!(matches!(
            g.active_grant("h", 0).await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        assert!(g.outage().is_some_and(|r| r.contains("no answer within")));
        // Open: no call reaches the store, and none waits.
        let calls = store.calls.load(Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        for _ in 0..100 {
            assert!(g.get(Uuid::nil()).await.is_err());
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(store.calls.load(Ordering::SeqCst), calls);
    }

    #[tokio::test(start_paused = true)]
    async fn r04a_the_probe_closes_the_breaker_once_the_store_answers_again() {
        let store = Arc::new(Scripted::default());
        let g = guarded(store.clone());
        store.down.store(true, Ordering::SeqCst);
        assert!(g.get(Uuid::nil()).await.is_err());
        assert!(g.outage().is_some());
        // Still down at the first probe: stays open.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(g.outage().is_some_and(|r| r.contains("connection refused")));
        store.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(g.outage(), None);
        assert!(g.get(Uuid::nil()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_by_rule_do_not_open_the_breaker() {
        #[derive(Debug)]
        struct Refusing;
        #[async_trait]
        impl ApprovalStore for Refusing {
            async fn create_or_get_pending(
                &self,
                _: NewRequest,
            ) -> Result<(ApprovalRequest, bool), StoreError> {
                Err(StoreError::RateLimited {
                    principal: "a".into(),
                    limit: super::super::RateLimit::Pending,
                    max: 5,
                })
            }
            async fn get(&self, _: Uuid) -> Result<Option<ApprovalRequest>, StoreError> {
                Err(StoreError::Conflict("x".into()))
            }
            async fn get_many(&self, _: &[Uuid]) -> Result<Vec<ApprovalRequest>, StoreError> {
                Ok(Vec::new())
            }
            async fn list(&self, _: ListFilter) -> Result<Vec<ApprovalRequest>, StoreError> {
                Ok(Vec::new())
            }
            async fn reviews(&self, _: Uuid) -> Result<Vec<Review>, StoreError> {
                Ok(Vec::new())
            }
            async fn review(&self, _: Review, _: i64) -> Result<ReviewOutcome, StoreError> {
                Err(StoreError::Corrupt("row".into()))
            }
            async fn cancel(&self, id: Uuid, _: i64) -> Result<ApprovalRequest, StoreError> {
                Err(StoreError::NotFound {
                    what: "approval request",
                    id: id.to_string(),
                })
            }
            async fn expire_due(&self, _: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
                Ok(Vec::new())
            }
            async fn fallback_due(&self, _: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
                Ok(Vec::new())
            }
            async fn active_grant(&self, _: &str, _: i64) -> Result<Option<Grant>, StoreError> {
                Ok(None)
            }
            async fn get_grant(&self, _: Uuid) -> Result<Option<Grant>, StoreError> {
                Ok(None)
            }
            async fn grants(&self, _: bool, _: i64) -> Result<Vec<Grant>, StoreError> {
                Ok(Vec::new())
            }
            async fn revoke_grant(&self, _: Uuid, _: i64) -> Result<Grant, StoreError> {
                Err(StoreError::Conflict("x".into()))
            }
            async fn put_checkpoint(&self, _: &str, _: &Checkpoint) -> Result<(), StoreError> {
                Err(StoreError::Conflict("x".into()))
            }
            async fn checkpoints(&self, _: &str) -> Result<Vec<Checkpoint>, StoreError> {
                Ok(Vec::new())
            }
            async fn counts(&self, _: i64) -> Result<StoreCounts, StoreError> {
                Ok(StoreCounts::default())
            }
        }
        let g = GuardedStore::new(Arc::new(Refusing), GuardSettings::default());
        assert!(g.get(Uuid::nil()).await.is_err());
        assert!(g.cancel(Uuid::nil(), 0).await.is_err());
        assert!(g.review_is_corrupt().await);
        assert_eq!(g.outage(), None);
    }

    impl GuardedStore {
        async fn review_is_corrupt(&self) -> bool {
            let review = Review {
                request_id: Uuid::nil(),
                approver_id: "a".into(),
                approver_issuer: "i".into(),
                verdict: super::super::Verdict::Approve,
                rationale: "r".into(),
                evidence: serde_json::Map::new(),
                at: 0,
            };
            matches!(self.review(review, 0).await, Err(StoreError::Corrupt(_)))
        }
    }
}
