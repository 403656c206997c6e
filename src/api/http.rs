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
use super::caller::{authenticate, subject_principal};
use super::{ApiError, AppState, Body, ConnInfo, decide_and_record, json_response};
use crate::decision::{ApprovalRequirement, CheckRequest, Decision, Reason, Resource};

#[derive(Debug, Serialize)]
struct CheckResponse<'a> {
    decision: &'static str,
    decision_id: String,
    policy_version: &'a str,
    policy_ids: &'a [String],
    reasons: &'a [Reason],
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<&'a ApprovalRequirement>,
}

pub async fn check(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    match check_inner(state, conn, req).await {
        Ok(decision) => decision_response(&decision),
        Err(e) => e.into_response(),
    }
}

async fn check_inner(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Decision, ApiError> {
    let started = Instant::now();
    // Authenticate before reading the body: an unauthenticated caller costs no body parsing.
    let caller = authenticate(state, conn, req.headers()).await?;
    let map =
        body::read_json_object(req, &state.server, WrongTypeStatus::UnsupportedMediaType).await?;
    body::only_known(&map, "", &["subject", "action", "resource", "context"])?;
    let subject = match map.get("subject") {
        None => None,
        Some(_) => Some(body::entity_ref(&map, "subject", true)?),
    };
    let principal = subject_principal(&caller, subject.as_ref(), "subject")?;
    let action = body::string(&map, "", "action")?.to_owned();
    let resource = body::entity_ref(&map, "resource", true)?;
    let context = body::context(&map)?;
    let request = CheckRequest {
        principal,
        action,
        action_properties: None,
        resource: Resource {
            kind: resource.kind,
            id: resource.id,
            properties: resource.properties,
        },
        context,
    };
    Ok(decide_and_record(state, &request, started))
}

pub fn decision_response(d: &Decision) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &CheckResponse {
            decision: d.outcome.as_str(),
            decision_id: d.id.to_string(),
            policy_version: &d.policy_version,
            policy_ids: &d.policy_ids,
            reasons: &d.reasons,
            approval: d.approval.as_ref(),
        },
    )
}
