//! One server per data folder (issue 10, network-abuse run): a second `mandate serve` on the
//! same audit log or SQLite store exits at start naming the holder's pid, so the audit chain
//! is never forked (SECURITY AU-01: no missing or duplicated record); a serve that cannot bind
//! its listen address leaves the audit log untouched. Through the real binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{dev_token, repo, spawn_serve};
use serde_json::json;

/// `mandate serve` with the example configuration and these data files, stderr captured.
fn serve(listen: &str, audit: &Path, store: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mandate"))
        .current_dir(repo())
        .arg("serve")
        .env("MANDATE_SERVER__LISTEN", listen)
        .env("MANDATE_EXT_AUTHZ__GRPC_LISTEN", "127.0.0.1:0")
        .env("MANDATE_AUDIT__PATH", audit)
        .env("MANDATE_STORE__URL", store)
        .env("MANDATE_LOG__FORMAT", "text")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mandate serve")
}

/// Wait (bounded) for a server that must refuse to start; its exit status and stderr.
fn refused(mut child: Child) -> (ExitStatus, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the second server did not exit: it started");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

async fn check(addr: &str) {
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/check"))
        .bearer_auth(dev_token(
            "agent-1",
            json!({"owner":"bob","groups":["payments-agents"]}),
            Duration::from_secs(300),
        ))
        .header("content-type", "application/json")
        .body(
            json!({"action":"payments:transfer","resource":{"type":"Account","id":"acct-1"},"context":{"amount":50}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

fn verify(audit: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .current_dir(repo())
        .args(["audit", "verify"])
        .arg(audit)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn au01_second_serve_on_the_same_audit_log_exits_naming_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let (mut first, addr) = spawn_serve(&audit);
    check(&addr).await;

    // Another listen address (port 0), the same data folder.
    let (status, stderr) = refused(serve("127.0.0.1:0", &audit, &dir.path().join("mandate.db")));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.id())),
        "the holder's pid is named: {stderr}"
    );
    assert!(stderr.contains("audit.jsonl"), "{stderr}");

    // The first server's chain is whole, with its checks before and after.
    check(&addr).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let (ok, report) = verify(&audit);
    assert!(ok, "{report}");
}

#[tokio::test]
async fn au01_second_serve_on_the_same_sqlite_store_exits_naming_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let (mut first, addr) = spawn_serve(&audit);
    let other = tempfile::tempdir().unwrap();
    let (status, stderr) = refused(serve(
        "127.0.0.1:0",
        &other.path().join("audit.jsonl"),
        &dir.path().join("mandate.db"),
    ));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.id())),
        "the holder's pid is named: {stderr}"
    );
    assert!(stderr.contains("mandate.db"), "{stderr}");
    check(&addr).await;
    first.kill().unwrap();
    first.wait().unwrap();
}

#[tokio::test]
async fn au01_serve_that_cannot_bind_leaves_the_audit_log_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let (mut first, addr) = spawn_serve(&audit);
    check(&addr).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let before = std::fs::read(&audit).unwrap();
    let modified = std::fs::metadata(&audit).unwrap().modified().unwrap();
    assert!(!before.is_empty());

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let (status, stderr) = refused(serve(&taken_addr, &audit, &dir.path().join("mandate.db")));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on `{taken_addr}`")),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&audit).unwrap(), before);
    assert_eq!(
        std::fs::metadata(&audit).unwrap().modified().unwrap(),
        modified
    );

    // In a folder that does not exist yet, nothing is created.
    let fresh = dir.path().join("not-yet");
    let (status, stderr) = refused(serve(
        &taken_addr,
        &fresh.join("audit.jsonl"),
        &fresh.join("mandate.db"),
    ));
    assert!(!status.success(), "{stderr}");
    assert!(
        !fresh.exists(),
        "a failed start created `{}`",
        fresh.display()
    );
    drop(taken);
    let (ok, report) = verify(&audit);
    assert!(ok, "{report}");
}
