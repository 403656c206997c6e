//! The `mandate` binary as users run it: `serve` (with an environment override, readiness,
//! and a clean stop), `dev token`, `check`, `policy validate`, `policy test`, and
//! configuration errors reported all at once, each naming its file line, variable or flag.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::repo;

fn mandate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mandate"));
    c.current_dir(repo());
    c
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = mandate().args(args).output().expect("mandate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn example_bundle_validates_and_its_tests_pass() {
    let (code, out, err) = run(&["policy", "validate", "config/policies"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("ok: bundle `example` revision `1`"),
        "{out}"
    );
    let (code, out, err) = run(&["policy", "test", "config/policies"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(&["policy", "test", "tests/fixtures/authzen"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn failing_policy_test_prints_expected_and_got_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    common::copy_dir(&repo().join("config/policies"), dir.path());
    std::fs::write(
        dir.path().join("tests/wrong.yaml"),
        r#"cases:
  - name: a big transfer is not allowed on its own
    principal: { type: Agent, id: agent-1 }
    action: payments:transfer
    resource: { type: Account, id: acct-1 }
    context: { amount: 5000 }
    expect: allow
"#,
    )
    .unwrap();
    let (code, out, err) = run(&["policy", "test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("a big transfer is not allowed on its own"),
        "{out}"
    );
    assert!(out.contains("allow") && out.contains("escalate"), "{out}");
}

#[test]
fn bad_annotation_is_a_load_error_naming_file_line_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    common::copy_dir(&repo().join("config/policies"), dir.path());
    std::fs::write(
        dir.path().join("zz-bad.cedar"),
        "\n@id(\"bad-ttl\")\n@approval(\"finance-approvers\")\n@grant_ttl(\"forever\")\npermit (principal, action == Action::\"crm:read\", resource);\n",
    )
    .unwrap();
    let (code, out, err) = run(&["policy", "validate", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("zz-bad.cedar:"), "{err}");
    assert!(err.contains("bad-ttl"), "{err}");
    assert!(err.contains("forever"), "{err}");
}

#[test]
fn dev_token_then_offline_check_exit_codes() {
    let (code, token, err) = run(&["dev", "token", "--sub", "agent-1", "--claim", "owner=bob"]);
    assert_eq!(code, 0, "{err}");
    let token = token.trim();
    assert_eq!(
        token.split('.').count(),
        3,
        "only the token is printed: {token}"
    );
    assert!(!token.contains(char::is_whitespace));
    let check = |amount: &str| {
        run(&[
            "check",
            "--principal",
            "Agent::agent-1",
            "--action",
            "payments:transfer",
            "--resource",
            "Account::acct-1",
            "--context",
            &format!("{{\"amount\":{amount}}}"),
        ])
    };
    let (code, out, _) = check("50");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"allow\""), "{out}");
    let (code, out, _) = check("250");
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("finance-approvers"), "{out}");
    let (code, _, _) = check("20000");
    assert_eq!(code, 2);
    // A duplicate key is refused, not decided on its last value (SECURITY J-22's rule).
    let (code, _, err) = check("20000,\"amount\":250");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("duplicate key `amount`"), "{err}");
}

#[test]
fn every_config_problem_is_reported_before_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"nowhere\"\ncolour = 1\n[[issuers]]\nname = \"x\"\nissuer = \"https://x\"\nalgorithms = [\"none\"]\n",
    )
    .unwrap();
    let (code, _, err) = run(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    for key in [
        "server.listen",
        "server.colour",
        "issuers[0].audiences",
        "issuers[0].algorithms[0]",
    ] {
        assert!(err.contains(key), "missing {key}: {err}");
    }
}

#[test]
fn config_problems_name_the_file_line_the_variable_or_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mandate.toml");
    let file = path.to_str().unwrap();
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\nlistn = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["serve", "--config", file]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "{file}:3: server.listn: unknown key (expected one of:"
        )),
        "{err}"
    );

    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = mandate()
        .args(["serve", "--config", file])
        .env("MANDATE_SERVER__LISTN", "127.0.0.1:1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("\n  MANDATE_SERVER__LISTN: server.listn: unknown key"),
        "{err}"
    );

    let (code, _, err) = run(&["serve", "--config", file, "--listen", "nonsense"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("\n  --listen: server.listen: `nonsense` is not an address"),
        "{err}"
    );
}

#[test]
fn serve_help_lists_the_flags_and_the_environment_overrides() {
    let (code, out, err) = run(&["serve", "--help"]);
    assert_eq!(code, 0, "{err}");
    for text in [
        "--listen <ADDR>",
        "--bundle <DIR>",
        "--log-level <LEVEL>",
        "--log-format <FORMAT>",
        "MANDATE_CONFIG",
        "MANDATE_<SECTION>__<KEY>",
        "MANDATE_SERVER__LISTEN=127.0.0.1:9000",
        "MANDATE_ISSUERS__0__LEEWAY=10s",
        "RUST_LOG",
    ] {
        assert!(out.contains(text), "missing {text}: {out}");
    }
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_flags_win_over_the_environment() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    // The environment's listener and log filter would fail or silence the start: the flags
    // replace both.
    let mut child = Killed(
        mandate()
            .args(["serve", "--listen", "127.0.0.1:0", "--log-level", "info"])
            .args(["--log-format", "text"])
            .env("MANDATE_SERVER__LISTEN", "nowhere")
            .env("RUST_LOG", "off")
            .env("MANDATE_AUDIT__PATH", dir.path().join("audit.jsonl"))
            .env("MANDATE_STORE__URL", dir.path().join("mandate.db"))
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split("addr=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned)
        })
        .expect("listening line logged at the flag's level");
    std::thread::spawn(move || for _ in lines {});
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let resp = http_get(&addr, "/healthz").unwrap_or_default();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// A bare HTTP/1.1 GET over std's TcpStream: no client library, no external tool.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn serve_starts_ready_fast_answers_and_stops_on_sigterm() {
    let started = Instant::now();
    let audit = tempfile::tempdir().unwrap();
    let (mut child, addr) = common::spawn_serve(&audit.path().join("audit.jsonl"));
    let body = loop {
        if let Some(resp) = http_get(&addr, "/readyz")
            && resp.starts_with("HTTP/1.1 200")
        {
            break resp;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(body.contains("\"ready\":true"), "{body}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
