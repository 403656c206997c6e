//! The sweep: pending requests past their `@fallback_after` move to the fallback group, and
//! those past their expiry become `expired` (never approved), each move recorded in the audit
//! log. Approval timers live in the store (`expires_at`, `fallback_at`), so they survive a
//! restart: the sweep only acts on them when due, by the service's clock.

use super::Service;
use crate::approval::ApprovalStore;

impl Service {
    /// One sweep at the service's time. Returns how many requests moved (fallback, expired).
    pub async fn sweep(&self) -> (usize, usize) {
        let now = self.now();
        let fallback = match self.store.fallback_due(now).await {
            Ok(moved) => moved,
            Err(e) => {
                tracing::warn!(error = %e, "fallback sweep failed; retrying at the next tick");
                Vec::new()
            }
        };
        for r in &fallback {
            self.approval_event("fallback", r);
            let detail =
                serde_json::json!({"request_id": r.id.to_string(), "groups": r.current_groups});
            self.sweep_event("approval_fallback", &detail);
        }
        let expired = match self.store.expire_due(now).await {
            Ok(moved) => moved,
            Err(e) => {
                tracing::warn!(error = %e, "expiry sweep failed; retrying at the next tick");
                Vec::new()
            }
        };
        for r in &expired {
            self.approval_event("expired", r);
            let detail =
                serde_json::json!({"request_id": r.id.to_string(), "expires_at": r.expires_at});
            self.sweep_event("approval_expired", &detail);
        }
        // The gauges of `/metrics`: stale by at most one sweep; an outage keeps the last.
        match self.store.counts(now).await {
            Ok(mut counts) => {
                if let Ok(mut g) = self.gauges.lock() {
                    // A group with nothing pending any more reads 0, not a vanished series.
                    for (group, _) in &g.pending_by_group {
                        if !counts.pending_by_group.iter().any(|(n, _)| n == group) {
                            counts.pending_by_group.push((group.clone(), 0));
                        }
                    }
                    counts.pending_by_group.sort();
                    *g = counts;
                }
            }
            Err(e) => tracing::debug!(error = %e, "store counts not refreshed"),
        }
        (fallback.len(), expired.len())
    }

    /// The store already made the move; a log that cannot record it is reported (and fails
    /// the next decision, which denies).
    fn sweep_event(&self, event: &str, detail: &serde_json::Value) {
        if let Err(e) = self.audit_event(event, detail) {
            tracing::error!(error = %e, event, "approval event not written to the audit log");
        }
    }
}
