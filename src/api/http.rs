//! The native decision API: `POST /v1/check` with the agent's workload token.
//!
//! Body: `{"action": "...", "resource": {"type", "id", "properties"?}, "context"?: {...},
//! "subject"?: {"type", "id", "properties"?}}`. Unknown fields are refused (a typo must not
//! silently drop input a policy depends on). Answer: `200` with
//! `{decision, decision_id, policy_version, policy_ids, reasons, approval?}`.

use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use super::body::{self, WrongTypeStatus};
use super::caller::{Caller, authenticate, subject_principal};
use super::{
    ApiError, AppState, Body, ConnInfo, Settled, approval_request_json, grant_json, json_response,
    settle,
};
use crate::decision::{ApprovalRequirement, CacheKey, CheckRequest, Reason, Resource};

#[derive(Debug, Serialize)]
struct CheckResponse<'a> {
    decision: &'static str,
    decision_id: String,
    policy_version: &'a str,
    policy_ids: &'a [String],
    reasons: &'a [Reason],
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<&'a ApprovalRequirement>,
    /// The approval request an escalation created (or the pending one it repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    approval_request: Option<serde_json::Value>,
    /// The grant that allowed this check (an earlier approval of exactly this request).
    #[serde(skip_serializing_if = "Option::is_none")]
    grant: Option<serde_json::Value>,
}

pub async fn check(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    match check_inner(state, conn, req).await {
        Ok(settled) => decision_response(&settled),
        Err(e) => e.into_response(),
    }
}

async fn check_inner(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Settled, ApiError> {
    let started = Instant::now();
    // Authenticate before reading the body: an unauthenticated caller costs no body parsing.
    let caller = authenticate(state, conn, req.headers()).await?;
    // The caller's credential fixes the principal and every attribute it carries; a trusted
    // enforcement point's subject is in the body.
    // Tagged by kind, so no credential of one kind can stand for one of another.
    let credential = match &caller {
        Caller::Agent(p) => match p.credential_digest {
            Some(digest) => [b"sha256:".as_slice(), &digest].concat(),
            None => [b"bearer:".as_slice(), &bearer_bytes(req.headers())].concat(),
        },
        Caller::EnforcementPoint { name } => format!("pep:{name}").into_bytes(),
    };
    let bytes =
        body::read_json_bytes(req, &state.server, WrongTypeStatus::UnsupportedMediaType).await?;
    let now = state.engine.now();
    let key = CacheKey::new()
        .part(&credential)
        .part(&bytes)
        .part(state.engine.bundle().version().as_bytes())
        .part(&now.to_le_bytes())
        .finish();
    // A repeat of the same check within the same second: the same inputs make the same
    // verdict (SECURITY R-04c); it is still a decision of its own, with its own id and record.
    if let Some(hit) = state.decisions.get(&key, now) {
        return Ok(settle(state, &hit.request, hit.fresh(), started).await);
    }
    let request = parse_check(&caller, &bytes)?;
    let verdict = state.engine.decide_at(&request, now);
    let settled = settle(state, &request, verdict.clone(), started).await;
    // Cache the policy's verdict, not an outage: a deny caused by the audit log or the store
    // must not outlive the outage.
    if settled.decision.outcome == verdict.outcome {
        state.decisions.insert(key, now, request, verdict);
    }
    Ok(settled)
}

/// The bearer credential as sent (authentication already checked there is exactly one).
fn bearer_bytes(headers: &hyper::HeaderMap) -> Vec<u8> {
    headers
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default()
}

fn parse_check(caller: &Caller, bytes: &[u8]) -> Result<CheckRequest, ApiError> {
    let map = body::parse_object(bytes)?;
    body::only_known(&map, "", &["subject", "action", "resource", "context"])?;
    let subject = match map.get("subject") {
        None => None,
        Some(_) => Some(body::entity_ref(&map, "subject", true)?),
    };
    let principal = subject_principal(caller, subject.as_ref(), "subject")?;
    let action = body::string(&map, "", "action")?.to_owned();
    let resource = body::entity_ref(&map, "resource", true)?;
    let context = body::context(&map)?;
    Ok(CheckRequest {
        principal,
        action,
        action_properties: None,
        resource: Resource {
            kind: resource.kind,
            id: resource.id,
            properties: resource.properties,
        },
        context,
    })
}

pub fn decision_response(settled: &Settled) -> Response<Body> {
    let d = &settled.decision;
    json_response(
        StatusCode::OK,
        &CheckResponse {
            decision: d.outcome.as_str(),
            decision_id: d.id.to_string(),
            policy_version: &d.policy_version,
            policy_ids: &d.policy_ids,
            reasons: &d.reasons,
            approval: d.approval.as_ref(),
            approval_request: settled.approval.as_ref().map(approval_request_json),
            grant: settled.grant.as_ref().map(grant_json),
        },
    )
}
