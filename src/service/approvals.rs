//! The approvals workflows: review, cancel, revoke, and the read queries of the approvals
//! API (show with long poll, list, grants).
//!
//! Who sees what: a request is shown to the principal it belongs to and to the approvers of
//! its current groups; anyone else is told it does not exist, so ids cannot be probed
//! (SECURITY A-22).
//!
//! A reviewer authenticates with its own token and must (1) not be in the request's
//! requester set: the principal itself, its owner, anyone in its `act` chain;
//! (2) belong to one of the request's current approver groups; (3) be permitted action
//! `approve` on the `ApprovalRequest` by the policy bundle, so who may approve what is
//! policy-as-code too. The reviewer's identity comes only from its token.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::caller::Caller;
use super::{ApprovalError, Service};
use crate::approval::{
    ApprovalRequest, ApprovalStore, Grant, ListFilter, Review, ReviewOutcome, Status, Verdict,
};
use crate::vocabulary::{CheckRequest, Outcome, Principal, Resource};

/// Longest a status request may wait for a change.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a waiting status request looks at the store again.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// An approver's review, as submitted.
#[derive(Debug, Clone)]
pub struct ReviewInput {
    /// The request id as the caller wrote it.
    pub request_id: String,
    pub verdict: Verdict,
    pub rationale: String,
    /// Evidence by kind, e.g. `{"ticket": "FIN-123"}`.
    pub evidence: Map<String, Value>,
    /// The binding hash the approver was shown, when the client sends it: the review lands
    /// only on exactly that request.
    pub binding_hash: Option<String>,
}

/// Which requests an approver lists.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<Status>,
    /// One of the caller's groups; all of them when `None`.
    pub group: Option<String>,
    pub limit: u32,
    pub after: Option<Uuid>,
}

const REQUEST: &str = "approval request";
const GRANT: &str = "grant";

/// A request id as the caller wrote it; one that is not a UUID is simply not found.
fn parse_id(raw: &str, what: &'static str) -> Result<Uuid, ApprovalError> {
    Uuid::parse_str(raw).map_err(|_| ApprovalError::NotFound {
        what,
        id: raw.to_owned(),
    })
}

fn not_found(what: &'static str, id: &str) -> ApprovalError {
    ApprovalError::NotFound {
        what,
        id: id.to_owned(),
    }
}

impl Service {
    /// Record an approver's review. Every rule is checked before anything is written; the
    /// review's audit event is on disk before the store sees the review, and a second event
    /// says what became of it.
    pub async fn review(
        &self,
        caller: &Caller,
        input: ReviewInput,
    ) -> Result<ReviewOutcome, ApprovalError> {
        let Caller::Agent(approver) = caller else {
            // SECURITY A-03: an enforcement point or bot cannot approve in its own name.
            return Err(ApprovalError::ApproverRequired(
                "approvals are made with the approver's own token, not an enforcement point's",
            ));
        };
        let rationale = input.rationale.trim().to_owned();
        if rationale.is_empty() {
            return Err(ApprovalError::Invalid {
                field: "rationale".into(),
                message: "must say why".into(),
            });
        }
        let raw = input.request_id.as_str();
        let id = parse_id(raw, REQUEST)?;
        let request = self
            .store
            .get(id)
            .await
            .map_err(|e| ApprovalError::from_store(e, REQUEST, raw))?
            .ok_or_else(|| not_found(REQUEST, raw))?;

        // Someone who may not see the request is told it does not exist, as for an id that
        // does not (SECURITY A-22): no answer tells a stranger that an id is real.
        if !self.viewer(caller)(&request) {
            return Err(not_found(REQUEST, raw));
        }
        // Separation of duties: nobody in the requester set, whatever the policy
        // says.
        let p = &request.principal;
        if approver.id == p.id
            || p.owner.as_deref() == Some(approver.id.as_str())
            || p.actors.iter().any(|a| *a == approver.id)
        {
            return Err(ApprovalError::SelfApproval {
                approver: approver.id.clone(),
            });
        }
        // Past the check above, only the requester itself could be outside the approver
        // groups, and it is refused as such; kept so no path reviews without membership.
        if !self
            .approver_groups(approver)
            .iter()
            .any(|g| request.current_groups.contains(g))
        {
            return Err(not_found(REQUEST, raw));
        }
        if input.verdict == Verdict::Approve {
            for kind in &request.evidence {
                match input.evidence.get(kind) {
                    Some(Value::String(v)) if !v.trim().is_empty() => {}
                    _ => {
                        return Err(ApprovalError::Invalid {
                            field: format!("evidence.{kind}"),
                            message: format!(
                                "the policy asks for `{kind}` evidence with every approval"
                            ),
                        });
                    }
                }
            }
        }
        self.approve_permitted(approver, &request)?;
        if let Some(shown) = input.binding_hash.filter(|h| *h != request.binding_hash) {
            return Err(ApprovalError::Mismatch {
                id,
                stored: request.binding_hash,
                shown,
            });
        }

        // Ordering of review and audit (SECURITY §0 item 8): no review takes effect without
        // its audit event. The review as submitted (request, approver, verdict, rationale,
        // evidence) is written and synced first; only then is it given to the store. If that
        // event cannot be written, the review is refused and the request is left as it was.
        // After the store has answered, a second event says what became of the attempt:
        // `applied` (with the new status and grant), `refused` (the store's reason: another
        // review won, the request expired...) or `store_error` (the store failed; whether it
        // committed is the store's to say). An attempt event without an outcome event means
        // the log failed in between; the store is then the truth. The alternative, holding
        // the store transaction open across the audit sync, would keep SQLite's write lock
        // during an fdatasync and put audit I/O inside every backend; this keeps both apart.
        let now = self.now();
        let who = json!({"id": approver.id, "issuer": approver.issuer});
        let attempt = json!({
            "request_id": id.to_string(),
            "binding_hash": request.binding_hash,
            "policy_version": request.policy_version,
            "approver": who,
            "verdict": input.verdict.as_str(),
            "rationale": rationale,
            "evidence": input.evidence,
        });
        self.audit_event("approval_review", &attempt)
            .map_err(|error| ApprovalError::NotAudited {
                what: "review",
                error,
            })?;
        let result = self
            .store
            .review(
                Review {
                    request_id: id,
                    approver_id: approver.id.clone(),
                    approver_issuer: approver.issuer.clone(),
                    verdict: input.verdict,
                    rationale,
                    evidence: input.evidence,
                    at: now,
                },
                now,
            )
            .await;
        // A grant this review created must be visible to the next check at once; invalidated
        // whatever the outcome, since an error may follow a commit.
        self.grants.invalidate(&request.binding_hash);
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                let refused = ApprovalError::from_store(e, REQUEST, raw);
                let (kind, code) = match &refused {
                    ApprovalError::StoreUnavailable(e) => ("store_error", e.code()),
                    ApprovalError::Refused(e) => ("refused", e.code()),
                    _ => ("refused", "not_found"),
                };
                let detail = json!({
                    "request_id": id.to_string(),
                    "approver": who,
                    "outcome": kind,
                    "error": code,
                });
                // The refusal is the answer either way; a log that fails here fails the next
                // decision too.
                if let Err(audit) = self.audit_event("approval_review_outcome", &detail) {
                    tracing::error!(error = %audit, request_id = %id, "review refusal not audited");
                }
                return Err(refused);
            }
        };
        let status = outcome.request.status;
        if matches!(status, Status::Approved | Status::Denied) {
            self.approval_event(status.as_str(), &outcome.request);
        }
        let detail = json!({
            "request_id": id.to_string(),
            "approver": who,
            "outcome": "applied",
            "status": status.as_str(),
            "grant_id": outcome.grant.as_ref().map(|g| g.id.to_string()),
        });
        self.audit_event("approval_review_outcome", &detail)
            .map_err(|error| ApprovalError::AppliedNotAudited {
                what: format!(
                    "the review was audited and applied (the request is {status}), but its outcome could not be audited"
                ),
                error,
            })?;
        Ok(outcome)
    }

    /// The bundle's verdict on `approver` approving `request`: action `approve` on an
    /// `ApprovalRequest` entity carrying the request's action, groups and requester. Anything
    /// but an allow refuses the review (a bundle that does not declare `approve` admits no
    /// approver).
    fn approve_permitted(
        &self,
        approver: &Arc<Principal>,
        request: &ApprovalRequest,
    ) -> Result<(), ApprovalError> {
        let properties = json!({
            "action": request.action,
            "groups": request.current_groups,
            "requester": request.principal.id,
        });
        let check = CheckRequest {
            principal: approver.clone(),
            action: "approve".into(),
            action_properties: None,
            resource: Resource {
                kind: "ApprovalRequest".into(),
                id: request.id.to_string(),
                properties: properties.as_object().cloned().unwrap_or_default(),
            },
            context: Map::new(),
        };
        let decision = self.engine.decide(&check);
        if decision.outcome == Outcome::Allow {
            return Ok(());
        }
        Err(ApprovalError::NotPermitted {
            approver: approver.id.clone(),
            why: decision
                .reasons
                .first()
                .map(|r| r.message.clone())
                .unwrap_or_default(),
        })
    }

    /// The groups `p` approves for: its token's groups claim, and the entities the bundle's
    /// entity data puts it in (`Agent::"alice"` with parent `Team::"finance-approvers"` is in
    /// `finance-approvers`), so membership can live in the identity provider or the bundle.
    pub fn approver_groups(&self, p: &Principal) -> Vec<String> {
        let mut groups = p.groups.clone();
        let bundle = self.engine.bundle();
        if let Some(ancestors) = bundle.entities().ancestors(&p.entity.uid()) {
            for a in ancestors {
                let id = a.id().unescaped();
                if !groups.iter().any(|g| g == id) {
                    groups.push(id.to_owned());
                }
            }
        }
        groups
    }

    /// Who may see a request: its requester, and the approvers of its current groups. The
    /// caller's approver groups are worked out once, for every request it is asked about.
    fn viewer<'c>(&self, caller: &'c Caller) -> impl Fn(&ApprovalRequest) -> bool + 'c {
        let groups = match caller {
            Caller::Agent(p) => self.approver_groups(p),
            Caller::EnforcementPoint { .. } => Vec::new(),
        };
        move |request| {
            is_requester(caller, request)
                || groups.iter().any(|g| request.current_groups.contains(g))
        }
    }

    /// The request `raw`, if `caller` may see it; with `wait`, answered as soon as its status
    /// changes or when `wait` is over (long poll).
    pub async fn show(
        &self,
        caller: &Caller,
        raw: &str,
        wait: Option<Duration>,
    ) -> Result<ApprovalRequest, ApprovalError> {
        let id = parse_id(raw, REQUEST)?;
        let request = self.read_request(id, raw).await?;
        if !self.viewer(caller)(&request) {
            return Err(not_found(REQUEST, raw));
        }
        let Some(wait) = wait.map(|w| w.min(MAX_WAIT)) else {
            return Ok(request);
        };
        // Only a pending request can still change: a decided one is answered at once.
        let deadline = tokio::time::Instant::now() + wait;
        let mut current = request;
        while current.status == Status::Pending && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(WAIT_POLL.min(deadline - tokio::time::Instant::now())).await;
            if let Some(r) = self
                .store
                .get(id)
                .await
                .map_err(ApprovalError::StoreUnavailable)?
            {
                current = r;
            }
        }
        Ok(current)
    }

    async fn read_request(&self, id: Uuid, raw: &str) -> Result<ApprovalRequest, ApprovalError> {
        self.store
            .get(id)
            .await
            .map_err(ApprovalError::StoreUnavailable)?
            .ok_or_else(|| not_found(REQUEST, raw))
    }

    /// The requester withdraws its own pending request.
    pub async fn cancel(
        &self,
        caller: &Caller,
        raw: &str,
    ) -> Result<ApprovalRequest, ApprovalError> {
        let id = parse_id(raw, REQUEST)?;
        let request = self.read_request(id, raw).await?;
        if !is_requester(caller, &request) {
            return Err(not_found(REQUEST, raw));
        }
        let cancelled = self
            .store
            .cancel(id, self.now())
            .await
            .map_err(|e| ApprovalError::from_store(e, REQUEST, raw))?;
        let detail = json!({"request_id": id.to_string(), "by": request.principal.id});
        self.audit_event("approval_cancelled", &detail)
            .map_err(|error| ApprovalError::AppliedNotAudited {
                what: "the cancellation was stored but could not be audited".into(),
                error,
            })?;
        self.metrics.approval_event("cancelled", &cancelled.groups);
        Ok(cancelled)
    }

    /// The requests an approver may review, oldest first; only groups the caller belongs to.
    pub async fn list(
        &self,
        caller: &Caller,
        query: ListQuery,
    ) -> Result<Vec<ApprovalRequest>, ApprovalError> {
        let Caller::Agent(approver) = caller else {
            return Err(ApprovalError::ApproverRequired(
                "listing approval requests needs an approver's own token",
            ));
        };
        let member_of = self.approver_groups(approver);
        let groups = match query.group {
            Some(g) if member_of.contains(&g) => vec![g],
            Some(group) => {
                return Err(ApprovalError::NotInGroup {
                    approver: approver.id.clone(),
                    group,
                });
            }
            None => member_of,
        };
        let mut out: Vec<ApprovalRequest> = Vec::new();
        for group in groups {
            let page = self
                .store
                .list(ListFilter {
                    status: query.status,
                    group: Some(group),
                    limit: query.limit,
                    after: query.after,
                })
                .await
                .map_err(ApprovalError::StoreUnavailable)?;
            for r in page {
                if !out.iter().any(|o| o.id == r.id) {
                    out.push(r);
                }
            }
        }
        // Oldest first. The sort is stable, so requests of the same second keep the store's
        // order, which is the order they were created in (ids are random: SECURITY A-22).
        out.sort_by_key(|r| r.created_at);
        Ok(out)
    }

    /// The active (or all) grants of requests the caller may view.
    pub async fn grants(&self, caller: &Caller, all: bool) -> Result<Vec<Grant>, ApprovalError> {
        let grants = self
            .store
            .grants(!all, self.now())
            .await
            .map_err(ApprovalError::StoreUnavailable)?;
        // The requests behind them in one read, not one per grant.
        let may_view = self.viewer(caller);
        let mut ids: Vec<Uuid> = grants.iter().map(|g| g.request_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let visible: HashSet<Uuid> = self
            .store
            .get_many(&ids)
            .await
            .map_err(ApprovalError::StoreUnavailable)?
            .into_iter()
            .filter(|r| may_view(r))
            .map(|r| r.id)
            .collect();
        Ok(grants
            .into_iter()
            .filter(|g| visible.contains(&g.request_id))
            .collect())
    }

    /// An approver of the request's groups, or the requester giving it up, ends a grant
    /// before its time; an audit event is synced before the answer.
    pub async fn revoke(&self, caller: &Caller, raw: &str) -> Result<Grant, ApprovalError> {
        let id = parse_id(raw, GRANT)?;
        let grant = self
            .store
            .get_grant(id)
            .await
            .map_err(ApprovalError::StoreUnavailable)?
            .ok_or_else(|| not_found(GRANT, raw))?;
        let request = self
            .store
            .get(grant.request_id)
            .await
            .map_err(ApprovalError::StoreUnavailable)?
            .ok_or_else(|| not_found(GRANT, raw))?;
        if !self.viewer(caller)(&request) {
            return Err(not_found(GRANT, raw));
        }
        let revoked = self.store.revoke_grant(id, self.now()).await;
        // The next check must not be allowed from the cache (SECURITY A-12); invalidated
        // whatever the outcome, since an error may follow a commit.
        self.grants.invalidate(&grant.binding_hash);
        let revoked = revoked.map_err(|e| ApprovalError::from_store(e, GRANT, raw))?;
        let detail = json!({
            "grant_id": id.to_string(),
            "request_id": grant.request_id.to_string(),
            "by": caller.name(),
        });
        self.audit_event("grant_revoked", &detail)
            .map_err(|error| ApprovalError::AppliedNotAudited {
                what: "the revocation was stored but could not be audited".into(),
                error,
            })?;
        Ok(revoked)
    }
}

/// The caller is the principal the request was made for (same type, id and issuer).
fn is_requester(caller: &Caller, request: &ApprovalRequest) -> bool {
    matches!(caller, Caller::Agent(p)
        if p.kind == request.principal.kind
            && p.id == request.principal.id
            && p.issuer == request.principal.issuer)
}
