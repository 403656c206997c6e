//! The audit log through the real server (SECURITY §2.2): one record per decision with its
//! id (AU-01), no token in it (AU-05), deny when it cannot be written (AU-02), and every
//! acknowledged decision on file after `kill -9` (AU-03); `mandate audit verify` on the result.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{TestServer, example_config, payments_agent_token, transfer};
use serde_json::{Value, json};

fn token() -> String {
    payments_agent_token("agent-1")
}

fn authzen(amount: i64) -> Value {
    json!({"subject":{"type":"Agent","id":"agent-1"},"action":{"name":"payments:transfer"},
           "resource":{"type":"Account","id":"acct-1"},"context":{"amount":amount}})
}

/// The log's records by decision id (each id must appear once).
fn records(path: &Path) -> HashMap<String, Value> {
    let text = std::fs::read_to_string(path).expect("audit log");
    let mut out = HashMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("json line");
        if v["kind"] == "decision" {
            let id = v["decision_id"].as_str().expect("decision_id").to_owned();
            assert!(out.insert(id.clone(), v).is_none(), "{id} recorded twice");
        }
    }
    out
}

/// `mandate audit verify FILE`: (exit code, stdout).
fn verify_cli(path: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .expect("mandate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn au01_every_decision_has_exactly_one_record_and_the_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let log_s = log.display().to_string();
    let s = TestServer::start(&example_config(&[("MANDATE_AUDIT__PATH", &log_s)])).await;
    let t = token();
    // id -> expected decision
    let mut expected: HashMap<String, &str> = HashMap::new();
    for (amount, outcome) in [(50, "allow"), (250, "escalate"), (20_000, "deny")] {
        let (st, v) = s.post("/v1/check", Some(&t), &transfer(amount)).await;
        assert_eq!((st, v["decision"].as_str()), (200, Some(outcome)), "{v}");
        expected.insert(v["decision_id"].as_str().unwrap().to_owned(), outcome);
    }
    // An error-deny is a decision too.
    let (_, v) = s
        .post(
            "/v1/check",
            Some(&t),
            &json!({"action":"payments:refund","resource":{"type":"Account","id":"a"}}),
        )
        .await;
    assert_eq!(v["reasons"][0]["code"], "unknown_action", "{v}");
    expected.insert(v["decision_id"].as_str().unwrap().to_owned(), "deny");
    // AuthZEN: one evaluation, and a batch whose every item is its own decision.
    let (st, v) = s
        .post("/access/v1/evaluation", Some(&t), &authzen(50))
        .await;
    assert_eq!((st, &v["decision"]), (200, &json!(true)), "{v}");
    expected.insert(v["context"]["id"].as_str().unwrap().to_owned(), "allow");
    let (st, v) = s
        .post(
            "/access/v1/evaluations",
            Some(&t),
            &json!({"subject":{"type":"Agent","id":"agent-1"},"action":{"name":"payments:transfer"},
                    "resource":{"type":"Account","id":"acct-1"},
                    "evaluations":[{"context":{"amount":10}},{"context":{"amount":500}},{"context":{"amount":99_999}}]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    for (item, outcome) in v["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .zip(["allow", "escalate", "deny"])
    {
        expected.insert(item["context"]["id"].as_str().unwrap().to_owned(), outcome);
    }
    // Refused before any decision: not a decision, no record.
    let (st, _) = s.post("/v1/check", None, &transfer(50)).await;
    assert_eq!(st, 401);
    let (st, _) = s.post("/v1/check", Some(&t), &json!({"action": 1})).await;
    assert_eq!(st, 400);
    s.shutdown().await;

    assert_eq!(expected.len(), 8);
    let recs = records(&log);
    assert_eq!(recs.len(), expected.len(), "{recs:?}");
    for (id, outcome) in &expected {
        let r = recs.get(id).unwrap_or_else(|| panic!("no record for {id}"));
        assert_eq!(r["decision"], *outcome, "{r}");
        assert_eq!(r["principal"], json!({"type":"Agent","id":"agent-1"}));
        assert_eq!(r["issuer"], "dev");
        // The token is represented by its `jti` (dev tokens get a fresh one), never itself.
        assert!(r["token_id"].as_str().is_some_and(|j| !j.is_empty()), "{r}");
        assert!(r["policy_version"].as_str().unwrap().starts_with("1+"));
        assert!(r["latency_us"].as_u64().is_some());
        assert_eq!(r["context_digest"].as_str().unwrap().len(), 64);
    }
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: 8 records, last hash "), "{out}");

    // An edited line is detected, at its line.
    let text = std::fs::read_to_string(&log).unwrap();
    let edited = text.replacen("\"decision\":\"deny\"", "\"decision\":\"allow\"", 1);
    let line = text[..text.find("\"decision\":\"deny\"").unwrap()]
        .matches('\n')
        .count()
        + 1;
    std::fs::write(&log, edited).unwrap();
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("audit.jsonl: line {line}: ")),
        "{out}"
    );
}

#[tokio::test]
async fn au05_no_raw_token_reaches_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let log_s = log.display().to_string();
    let s = TestServer::start(&example_config(&[("MANDATE_AUDIT__PATH", &log_s)])).await;
    let t = token();
    for amount in [50, 250, 20_000] {
        s.post("/v1/check", Some(&t), &transfer(amount)).await;
        s.post("/access/v1/evaluation", Some(&t), &authzen(amount))
            .await;
    }
    s.shutdown().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 6);
    assert!(!text.contains(&t));
    for part in t.split('.') {
        assert!(!text.contains(part), "a token segment is in the log");
    }
    assert!(!text.contains("eyJ"));
}

#[tokio::test]
async fn au02_an_unwritable_audit_log_turns_an_allow_into_a_deny() {
    let s = TestServer::start(&example_config(&[("MANDATE_AUDIT__PATH", "/dev/full")])).await;
    let t = token();
    let (st, v) = s.post("/v1/check", Some(&t), &transfer(50)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(v["reasons"][0]["code"], "audit_unavailable", "{v}");
    let (st, v) = s
        .post("/access/v1/evaluation", Some(&t), &authzen(50))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["decision"], false, "{v}");
    assert_eq!(v["context"]["reason"], "audit_unavailable", "{v}");
    let (_, v) = s
        .post(
            "/access/v1/evaluations",
            Some(&t),
            &json!({"subject":{"type":"Agent","id":"agent-1"},"action":{"name":"payments:transfer"},
                    "resource":{"type":"Account","id":"acct-1"},"context":{"amount":10},
                    "evaluations":[{},{}]}),
        )
        .await;
    for item in v["evaluations"].as_array().unwrap() {
        assert_eq!(item["decision"], false, "{v}");
        assert_eq!(item["context"]["reason"], "audit_unavailable", "{v}");
    }
    let failures = s.running.as_ref().unwrap().service.audit.write_failures();
    assert_eq!(failures, 4);
    // The count is visible to operators, and the sidecar says it is not ready (issue 10.6):
    // every decision it makes is a deny.
    let r = s.client.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["audit"]["write_failures"], 4, "{v}");
    assert_eq!(v["ready"], false, "{v}");
    assert_eq!(v["degraded"], json!(["audit"]), "{v}");
    assert_eq!(v["audit"]["ok"], false, "{v}");
    s.shutdown().await;
}

/// One `POST /v1/check` over a plain TCP connection; returns the body.
async fn post_check(client: &reqwest::Client, addr: &str, token: &str, amount: i64) -> Value {
    let resp = client
        .post(format!("http://{addr}/v1/check"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(transfer(amount).to_string())
        .send()
        .await
        .expect("check answered");
    serde_json::from_str(&resp.text().await.expect("body")).expect("json")
}

#[tokio::test]
async fn au03_every_acknowledged_decision_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let (mut child, addr) = common::spawn_serve(&log);

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let t = token();
    let mut acknowledged = Vec::new();
    for i in 0..200 {
        let amount = [50, 250, 20_000][i % 3];
        let v = post_check(&client, &addr, &t, amount).await;
        assert!(v["decision"].is_string(), "{v}");
        acknowledged.push(v["decision_id"].as_str().unwrap().to_owned());
    }
    child.kill().expect("kill -9");
    child.wait().unwrap();

    let (code, out) = verify_cli(&log);
    assert_eq!(code, 0, "{out}");
    let recs = records(&log);
    for id in &acknowledged {
        assert!(
            recs.contains_key(id),
            "acknowledged {id} missing after kill -9"
        );
    }
    assert_eq!(recs.len(), 200);
}

/// `mandate audit verify FILE --checkpoints FILE.checkpoints --key KEY`: (exit code, stdout).
fn verify_checkpoints_cli(log: &Path, key: &Path) -> (i32, String) {
    let mut cps = log.as_os_str().to_owned();
    cps.push(".checkpoints");
    let out = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .args(["audit", "verify"])
        .arg(log)
        .arg("--checkpoints")
        .arg(&cps)
        .arg("--key")
        .arg(key)
        .output()
        .expect("mandate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Recompute the chain from line `from` (0-based) after `edit` changed that record, as an
/// attacker who can write the file would: every `prev_hash` and `hash` made consistent again.
fn rewrite_chain(log: &Path, from: usize, edit: impl Fn(&mut serde_json::Map<String, Value>)) {
    use sha2::{Digest, Sha256};
    let text = std::fs::read_to_string(log).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut prev: String = if from == 0 {
        "0".repeat(64)
    } else {
        let v: Value = serde_json::from_str(&lines[from - 1]).unwrap();
        v["hash"].as_str().unwrap().to_owned()
    };
    for (i, line) in lines.iter_mut().enumerate().skip(from) {
        let mut v: Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("hash");
        obj.insert("prev_hash".into(), Value::String(prev.clone()));
        if i == from {
            edit(obj);
        }
        let mut canonical = Vec::new();
        mandate::audit::write_canonical(&mut canonical, &v).unwrap();
        let hash = hex::encode(
            Sha256::new()
                .chain_update(prev.as_bytes())
                .chain_update(b"\n")
                .chain_update(&canonical)
                .finalize(),
        );
        // The line as the writer puts it: the canonical record, `hash` appended last.
        canonical.pop();
        *line = format!(
            "{},\"hash\":\"{hash}\"}}",
            String::from_utf8(canonical).unwrap()
        );
        prev = hash;
    }
    std::fs::write(log, lines.join("\n") + "\n").unwrap();
}

#[tokio::test]
async fn au04_signed_checkpoints_catch_a_rewritten_chain_a_cut_end_and_a_forged_checkpoint() {
    let log = std::path::PathBuf::from(common::fresh_audit_path());
    let log_s = log.display().to_string();
    let key = common::repo().join("config/dev/audit-checkpoint-key.pem.pub");
    let db = log.with_file_name("mandate.db").display().to_string();
    let s = TestServer::start(&example_config(&[
        ("MANDATE_AUDIT__PATH", &log_s),
        ("MANDATE_AUDIT__CHECKPOINT_EVERY", "4"),
        ("MANDATE_STORE__URL", &db),
    ]))
    .await;
    let t = token();
    for amount in 1..=10 {
        let (_, v) = s.post("/v1/check", Some(&t), &transfer(amount)).await;
        assert_eq!(v["decision"], "allow", "{v}");
    }
    // Shutdown signs the head once more.
    s.shutdown().await;
    let (code, out) = verify_checkpoints_cli(&log, &key);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("vouched for up to seq 10, 0 record(s)"),
        "{out}"
    );

    // An attacker who can write the file recomputes the chain after turning a deny into an
    // allow: the chain alone says ok, the checkpoints do not.
    let pristine = std::fs::read_to_string(&log).unwrap();
    rewrite_chain(&log, 2, |r| {
        r.insert("decision".into(), json!("deny"));
    });
    assert_eq!(verify_cli(&log).0, 0, "the rewritten chain is consistent");
    let (code, out) = verify_checkpoints_cli(&log, &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the log was rewritten"), "{out}");

    // Records cut from the end: undetectable by the chain, not by the last checkpoint, even
    // with the checkpoint file gone: the approval store kept them too.
    let cut: Vec<&str> = pristine.lines().take(7).collect();
    std::fs::write(&log, cut.join("\n") + "\n").unwrap();
    assert_eq!(verify_cli(&log).0, 0);
    let (code, out) = verify_checkpoints_cli(&log, &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cut from the end"), "{out}");
    let mut cps_file = log.as_os_str().to_owned();
    cps_file.push(".checkpoints");
    let saved = std::fs::read(&cps_file).unwrap();
    std::fs::remove_file(&cps_file).unwrap();
    let from_store = |log: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_mandate"))
            .args(["audit", "verify"])
            .arg(log)
            .args(["--store", &db, "--key"])
            .arg(&key)
            .output()
            .expect("mandate runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = from_store(&log);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cut from the end"), "{out}");
    std::fs::write(&log, &pristine).unwrap();
    let (code, out) = from_store(&log);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("vouched for up to seq 10"), "{out}");
    std::fs::write(&cps_file, saved).unwrap();

    // A checkpoint signed by any other key does not verify.
    std::fs::write(&log, &pristine).unwrap();
    let mut cps = log.as_os_str().to_owned();
    cps.push(".checkpoints");
    let other = mandate::audit::CheckpointKey::from_pkcs8(
        mandate::audit::CheckpointKey::generate_pem()
            .unwrap()
            .as_bytes(),
        "other",
    )
    .unwrap();
    let forged = other.sign(10, "00", 0);
    let mut text = std::fs::read_to_string(&cps).unwrap();
    text.push_str(&serde_json::to_string(&forged).unwrap());
    text.push('\n');
    std::fs::write(&cps, text).unwrap();
    let (code, out) = verify_checkpoints_cli(&log, &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not verify"), "{out}");
}

/// Issue 14 item 4: below `audit.min_free_disk` on the log's filesystem, `/readyz` says so
/// (`warnings: ["audit_disk_low"]`, the free and total bytes) while the sidecar stays ready and
/// keeps answering: the alarm comes before the disk is full and every check is denied (AU-02).
#[tokio::test]
async fn au02_a_low_audit_disk_is_announced_before_it_fills() {
    for (min_free, low) in [("100%", true), ("0", false)] {
        let s = TestServer::start(&example_config(&[(
            "MANDATE_AUDIT__MIN_FREE_DISK",
            min_free,
        )]))
        .await;
        let (status, v) = s.get("/readyz", None).await;
        assert_eq!(status, 200, "{min_free}");
        let disk = &v["audit"]["disk"];
        assert_eq!(disk["low"], low, "{v}");
        assert!(disk["total_bytes"].as_u64().unwrap() > 0, "{v}");
        assert!(
            disk["free_bytes"].as_u64().unwrap() <= disk["total_bytes"].as_u64().unwrap(),
            "{v}"
        );
        let want = if low {
            json!(["audit_disk_low"])
        } else {
            json!([])
        };
        assert_eq!(v["warnings"], want, "{v}");
        assert_eq!(
            (v["ready"].clone(), v["degraded"].clone()),
            (json!(true), json!([]))
        );
        // Checks go on.
        let (st, d) = s.post("/v1/check", Some(&token()), &transfer(50)).await;
        assert_eq!((st, d["decision"].clone()), (200, json!("allow")), "{d}");
        s.shutdown().await;
    }
}

/// Issue 14 item 4: a served log rotates by size, compresses and keeps its retention, and the
/// chain still verifies across its segments, with its checkpoints, from the file or the
/// directory (AU-04 for the segment another hand deletes).
#[tokio::test]
async fn au04_a_rotated_compressed_and_retained_log_verifies_across_segments() {
    let log = std::path::PathBuf::from(common::fresh_audit_path());
    let dir = log.parent().unwrap().to_path_buf();
    let log_s = log.display().to_string();
    let key = common::repo().join("config/dev/audit-checkpoint-key.pem.pub");
    let db = log.with_file_name("mandate.db").display().to_string();
    let s = TestServer::start(&example_config(&[
        ("MANDATE_AUDIT__PATH", &log_s),
        ("MANDATE_AUDIT__ROTATE_SIZE", "8KiB"),
        ("MANDATE_AUDIT__KEEP_SEGMENTS", "3"),
        ("MANDATE_AUDIT__CHECKPOINT_EVERY", "25"),
        ("MANDATE_STORE__URL", &db),
    ]))
    .await;
    let t = token();
    let mut last_id = String::new();
    for amount in 1..=150 {
        let (_, v) = s
            .post("/v1/check", Some(&t), &transfer(amount % 100 + 1))
            .await;
        assert_eq!(v["decision"], "allow", "{v}");
        last_id = v["decision_id"].as_str().unwrap().to_owned();
        if amount == 30 {
            // A checkpoint of records that retention will delete (at most one a second).
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    // The segment thread compresses and applies retention after each rotation.
    let segments = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("audit-"))
            .collect();
        names.sort();
        names
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(segments().len() == 3 && segments().iter().all(|n| n.ends_with(".jsonl.zst"))) {
        assert!(std::time::Instant::now() < deadline, "{:?}", segments());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.shutdown().await;
    // The newest decision is the chain's last decision record, in whichever segment it
    // landed (the keeper's retention record may have closed the segment that holds it).
    let mut last_decision = None;
    for (file, compressed) in mandate::audit::segments::Family::of(&log).files().unwrap() {
        use std::io::BufRead as _;
        for line in mandate::audit::segments::open_lines(&file, compressed)
            .unwrap()
            .lines()
        {
            let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
            if v["kind"] == "decision" {
                last_decision = v["decision_id"].as_str().map(str::to_owned);
            }
        }
    }
    assert_eq!(last_decision.as_deref(), Some(last_id.as_str()));

    let (code, out) = verify_cli(&log);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("segments: 4 file(s), seq "), "{out}");
    assert!(
        out.contains(": deleted by retention, as the log records"),
        "{out}"
    );
    assert_eq!(
        verify_cli(&dir),
        (code, out.clone()),
        "the directory is the same log"
    );
    let (code, out) = verify_checkpoints_cli(&log, &key);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("0 record(s) after it not yet checkpointed"),
        "{out}"
    );
    assert!(out.contains("cover records deleted by retention"), "{out}");

    // Someone deletes the oldest kept segment: the log no longer accounts for its start.
    std::fs::remove_file(dir.join(&segments()[0])).unwrap();
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("records were cut from the front of the log"),
        "{out}"
    );
}
