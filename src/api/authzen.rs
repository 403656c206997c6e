//! OpenID AuthZEN Authorization API 1.0 (what is implemented and the specifications'
//! addresses: docs/authzen.md): access evaluation, boxcarred evaluations with all three
//! `evaluations_semantic` values, and PDP metadata discovery.
//!
//! Mapping onto the core: `subject` is the Cedar principal (`type::"id"`, `properties` as
//! attributes); `action.name` is `Action::"name"` and `action.properties` reach policies as
//! `context.mandate.action`; `resource` is the resource entity; `context` the context.
//! Unknown request members are ignored, as the specification requires. An escalation is a
//! denial (`decision: false`) with `context.reason = "approval_required"` and
//! `context.access_request`, as the Access Request and Approval profile describes.

use crate::metrics::Api;
use crate::service::Call;

use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::{Request, Response, StatusCode};
use serde_json::{Map, Value, json};

use super::body::{self, EntityRef, WrongTypeStatus};
use super::caller::{Caller, authenticate, subject_principal};
use super::{ApiError, AppState, Body, ConnInfo, approval_request_json, json_response};
use crate::clock::rfc3339;
use crate::service::Settled;
use crate::vocabulary::{CheckRequest, Outcome, Resource};

/// How long a requestable denial stays valid for submission (Teleport's default pending
/// request TTL); the approval workflow binds to the evaluation id within this window.
pub const ACCESS_REQUEST_TTL_SECS: i64 = 3600;

pub async fn evaluation(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<Body> {
    let mut call = super::call_from(state, Api::Authzen, req.headers());
    let (caller, map) = match authenticate_and_read(state, conn, req, &mut call).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    match evaluate_one(state, &caller, &map, "", call).await {
        Ok(d) => json_response(StatusCode::OK, &decision_json(&d)),
        Err(e) => e.into_response(),
    }
}

pub async fn evaluations(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<Body> {
    let mut call = super::call_from(state, Api::Authzen, req.headers());
    let (caller, map) = match authenticate_and_read(state, conn, req, &mut call).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    match evaluations_inner(state, &caller, &map, call).await {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

async fn authenticate_and_read(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
    call: &mut Call,
) -> Result<(Caller, Map<String, Value>), ApiError> {
    let caller = call
        .identify(authenticate(state, conn, req.headers()))
        .await?;
    let map = body::read_json_object(req, &state.server, WrongTypeStatus::BadRequest).await?;
    Ok((caller, map))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Semantic {
    ExecuteAll,
    DenyOnFirstDeny,
    PermitOnFirstPermit,
}

async fn evaluations_inner(
    state: &AppState,
    caller: &Caller,
    map: &Map<String, Value>,
    call: Call,
) -> Result<Value, ApiError> {
    // Without an `evaluations` array the endpoint answers like the single evaluation API.
    let Some((items, semantic)) = batch(map)? else {
        return evaluate_one(state, caller, map, "", call)
            .await
            .map(|d| decision_json(&d));
    };
    let mut results = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("evaluations[{i}]");
        let outcome = match batch_item(map, item, &prefix) {
            Ok(merged) => evaluate_one(state, caller, &merged, &prefix, call.clone()).await,
            Err(e) => Err(e),
        };
        // Per-item failures are denials carrying the error (fail closed), not a failed batch.
        let (allowed, value) = match outcome {
            Ok(d) => (d.decision.outcome == Outcome::Allow, decision_json(&d)),
            Err(e) => (false, item_error(&e)),
        };
        results.push(value);
        let stop = match semantic {
            Semantic::ExecuteAll => false,
            Semantic::DenyOnFirstDeny => !allowed,
            Semantic::PermitOnFirstPermit => allowed,
        };
        if stop {
            break;
        }
    }
    Ok(json!({ "evaluations": results }))
}

/// The items and semantic of a boxcarred request; `None` when the body has no (or an empty)
/// `evaluations` array and is a single evaluation.
fn batch(map: &Map<String, Value>) -> Result<Option<(&[Value], Semantic)>, ApiError> {
    let items = match map.get("evaluations") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) if a.is_empty() => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(ApiError::field(
                "evaluations",
                format!("must be an array, not {}", body::kind(other)),
            ));
        }
    };
    let semantic = match body::opt_object(map, "", "options")?
        .and_then(|o| o.get("evaluations_semantic"))
    {
        None | Some(Value::Null) => Semantic::ExecuteAll,
        Some(Value::String(s)) => match s.as_str() {
            "execute_all" => Semantic::ExecuteAll,
            "deny_on_first_deny" => Semantic::DenyOnFirstDeny,
            "permit_on_first_permit" => Semantic::PermitOnFirstPermit,
            other => {
                return Err(ApiError::field(
                    "options.evaluations_semantic",
                    format!(
                        "`{other}` is not one of execute_all, deny_on_first_deny, permit_on_first_permit"
                    ),
                ));
            }
        },
        Some(other) => {
            return Err(ApiError::field(
                "options.evaluations_semantic",
                format!("must be a string, not {}", body::kind(other)),
            ));
        }
    };
    Ok(Some((items, semantic)))
}

/// One batch item as a single evaluation: top-level members are defaults, and an item's own
/// member replaces the default whole (no merging of properties, as the specification says).
fn batch_item(
    map: &Map<String, Value>,
    item: &Value,
    prefix: &str,
) -> Result<Map<String, Value>, ApiError> {
    match item {
        Value::Object(own) => {
            let mut merged = Map::new();
            for key in ["subject", "action", "resource", "context"] {
                if let Some(v) = own.get(key).or_else(|| map.get(key)) {
                    merged.insert(key.to_owned(), v.clone());
                }
            }
            Ok(merged)
        }
        other => Err(ApiError::field(
            prefix.to_owned(),
            format!("must be an object, not {}", body::kind(other)),
        )),
    }
}

/// Every request a body asks to evaluate, each parsed or refused on its own (the decisions
/// aside, what [`evaluations`] does with it); for the fuzz targets (SECURITY F-04).
pub(crate) fn requests(
    caller: &Caller,
    map: &Map<String, Value>,
) -> Result<Vec<Result<CheckRequest, ApiError>>, ApiError> {
    let Some((items, _)) = batch(map)? else {
        return Ok(vec![evaluation_request(caller, map, "")]);
    };
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = format!("evaluations[{i}]");
            batch_item(map, item, &prefix).and_then(|m| evaluation_request(caller, &m, &prefix))
        })
        .collect())
}

fn item_error(e: &ApiError) -> Value {
    let mut error = json!({
        "status": e.status.as_u16(),
        "code": e.code,
        "message": e.message,
    });
    if let (Some(field), Some(obj)) = (&e.field, error.as_object_mut()) {
        obj.insert("field".into(), Value::String(field.clone()));
    }
    json!({"decision": false, "context": {"error": error}})
}

fn prefixed(prefix: &str, mut e: ApiError) -> ApiError {
    if !prefix.is_empty() {
        e.field = Some(match e.field {
            Some(f) => format!("{prefix}.{f}"),
            None => prefix.to_owned(),
        });
    }
    e
}

/// Parse, decide and record one evaluation (`subject`, `action`, `resource`, `context`).
/// Each batch item is its own decision with its own audit record.
async fn evaluate_one(
    state: &AppState,
    caller: &Caller,
    map: &Map<String, Value>,
    prefix: &str,
    call: Call,
) -> Result<Settled, ApiError> {
    let request = evaluation_request(caller, map, prefix)?;
    Ok(state.service.check(&request, call).await)
}

/// One evaluation's members as a check request; every error names its field under `prefix`.
fn evaluation_request(
    caller: &Caller,
    map: &Map<String, Value>,
    prefix: &str,
) -> Result<CheckRequest, ApiError> {
    let p = |e| prefixed(prefix, e);
    let subject: EntityRef = body::entity_ref(map, "subject", false).map_err(p)?;
    let action = body::object(map, "", "action").map_err(p)?;
    let action_name = body::string(action, "action", "name")
        .map_err(p)?
        .to_owned();
    let action_properties = body::opt_object(action, "action", "properties")
        .map_err(p)?
        .cloned();
    let resource = body::entity_ref(map, "resource", false).map_err(p)?;
    let context = body::context(map).map_err(p)?;
    let principal = subject_principal(caller, Some(&subject), "subject").map_err(p)?;
    Ok(CheckRequest {
        principal,
        action: action_name,
        action_properties,
        resource: Resource {
            kind: resource.kind,
            id: resource.id,
            properties: resource.properties,
        },
        context,
    })
}

/// The AuthZEN Decision for one core decision.
fn decision_json(settled: &Settled) -> Value {
    let d = &settled.decision;
    let mut context = json!({
        "id": d.id.to_string(),
        "policy_version": &*d.policy_version,
    });
    let Some(ctx) = context.as_object_mut() else {
        return json!({"decision": false});
    };
    if !d.policy_ids.is_empty() {
        ctx.insert("policy_ids".into(), json!(d.policy_ids));
    }
    match d.outcome {
        Outcome::Allow => {
            if let Some(g) = &settled.grant {
                ctx.insert("grant".into(), super::grant_json(g));
            }
        }
        Outcome::Deny => {
            if let Some(r) = d.reasons.first() {
                ctx.insert("reason".into(), Value::String(r.code.to_owned()));
                ctx.insert("reason_admin".into(), json!({"en": r.message}));
            }
        }
        Outcome::Escalate => {
            let evaluated_at =
                d.id.get_timestamp()
                    .map(|ts| ts.to_unix().0 as i64)
                    .unwrap_or(0);
            ctx.insert("evaluation_id".into(), Value::String(d.id.to_string()));
            ctx.insert("evaluated_at".into(), Value::String(rfc3339(evaluated_at)));
            ctx.insert("reason".into(), Value::String("approval_required".into()));
            if let Some(a) = &d.approval {
                let description = format!(
                    "{} approval{} from {} required{}",
                    a.quorum,
                    if a.quorum == 1 { "" } else { "s" },
                    a.groups.join(" or "),
                    if a.evidence.is_empty() {
                        String::new()
                    } else {
                        format!(", with evidence: {}", a.evidence.join(", "))
                    }
                );
                // The stored request's expiry when there is one; the binding window otherwise.
                let expires_at = settled
                    .approval
                    .as_ref()
                    .map_or(evaluated_at + ACCESS_REQUEST_TTL_SECS, |r| r.expires_at);
                ctx.insert(
                    "access_request".into(),
                    json!({
                        "template": a.policy_id,
                        "expires_at": rfc3339(expires_at),
                        "display": {"title": "Approval required", "description": description},
                    }),
                );
                if let Some(r) = &settled.approval {
                    ctx.insert("approval_request".into(), approval_request_json(r));
                }
                if let Ok(v) = serde_json::to_value(a) {
                    ctx.insert("approval".into(), v);
                }
            }
        }
    }
    json!({"decision": d.outcome == Outcome::Allow, "context": context})
}

/// `GET /.well-known/authzen-configuration`: PDP metadata. The base URL is
/// `server.public_url` when configured, else the scheme of this connection and its `Host`.
pub fn discovery(state: &AppState, conn: &ConnInfo, req: &Request<Incoming>) -> Response<Body> {
    if req.uri().path() != "/.well-known/authzen-configuration" {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no PDP metadata at `{}` (no tenants are configured)",
                req.uri().path()
            ),
        )
        .into_response();
    }
    let base = match &state.server.public_url {
        Some(u) => u.clone(),
        None => {
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                .unwrap_or("localhost");
            format!("{}://{host}", if conn.tls { "https" } else { "http" })
        }
    };
    json_response(
        StatusCode::OK,
        &json!({
            "policy_decision_point": base,
            "access_evaluation_endpoint": format!("{base}/access/v1/evaluation"),
            "access_evaluations_endpoint": format!("{base}/access/v1/evaluations"),
        }),
    )
}
