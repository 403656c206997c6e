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
            self.notifier.send("fallback", r);
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
            self.notifier.send("expired", r);
            let detail =
                serde_json::json!({"request_id": r.id.to_string(), "expires_at": r.expires_at});
            self.sweep_event("approval_expired", &detail);
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
