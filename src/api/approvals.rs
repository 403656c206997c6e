//! The approvals API: `GET /v1/approvals/{id}` (the status of an approval request, for the
//! agent that asked: the `status_url` of an escalation) and `POST /v1/approvals/{id}/approve`
//! or `/deny` (an approver's review).
//!
//! A request is shown only to the principal it belongs to; anyone else gets the same `404`
//! as for an id that does not exist, so ids cannot be probed (SECURITY A-22).
//!
//! An approver authenticates with its own token and must (1) not be in the request's
//! requester set: the principal itself, its owner, anyone in its `act` chain;
//! (2) belong to one of the request's current approver groups; (3) be permitted action
//! `approve` on the `ApprovalRequest` by the policy bundle, so who may approve what is
//! policy-as-code too. The approver's identity comes only from its token.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use uuid::Uuid;

use std::sync::Arc;

use super::authzen::rfc3339;
use super::body::{self, WrongTypeStatus};
use super::caller::{Caller, authenticate};
use super::{ApiError, AppState, Body, ConnInfo, grant_json, json_response};
use crate::approval::{ApprovalRequest, Review, StoreError, Verdict};
use crate::audit::EventRecord;
use crate::decision::{CheckRequest, Outcome, Resource};
use crate::identity::Principal;

pub const PREFIX: &str = "/v1/approvals/";

/// `POST /v1/approvals/{id}/approve` or `/deny`.
pub async fn review(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
    verdict: Verdict,
) -> Response<Body> {
    match review_inner(state, conn, req, verdict).await {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

fn forbidden(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, code, message)
}

fn store_error(e: &StoreError, id: &str) -> ApiError {
    match e.code() {
        "not_found" => not_found(id),
        code @ ("request_expired" | "not_pending" | "already_reviewed" | "conflict") => {
            ApiError::new(StatusCode::CONFLICT, code, e.to_string())
        }
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the approval store is unavailable: {}", e.code()),
        ),
    }
}

async fn review_inner(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
    verdict: Verdict,
) -> Result<serde_json::Value, ApiError> {
    let caller = authenticate(state, conn, req.headers()).await?;
    let raw = req
        .uri()
        .path()
        .trim_start_matches(PREFIX)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let Caller::Agent(approver) = caller else {
        // an enforcement point or bot cannot approve in its own name.
        return Err(forbidden(
            "approver_required",
            "approvals are made with the approver's own token, not an enforcement point's".into(),
        ));
    };
    let map =
        body::read_json_object(req, &state.server, WrongTypeStatus::UnsupportedMediaType).await?;
    body::only_known(&map, "", &["rationale", "evidence"])?;
    let rationale = body::string(&map, "", "rationale")?.trim().to_owned();
    if rationale.is_empty() {
        return Err(ApiError::field("rationale", "must say why"));
    }
    let evidence = body::opt_object(&map, "", "evidence")?
        .cloned()
        .unwrap_or_default();
    let id = Uuid::parse_str(&raw).map_err(|_| not_found(&raw))?;
    let request = state
        .store
        .get(id)
        .await
        .map_err(|e| store_error(&e, &raw))?
        .ok_or_else(|| not_found(&raw))?;

    // Separation of duties: nobody in the requester set, whatever the policy says.
    let p = &request.principal;
    if approver.id == p.id
        || p.owner.as_deref() == Some(approver.id.as_str())
        || p.actors.iter().any(|a| *a == approver.id)
    {
        return Err(forbidden(
            "self_approval_forbidden",
            format!(
                "`{}` is the requester, its owner or in its delegation chain: it cannot review this request",
                approver.id
            ),
        ));
    }
    if !approver
        .groups
        .iter()
        .any(|g| request.current_groups.contains(g))
    {
        return Err(forbidden(
            "not_an_approver",
            format!(
                "`{}` is in none of the approver groups of this request ({})",
                approver.id,
                request.current_groups.join(", ")
            ),
        ));
    }
    if verdict == Verdict::Approve {
        for kind in &request.evidence {
            match evidence.get(kind) {
                Some(serde_json::Value::String(v)) if !v.trim().is_empty() => {}
                _ => {
                    return Err(ApiError::field(
                        format!("evidence.{kind}"),
                        format!("the policy asks for `{kind}` evidence with every approval"),
                    ));
                }
            }
        }
    }
    approve_permitted(state, &approver, &request)?;

    let now = state.engine.now();
    let outcome = state
        .store
        .review(
            Review {
                request_id: id,
                approver_id: approver.id.clone(),
                approver_issuer: approver.issuer.clone(),
                verdict,
                rationale: rationale.clone(),
                evidence: evidence.clone(),
                at: now,
            },
            now,
        )
        .await
        .map_err(|e| store_error(&e, &raw))?;

    // Approval events are on disk before they are acknowledged.
    let detail = json!({
        "request_id": id.to_string(),
        "approver": {"id": approver.id, "issuer": approver.issuer},
        "verdict": match verdict { Verdict::Approve => "approve", Verdict::Deny => "deny" },
        "rationale": rationale,
        "evidence": evidence,
        "status": outcome.request.status.as_str(),
        "grant_id": outcome.grant.as_ref().map(|g| g.id.to_string()),
    });
    state
        .audit
        .append_durable(&EventRecord::new("approval_review", &detail).into())
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                format!("the review was stored but could not be audited: {e}"),
            )
        })?;
    Ok(json!({
        "request": view(&outcome.request),
        "grant": outcome.grant.as_ref().map(grant_json),
    }))
}

/// The bundle's verdict on `approver` approving `request`: action `approve` on an
/// `ApprovalRequest` entity carrying the request's action, groups and requester. Anything but
/// an allow refuses the review (a bundle that does not declare `approve` admits no approver).
fn approve_permitted(
    state: &AppState,
    approver: &Arc<Principal>,
    request: &ApprovalRequest,
) -> Result<(), ApiError> {
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
        context: serde_json::Map::new(),
    };
    let decision = state.engine.decide(&check);
    if decision.outcome == Outcome::Allow {
        return Ok(());
    }
    let why = decision
        .reasons
        .first()
        .map(|r| r.message.clone())
        .unwrap_or_default();
    Err(forbidden(
        "approval_not_permitted",
        format!(
            "the policy does not permit `{}` to approve this request: {why}",
            approver.id
        ),
    ))
}

pub async fn show(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    match show_inner(state, conn, req).await {
        Ok(r) => json_response(StatusCode::OK, &view(&r)),
        Err(e) => e.into_response(),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no approval request `{id}` for this caller"),
    )
}

async fn show_inner(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<ApprovalRequest, ApiError> {
    let caller = authenticate(state, conn, req.headers()).await?;
    let raw = req.uri().path().trim_start_matches(PREFIX).to_owned();
    let id = Uuid::parse_str(&raw).map_err(|_| not_found(&raw))?;
    let request = state
        .store
        .get(id)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("the approval store cannot be read: {}", e.code()),
            )
        })?
        .ok_or_else(|| not_found(&raw))?;
    match caller {
        Caller::Agent(p)
            if p.kind == request.principal.kind
                && p.id == request.principal.id
                && p.issuer == request.principal.issuer =>
        {
            Ok(request)
        }
        _ => Err(not_found(&raw)),
    }
}

fn view(r: &ApprovalRequest) -> serde_json::Value {
    json!({
        "id": r.id.to_string(),
        "status": r.status.as_str(),
        "binding_hash": r.binding_hash,
        "principal": {"type": r.principal.kind, "id": r.principal.id, "issuer": r.principal.issuer},
        "action": r.action,
        "resource": {"type": r.resource.kind, "id": r.resource.id, "properties": r.resource.properties},
        "context": r.context,
        "policy_version": r.policy_version,
        "policy_ids": r.policy_ids,
        "groups": r.groups,
        "current_groups": r.current_groups,
        "quorum": r.quorum,
        "evidence": r.evidence,
        "grant_ttl": humantime::format_duration(r.grant_ttl).to_string(),
        "fallback": r.fallback,
        "created_at": rfc3339(r.created_at),
        "expires_at": rfc3339(r.expires_at),
    })
}
