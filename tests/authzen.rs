//! The AuthZEN 1.0 certification scenario (docs/authzen.md) at the Basic, Batch and
//! Discovery levels, against the real server on port 0 loaded with the scenario's fixture
//! (tests/fixtures/authzen). The harness authenticates as a configured enforcement point, as
//! a PEP does; each test names the scenario section it covers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use common::{TestServer, config_from, dev_token, repo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const HARNESS_SECRET: &str = "authzen-harness-credential-0123456789";

fn config_text() -> String {
    let digest = hex::encode(Sha256::digest(HARNESS_SECRET.as_bytes()));
    format!(
        r#"
[policy]
bundle = "fixtures/authzen"

[[issuers]]
name = "dev"
issuer = "https://dev.mandate.invalid"
audiences = ["mandate"]
algorithms = ["ES256"]
jwks_file = "../config/dev/jwks.json"
principal_type = "user"

[[enforcement_points]]
name = "harness"
credential_sha256 = "{digest}"
"#
    )
}

async fn server() -> TestServer {
    let path = repo().join("tests/authzen.toml");
    TestServer::start(&config_from(&config_text(), &path, &[])).await
}

async fn eval(s: &TestServer, body: Value) -> (u16, Value) {
    s.post("/access/v1/evaluation", Some(HARNESS_SECRET), &body)
        .await
}

async fn evals(s: &TestServer, body: Value) -> (u16, Value) {
    s.post("/access/v1/evaluations", Some(HARNESS_SECRET), &body)
        .await
}

fn decisions(v: &Value) -> Vec<Value> {
    v["evaluations"]
        .as_array()
        .unwrap_or_else(|| panic!("no evaluations array in {v}"))
        .iter()
        .map(|e| e["decision"].clone())
        .collect()
}

#[tokio::test]
async fn basic_core_and_properties_fixture_decisions() {
    let s = server().await;
    let cases = [
        // c-2-2-1 (rule 1)
        (
            json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}),
            true,
        ),
        // rule 2
        (
            json!({"subject":{"type":"user","id":"alice"},"action":{"name":"write"},"resource":{"type":"record","id":"record-1"}}),
            true,
        ),
        // rule 3
        (
            json!({"subject":{"type":"user","id":"bob"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}),
            true,
        ),
        // c-2-2-2 (rule 4)
        (
            json!({"subject":{"type":"user","id":"bob"},"action":{"name":"write"},"resource":{"type":"record","id":"record-1"}}),
            false,
        ),
        // c-2-2-3: optional context changes nothing
        (
            json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"},
                "context":{"time":"2025-06-27T18:03-07:00","ip":"192.168.1.1"}}),
            true,
        ),
        // c-2-2-4 (rule 5)
        (
            json!({"subject":{"type":"user","id":"alice"},"action":{"name":"write"},
                "resource":{"type":"record","id":"record-2","properties":{"status":"archived"}}}),
            false,
        ),
        // c-2-2-5 (rule 6)
        (
            json!({"subject":{"type":"user","id":"bob","properties":{"role":"admin"}},"action":{"name":"write"},
                "resource":{"type":"record","id":"record-2","properties":{"status":"archived"}}}),
            true,
        ),
        // c-2-2-6 (rule 7)
        (
            json!({"subject":{"type":"user","id":"alice"},"action":{"name":"delete","properties":{"soft":true}},
                "resource":{"type":"record","id":"record-1"}}),
            true,
        ),
        // c-2-2-7 (rule 8)
        (
            json!({"subject":{"type":"user","id":"alice"},"action":{"name":"delete","properties":{"soft":false}},
                "resource":{"type":"record","id":"record-1"}}),
            false,
        ),
        // c-2-2-8: additional properties are accepted
        (
            json!({"subject":{"type":"user","id":"alice","properties":{"department":"Sales","role":"manager"}},
                "action":{"name":"read","properties":{"method":"GET"}},
                "resource":{"type":"record","id":"record-1","properties":{"status":"active","owner":"bob"}}}),
            true,
        ),
        // c-2-2-9: unknown fields are ignored
        (
            json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"},
                "foo":"bar","futureField":{"nested":true}}),
            true,
        ),
    ];
    for (i, (body, expected)) in cases.into_iter().enumerate() {
        let (status, resp) = eval(&s, body.clone()).await;
        assert_eq!(status, 200, "case {i}: {body} -> {resp}");
        // c-2-3-1: the decision is a boolean.
        assert_eq!(
            resp["decision"],
            Value::Bool(expected),
            "case {i}: {body} -> {resp}"
        );
    }
    s.shutdown().await;
}

#[tokio::test]
async fn basic_error_handling_c_2_4() {
    let s = server().await;
    let bad_bodies = [
        // c-2-4-1 missing subject, action, resource
        json!({"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}),
        json!({"subject":{"type":"user","id":"alice"},"resource":{"type":"record","id":"record-1"}}),
        json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"}}),
        // c-2-4-2 missing sub-fields
        json!({"subject":{"id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}),
        json!({"subject":{"type":"user"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}),
        json!({"subject":{"type":"user","id":"alice"},"action":{},"resource":{"type":"record","id":"record-1"}}),
        json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"id":"record-1"}}),
        json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record"}}),
        // c-2-4-6 invalid field types
        json!({"subject":"alice","action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}),
        json!({"subject":{"type":"user","id":"alice"},"action":{"name":123},"resource":{"type":"record","id":"record-1"}}),
    ];
    let expected_fields = [
        "subject",
        "action",
        "resource",
        "subject.type",
        "subject.id",
        "action.name",
        "resource.type",
        "resource.id",
        "subject",
        "action.name",
    ];
    for (body, field) in bad_bodies.iter().zip(expected_fields) {
        let (status, resp) = eval(&s, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {resp}");
        assert_eq!(resp["field"], field, "{body} -> {resp}");
    }
    let raw = |ct: &'static str, body: &'static str| {
        s.client
            .post(s.url("/access/v1/evaluation"))
            .bearer_auth(HARNESS_SECRET)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let ok_body = r#"{"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}"#;
    // c-2-4-3 invalid content type: 400 on the AuthZEN endpoints
    assert_eq!(raw("text/plain", ok_body).await.unwrap().status(), 400);
    // c-2-4-4 malformed JSON
    assert_eq!(
        raw("application/json", "{\"subject\":")
            .await
            .unwrap()
            .status(),
        400
    );
    // c-2-4-5 empty body
    assert_eq!(raw("application/json", "").await.unwrap().status(), 400);
    // c-5: content type with parameters is still JSON
    assert_eq!(
        raw("application/json; charset=utf-8", ok_body)
            .await
            .unwrap()
            .status(),
        200
    );
    s.shutdown().await;
}

#[tokio::test]
async fn header_handling_and_idempotency_c_2_5_c_2_6() {
    let s = server().await;
    let body = r#"{"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}"#;
    let resp = s
        .client
        .post(s.url("/access/v1/evaluation"))
        .bearer_auth(HARNESS_SECRET)
        .header("content-type", "application/json")
        .header("x-request-id", "bfe9eb29-ab87-4ca3-be83-a1d5d8305716")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    assert_eq!(
        resp.headers().get("x-request-id").unwrap(),
        "bfe9eb29-ab87-4ca3-be83-a1d5d8305716"
    );
    // c-2-5-1 on an error response too
    let resp = s
        .client
        .post(s.url("/access/v1/evaluation"))
        .bearer_auth(HARNESS_SECRET)
        .header("content-type", "application/json")
        .header("x-request-id", "err-1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers().get("x-request-id").unwrap(), "err-1");
    // c-2-6 idempotency
    for _ in 0..5 {
        let (status, v) = eval(&s, serde_json::from_str(body).unwrap()).await;
        assert_eq!((status, v["decision"].clone()), (200, Value::Bool(true)));
    }
    s.shutdown().await;
}

#[tokio::test]
async fn batch_core_and_properties_c_3_2() {
    let s = server().await;
    // c-3-2-1 structure
    let (st, v) = evals(&s, json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},
        "evaluations":[{"resource":{"type":"record","id":"record-1"}},{"resource":{"type":"record","id":"record-2"}}]})).await;
    assert_eq!(st, 200);
    let d = decisions(&v);
    assert_eq!(d.len(), 2);
    assert!(d.iter().all(Value::is_boolean), "{v}");
    assert!(
        v.get("decision").is_none(),
        "c-3-3-4: top-level decision omitted: {v}"
    );
    // c-3-2-2 fixture decisions and ordering
    let (_, v) = evals(
        &s,
        json!({"subject":{"type":"user","id":"bob"},"resource":{"type":"record","id":"record-1"},
        "evaluations":[{"action":{"name":"read"}},{"action":{"name":"write"}}]}),
    )
    .await;
    assert_eq!(decisions(&v), vec![json!(true), json!(false)]);
    // c-3-2-3 resource properties per item
    let (_, v) = evals(&s, json!({"subject":{"type":"user","id":"alice"},"action":{"name":"write"},
        "evaluations":[{"resource":{"type":"record","id":"record-1","properties":{"status":"active"}}},
                       {"resource":{"type":"record","id":"record-2","properties":{"status":"archived"}}}]})).await;
    assert_eq!(decisions(&v), vec![json!(true), json!(false)]);
    // c-3-2-4 subject properties per item
    let (_, v) = evals(&s, json!({"action":{"name":"write"},"resource":{"type":"record","id":"record-2","properties":{"status":"archived"}},
        "evaluations":[{"subject":{"type":"user","id":"alice"}},{"subject":{"type":"user","id":"bob","properties":{"role":"admin"}}}]})).await;
    assert_eq!(decisions(&v), vec![json!(false), json!(true)]);
    // c-3-2-5 no defaults
    let (_, v) = evals(&s, json!({"evaluations":[
        {"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}},
        {"subject":{"type":"user","id":"bob"},"action":{"name":"write"},"resource":{"type":"record","id":"record-1"}}]})).await;
    assert_eq!(decisions(&v), vec![json!(true), json!(false)]);
    // c-3-2-6 context inheritance and override
    let (st, v) = evals(&s, json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"context":{"time":"2025-06-27T18:03-07:00"},
        "evaluations":[{"resource":{"type":"record","id":"record-1"}},
                       {"resource":{"type":"record","id":"record-2"},"context":{"time":"2025-06-27T19:00-07:00","source":"batch-override"}}]})).await;
    assert_eq!(st, 200);
    assert_eq!(decisions(&v).len(), 2);
    // c-3-2-7 whole-object replacement of defaults, no merging
    let (_, v) = evals(&s, json!({"subject":{"type":"user","id":"alice"},"action":{"name":"write"},
        "resource":{"type":"record","id":"record-1","properties":{"status":"active"}},
        "evaluations":[{},{"resource":{"type":"record","id":"record-2","properties":{"status":"archived"}}}]})).await;
    assert_eq!(decisions(&v), vec![json!(true), json!(false)]);
    s.shutdown().await;
}

#[tokio::test]
async fn batch_errors_and_semantics_c_3_4() {
    let s = server().await;
    // c-3-4-1 a failed item is a denial carrying the error, the batch still answers 200
    let (st, v) = evals(
        &s,
        json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},
        "options":{"evaluations_semantic":"execute_all"},
        "evaluations":[{"resource":{"type":"record","id":"record-1"}},{}]}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(decisions(&v), vec![json!(true), json!(false)]);
    assert_eq!(v["evaluations"][1]["context"]["error"]["status"], 400);
    assert_eq!(
        v["evaluations"][1]["context"]["error"]["field"],
        "evaluations[1].resource"
    );
    // c-3-4-2 missing evaluations: behaves as a single evaluation
    let single = json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}});
    let (st, v) = evals(&s, single.clone()).await;
    assert_eq!((st, v["decision"].clone()), (200, json!(true)));
    // c-3-4-3 empty evaluations: the same
    let mut empty = single.clone();
    empty["evaluations"] = json!([]);
    let (st, v) = evals(&s, empty).await;
    assert_eq!((st, v["decision"].clone()), (200, json!(true)));
    // deny_on_first_deny stops after the first denial
    let three = |semantic: &str| {
        json!({"subject":{"type":"user","id":"bob"},"resource":{"type":"record","id":"record-1"},
               "options":{"evaluations_semantic": semantic},
               "evaluations":[{"action":{"name":"read"}},{"action":{"name":"write"}},{"action":{"name":"read"}}]})
    };
    let (_, v) = evals(&s, three("deny_on_first_deny")).await;
    assert_eq!(decisions(&v), vec![json!(true), json!(false)]);
    // permit_on_first_permit stops after the first permit
    let (_, v) = evals(&s, three("permit_on_first_permit")).await;
    assert_eq!(decisions(&v), vec![json!(true)]);
    let (_, v) = evals(&s, three("execute_all")).await;
    assert_eq!(decisions(&v), vec![json!(true), json!(false), json!(true)]);
    // an unknown semantic is a whole-request error naming the option
    let (st, v) = evals(&s, three("maybe")).await;
    assert_eq!(
        (st, v["field"].clone()),
        (400, json!("options.evaluations_semantic"))
    );
    s.shutdown().await;
}

#[tokio::test]
async fn discovery_c_6() {
    let s = server().await;
    let resp = s
        .client
        .get(s.url("/.well-known/authzen-configuration"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(v["policy_decision_point"], s.base.as_str());
    assert_eq!(
        v["access_evaluation_endpoint"],
        format!("{}/access/v1/evaluation", s.base)
    );
    assert_eq!(
        v["access_evaluations_endpoint"],
        format!("{}/access/v1/evaluations", s.base)
    );
    let resp = s
        .client
        .get(s.url("/.well-known/authzen-configuration/tenant1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    s.shutdown().await;
}

#[tokio::test]
async fn callers_must_authenticate_and_agents_may_only_ask_about_themselves() {
    let s = server().await;
    let body = json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}});
    let (st, v) = s.post("/access/v1/evaluation", None, &body).await;
    assert_eq!((st, v["error"].clone()), (401, json!("token_missing")));
    let (st, v) = s
        .post("/access/v1/evaluation", Some("not-the-credential"), &body)
        .await;
    assert_eq!(st, 401, "{v}");
    // An agent token for alice may ask about alice, not about bob.
    let alice = dev_token("alice", json!({}), std::time::Duration::from_secs(300));
    let (st, v) = s.post("/access/v1/evaluation", Some(&alice), &body).await;
    assert_eq!((st, v["decision"].clone()), (200, json!(true)), "{v}");
    let mut as_bob = body.clone();
    as_bob["subject"]["id"] = json!("bob");
    let (st, v) = s.post("/access/v1/evaluation", Some(&alice), &as_bob).await;
    assert_eq!((st, v["error"].clone()), (403, json!("subject_mismatch")));
    // In a batch the refusal is per item.
    let (st, v) = s
        .post(
            "/access/v1/evaluations",
            Some(&alice),
            &json!({"action":{"name":"read"},"resource":{"type":"record","id":"record-1"},
                    "evaluations":[{"subject":{"type":"user","id":"alice"}},{"subject":{"type":"user","id":"bob"}}]}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(decisions(&v), vec![json!(true), json!(false)]);
    assert_eq!(v["evaluations"][1]["context"]["error"]["status"], 403);
    s.shutdown().await;
}
