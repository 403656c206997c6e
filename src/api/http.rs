//! The native decision API: `POST /v1/check` with the agent's workload token.
//!
//! Body: `{"action": "...", "resource": {"type", "id", "properties"?}, "context"?: {...},
//! "subject"?: {"type", "id", "properties"?}}`. Unknown fields are refused (a typo must not
//! silently drop input a policy depends on). Answer: `200` with
//! `{decision, decision_id, policy_version, policy_ids, reasons, approval?}`.

use crate::metrics::Api;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value};

use super::body::{self, EntityRef, WrongTypeStatus};
use super::caller::{Caller, authenticate, subject_principal};
use super::{
    ApiError, AppState, Body, ConnInfo, approval_request_json, grant_json, json_bytes_response,
    json_response,
};
use crate::audit::write_str;
use crate::service::Settled;
use crate::vocabulary::{ApprovalRequirement, CheckRequest, Decision, Reason, Resource};

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
    let mut call = super::call_from(state, Api::Native, req.headers());
    // Authenticate before reading the body: an unauthenticated caller costs no body parsing.
    let caller = call
        .identify(authenticate(state, conn, req.headers()))
        .await?;
    // The credential as sent (a cheap reference-counted copy), for a caller whose
    // verification left no digest of it to key repeats on.
    let bearer = req.headers().get(hyper::header::AUTHORIZATION).cloned();
    let bytes =
        body::read_json_bytes(req, &state.server, WrongTypeStatus::UnsupportedMediaType).await?;
    state
        .service
        .check_bytes(
            &caller,
            bearer.as_ref().map_or(&[][..], |v| v.as_bytes()),
            &bytes,
            |b| parse_check(&caller, b),
            call,
        )
        .await
}

pub(crate) fn parse_check(caller: &Caller, bytes: &[u8]) -> Result<CheckRequest, ApiError> {
    let (subject, action, resource, context) = match body::quick_check(bytes) {
        Some((action, resource, context)) => (None, action, resource, context),
        None => read_check(bytes)?,
    };
    let principal = subject_principal(caller, subject.as_ref(), "subject")?;
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

/// A check body read field by field: every error names its field.
pub(crate) type CheckBody = (Option<EntityRef>, String, EntityRef, Map<String, Value>);

pub(crate) fn read_check(bytes: &[u8]) -> Result<CheckBody, ApiError> {
    let map = body::parse_object(bytes)?;
    body::only_known(&map, "", &["subject", "action", "resource", "context"])?;
    let subject = match map.get("subject") {
        None => None,
        Some(_) => Some(body::entity_ref(&map, "subject", true)?),
    };
    let action = body::string(&map, "", "action")?.to_owned();
    let resource = body::entity_ref(&map, "resource", true)?;
    let context = body::context(&map)?;
    Ok((subject, action, resource, context))
}

/// The `/v1/check` answer as a JSON value (for an answer that carries it inside another).
pub fn decision_value(settled: &Settled) -> serde_json::Value {
    let d = &settled.decision;
    serde_json::to_value(CheckResponse {
        decision: d.outcome.as_str(),
        decision_id: d.id.to_string(),
        policy_version: &d.policy_version,
        policy_ids: &d.policy_ids,
        reasons: &d.reasons,
        approval: d.approval.as_ref(),
        approval_request: settled.approval.as_ref().map(approval_request_json),
        grant: settled.grant.as_ref().map(grant_json),
    })
    .unwrap_or(serde_json::Value::Null)
}

pub fn decision_response(settled: &Settled) -> Response<Body> {
    let d = &settled.decision;
    // Most answers carry no approval: written by hand, as serde would write them.
    if d.approval.is_none() && settled.approval.is_none() && settled.grant.is_none() {
        return json_bytes_response(StatusCode::OK, plain_decision_json(d));
    }
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

/// The JSON of a [`CheckResponse`] without approval, request or grant.
fn plain_decision_json(d: &Decision) -> Vec<u8> {
    let mut out = Vec::with_capacity(320);
    out.extend_from_slice(b"{\"decision\":\"");
    out.extend_from_slice(d.outcome.as_str().as_bytes());
    out.extend_from_slice(b"\",\"decision_id\":\"");
    out.extend_from_slice(
        d.id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"policy_version\":");
    write_str(&mut out, &d.policy_version);
    out.extend_from_slice(b",\"policy_ids\":[");
    for (i, id) in d.policy_ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&mut out, id);
    }
    out.extend_from_slice(b"],\"reasons\":[");
    for (i, r) in d.reasons.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"code\":");
        write_str(&mut out, r.code);
        if let Some(id) = &r.policy_id {
            out.extend_from_slice(b",\"policy_id\":");
            write_str(&mut out, id);
        }
        out.extend_from_slice(b",\"message\":");
        write_str(&mut out, &r.message);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::vocabulary::Outcome;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z_-]{0,12}",
            any::<String>(),
            Just("quote \" back \\ tab \t nul \u{0} del \u{7f} é 😀".to_owned()),
        ]
    }

    /// Bodies near the usual shape: some usual, some with each thing the quick reader
    /// must leave to the field-by-field one.
    fn body() -> impl Strategy<Value = String> {
        let text = prop_oneof![
            Just(r#""acct-1""#.to_owned()),
            Just(r#""""#.to_owned()),
            Just("1".to_owned()),
            Just("null".to_owned()),
            Just(r#""caf\u00e9 \"q\"""#.to_owned()),
        ];
        let object = prop_oneof![
            Just("{}".to_owned()),
            Just(r#"{"amount":250,"tags":["a"],"nested":{"x":null}}"#.to_owned()),
            Just(r#"{"mandate":{"now":1}}"#.to_owned()),
            Just(r#"{"amount":20000,"amount":250}"#.to_owned()),
            Just(r#"{"a":{"b":[{"x":1,"x":2}]}}"#.to_owned()),
            Just("null".to_owned()),
            Just("[1]".to_owned()),
        ];
        let resource = (
            text.clone(),
            text.clone(),
            proptest::option::of(object.clone()),
            proptest::option::of(prop_oneof![Just(r#""extra":1"#), Just(r#""id":"acct-2""#),]),
        )
            .prop_map(|(kind, id, props, extra)| {
                let mut fields = vec![format!(r#""type":{kind}"#), format!(r#""id":{id}"#)];
                fields.extend(props.map(|p| format!(r#""properties":{p}"#)));
                fields.extend(extra.map(str::to_owned));
                format!("{{{}}}", fields.join(","))
            });
        (
            proptest::option::of(text),
            proptest::option::of(resource),
            proptest::option::of(object),
            proptest::option::of(prop_oneof![
                Just(r#""subject":{"type":"Agent","id":"agent-1"}"#),
                Just(r#""subject":null"#),
                Just(r#""actoin":"x""#),
                Just(r#""action":"dup""#),
                Just(r#""context":{}"#),
            ]),
        )
            .prop_map(|(action, resource, context, extra)| {
                let mut fields = Vec::new();
                fields.extend(action.map(|a| format!(r#""action":{a}"#)));
                fields.extend(resource.map(|r| format!(r#""resource":{r}"#)));
                fields.extend(context.map(|c| format!(r#""context":{c}"#)));
                fields.extend(extra.map(str::to_owned));
                format!("{{{}}}", fields.join(","))
            })
    }

    proptest! {
        /// Wherever the quick reader takes a body, it reads what the field-by-field reader
        /// reads; it leaves every body that reader refuses (a duplicate key at any depth
        /// among them: SECURITY J-22's rule for bodies).
        #[test]
        fn quick_reader_agrees(text in body()) {
            let quick = body::quick_check(text.as_bytes());
            let full = read_check(text.as_bytes());
            if let Some((action, resource, context)) = quick {
                let full = full.expect("the full reader accepts what the quick one does");
                prop_assert_eq!(full, (None, action, resource, context));
            }
        }

        /// The hand-written answer is byte for byte what serde writes for the same decision.
        #[test]
        fn plain_answer_is_what_serde_writes(
            outcome in prop_oneof![Just(Outcome::Allow), Just(Outcome::Deny)],
            version in text(),
            ids in proptest::collection::vec(text(), 0..3),
            reasons in proptest::collection::vec((proptest::option::of(text()), text()), 0..3),
        ) {
            let d = Decision {
                id: uuid::Uuid::now_v7(),
                outcome,
                policy_version: version.into(),
                policy_ids: ids,
                reasons: reasons
                    .into_iter()
                    .map(|(policy_id, message)| Reason { code: "permitted", policy_id, message })
                    .collect(),
                approval: None,
            };
            let serde = serde_json::to_vec(&CheckResponse {
                decision: d.outcome.as_str(),
                decision_id: d.id.to_string(),
                policy_version: &d.policy_version,
                policy_ids: &d.policy_ids,
                reasons: &d.reasons,
                approval: None,
                approval_request: None,
                grant: None,
            })
            .expect("serializes");
            prop_assert_eq!(String::from_utf8(plain_decision_json(&d)).expect("utf-8"), String::from_utf8(serde).expect("utf-8"));
        }
    }
}
