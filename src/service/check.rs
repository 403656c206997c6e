//! The check workflow: decide, settle an escalation (an active grant allows it; otherwise it
//! becomes a pending approval request), and record the decision in the audit log before
//! anyone sees it. Every failure on the way is a deny with a reason, never an allow.

use std::time::Instant;

use opentelemetry::trace::{SpanContext, TraceId};

use super::Service;
use super::caller::Caller;
use super::trace::{Stages, Stopwatch};
use crate::approval::{ApprovalRequest, ApprovalStore, Grant, NewRequest, StoreError};
use crate::audit::{Approver, DecisionRecord};
use crate::decision::CacheKey;
use crate::metrics::Api;
use crate::vocabulary::{CheckRequest, Decision, Outcome, Reason};

/// Reason code of a deny caused by an approval store that cannot take the request.
pub const ESCALATION_UNAVAILABLE: &str = "escalation_unavailable";
/// Reason code of a deny because the principal is at its escalation limits (SECURITY A-16).
pub const ESCALATION_RATE_LIMITED: &str = "escalation_rate_limited";
/// Reason code of a deny caused by an audit log that cannot be written.
pub const AUDIT_UNAVAILABLE: &str = "audit_unavailable";

/// Which adapter a check came through, when it began handling the request (the audit
/// record's latency, the decision duration metric and the check's span run from `started`),
/// and the caller's trace, if it sent one.
#[derive(Debug, Clone)]
pub struct Call {
    pub api: Api,
    pub started: Instant,
    /// The caller's span (W3C `traceparent`): the check's span is its child.
    pub parent: Option<SpanContext>,
    /// This check's span is exported ([`Call::traced`]).
    sampled: bool,
    /// When the caller's credential was verified and the policy evaluated (kept only for a
    /// sampled check, for their child spans).
    identified: Option<(Instant, Instant)>,
    evaluated: Option<(Instant, Instant)>,
}

impl Call {
    /// A call through `api` that starts now.
    pub fn new(api: Api) -> Self {
        Self {
            api,
            started: Instant::now(),
            parent: None,
            sampled: false,
            identified: None,
            evaluated: None,
        }
    }

    /// Await `verify` (the caller's credential being verified), timed for the check's span
    /// when it is sampled.
    pub async fn identify<T>(&mut self, verify: impl std::future::Future<Output = T>) -> T {
        let watch = Stopwatch::start(self.sampled);
        let out = verify.await;
        self.identified = watch.stop();
        out
    }

    /// This call, joining the caller's trace `parent`, sampled as `traces` decides.
    pub fn traced(mut self, traces: &super::trace::Traces, parent: Option<SpanContext>) -> Self {
        self.sampled = traces.sampled(parent.as_ref());
        self.parent = parent;
        self
    }
}

/// A decision as answered, with the approval request an escalation created or repeated, or
/// the grant that allowed it.
#[derive(Debug, Clone)]
pub struct Settled {
    pub decision: Decision,
    /// The approvers (with their rationale) behind a grant that allowed this check.
    pub approvers: Vec<Approver>,
    /// Present exactly when the answer is an escalation.
    pub approval: Option<ApprovalRequest>,
    /// Present when an earlier approval of exactly this request allowed it.
    pub grant: Option<Grant>,
}

impl Settled {
    fn plain(decision: Decision) -> Self {
        Self {
            decision,
            approvers: Vec::new(),
            approval: None,
            grant: None,
        }
    }
}

impl Service {
    /// Decide `req`, settle an escalation against the approval store, and record the decision
    /// in the audit log before anyone sees it.
    pub async fn check(&self, req: &CheckRequest, mut call: Call) -> Settled {
        let decision = self.evaluate(&mut call, || self.engine.decide(req));
        self.settle(req, decision, call).await
    }

    /// Run the policy, timed for the check's span when it is sampled.
    fn evaluate(&self, call: &mut Call, decide: impl FnOnce() -> Decision) -> Decision {
        let watch = Stopwatch::start(call.sampled);
        let decision = decide();
        call.evaluated = watch.stop();
        decision
    }

    /// A check whose whole input is `caller` and the request bytes `body`: a repeat of the
    /// same bytes from the same credential within the same second reuses the verdict
    /// (SECURITY R-04c) without parsing them again; it is still a decision of its own, with
    /// its own id and record. `bearer` is the credential as sent, for a caller whose
    /// verification left no digest of it. `parse` turns the bytes into the request (its error
    /// is the adapter's own, returned as is).
    pub async fn check_bytes<E>(
        &self,
        caller: &Caller,
        bearer: &[u8],
        body: &[u8],
        parse: impl FnOnce(&[u8]) -> Result<CheckRequest, E>,
        mut call: Call,
    ) -> Result<Settled, E> {
        // The credential fixes the principal and every attribute it carries; tagged by kind,
        // so no credential of one kind can stand for one of another.
        let credential = match caller {
            Caller::Agent(p) => match p.credential_digest {
                Some(digest) => [b"sha256:".as_slice(), &digest].concat(),
                None => [b"bearer:".as_slice(), bearer].concat(),
            },
            Caller::EnforcementPoint { name } => format!("pep:{name}").into_bytes(),
        };
        let now = self.engine.now();
        let key = CacheKey::new()
            .part(&credential)
            .part(body)
            .part(self.engine.bundle().version().as_bytes())
            .part(&now.to_le_bytes())
            .finish();
        if let Some(hit) = self.decisions.get(&key, now) {
            self.decision_lookups.record(true);
            return Ok(self.settle(&hit.request, hit.fresh(), call).await);
        }
        self.decision_lookups.record(false);
        let request = parse(body)?;
        let verdict = self.evaluate(&mut call, || self.engine.decide_at(&request, now));
        let settled = self.settle(&request, verdict.clone(), call).await;
        // Cache the policy's verdict, not an outage: a deny caused by the audit log or the
        // store must not outlive the outage.
        if settled.decision.outcome == verdict.outcome {
            self.decisions.insert(key, now, request, verdict);
        }
        Ok(settled)
    }

    /// A request the adapter could not put to the policy (an HTTP request no route maps to
    /// an action): a deny with `reason`, recorded like every decision (SECURITY §0: a deny is
    /// a decision with an audit record, never only a transport error).
    pub async fn refuse(&self, req: &CheckRequest, reason: Reason, call: Call) -> Settled {
        let decision = Decision {
            id: uuid::Uuid::now_v7(),
            outcome: Outcome::Deny,
            policy_version: self.engine.bundle().version(),
            policy_ids: Vec::new(),
            reasons: vec![reason],
            approval: None,
        };
        self.settle(req, decision, call).await
    }

    /// Settle (if an escalation) and record `decision` about `req`; the answer to give.
    pub async fn settle(&self, req: &CheckRequest, decision: Decision, call: Call) -> Settled {
        let span = match &self.traces {
            Some(t) if call.sampled => Some(t.start(&call)),
            _ => None,
        };
        // The exported span's trace, else the caller's (joined, not exported).
        let trace_id = match &span {
            Some(s) => Some(s.trace_id()),
            None => call.parent.as_ref().map(SpanContext::trace_id),
        };
        let mut stages = Stages {
            identified: call.identified,
            evaluated: call.evaluated,
            ..Stages::default()
        };
        let sampled = span.is_some();
        let store = Stopwatch::start(sampled && decision.outcome == Outcome::Escalate);
        let mut settled = self.settle_escalation(req, decision).await;
        stages.store = store.stop();
        let audit = Stopwatch::start(sampled);
        let deny = self.record(req, &settled, call.started, trace_id);
        stages.audit = audit.stop();
        if let Some(deny) = deny {
            settled.decision = deny;
        }
        if settled.decision.outcome != Outcome::Escalate {
            settled.approval = None;
        }
        if settled.decision.outcome != Outcome::Allow {
            settled.grant = None;
            settled.approvers.clear();
        }
        let d = &settled.decision;
        self.stats.decided(d.outcome);
        let reason = d.reasons.first().map_or("none", |r| r.code);
        self.metrics
            .decided(call.api, d.outcome, reason, call.started.elapsed());
        if let Some(span) = span {
            span.finish(&call, req, d, stages);
        }
        settled
    }

    /// An escalation is allowed by an active grant bound to exactly this request (its binding
    /// hash) under the same policy version; otherwise it becomes a pending approval request,
    /// or returns the pending one with the same binding hash (a retrying agent floods no
    /// approvers).
    async fn settle_escalation(&self, req: &CheckRequest, decision: Decision) -> Settled {
        let Some(requirement) = decision
            .approval
            .as_ref()
            .filter(|_| decision.outcome == Outcome::Escalate)
        else {
            return Settled::plain(decision);
        };
        let now = self.engine.now();
        let new = NewRequest::from_escalation(
            req,
            requirement,
            &decision.policy_version,
            &decision.policy_ids,
            now,
            self.request_ttl,
        );
        // From the grant cache when it may be trusted, else from the store (DESIGN §4).
        match self
            .grants
            .active(self.store.as_ref(), &new.binding_hash(), now)
            .await
        {
            // A grant outlives no policy change: under another version the request is asked
            // for again (SECURITY A-09 errs on the side of a new approval).
            Ok(Some(active)) if active.grant.policy_version == *decision.policy_version => {
                let grant = active.grant.clone();
                let allowed = Decision {
                    outcome: Outcome::Allow,
                    reasons: vec![Reason {
                        code: "granted",
                        policy_id: decision.policy_ids.first().cloned(),
                        message: format!(
                            "allowed by grant `{}` from approval request `{}`, until {}",
                            grant.id,
                            grant.request_id,
                            crate::clock::rfc3339(grant.expires_at)
                        ),
                    }],
                    approval: None,
                    ..decision
                };
                // Who approved, and why, belongs in the record of every decision the grant
                // allows.
                return Settled {
                    decision: allowed,
                    approvers: active.approvers.clone(),
                    approval: None,
                    grant: Some(grant),
                };
            }
            Ok(_) => {}
            Err(e) => return self.store_failure(decision, &e),
        }
        // The approver is shown the policies that asked, as they were in this decision's
        // bundle.
        let Some(texts) = self
            .engine
            .policy_texts(&decision.policy_version, &decision.policy_ids)
        else {
            return escalation_denied(
                decision,
                ESCALATION_UNAVAILABLE,
                "the policy bundle was reloaded while deciding: ask again".into(),
            );
        };
        let new = new
            .with_policy_text(texts)
            .with_limits(self.escalation_limits);
        match self.store.create_or_get_pending(new).await {
            Ok((request, created)) => {
                if created {
                    self.stats.approval_request_created();
                    self.approval_event("created", &request);
                }
                Settled {
                    decision,
                    approvers: Vec::new(),
                    approval: Some(request),
                    grant: None,
                }
            }
            Err(e) => self.store_failure(decision, &e),
        }
    }

    /// Record the decision of `settled` about `req` in the audit log. `Some(deny)` when it
    /// could not be recorded: that deny is the answer instead.
    fn record(
        &self,
        req: &CheckRequest,
        settled: &Settled,
        started: Instant,
        trace_id: Option<TraceId>,
    ) -> Option<Decision> {
        let decision = &settled.decision;
        let approval_id = settled
            .approval
            .as_ref()
            .map(|a| a.id)
            .or(settled.grant.as_ref().map(|g| g.request_id))
            .map(|id| id.to_string());
        let grant_id = settled.grant.as_ref().map(|g| g.id.to_string());
        let mut record = DecisionRecord::new(req, decision, started.elapsed());
        record.approval_id = approval_id.as_deref();
        record.grant_id = grant_id.as_deref();
        record.approvers = &settled.approvers;
        record.trace_id = trace_id;
        match self.audit.append(&record.into()) {
            Ok(_) => None,
            // Fail closed (SECURITY §0 item 2, P-04): no decision is answered without its
            // audit record, so whatever policy said, the answer is a deny. The failure is
            // counted (`AuditLog::write_failures`); this deny itself cannot be recorded.
            Err(e) => {
                tracing::error!(error = %e, decision_id = %decision.id, "audit record not written; denying");
                Some(Decision {
                    id: decision.id,
                    outcome: Outcome::Deny,
                    policy_version: decision.policy_version.clone(),
                    policy_ids: Vec::new(),
                    reasons: vec![Reason {
                        code: AUDIT_UNAVAILABLE,
                        policy_id: None,
                        message: "the decision could not be recorded in the audit log".into(),
                    }],
                    approval: None,
                })
            }
        }
    }

    /// Fail closed (SECURITY R-04a): an escalation the store cannot settle is a deny, never an
    /// allow and never a silent dead end. A principal at its escalation limits (SECURITY
    /// A-16) is told which limit.
    fn store_failure(&self, decision: Decision, e: &StoreError) -> Settled {
        if let StoreError::RateLimited { .. } = e {
            self.metrics.escalation_rate_limited();
            tracing::warn!(error = %e, decision_id = %decision.id, "escalation rate limited; denying");
            return escalation_denied(decision, ESCALATION_RATE_LIMITED, e.to_string());
        }
        tracing::error!(error = %e, decision_id = %decision.id, "approval store unavailable; denying");
        escalation_denied(
            decision,
            ESCALATION_UNAVAILABLE,
            format!("the approval store is unavailable: {}", e.code()),
        )
    }
}

/// An escalation that could not become an approval request, as a deny with `code`.
fn escalation_denied(decision: Decision, code: &'static str, message: String) -> Settled {
    Settled::plain(Decision {
        id: decision.id,
        outcome: Outcome::Deny,
        policy_version: decision.policy_version,
        policy_ids: decision.policy_ids,
        reasons: vec![Reason {
            code,
            policy_id: None,
            message,
        }],
        approval: None,
    })
}
