//! The native API (`POST /v1/check`) and the admin endpoints, against the real server on
//! port 0 with the example configuration and bundle, using tokens minted with the dev key.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::time::Duration;

use common::{TestServer, dev_token, example_config, payments_agent_token, transfer};
use serde_json::{Value, json};

fn token() -> String {
    payments_agent_token("agent-1")
}

#[tokio::test]
async fn three_outcomes_with_ids_versions_and_reasons() {
    let s = TestServer::start(&example_config(&[])).await;
    let t = token();

    let (st, allow) = s.post("/v1/check", Some(&t), &transfer(50)).await;
    assert_eq!(st, 200, "{allow}");
    assert_eq!(allow["decision"], "allow", "{allow}");
    assert!(
        allow["decision_id"]
            .as_str()
            .is_some_and(|id| id.len() == 36)
    );
    let version = allow["policy_version"].as_str().unwrap().to_owned();
    assert!(version.starts_with("1+"), "{version}");
    assert!(!allow["policy_ids"].as_array().unwrap().is_empty());
    assert!(allow.get("approval").is_none());

    let (st, esc) = s.post("/v1/check", Some(&t), &transfer(250)).await;
    assert_eq!(st, 200);
    assert_eq!(esc["decision"], "escalate", "{esc}");
    assert_eq!(esc["approval"]["groups"], json!(["finance-approvers"]));
    assert_eq!(esc["approval"]["quorum"], 1);
    assert_eq!(esc["approval"]["evidence"], json!(["ticket"]));
    assert_eq!(esc["approval"]["grant_ttl"], "1h");
    assert_eq!(esc["approval"]["fallback"]["group"], "finance-leads");
    assert_eq!(esc["policy_version"], version.as_str());
    assert_ne!(esc["decision_id"], allow["decision_id"]);

    let (st, deny) = s.post("/v1/check", Some(&t), &transfer(10_001)).await;
    assert_eq!(st, 200);
    assert_eq!(deny["decision"], "deny", "{deny}");
    assert_eq!(deny["reasons"][0]["code"], "forbidden");

    let (_, shell) = s
        .post(
            "/v1/check",
            Some(&t),
            &json!({"action":"tool:shell.exec","resource":{"type":"Tool","id":"bash"},"context":{}}),
        )
        .await;
    assert_eq!(shell["decision"], "deny", "{shell}");

    // An action no policy knows is a deny, never an error an enforcement point could fail open on.
    let (st, unknown) = s
        .post(
            "/v1/check",
            Some(&t),
            &json!({"action":"payments:refund","resource":{"type":"Account","id":"a"}}),
        )
        .await;
    assert_eq!(
        (st, unknown["decision"].clone()),
        (200, json!("deny")),
        "{unknown}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let s = TestServer::start(&example_config(&[])).await;
    let r = s.client.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = s.client.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["policy"]["name"], "example");
    s.shutdown().await;
}

#[tokio::test]
async fn malformed_input_gets_a_clear_error_and_never_an_allow() {
    let s = TestServer::start(&example_config(&[])).await;
    let t = token();
    let cases = [
        (json!({"resource":{"type":"Account","id":"a"}}), "action"),
        (json!({"action":"payments:transfer"}), "resource"),
        (
            json!({"action":"payments:transfer","resource":{"type":"Account"}}),
            "resource.id",
        ),
        (
            json!({"action":7,"resource":{"type":"Account","id":"a"}}),
            "action",
        ),
        (
            json!({"action":"payments:transfer","resource":{"type":"Account","id":"a"},"contxt":{}}),
            "contxt",
        ),
        (
            json!({"action":"payments:transfer","resource":{"type":"Account","id":"a"},"context":[1]}),
            "context",
        ),
        (
            json!({"action":"payments:transfer","resource":{"type":"Account","id":"a"},"context":{"mandate":{}}}),
            "context.mandate",
        ),
        (
            json!({"action":"payments:transfer","resource":{"type":"not a type","id":"a"},"context":{"amount":1}}),
            "resource.type",
        ),
    ];
    for (body, field) in cases {
        let (st, v) = s.post("/v1/check", Some(&t), &body).await;
        if st == 200 {
            // A resource type Cedar cannot name is a deny naming the field, not an allow.
            assert_eq!(v["decision"], "deny", "{body} -> {v}");
            continue;
        }
        assert_eq!(st, 400, "{body} -> {v}");
        assert_eq!(v["error"], "invalid_request", "{body} -> {v}");
        assert_eq!(v["field"], field, "{body} -> {v}");
    }
    // A float amount cannot be represented in Cedar: deny naming the field, never a rounding.
    let (st, v) = s
        .post("/v1/check", Some(&t), &json!({"action":"payments:transfer","resource":{"type":"Account","id":"a"},"context":{"amount":50.5}}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["decision"], "deny", "{v}");
    assert!(
        v["reasons"][0]["message"]
            .as_str()
            .unwrap()
            .contains("context.amount"),
        "{v}"
    );

    let post_raw = |ct: &'static str, body: Vec<u8>| {
        s.client
            .post(s.url("/v1/check"))
            .bearer_auth(&t)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    assert_eq!(
        post_raw("text/plain", b"{}".to_vec())
            .await
            .unwrap()
            .status(),
        415
    );
    assert_eq!(
        post_raw("application/json", b"{\"action\":".to_vec())
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post_raw("application/json", Vec::new())
            .await
            .unwrap()
            .status(),
        400
    );
    let big = format!("{{\"action\":\"x\",\"pad\":\"{}\"}}", "a".repeat(70 * 1024));
    let r = post_raw("application/json", big.into_bytes())
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["error"], "body_too_large");
    // Unknown paths and wrong methods.
    assert_eq!(
        s.client
            .get(s.url("/v1/check"))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
    assert_eq!(
        s.client.get(s.url("/nope")).send().await.unwrap().status(),
        404
    );
    s.shutdown().await;
}

#[tokio::test]
async fn rejected_tokens_are_401_naming_the_reason() {
    let s = TestServer::start(&example_config(&[])).await;
    let body = transfer(50);
    let (st, v) = s.post("/v1/check", None, &body).await;
    assert_eq!((st, v["error"].clone()), (401, json!("token_missing")));
    let (st, v) = s.post("/v1/check", Some("a.b"), &body).await;
    assert_eq!((st, v["error"].clone()), (401, json!("token_malformed")));
    // j26: a megabyte of dots is refused before any split
    let dots = ".".repeat(1 << 20);
    let r = s
        .client
        .post(s.url("/v1/check"))
        .header("authorization", format!("Bearer {dots}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(matches!(r.status().as_u16(), 401 | 431), "{}", r.status());
    // j39: two Authorization headers
    let t = token();
    let r = s
        .client
        .post(s.url("/v1/check"))
        .header("authorization", format!("Bearer {t}"))
        .header("authorization", format!("Bearer {t}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["error"], "token_ambiguous");
    // An expired token (minted long ago, well past the 30 s leeway).
    let key = std::fs::read(common::repo().join("config/dev/signing-key.pem")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let old = mandate::identity::dev::mint(
        &key,
        "dev-1",
        "https://dev.mandate.invalid",
        "mandate",
        "agent-1",
        Default::default(),
        Duration::from_secs(60),
        now - 3600,
    )
    .unwrap();
    let (st, v) = s.post("/v1/check", Some(&old), &body).await;
    assert_eq!(
        (st, v["error"].clone()),
        (401, json!("token_expired")),
        "{v}"
    );
    // A token for another audience.
    let other_aud = mandate::identity::dev::mint(
        &key,
        "dev-1",
        "https://dev.mandate.invalid",
        "someone-else",
        "agent-1",
        Default::default(),
        Duration::from_secs(60),
        now,
    )
    .unwrap();
    let (st, v) = s.post("/v1/check", Some(&other_aud), &body).await;
    assert_eq!(
        (st, v["error"].clone()),
        (401, json!("aud_mismatch")),
        "{v}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn agents_may_only_ask_about_themselves() {
    let s = TestServer::start(&example_config(&[])).await;
    let t = token();
    let mut body = transfer(50);
    body["subject"] = json!({"type":"Agent","id":"agent-2"});
    let (st, v) = s.post("/v1/check", Some(&t), &body).await;
    assert_eq!(
        (st, v["error"].clone()),
        (403, json!("subject_mismatch")),
        "{v}"
    );
    body["subject"] = json!({"type":"Agent","id":"agent-1"});
    let (st, v) = s.post("/v1/check", Some(&t), &body).await;
    assert_eq!((st, v["decision"].clone()), (200, json!("allow")), "{v}");
    s.shutdown().await;
}

#[tokio::test]
async fn unix_socket_listener_answers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mandate.sock");
    let sock_s = sock.to_str().unwrap().to_owned();
    let cfg = example_config(&[("MANDATE_SERVER__UNIX_SOCKET", &sock_s)]);
    let s = TestServer::start(&cfg).await;
    let t = token();
    let body = transfer(50).to_string();
    let req = format!(
        "POST /v1/check HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"decision\":\"allow\""), "{out}");
    s.shutdown().await;
}

#[tokio::test]
async fn r04c_a_repeated_check_is_a_new_decision_and_any_changed_input_is_decided_anew() {
    let s = TestServer::start(&example_config(&[])).await;
    let t = token();
    let (_, a) = s.post("/v1/check", Some(&t), &transfer(50)).await;
    let (_, b) = s.post("/v1/check", Some(&t), &transfer(50)).await;
    assert_eq!(
        (a["decision"].clone(), b["decision"].clone()),
        (json!("allow"), json!("allow"))
    );
    assert_ne!(
        a["decision_id"], b["decision_id"],
        "each check is its own decision"
    );
    // One byte of difference in the body, or another token, is another check.
    let (_, c) = s.post("/v1/check", Some(&t), &transfer(500)).await;
    assert_eq!(c["decision"], "escalate");
    let other = dev_token("agent-2", json!({}), Duration::from_secs(300));
    let mut body = transfer(50);
    body["subject"] = json!({"type": "Agent", "id": "agent-1"});
    let (st, v) = s.post("/v1/check", Some(&other), &body).await;
    assert_eq!((st, v["error"].clone()), (403, json!("subject_mismatch")));
    // Both repeats were recorded: two records carry the two ids.
    let log = std::fs::read_to_string(s.running.as_ref().unwrap().service.audit.path()).unwrap();
    for id in [&a["decision_id"], &b["decision_id"]] {
        assert_eq!(log.matches(id.as_str().unwrap()).count(), 1, "{id}");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn escalation_is_persisted_once_and_its_status_is_shown_to_its_requester_only() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let clock = mandate::clock::ManualClock::new(now);
    let s = TestServer::start_with_clock(&example_config(&[]), clock.clone()).await;
    let t = token();
    let (_, first) = s.post("/v1/check", Some(&t), &transfer(250)).await;
    assert_eq!(first["decision"], "escalate", "{first}");
    let request = &first["approval_request"];
    let id = request["id"]
        .as_str()
        .expect("approval request id")
        .to_owned();
    assert_eq!(request["status"], "pending");
    assert_eq!(request["status_url"], format!("/v1/approvals/{id}"));
    assert!(
        request["expires_at"]
            .as_str()
            .is_some_and(|e| e.ends_with('Z'))
    );
    // A retrying agent gets the same pending request, not a new one (no approval flood); a
    // second later, so the store answers, not the per-second decision cache.
    clock.advance(1);
    let (_, again) = s.post("/v1/check", Some(&t), &transfer(250)).await;
    assert_eq!(again["approval_request"]["id"], id.as_str());
    // Another amount is another request.
    let (_, other) = s.post("/v1/check", Some(&t), &transfer(251)).await;
    assert_ne!(other["approval_request"]["id"], id.as_str());

    let get = |token: String, path: String| {
        let c = s.client.clone();
        let url = s.url(&path);
        async move {
            let r = c.get(url).bearer_auth(token).send().await.unwrap();
            let st = r.status().as_u16();
            (
                st,
                serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap(),
            )
        }
    };
    let (st, v) = get(t.clone(), format!("/v1/approvals/{id}")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["status"].clone(), v["action"].clone()),
        (json!("pending"), json!("payments:transfer"))
    );
    assert_eq!(v["context"]["amount"], 250);
    assert_eq!(v["groups"], json!(["finance-approvers"]));
    // a22: another agent, an unknown id and a malformed id all look the same.
    let stranger = dev_token("agent-9", json!({}), Duration::from_secs(300));
    let (st, _) = get(stranger, format!("/v1/approvals/{id}")).await;
    assert_eq!(st, 404);
    let (st, _) = get(t.clone(), format!("/v1/approvals/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(st, 404);
    let (st, _) = get(t.clone(), "/v1/approvals/not-an-id".into()).await;
    assert_eq!(st, 404);
    // The audit record of the escalation names the approval request.
    let log = std::fs::read_to_string(s.running.as_ref().unwrap().service.audit.path()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(first["decision_id"].as_str().unwrap()))
        .unwrap();
    assert!(
        line.contains(&format!("\"approval_id\":\"{id}\"")),
        "{line}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn authzen_escalation_is_a_requestable_denial_naming_its_approval_request() {
    let s = TestServer::start(&example_config(&[])).await;
    let t = token();
    let body = json!({"subject":{"type":"Agent","id":"agent-1"},"action":{"name":"payments:transfer"},
                      "resource":{"type":"Account","id":"acct-1"},"context":{"amount":250}});
    let (st, v) = s.post("/access/v1/evaluation", Some(&t), &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["decision"], false);
    let ctx = &v["context"];
    assert_eq!(ctx["reason"], "approval_required");
    assert_eq!(ctx["evaluation_id"], ctx["id"]);
    assert_eq!(ctx["access_request"]["template"], "payments-approval");
    assert_eq!(
        ctx["access_request"]["expires_at"],
        ctx["approval_request"]["expires_at"]
    );
    assert_eq!(ctx["approval_request"]["status"], "pending");
    // The native API sees the same pending request.
    let (_, native) = s.post("/v1/check", Some(&t), &transfer(250)).await;
    assert_eq!(
        native["approval_request"]["id"],
        ctx["approval_request"]["id"]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn an_approved_request_is_allowed_by_its_grant_and_a_different_one_escalates_again() {
    use mandate::approval::{ApprovalStore, Review, Verdict};
    let s = TestServer::start(&example_config(&[])).await;
    let t = token();
    let (_, esc) = s.post("/v1/check", Some(&t), &transfer(250)).await;
    let id: uuid::Uuid = esc["approval_request"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // An approver's review, through the store (the approvals HTTP API comes next).
    let state = s.running.as_ref().unwrap().service.clone();
    let now = state.engine.now();
    let outcome = state
        .store
        .review(
            Review {
                request_id: id,
                approver_id: "alice".into(),
                approver_issuer: "dev".into(),
                verdict: Verdict::Approve,
                rationale: "invoice INV-7 checked".into(),
                evidence: json!({"ticket": "FIN-123"}).as_object().cloned().unwrap(),
                at: now,
            },
            now,
        )
        .await
        .unwrap();
    let grant = outcome.grant.expect("quorum 1 reached: a grant");
    // Written to the store directly, not through the approvals API (which invalidates the
    // grant cache itself): the cached "no grant" of the escalation above must go.
    state.grants.invalidate(&grant.binding_hash);

    let (st, allowed) = s.post("/v1/check", Some(&t), &transfer(250)).await;
    assert_eq!(st, 200);
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    assert_eq!(allowed["reasons"][0]["code"], "granted");
    assert_eq!(allowed["grant"]["id"], grant.id.to_string());
    assert_eq!(allowed["grant"]["approval_request"], id.to_string());
    // a06: any other request is not covered by the grant.
    let (_, bigger) = s.post("/v1/check", Some(&t), &transfer(251)).await;
    assert_eq!(bigger["decision"], "escalate", "{bigger}");
    let mut other_account = transfer(250);
    other_account["resource"]["id"] = json!("acct-2");
    let (_, other) = s.post("/v1/check", Some(&t), &other_account).await;
    assert_eq!(other["decision"], "escalate", "{other}");
    // The audit record of the allow names the grant and the approval.
    let log = std::fs::read_to_string(state.audit.path()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(allowed["decision_id"].as_str().unwrap()))
        .unwrap();
    assert!(
        line.contains(&format!("\"grant_id\":\"{}\"", grant.id)),
        "{line}"
    );
    assert!(
        line.contains(&format!("\"approval_id\":\"{id}\"")),
        "{line}"
    );
    s.shutdown().await;
}
