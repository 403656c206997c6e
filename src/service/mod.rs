//! The core service: the workflows every adapter calls. An adapter (the HTTP API, the CLI,
//! the coming ext_authz and MCP ones) parses its wire input into core types, calls one of
//! these, and renders the result; it decides nothing.
//!
//! - [`caller`]: who is calling (an agent with its own token, or a trusted enforcement point)
//!   and whose check it may ask for.
//! - [`check`]: decide, settle an escalation against grants and the approval store, and
//!   record the decision before anyone sees it.
//! - [`approvals`]: review (separation of duties, approver groups, evidence, the `approve`
//!   policy, audit before and after), cancel, revoke, and the read queries.
//! - [`sweep`]: fallback and expiry of pending approval requests.
//! - [`stats`]: what was done, counted for the periodic summary line.
//! - [`trace`]: a span per check, joining the caller's trace.
//!
//! Every fail-closed choice of a workflow is made here, with a comment at the spot; errors
//! are typed ([`caller::SubjectError`], [`ApprovalError`]) so each adapter maps them to its
//! own statuses in one `match`.

pub mod approvals;
pub mod caller;
pub mod check;
mod error;
pub mod stats;
pub mod sweep;
pub mod trace;

use std::sync::Arc;
use std::time::Duration;

use crate::approval::{EscalationLimits, GrantCache, GuardedStore, StoreCounts};
use crate::audit::{AuditError, AuditLog, EventRecord};
use crate::config::EnforcementPoint;
use crate::decision::{DecisionCache, Engine};
use crate::identity::Verifier;
use crate::metrics::Metrics;
use crate::notify::Notifier;

pub use approvals::{ListQuery, ReviewInput};
pub use caller::{Caller, Subject, SubjectError};
pub use check::{
    AUDIT_UNAVAILABLE, Call, ESCALATION_RATE_LIMITED, ESCALATION_UNAVAILABLE, Settled,
};
pub use error::ApprovalError;

/// Distinct checks whose verdict is kept for a repeat within the same second: bounded small,
/// since each entry holds a whole request (the sidecar must stay within its memory budget).
pub const DECISION_CACHE_ENTRIES: usize = 1_024;

/// Everything the workflows need, built once at start-up and shared by every adapter.
#[derive(Debug)]
pub struct Service {
    /// Decides against the active bundle, with the injected clock (`engine.now()` is the
    /// service's time for every expiry).
    pub engine: Engine,
    pub verifier: Verifier,
    /// Every decision is recorded here before it is answered.
    pub audit: AuditLog,
    /// The free space left for `audit` (`audit.min_free_disk`).
    pub audit_disk: crate::audit::DiskWatch,
    /// Repeats of the exact same check within a second reuse the verdict.
    pub decisions: DecisionCache,
    /// Approval requests and grants, behind the circuit breaker that fails fast while the
    /// store is out.
    pub store: Arc<GuardedStore>,
    /// Active grants (and their absence) by binding hash, in front of `store` on the hot
    /// path; whoever changes a grant through this process invalidates its entry.
    pub grants: Arc<GrantCache>,
    /// How long an approval request stays pending.
    pub request_ttl: Duration,
    /// Per-principal limits on new approval requests (SECURITY A-16).
    pub escalation_limits: EscalationLimits,
    /// Webhooks about approval requests.
    pub notifier: Notifier,
    /// Callers trusted to name the subject of a check.
    pub enforcement_points: Vec<EnforcementPoint>,
    /// Decisions by outcome, approval requests created, credentials refused.
    pub stats: stats::Stats,
    /// The instruments of `/metrics` and OTLP (a clone of `Metrics::off()` when none are
    /// wired).
    pub metrics: Metrics,
    /// Pending requests by group and active grants, as of the last sweep (gauges).
    pub gauges: std::sync::Mutex<StoreCounts>,
    /// A span per check, when telemetry exports traces.
    pub traces: Option<trace::Traces>,
    /// Decision cache hits and misses.
    pub decision_lookups: crate::metrics::Lookups,
}

impl Service {
    /// The service's time (unix seconds), from the injected clock.
    pub fn now(&self) -> i64 {
        self.engine.now()
    }

    /// Pending requests by group and active grants, as of the last sweep.
    pub fn store_counts(&self) -> StoreCounts {
        self.gauges.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Tell the webhooks about an approval request event, and count it by the request's
    /// first approver group.
    fn approval_event(&self, event: &'static str, request: &crate::approval::ApprovalRequest) {
        self.notifier.send(event, request);
        self.metrics.approval_event(event, &request.groups);
    }

    /// Write an approval event and sync it to disk: the change it records is not
    /// acknowledged until it is on disk too.
    fn audit_event(&self, event: &str, detail: &serde_json::Value) -> Result<(), AuditError> {
        self.audit
            .append_durable(&EventRecord::new(event, detail).into())
            .map(|_| ())
    }
}
