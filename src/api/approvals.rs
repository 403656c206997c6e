//! The approvals API, first part: `GET /v1/approvals/{id}`, the status of an approval
//! request, for the agent that asked (the `status_url` of an escalation).
//!
//! A request is shown only to the principal it belongs to; anyone else gets the same `404`
//! as for an id that does not exist, so ids cannot be probed (SECURITY A-22). Approvers'
//! views and actions come with the rest of the approvals API.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use uuid::Uuid;

use super::authzen::rfc3339;
use super::caller::{Caller, authenticate};
use super::{ApiError, AppState, Body, ConnInfo, json_response};
use crate::approval::ApprovalRequest;

pub const PREFIX: &str = "/v1/approvals/";

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
