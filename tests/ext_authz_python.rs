//! Envoy `ext_authz` over gRPC with a client nobody here wrote: Python `grpcio` and Envoy's
//! own protos (`xds-protos`, generated from envoyproxy/data-plane-api), installed by
//! scripts/test from tests/requirements.txt (issue 12 item 5). The client
//! (tests/peers/ext_authz_client.py) sends one CheckRequest per case, as Envoy's filter
//! does, and prints each answer; this test judges them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{TestServer, dev_token, example_config_plus, repo, spire_and_envoy};
use serde_json::{Value, json};

const PEP_SECRET: &str = "python-envoy-credential";

#[tokio::test]
async fn an_envoy_protos_client_gets_ext_authz_answers() {
    use sha2::Digest as _;
    let digest = hex::encode(sha2::Sha256::digest(PEP_SECRET.as_bytes()));
    let s = TestServer::start(&example_config_plus(
        &spire_and_envoy(&digest),
        &[
            (
                "MANDATE_EXT_AUTHZ__IDENTITY",
                r#"["jwt_authn", "peer", "authorization"]"#,
            ),
            ("MANDATE_EXT_AUTHZ__PEER_ISSUER", "spire"),
        ],
    ))
    .await;
    let addr = s.running.as_ref().unwrap().grpc_addr.unwrap();
    let token = dev_token("agent-1", json!({"owner": "bob"}), Duration::from_secs(300));
    let script = repo().join("tests/peers/ext_authz_client.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .args([addr.to_string(), token, PEP_SECRET.to_owned()])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client failed (scripts/test installs tests/requirements.txt):\n{stderr}"
    );
    let answers: HashMap<String, Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["case"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    let get = |case: &str| {
        answers
            .get(case)
            .unwrap_or_else(|| panic!("no answer for `{case}`: {answers:?}"))
    };
    let grpc = |case: &str| {
        (
            get(case)["code"].as_i64(),
            get(case)["http_status"].as_i64(),
        )
    };

    // Allow: OK with the principal for the upstream.
    assert_eq!(grpc("allow"), (Some(0), Some(200)), "{:?}", get("allow"));
    assert_eq!(
        get("allow")["headers"]["x-mandate-principal"],
        "Agent::\"agent-1\""
    );
    // Deny and escalate: PERMISSION_DENIED with the 403 the client sees.
    assert_eq!(grpc("deny"), (Some(7), Some(403)));
    assert_eq!(get("deny")["body"]["decision"], "deny");
    assert_eq!(grpc("escalate"), (Some(7), Some(403)));
    let esc = get("escalate");
    let id = esc["body"]["approval_request"]["id"].as_str().unwrap();
    assert_eq!(esc["headers"]["x-mandate-approval-id"], id, "{esc}");
    // Bad or missing token: UNAUTHENTICATED, 401 with the reason (SECURITY P-05).
    assert_eq!(grpc("bad_token"), (Some(16), Some(401)));
    assert_eq!(get("bad_token")["body"]["error"], "token_malformed");
    assert_eq!(grpc("no_token"), (Some(16), Some(401)));
    assert_eq!(get("no_token")["body"]["error"], "token_missing");
    // jwt_authn metadata (numbers as doubles, as Envoy writes them) from the enforcement
    // point is the agent; from anyone else it is not believed (cf. SECURITY A-25).
    assert_eq!(
        grpc("jwt_authn"),
        (Some(0), Some(200)),
        "{:?}",
        get("jwt_authn")
    );
    assert_eq!(
        get("jwt_authn")["headers"]["x-mandate-principal"],
        "Agent::\"agent-py\""
    );
    assert_eq!(grpc("jwt_authn_untrusted"), (Some(16), Some(401)));
    assert_eq!(
        get("jwt_authn_untrusted")["body"]["error"],
        "assertion_untrusted"
    );
    // The mTLS peer's SPIFFE ID.
    assert_eq!(grpc("peer"), (Some(0), Some(200)), "{:?}", get("peer"));
    assert_eq!(
        get("peer")["headers"]["x-mandate-principal"],
        "Agent::\"spiffe://example.org/ns/agents/sa/py-peer\""
    );
    // A CheckRequest that describes nothing is never OK (SECURITY P-01).
    assert_eq!(grpc("no_attributes"), (Some(7), Some(400)));
    assert_eq!(get("health")["status"], json!("SERVING"));
    s.shutdown().await;
}
