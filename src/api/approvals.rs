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
    let raw = path_id(req.uri().path(), PREFIX);
    let Caller::Agent(approver) = caller else {
        // an enforcement point or bot cannot approve in its own name.
        return Err(forbidden(
            "approver_required",
            "approvals are made with the approver's own token, not an enforcement point's".into(),
        ));
    };
    let map =
        body::read_json_object(req, &state.server, WrongTypeStatus::UnsupportedMediaType).await?;
    body::only_known(&map, "", &["rationale", "evidence", "binding_hash"])?;
    // What the approver was shown (`binding_hash` of the view), when the client sends it: a
    // review lands only on exactly that request (issue 4: approving a request other than the
    // one shown is refused).
    let shown = match map.get("binding_hash") {
        None => None,
        Some(_) => Some(body::string(&map, "", "binding_hash")?.to_owned()),
    };
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
    if !approver_groups(state, &approver)
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

    if let Some(shown) = shown.filter(|h| *h != request.binding_hash) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "request_mismatch",
            format!(
                "approval request `{id}` is not the request that was shown: its binding hash is `{}`, the review names `{shown}`",
                request.binding_hash
            ),
        ));
    }

    // Ordering of review and audit (issue 4 point 8, SECURITY §0 item 8): no review takes
    // effect without its audit event. The review as submitted (request, approver, verdict,
    // rationale, evidence) is written and synced first; only then is it given to the store.
    // If that event cannot be written, the review is refused (503) and the request is left as
    // it was. After the store has answered, a second event says what became of the attempt:
    // `applied` (with the new status and grant), `refused` (the store's reason: another
    // review won, the request expired...) or `store_error` (the store failed; whether it
    // committed is the store's to say). An attempt event without an outcome event means the
    // log failed in between; the store is then the truth. The alternative, holding the store
    // transaction open across the audit sync, would keep SQLite's write lock during an
    // fdatasync and put audit I/O inside every backend; this keeps both apart.
    let now = state.engine.now();
    let attempt = json!({
        "request_id": id.to_string(),
        "binding_hash": request.binding_hash,
        "policy_version": request.policy_version,
        "approver": {"id": approver.id, "issuer": approver.issuer},
        "verdict": verdict.as_str(),
        "rationale": rationale,
        "evidence": evidence,
    });
    append_durable(state, "approval_review", &attempt).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            format!("the review was not recorded, the audit log cannot be written: {e}"),
        )
    })?;
    let result = state
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
        .await;
    // A grant this review created must be visible to the next check at once; invalidated
    // whatever the outcome, since an error may follow a commit.
    state.grants.invalidate(&request.binding_hash);
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            let refused = store_error(&e, &raw);
            let kind = if refused.status == StatusCode::SERVICE_UNAVAILABLE {
                "store_error"
            } else {
                "refused"
            };
            let detail = json!({
                "request_id": id.to_string(),
                "approver": {"id": approver.id, "issuer": approver.issuer},
                "outcome": kind,
                "error": e.code(),
            });
            // The refusal is the answer either way; a log that fails here fails the next
            // decision too.
            if let Err(audit) = append_durable(state, "approval_review_outcome", &detail) {
                tracing::error!(error = %audit, request_id = %id, "review refusal not audited");
            }
            return Err(refused);
        }
    };

    let status = outcome.request.status.as_str();
    if matches!(status, "approved" | "denied") {
        state.notifier.send(status, &outcome.request);
    }
    let detail = json!({
        "request_id": id.to_string(),
        "approver": {"id": approver.id, "issuer": approver.issuer},
        "outcome": "applied",
        "status": status,
        "grant_id": outcome.grant.as_ref().map(|g| g.id.to_string()),
    });
    append_durable(state, "approval_review_outcome", &detail).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            format!(
                "the review was audited and applied (the request is {status}), but its outcome could not be audited: {e}"
            ),
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

fn store_read_error(e: &StoreError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("the approval store cannot be read: {}", e.code()),
    )
}

/// The requester sees its own request; an approver of its current groups sees what it is
/// asked to approve. Everyone else is told it does not exist. The caller's approver groups
/// are worked out once, for every request it is asked about.
fn viewer<'c>(state: &AppState, caller: &'c Caller) -> impl Fn(&ApprovalRequest) -> bool + 'c {
    let groups = match caller {
        Caller::Agent(p) => approver_groups(state, p),
        Caller::EnforcementPoint { .. } => Vec::new(),
    };
    move |request| {
        is_requester(caller, request) || groups.iter().any(|g| request.current_groups.contains(g))
    }
}

/// The groups `p` approves for: its token's groups claim, and the entities the bundle's
/// entity data puts it in (`Agent::"alice"` with parent `Team::"finance-approvers"` is in
/// `finance-approvers`), so membership can live in the identity provider or in the bundle.
pub fn approver_groups(state: &AppState, p: &Principal) -> Vec<String> {
    let mut groups = p.groups.clone();
    let bundle = state.engine.bundle();
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

/// The caller is the principal the request was made for (same type, id and issuer).
fn is_requester(caller: &Caller, request: &ApprovalRequest) -> bool {
    matches!(caller, Caller::Agent(p)
        if p.kind == request.principal.kind
            && p.id == request.principal.id
            && p.issuer == request.principal.issuer)
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

/// Write an approval event and sync it to disk.
fn append_durable(
    state: &AppState,
    event: &str,
    detail: &serde_json::Value,
) -> Result<(), crate::audit::AuditError> {
    state
        .audit
        .append_durable(&EventRecord::new(event, detail).into())
        .map(|_| ())
}

/// Write an approval event and sync it: the change it records was stored, and is not
/// acknowledged until it is on disk too.
fn audit_event(
    state: &AppState,
    event: &str,
    detail: &serde_json::Value,
    what: &str,
) -> Result<(), ApiError> {
    append_durable(state, event, detail).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            format!("the {what} was stored but could not be audited: {e}"),
        )
    })
}

/// Longest a status request may wait for a change (`?wait=`).
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// How often a waiting status request looks at the store again.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

async fn show_inner(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<ApprovalRequest, ApiError> {
    let caller = authenticate(state, conn, req.headers()).await?;
    let raw = path_id(req.uri().path(), PREFIX);
    let wait = match query_param(req.uri().query(), "wait") {
        None => None,
        Some(w) => Some(
            humantime::parse_duration(&w)
                .ok()
                .filter(|d| *d <= MAX_WAIT)
                .ok_or_else(|| {
                    ApiError::field("wait", format!("`{w}` is not a duration of at most 60s"))
                })?,
        ),
    };
    let id = Uuid::parse_str(&raw).map_err(|_| not_found(&raw))?;
    let request = state
        .store
        .get(id)
        .await
        .map_err(|e| store_read_error(&e))?
        .ok_or_else(|| not_found(&raw))?;
    if !viewer(state, &caller)(&request) {
        return Err(not_found(&raw));
    }
    let Some(wait) = wait else {
        return Ok(request);
    };
    // Long poll: answer as soon as the status changes, or with the current one at the end.
    let deadline = tokio::time::Instant::now() + wait;
    let mut current = request;
    let initial = current.status;
    while current.status == initial && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(WAIT_POLL.min(deadline - tokio::time::Instant::now())).await;
        if let Some(r) = state
            .store
            .get(id)
            .await
            .map_err(|e| store_read_error(&e))?
        {
            current = r;
        }
    }
    Ok(current)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_owned())
    })
}

/// `POST /v1/approvals/{id}/cancel`: the requester withdraws its own pending request.
pub async fn cancel(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let result = async {
        let caller = authenticate(state, conn, req.headers()).await?;
        let raw = path_id(req.uri().path(), PREFIX);
        let id = Uuid::parse_str(&raw).map_err(|_| not_found(&raw))?;
        let request = state
            .store
            .get(id)
            .await
            .map_err(|e| store_read_error(&e))?
            .ok_or_else(|| not_found(&raw))?;
        if !is_requester(&caller, &request) {
            return Err(not_found(&raw));
        }
        let cancelled = state
            .store
            .cancel(id, state.engine.now())
            .await
            .map_err(|e| store_error(&e, &raw))?;
        let detail = json!({"request_id": id.to_string(), "by": request.principal.id});
        audit_event(state, "approval_cancelled", &detail, "cancellation")?;
        Ok(cancelled)
    }
    .await;
    match result {
        Ok(r) => json_response(StatusCode::OK, &view(&r)),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/approvals?status=pending&group=g&limit=n&after=id`: the requests an approver may
/// review, newest last; only groups the caller belongs to.
pub async fn list(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let result = async {
        let Caller::Agent(caller) = authenticate(state, conn, req.headers()).await? else {
            return Err(forbidden(
                "approver_required",
                "listing approval requests needs an approver's own token".into(),
            ));
        };
        let q = req.uri().query();
        let status = match query_param(q, "status") {
            None => None,
            Some(s) => Some(crate::approval::Status::parse(&s).ok_or_else(|| {
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
        let after = match query_param(q, "after") {
            None => None,
            Some(a) => Some(
                Uuid::parse_str(&a)
                    .map_err(|_| ApiError::field("after", format!("`{a}` is not a request id")))?,
            ),
        };
        let member_of = approver_groups(state, &caller);
        let groups: Vec<String> = match query_param(q, "group") {
            Some(g) if member_of.contains(&g) => vec![g],
            Some(g) => {
                return Err(forbidden(
                    "not_an_approver",
                    format!("`{}` is not in group `{g}`", caller.id),
                ));
            }
            None => member_of,
        };
        let mut out: Vec<ApprovalRequest> = Vec::new();
        for group in groups {
            let page = state
                .store
                .list(crate::approval::ListFilter {
                    status,
                    group: Some(group),
                    limit,
                    after,
                })
                .await
                .map_err(|e| store_read_error(&e))?;
            for r in page {
                if !out.iter().any(|o| o.id == r.id) {
                    out.push(r);
                }
            }
        }
        out.sort_by_key(|r| (r.created_at, r.id));
        Ok(json!({"requests": out.iter().map(view).collect::<Vec<_>>()}))
    }
    .await;
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
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
        "fallback": r.fallback,
        "created_at": rfc3339(r.created_at),
        "expires_at": rfc3339(r.expires_at),
    })
}

/// Grants, as seen through the requests they came from.
pub const GRANTS: &str = "/v1/grants";

/// `GET /v1/grants[?all=true]`: the active (or all) grants of requests the caller may view.
pub async fn grants(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let result = async {
        let caller = authenticate(state, conn, req.headers()).await?;
        let all = query_param(req.uri().query(), "all").is_some_and(|v| v == "true");
        let now = state.engine.now();
        let grants = state
            .store
            .grants(!all, now)
            .await
            .map_err(|e| store_read_error(&e))?;
        // The requests behind them in one read, not one per grant.
        let may_view = viewer(state, &caller);
        let mut ids: Vec<Uuid> = grants.iter().map(|g| g.request_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let visible: std::collections::HashSet<Uuid> = state
            .store
            .get_many(&ids)
            .await
            .map_err(|e| store_read_error(&e))?
            .into_iter()
            .filter(|r| may_view(r))
            .map(|r| r.id)
            .collect();
        let mut out = Vec::new();
        for g in grants {
            if visible.contains(&g.request_id) {
                let mut v = grant_json(&g);
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("revoked".into(), json!(g.revoked_at.is_some()));
                }
                out.push(v);
            }
        }
        Ok::<_, ApiError>(json!({ "grants": out }))
    }
    .await;
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/grants/{id}/revoke`: an approver of the request's groups, or the requester
/// giving it up, ends a grant before its time; an audit event synced before the answer.
pub async fn revoke(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let result = async {
        let caller = authenticate(state, conn, req.headers()).await?;
        let raw = path_id(req.uri().path(), GRANTS);
        let missing = || {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no grant `{raw}` for this caller"),
            )
        };
        let id = Uuid::parse_str(&raw).map_err(|_| missing())?;
        let now = state.engine.now();
        let grant = state
            .store
            .get_grant(id)
            .await
            .map_err(|e| store_read_error(&e))?
            .ok_or_else(missing)?;
        let request = state
            .store
            .get(grant.request_id)
            .await
            .map_err(|e| store_read_error(&e))?
            .ok_or_else(missing)?;
        if !viewer(state, &caller)(&request) {
            return Err(missing());
        }
        let revoked = state.store.revoke_grant(id, now).await;
        // The next check must not be allowed from the cache (SECURITY A-12); invalidated
        // whatever the outcome, since an error may follow a commit.
        state.grants.invalidate(&grant.binding_hash);
        let revoked = revoked.map_err(|e| store_error(&e, &raw))?;
        let by = match &caller {
            Caller::Agent(p) => p.id.clone(),
            Caller::EnforcementPoint { name } => format!("pep:{name}"),
        };
        let detail = json!({"grant_id": id.to_string(), "request_id": grant.request_id.to_string(), "by": by});
        audit_event(state, "grant_revoked", &detail, "revocation")?;
        let mut v = grant_json(&revoked);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("revoked".into(), json!(revoked.revoked_at.is_some()));
        }
        Ok(v)
    }
    .await;
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}
