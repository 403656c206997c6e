//! The `mandate` binary as users run it: `serve` (with an environment override, readiness,
//! and a clean stop), `dev token`, `check`, `policy validate`, `policy test`, `route test`, and
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

use common::{Killed, mandate, repo};

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

/// `mandate route test`: the rule a request matches and the `/v1/check` body it becomes;
/// exit 2 when no route matches (the request would be denied), 1 for one refused whole.
#[test]
fn route_test_prints_the_matched_rule_and_the_check() {
    let (code, out, err) = run(&[
        "route",
        "test",
        "POST",
        "https://api.example.com/accounts/acct-1/transfers?x=1",
        "--header",
        "x-request-id=abc",
        "--body",
        r#"{"amount": 250}"#,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (first, json) = out.split_once('\n').unwrap();
    assert_eq!(
        first,
        "`POST /accounts/acct-1/transfers` matches routes[0] `transfer`"
    );
    let check: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        check,
        serde_json::json!({"action": "payments:transfer",
            "resource": {"type": "Account", "id": "acct-1"}, "context": {"amount": 250}})
    );
    let (code, out, _) = run(&["route", "test", "DELETE", "/accounts/acct-1"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("matches no route"), "{out}");
    let (code, _, err) = run(&["route", "test", "GET", "/crm//records"]);
    assert_eq!(code, 1);
    assert!(err.contains("empty segment"), "{err}");
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
            .env("MANDATE_EXT_AUTHZ__GRPC_LISTEN", "127.0.0.1:0")
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

/// `mandate serve` run as a fresh clone runs it: from a directory holding a copy of the
/// repository's `config/` (so the example's `../data` is that directory's `data/`), on port 0,
/// with `env`. Every line it logs comes through the receiver.
fn serve_copy_of_example(
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    common::copy_dir(&repo().join("config"), &dir.join("config"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .current_dir(dir)
        .arg("serve")
        .env("MANDATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("MANDATE_EXT_AUTHZ__GRPC_LISTEN", "127.0.0.1:0")
        .env("MANDATE_LOG__FORMAT", "text")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn mandate serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Lines from `rx` up to and including the first that `stop` accepts (30 s at most).
fn lines_until(
    rx: &std::sync::mpsc::Receiver<String>,
    mut stop: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = stop(&line);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("log line not seen within 30 s; got:\n{}", seen.join("\n")),
        }
    }
}

/// `key=value` of a text log line, as a number.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A bare HTTP/1.1 POST of JSON with a bearer token; the whole response.
fn http_post(addr: &str, path: &str, token: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 11 item 5: start-up says what matters (resolved paths, the store, a warning for the
/// published dev keys), and a running server logs a summary every `log.summary_interval`.
#[test]
fn serve_start_up_names_resolved_paths_warns_of_dev_keys_and_summarizes() {
    let dir = tempfile::tempdir().unwrap();
    let (child, rx) = serve_copy_of_example(dir.path(), &[("MANDATE_LOG__SUMMARY_INTERVAL", "1s")]);
    let start = lines_until(&rx, |l| l.contains("mandate started"));
    let text = start.join("\n");
    let line = |what: &str| {
        start
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no `{what}` line:\n{text}"))
    };
    let warn = line("the dev issuer is trusted");
    assert!(
        warn.contains("WARN") && warn.contains("issuer=dev"),
        "{warn}"
    );
    assert!(warn.contains("production"), "{warn}");
    assert!(line("audit checkpoints are signed with the published dev key").contains("WARN"));
    assert!(
        line("audit log open").contains("path=data/audit.jsonl "),
        "{text}"
    );
    assert!(
        line("approval store open").contains("location=sqlite data/mandate.db"),
        "{text}"
    );
    assert!(
        line("audit checkpoints on").contains("file=data/audit.jsonl.checkpoints"),
        "{text}"
    );
    assert!(
        line("mandate started").contains("path=config/policies"),
        "{text}"
    );
    assert!(!text.contains(".."), "paths are shown folded:\n{text}");
    let addr = line("listening")
        .split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();

    // One decision of each outcome (the escalation creates an approval request) and one
    // refused token: the summary lines of the next intervals add up to exactly that.
    let token = common::dev_token(
        "agent-1",
        serde_json::json!({"owner": "bob", "groups": ["payments-agents"]}),
        Duration::from_secs(300),
    );
    for (amount, outcome) in [(50, "allow"), (20_000, "deny"), (250, "escalate")] {
        let body = format!(
            r#"{{"action":"payments:transfer","resource":{{"type":"Account","id":"acct-1"}},"context":{{"amount":{amount}}}}}"#
        );
        let resp = http_post(&addr, "/v1/check", &token, &body);
        assert!(resp.contains(&format!("\"{outcome}\"")), "{resp}");
    }
    let resp = http_post(&addr, "/v1/check", "not.a.token", "{}");
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    let keys = [
        "decisions",
        "allow",
        "deny",
        "escalate",
        "approval_requests",
        "token_rejections",
    ];
    let mut totals = [0u64; 6];
    lines_until(&rx, |l| {
        if l.contains(" INFO ") && l.contains(": summary ") {
            for (t, k) in totals.iter_mut().zip(keys) {
                *t += field(l, k);
            }
        }
        totals == [3, 1, 1, 1, 1, 1]
    });
    // Then nothing more happens, and the summary says so.
    let idle = lines_until(&rx, |l| l.contains("summary: idle"));
    assert!(idle.last().unwrap().contains("interval=1s"), "{idle:?}");
    stop(child);
}

/// SIGHUP reloads the bundle; a broken bundle is refused, logged, and the last good one goes
/// on answering.
#[test]
fn sighup_reloads_the_bundle_and_a_broken_one_leaves_the_last_good_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (child, rx) = serve_copy_of_example(dir.path(), &[]);
    let start = lines_until(&rx, |l| l.contains("mandate started"));
    let addr = start
        .iter()
        .find_map(|l| l.split("addr=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    let token = common::dev_token("agent-1", serde_json::json!({}), Duration::from_secs(300));
    let read = r#"{"action":"crm:read","resource":{"type":"CrmRecord","id":"c-1"}}"#;
    let decision = || {
        let resp = http_post(&addr, "/v1/check", &token, read);
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        let v: serde_json::Value = serde_json::from_str(&body).expect("a decision");
        (
            v["decision"].as_str().unwrap().to_owned(),
            v["policy_version"].as_str().unwrap().to_owned(),
        )
    };
    let (first, v1) = decision();
    assert_eq!(first, "allow");
    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };

    let bundle = dir.path().join("config/policies");
    std::fs::write(
        bundle.join("freeze.cedar"),
        "@id(\"crm-freeze\")\nforbid (principal, action == Action::\"crm:read\", resource);\n",
    )
    .unwrap();
    hup();
    let reloaded = lines_until(&rx, |l| l.contains("policy bundle reloaded"));
    let v2 = decision();
    assert_eq!(v2.0, "deny");
    assert_ne!(v2.1, v1);
    assert!(
        reloaded
            .last()
            .unwrap()
            .contains(&format!("version=\"{}\"", v2.1)),
        "{reloaded:?}"
    );

    std::fs::write(
        bundle.join("broken.cedar"),
        "permit (principal, action, resource) when { context.nope > };\n",
    )
    .unwrap();
    hup();
    // The error may span lines (one per problem); the active version closes it.
    let refused = lines_until(&rx, |l| l.contains("active="));
    let text = refused.join("\n");
    assert!(
        text.contains("ERROR") && text.contains("policy bundle refused"),
        "{text}"
    );
    assert!(text.contains("broken.cedar"), "{text}");
    assert!(text.contains(&format!("active=\"{}\"", v2.1)), "{text}");
    assert_eq!(decision(), v2, "the last good bundle goes on answering");
    stop(child);
}
