//! Duplicate JSON keys in request bodies (issue 10 point 2; SECURITY J-22's rule, which
//! tokens already follow, applied to every API that takes JSON): refused with
//! `400 invalid_request` naming the key and its path, never decided on the last value. Against
//! the real server on port 0 with the example configuration.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::time::Duration;

use common::{TestServer, dev_token, example_config};
use mandate::approval::ApprovalStore;
use serde_json::{Value, json};

fn agent() -> String {
    dev_token(
        "agent-1",
        json!({"owner":"bob","groups":["payments-agents"]}),
        Duration::from_secs(300),
    )
}

/// POST `body` exactly as written (a `serde_json::Value` could not hold a duplicate).
async fn post_raw(s: &TestServer, path: &str, token: &str, body: &str) -> (u16, Value) {
    let resp = s
        .client
        .post(s.url(path))
        .header("content-type", "application/json")
        .bearer_auth(token)
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The answer is the duplicate-key refusal for `key` at `field`.
fn assert_duplicate(answer: &(u16, Value), field: &str, key: &str, body: &str) {
    let (status, v) = answer;
    assert_eq!(*status, 400, "{body} -> {v}");
    assert_eq!(v["error"], "invalid_request", "{body} -> {v}");
    assert_eq!(v["field"], field, "{body} -> {v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("duplicate key `{key}`")),
        "{body} -> {v}"
    );
}

const RESOURCE: &str = r#""resource":{"type":"Account","id":"acct-1"}"#;

#[tokio::test]
async fn j22_duplicate_keys_in_check_bodies_are_refused_at_every_depth() {
    let s = TestServer::start(&example_config(&[])).await;
    let t = agent();
    let cases = [
        // The attack run's first case: decided as the transfer when the last one won.
        (
            format!(r#"{{"action":"tool:shell.exec","action":"payments:transfer",{RESOURCE}}}"#),
            "action",
            "action",
        ),
        (
            format!(r#"{{"action":"payments:transfer",{RESOURCE},"context":{{"amount":20000,"amount":250}}}}"#),
            "context.amount",
            "amount",
        ),
        (
            r#"{"action":"payments:transfer","resource":{"type":"Account","id":"acct-9","id":"acct-1"}}"#
                .to_owned(),
            "resource.id",
            "id",
        ),
        (
            r#"{"action":"payments:transfer","resource":{"type":"Account","id":"acct-1","properties":{"owner":"eve","owner":"bob"}}}"#
                .to_owned(),
            "resource.properties.owner",
            "owner",
        ),
        (
            format!(r#"{{"action":"payments:transfer",{RESOURCE},"context":{{"amount":50,"meta":{{"a":{{"b":1,"b":2}}}}}}}}"#),
            "context.meta.a.b",
            "b",
        ),
        (
            format!(r#"{{"action":"payments:transfer",{RESOURCE},"context":{{"amount":50,"lines":[{{"x":1}},{{"x":1,"x":2}}]}}}}"#),
            "context.lines[1].x",
            "x",
        ),
        (
            format!(r#"{{"action":"payments:transfer",{RESOURCE},"context":{{"amount":50}},"context":{{"amount":50}}}}"#),
            "context",
            "context",
        ),
        (
            format!(r#"{{"subject":{{"type":"Agent","id":"agent-1","id":"agent-1"}},"action":"payments:transfer",{RESOURCE}}}"#),
            "subject.id",
            "id",
        ),
    ];
    for (body, field, key) in &cases {
        let answer = post_raw(&s, "/v1/check", &t, body).await;
        assert_duplicate(&answer, field, key, body);
        // Sent twice: the decision cache in front of the reader must not change the answer.
        let again = post_raw(&s, "/v1/check", &t, body).await;
        assert_duplicate(&again, field, key, body);
    }
    // The same bodies without the duplicate are decided (the refusal is about the duplicate).
    let (st, v) = post_raw(
        &s,
        "/v1/check",
        &t,
        &format!(r#"{{"action":"payments:transfer",{RESOURCE},"context":{{"amount":50,"lines":[{{"x":1}},{{"x":2}}]}}}}"#),
    )
    .await;
    assert_eq!((st, v["decision"].clone()), (200, json!("allow")), "{v}");
    s.shutdown().await;
}

#[tokio::test]
async fn j22_duplicate_keys_in_authzen_bodies_are_refused() {
    let s = TestServer::start(&example_config(&[])).await;
    let t = agent();
    let subject = r#""subject":{"type":"Agent","id":"agent-1"}"#;
    let one = [
        (
            format!(
                r#"{{{subject},"action":{{"name":"tool:shell.exec","name":"payments:transfer"}},{RESOURCE}}}"#
            ),
            "action.name",
            "name",
        ),
        (
            format!(
                r#"{{{subject},"action":{{"name":"payments:transfer"}},{RESOURCE},"context":{{"amount":20000,"amount":250}}}}"#
            ),
            "context.amount",
            "amount",
        ),
        (
            format!(
                r#"{{{subject},"action":{{"name":"payments:transfer","properties":{{"p":1,"p":2}}}},{RESOURCE}}}"#
            ),
            "action.properties.p",
            "p",
        ),
    ];
    for (body, field, key) in &one {
        let answer = post_raw(&s, "/access/v1/evaluation", &t, body).await;
        assert_duplicate(&answer, field, key, body);
    }
    // In a batch, the whole request is refused: no item is decided on a value the sender may
    // not have meant.
    let batch = format!(
        r#"{{{subject},{RESOURCE},"evaluations":[{{"action":{{"name":"payments:transfer"}},"context":{{"amount":1}}}},{{"action":{{"name":"payments:transfer"}},"context":{{"amount":20000,"amount":250}}}}]}}"#
    );
    let answer = post_raw(&s, "/access/v1/evaluations", &t, &batch).await;
    assert_duplicate(&answer, "evaluations[1].context.amount", "amount", &batch);
    let top = format!(
        r#"{{{subject},{RESOURCE},"options":{{"evaluations_semantic":"execute_all","evaluations_semantic":"deny_on_first_deny"}},"evaluations":[{{"action":{{"name":"payments:transfer"}}}}]}}"#
    );
    let answer = post_raw(&s, "/access/v1/evaluations", &t, &top).await;
    assert_duplicate(
        &answer,
        "options.evaluations_semantic",
        "evaluations_semantic",
        &top,
    );
    s.shutdown().await;
}

#[tokio::test]
async fn j22_duplicate_keys_in_review_bodies_are_refused_and_the_request_stays_pending() {
    let s = TestServer::start(&example_config(&[])).await;
    let t = agent();
    let (st, esc) = s
        .post(
            "/v1/check",
            Some(&t),
            &json!({"action":"payments:transfer","resource":{"type":"Account","id":"acct-1"},"context":{"amount":250}}),
        )
        .await;
    assert_eq!(
        (st, esc["decision"].clone()),
        (200, json!("escalate")),
        "{esc}"
    );
    let id = esc["approval_request"]["id"].as_str().unwrap().to_owned();
    let alice = dev_token(
        "alice",
        json!({"groups":["finance-approvers"]}),
        Duration::from_secs(300),
    );
    let cases = [
        (
            r#"{"rationale":"looks fine","rationale":"matches PO-1","evidence":{"ticket":"FIN-1"}}"#,
            "rationale",
            "rationale",
        ),
        (
            r#"{"rationale":"matches PO-1","evidence":{"ticket":"FIN-1","ticket":"FIN-2"}}"#,
            "evidence.ticket",
            "ticket",
        ),
    ];
    for verb in ["approve", "deny"] {
        for (body, field, key) in &cases {
            let answer = post_raw(&s, &format!("/v1/approvals/{id}/{verb}"), &alice, body).await;
            assert_duplicate(&answer, field, key, body);
        }
    }
    let store = &s.running.as_ref().unwrap().service.store;
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    assert_eq!(
        store.get(uuid).await.unwrap().unwrap().status,
        mandate::approval::Status::Pending
    );
    assert!(store.reviews(uuid).await.unwrap().is_empty());
    s.shutdown().await;
}
