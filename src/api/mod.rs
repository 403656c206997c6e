//! HTTP adapters: wire types stop here. Requests become core types ([`CheckRequest`]) and
//! decisions become JSON; errors map to HTTP statuses in exactly one place
//! ([`ApiError::into_response`]).
//!
//! Status discipline (shared/DESIGN.md §3): a deny is a `200` with the decision in the body;
//! 4xx are for malformed requests and failed caller authentication, always with a JSON body
//! that names what was wrong. Nothing here can turn an error into an allow: every path that
//! fails returns early with an error status or a deny decision.

pub mod admin;
pub mod approvals;
pub mod authzen;
pub mod body;
pub mod caller;
pub mod conn_guard;
pub mod http;
pub mod server;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::approval::{ApprovalRequest, ApprovalStore, Grant, GrantCache, NewRequest};
use crate::audit::{AuditLog, DecisionRecord};
use crate::config::{EnforcementPoint, ServerConfig};
use crate::decision::{CheckRequest, Decision, DecisionCache, Engine, Outcome, Reason};
use crate::identity::Verifier;

pub type Body = Full<Bytes>;

/// Everything a request handler needs, built once at start-up and shared.
#[derive(Debug)]
pub struct AppState {
    pub engine: Engine,
    pub verifier: Verifier,
    /// Every decision is recorded here before it is answered.
    pub audit: AuditLog,
    /// Repeats of the exact same check within a second reuse the verdict.
    pub decisions: DecisionCache,
    /// Approval requests and grants.
    pub store: Arc<dyn ApprovalStore>,
    /// Active grants (and their absence) by binding hash, in front of `store` on the hot
    /// path; whoever changes a grant through this process invalidates its entry.
    pub grants: Arc<GrantCache>,
    /// How long an approval request stays pending.
    pub request_ttl: std::time::Duration,
    /// Per-principal limits on new approval requests (SECURITY A-16).
    pub escalation_limits: crate::approval::EscalationLimits,
    /// Webhooks about approval requests.
    pub notifier: crate::notify::Notifier,
    pub enforcement_points: Vec<EnforcementPoint>,
    pub server: ServerConfig,
}

/// What the transport knows about the peer, for caller authentication.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// True when the connection is TLS (discovery then publishes `https` URLs).
    pub tls: bool,
    /// URI SANs of a verified client certificate (mTLS).
    pub client_uri_sans: Vec<String>,
}

/// A request refused before any decision was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable snake_case code (`invalid_request`, `token_expired`, `subject_mismatch`, ...).
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when there is one (`resource.type`).
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A 400 naming the field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut body = serde_json::json!({
            "error": self.code,
            "message": self.message,
        });
        if let (Some(field), Some(obj)) = (self.field, body.as_object_mut()) {
            obj.insert("field".into(), field.into());
        }
        let mut resp = json_response(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// A decision as answered, with the approval request an escalation created or repeated, or
/// the grant that allowed it.
#[derive(Debug, Clone)]
pub struct Settled {
    pub decision: Decision,
    /// The approvers (with their rationale) behind a grant that allowed this check.
    pub approvers: Vec<crate::audit::Approver>,
    /// Present exactly when the answer is an escalation.
    pub approval: Option<ApprovalRequest>,
    /// Present when an earlier approval of exactly this request allowed it.
    pub grant: Option<Grant>,
}

/// Decide `req`, settle an escalation against the approval store, and record the decision in
/// the audit log before anyone sees it. `started` is when the request handler began: the
/// record's latency runs from there to the decision.
pub async fn decide_and_record(state: &AppState, req: &CheckRequest, started: Instant) -> Settled {
    settle(state, req, state.engine.decide(req), started).await
}

/// Settle (if an escalation) and record `decision` about `req`; the answer to give.
pub async fn settle(
    state: &AppState,
    req: &CheckRequest,
    decision: Decision,
    started: Instant,
) -> Settled {
    let mut settled = settle_escalation(state, req, decision).await;
    if let Some(deny) = record(state, req, &settled, started) {
        settled.decision = deny;
    }
    if settled.decision.outcome != Outcome::Escalate {
        settled.approval = None;
    }
    if settled.decision.outcome != Outcome::Allow {
        settled.grant = None;
        settled.approvers.clear();
    }
    settled
}

/// An escalation is allowed by an active grant bound to exactly this request (its binding
/// hash) under the same policy version; otherwise it becomes a pending approval request, or
/// returns the pending one with the same binding hash (a retrying agent floods no approvers).
async fn settle_escalation(state: &AppState, req: &CheckRequest, decision: Decision) -> Settled {
    let Some(requirement) = decision
        .approval
        .as_ref()
        .filter(|_| decision.outcome == Outcome::Escalate)
    else {
        return Settled {
            decision,
            approvers: Vec::new(),
            approval: None,
            grant: None,
        };
    };
    let now = state.engine.now();
    let new = NewRequest::from_escalation(
        req,
        requirement,
        &decision.policy_version,
        &decision.policy_ids,
        now,
        state.request_ttl,
    );
    // From the grant cache when it may be trusted, else from the store (shared/DESIGN.md §4).
    match state
        .grants
        .active(state.store.as_ref(), &new.binding_hash(), now)
        .await
    {
        // A grant outlives no policy change: under another version the request is asked for
        // again (SECURITY A-09 errs on the side of a new approval).
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
                        authzen::rfc3339(grant.expires_at)
                    ),
                }],
                approval: None,
                ..decision
            };
            // Who approved, and why, belongs in the record of every decision the grant allows.
            return Settled {
                decision: allowed,
                approvers: active.approvers.clone(),
                approval: None,
                grant: Some(grant),
            };
        }
        Ok(_) => {}
        Err(e) => return store_failure(decision, &e),
    }
    // The approver is shown the policies that asked, as they were in this decision's bundle.
    let Some(texts) = state
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
        .with_limits(state.escalation_limits);
    match state.store.create_or_get_pending(new).await {
        Ok((request, created)) => {
            if created {
                state.notifier.send("created", &request);
            }
            Settled {
                decision,
                approvers: Vec::new(),
                approval: Some(request),
                grant: None,
            }
        }
        Err(e) => store_failure(decision, &e),
    }
}

/// Fail closed (SECURITY R-04a): an escalation the store cannot settle is a deny, never an
/// allow and never a silent dead end. A principal at its escalation limits (SECURITY A-16) is
/// told which limit.
fn store_failure(decision: Decision, e: &crate::approval::StoreError) -> Settled {
    if let crate::approval::StoreError::RateLimited { .. } = e {
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

/// An escalation that could not become an approval request, as a deny with `code`.
fn escalation_denied(decision: Decision, code: &'static str, message: String) -> Settled {
    Settled {
        decision: Decision {
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
        },
        approvers: Vec::new(),
        approval: None,
        grant: None,
    }
}

/// Reason code of a deny caused by an approval store that cannot take the request.
pub const ESCALATION_UNAVAILABLE: &str = "escalation_unavailable";
/// Reason code of a deny because the principal is at its escalation limits (SECURITY A-16).
pub const ESCALATION_RATE_LIMITED: &str = "escalation_rate_limited";

/// Record the decision of `settled` about `req` in the audit log. `Some(deny)` when it could
/// not be recorded: that deny is the answer instead (see [`decide_and_record`]).
pub fn record(
    state: &AppState,
    req: &CheckRequest,
    settled: &Settled,
    started: Instant,
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
    match state.audit.append(&record.into()) {
        Ok(_) => None,
        // Fail closed (SECURITY §0 item 2, P-04): no decision is answered without its audit
        // record, so whatever policy said, the answer is a deny. The failure is counted
        // (`AuditLog::write_failures`); this deny itself cannot be recorded.
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

/// What a check response says about the grant that allowed it.
pub fn grant_json(g: &Grant) -> serde_json::Value {
    serde_json::json!({
        "id": g.id.to_string(),
        "approval_request": g.request_id.to_string(),
        "expires_at": authzen::rfc3339(g.expires_at),
    })
}

/// What a check response says about the approval request of an escalation.
pub fn approval_request_json(a: &ApprovalRequest) -> serde_json::Value {
    serde_json::json!({
        "id": a.id.to_string(),
        "status": a.status.as_str(),
        "status_url": format!("/v1/approvals/{}", a.id),
        "expires_at": authzen::rfc3339(a.expires_at),
    })
}

/// Reason code of a deny caused by an audit log that cannot be written.
pub const AUDIT_UNAVAILABLE: &str = "audit_unavailable";

/// Serialize `value` as a JSON response. Serialization of our own types cannot fail; if it
/// ever did, the client gets a 500 with no decision in it, never an allow.
pub fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(b) => json_bytes_response(status, b),
        Err(_) => json_bytes_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":"internal","message":"response serialization failed"}"#.to_vec(),
        ),
    }
}

/// A response whose body is JSON already serialized.
pub fn json_bytes_response(status: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Route one request. `X-Request-ID` is echoed on every response (AuthZEN §transport).
pub async fn route(
    state: Arc<AppState>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<Body> {
    let request_id = req.headers().get("x-request-id").cloned();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut resp = match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => admin::healthz(),
        (&Method::GET, "/readyz") => admin::readyz(&state),
        (&Method::POST, "/v1/check") => http::check(&state, &conn, req).await,
        (&Method::POST, "/access/v1/evaluation") => authzen::evaluation(&state, &conn, req).await,
        (&Method::POST, "/access/v1/evaluations") => authzen::evaluations(&state, &conn, req).await,
        (&Method::GET, "/v1/approvals") => approvals::list(&state, &conn, req).await,
        (&Method::GET, approvals::GRANTS) => approvals::grants(&state, &conn, req).await,
        (&Method::POST, p) if p.starts_with(approvals::GRANTS) && p.ends_with("/revoke") => {
            approvals::revoke(&state, &conn, req).await
        }
        (&Method::POST, p) if p.starts_with(approvals::PREFIX) && p.ends_with("/cancel") => {
            approvals::cancel(&state, &conn, req).await
        }
        (&Method::GET, p) if p.starts_with(approvals::PREFIX) => {
            approvals::show(&state, &conn, req).await
        }
        (&Method::POST, p) if p.starts_with(approvals::PREFIX) && p.ends_with("/approve") => {
            approvals::review(&state, &conn, req, crate::approval::Verdict::Approve).await
        }
        (&Method::POST, p) if p.starts_with(approvals::PREFIX) && p.ends_with("/deny") => {
            approvals::review(&state, &conn, req, crate::approval::Verdict::Deny).await
        }
        (&Method::GET, p) if p.starts_with("/.well-known/authzen-configuration") => {
            authzen::discovery(&state, &conn, &req)
        }
        (
            _,
            "/healthz"
            | "/readyz"
            | "/v1/check"
            | "/access/v1/evaluation"
            | "/access/v1/evaluations"
            | "/.well-known/authzen-configuration",
        ) => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("`{method}` is not allowed on `{path}`"),
        )
        .into_response(),
        _ => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint at `{path}`"),
        )
        .into_response(),
    };
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    resp
}
