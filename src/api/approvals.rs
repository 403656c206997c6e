//! The approvals API, an adapter over [`crate::service::approvals`]: each handler parses the
//! path, query and body, calls the service, and renders the result.
//!
//! - `GET /v1/approvals?status=&group=&limit=&after=`: the requests an approver may review;
//! - `GET /v1/approvals/{id}[?wait=30s]`: one request, for its requester and its approvers;
//! - `POST /v1/approvals/{id}/approve` or `/deny`: an approver's review;
//! - `POST /v1/approvals/{id}/cancel`: the requester withdraws its request;
//! - `GET /v1/grants[?all=true]`, `POST /v1/grants/{id}/revoke`.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use uuid::Uuid;

use super::body::{self, WrongTypeStatus};
use super::caller::authenticate;
use super::{ApiError, AppState, Body, ConnInfo, grant_json, json_response};
use crate::approval::{ApprovalRequest, Grant, Status, Verdict};
use crate::clock::rfc3339;
use crate::service::approvals::MAX_WAIT;
use crate::service::{ListQuery, ReviewInput};

pub const PREFIX: &str = "/v1/approvals/";

/// Grants, as seen through the requests they came from.
pub const GRANTS: &str = "/v1/grants";

/// Answer `result` as JSON, or its error.
fn respond(result: Result<serde_json::Value, ApiError>) -> Response<Body> {
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/approvals/{id}/approve` or `/deny`.
pub async fn review(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
    verdict: Verdict,
) -> Response<Body> {
    respond(
        async {
            let caller = authenticate(state, conn, req.headers()).await?;
            let request_id = path_id(req.uri().path(), PREFIX);
            let map =
                body::read_json_object(req, &state.server, WrongTypeStatus::UnsupportedMediaType)
                    .await?;
            body::only_known(&map, "", &["rationale", "evidence", "binding_hash"])?;
            let binding_hash = match map.get("binding_hash") {
                None => None,
                Some(_) => Some(body::string(&map, "", "binding_hash")?.to_owned()),
            };
            let input = ReviewInput {
                request_id,
                verdict,
                rationale: body::string(&map, "", "rationale")?.to_owned(),
                evidence: body::opt_object(&map, "", "evidence")?
                    .cloned()
                    .unwrap_or_default(),
                binding_hash,
            };
            let outcome = state.service.review(&caller, input).await?;
            Ok(json!({
                "request": view(&outcome.request),
                "grant": outcome.grant.as_ref().map(grant_json),
            }))
        }
        .await,
    )
}

/// `GET /v1/approvals/{id}[?wait=30s]`.
pub async fn show(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    respond(
        async {
            let caller = authenticate(state, conn, req.headers()).await?;
            let raw = path_id(req.uri().path(), PREFIX);
            let wait = match query_param(req.uri().query(), "wait") {
                None => None,
                Some(w) => Some(
                    humantime::parse_duration(&w)
                        .ok()
                        .filter(|d| *d <= MAX_WAIT)
                        .ok_or_else(|| {
                            ApiError::field(
                                "wait",
                                format!("`{w}` is not a duration of at most 60s"),
                            )
                        })?,
                ),
            };
            let request = state.service.show(&caller, &raw, wait).await?;
            Ok(view(&request))
        }
        .await,
    )
}

/// `POST /v1/approvals/{id}/cancel`.
pub async fn cancel(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    respond(
        async {
            let caller = authenticate(state, conn, req.headers()).await?;
            let raw = path_id(req.uri().path(), PREFIX);
            Ok(view(&state.service.cancel(&caller, &raw).await?))
        }
        .await,
    )
}

/// `GET /v1/approvals?status=pending&group=g&limit=n&after=id`: newest last.
pub async fn list(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    respond(
        async {
            let caller = authenticate(state, conn, req.headers()).await?;
            let q = req.uri().query();
            let status = match query_param(q, "status") {
                None => None,
                Some(s) => Some(Status::parse(&s).ok_or_else(|| {
                    ApiError::field(
                        "status",
                        format!("`{s}` is not pending, approved, denied, expired or cancelled"),
                    )
                })?),
            };
            let limit = match query_param(q, "limit") {
                None => 0,
                Some(l) => l
                    .parse()
                    .map_err(|_| ApiError::field("limit", format!("`{l}` is not a number")))?,
            };
            let after =
                match query_param(q, "after") {
                    None => None,
                    Some(a) => Some(Uuid::parse_str(&a).map_err(|_| {
                        ApiError::field("after", format!("`{a}` is not a request id"))
                    })?),
                };
            let query = ListQuery {
                status,
                group: query_param(q, "group"),
                limit,
                after,
            };
            let requests = state.service.list(&caller, query).await?;
            Ok(json!({"requests": requests.iter().map(view).collect::<Vec<_>>()}))
        }
        .await,
    )
}

/// `GET /v1/grants[?all=true]`: the active (or all) grants of requests the caller may view.
pub async fn grants(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    respond(
        async {
            let caller = authenticate(state, conn, req.headers()).await?;
            let all = query_param(req.uri().query(), "all").is_some_and(|v| v == "true");
            let grants = state.service.grants(&caller, all).await?;
            Ok(json!({ "grants": grants.iter().map(grant_view).collect::<Vec<_>>() }))
        }
        .await,
    )
}

/// `POST /v1/grants/{id}/revoke`.
pub async fn revoke(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    respond(
        async {
            let caller = authenticate(state, conn, req.headers()).await?;
            let raw = path_id(req.uri().path(), GRANTS);
            Ok(grant_view(&state.service.revoke(&caller, &raw).await?))
        }
        .await,
    )
}

/// A grant as the grants API shows it: the check response's view plus whether it was revoked.
fn grant_view(g: &Grant) -> serde_json::Value {
    let mut v = grant_json(g);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("revoked".into(), json!(g.revoked_at.is_some()));
    }
    v
}

/// The id segment of `/prefix/{id}[/verb]`.
fn path_id(path: &str, prefix: &str) -> String {
    path.trim_start_matches(prefix)
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_owned())
    })
}

fn view(r: &ApprovalRequest) -> serde_json::Value {
    json!({
        "id": r.id.to_string(),
        "status": r.status.as_str(),
        "binding_hash": r.binding_hash,
        "principal": {
            "type": r.principal.kind,
            "id": r.principal.id,
            "issuer": r.principal.issuer,
            "owner": r.principal.owner,
            // On whose behalf: the RFC 8693 delegation chain, current actor first.
            "acting_for": r.principal.actors,
            "attributes": r.principal.attributes,
        },
        "action": r.action,
        "resource": {"type": r.resource.kind, "id": r.resource.id, "properties": r.resource.properties},
        "context": r.context,
        "policy_version": r.policy_version,
        "policy_ids": r.policy_ids,
        // The Cedar source of each policy that asked, as it was in `policy_version` (issue 4
        // point 3): the approver reads the rule, not only its name.
        "policy_text": r.policy_text,
        "groups": r.groups,
        "current_groups": r.current_groups,
        "quorum": r.quorum,
        "evidence": r.evidence,
        "grant_ttl": humantime::format_duration(r.grant_ttl).to_string(),
        // What the grant will allow once approved (`@grant_scope`): the approver sees it
        // before deciding.
        "grant_scope": r.grant_scope.as_str(),
        "fallback": r.fallback,
        "created_at": rfc3339(r.created_at),
        "expires_at": rfc3339(r.expires_at),
    })
}
