//! The log of a whole run (issue 15 item 3): `mandate serve` with JSON logs takes checks
//! with good and refused tokens, an escalation approved with evidence and a webhook that
//! cannot be delivered; then its whole stderr is read. Every line is JSON; each refused
//! credential and the failed webhook have a line with the reason; and no token (nor any of
//! its three parts), no evidence value and no rationale appears anywhere in it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::time::Duration;

use common::{dev_token, dev_token_at, payments_agent_token, spawn_serve_logged, transfer};
use serde_json::{Value, json};

const EVIDENCE: &str = "EVIDENCE-4b1d-never-logged";
const RATIONALE: &str = "rationale-9c2e-never-logged";

#[tokio::test]
async fn a_full_run_logs_refusals_with_reasons_and_never_a_token_or_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mandate.log");
    let (mut child, addr) = spawn_serve_logged(
        &dir.path().join("audit.jsonl"),
        &[
            ("MANDATE_LOG__FORMAT", "json"),
            // Nothing listens on port 9: every delivery fails, and says so.
            (
                "MANDATE_NOTIFICATIONS__WEBHOOKS",
                r#"["http://127.0.0.1:9/hook"]"#,
            ),
            ("MANDATE_NOTIFICATIONS__MAX_ATTEMPTS", "1"),
        ],
        &log,
    );
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let post = |path: &str, token: &str, body: Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };

    let good = payments_agent_token("agent-1");
    let r = post("/v1/check", &good, transfer(50)).await.unwrap();
    assert_eq!(r.status(), 200);
    let esc = post("/v1/check", &good, transfer(250))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let esc: Value = serde_json::from_str(&esc).unwrap();
    assert_eq!(esc["decision"], "escalate", "{esc}");
    let id = esc["approval_request"]["id"].as_str().unwrap().to_owned();
    let alice = dev_token(
        "alice",
        json!({"groups": ["finance-approvers"]}),
        Duration::from_secs(300),
    );
    let r = post(
        &format!("/v1/approvals/{id}/approve"),
        &alice,
        json!({"rationale": RATIONALE, "evidence": {"ticket": EVIDENCE}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // Refused: expired an hour ago, and a good token whose signature was altered.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expired = dev_token_at(
        "agent-1",
        json!({"owner": "bob"}),
        Duration::from_secs(60),
        now - 3600,
    );
    // One character inside the signature changed (the last one's low bits may be unused).
    let at = good.len() - 10;
    let swapped = if &good[at..=at] == "A" { "B" } else { "A" };
    let tampered = format!("{}{swapped}{}", &good[..at], &good[at + 1..]);
    for bad in [&expired, &tampered] {
        let r = post("/v1/check", bad, transfer(50)).await.unwrap();
        assert_eq!(r.status(), 401);
    }

    // The webhook's one attempt fails in the background: wait for its line, then stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("webhook gave up")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no webhook failure line"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let refused = |code: &str| {
        lines.iter().any(|l| {
            l["fields"]["message"] == "credential refused"
                && l["fields"]["code"] == code
                && l["fields"]["reason"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty())
        })
    };
    assert!(refused("token_expired"), "{text}");
    assert!(refused("signature_invalid"), "{text}");

    for (what, token) in [
        ("agent", &good),
        ("approver", &alice),
        ("expired", &expired),
        ("tampered", &tampered),
    ] {
        assert!(
            !text.contains(token.as_str()),
            "the {what} token is in the log"
        );
        for (i, part) in token.split('.').enumerate() {
            assert!(
                !text.contains(part),
                "part {i} of the {what} token is in the log"
            );
        }
    }
    assert!(!text.contains(EVIDENCE), "evidence is in the log");
    assert!(!text.contains(RATIONALE), "a rationale is in the log");
}
