//! `mandate mcp wrap` (issue 13 items 6 and 8): a local stdio MCP server behind Mandate's
//! decisions, between two peers nobody here wrote. The official Python MCP SDK's stdio client
//! (tests/peers/mcp_client.py --stdio) runs `mandate mcp wrap --name tools -- python3
//! tests/peers/mcp_upstream.py --stdio --counts FILE`, as a desktop agent runs a local server
//! from its tool configuration; the server is the SDK's `MCPServer` over stdio, writing how
//! many calls reached it (and the names of its environment variables) to FILE after each.
//! Mandate (the example configuration and bundle, port 0) decides every call through
//! `/v1/mcp/decide` and filters every list through `/v1/mcp/filter`, exactly as the HTTP
//! gateway does for `/mcp/tools` (tests/mcp.rs): what is not allowed never reaches the child
//! (SECURITY P-01), which the counts prove. The `j35_` cases run the wrapper without a token
//! against Mandate's Unix socket, where the OS user is the identity (`[[mcp.local_principals]]`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::Duration;

use common::mcp::{Run, call, text};
use common::{Killed, TestServer, dev_token, example_config, example_config_plus, repo};
use serde_json::{Value, json};

/// The agent of the example bundle.
fn agent() -> String {
    dev_token("agent-1", json!({"owner": "bob"}), Duration::from_secs(300))
}

/// Where the wrapped server writes its counts, in a directory of its own.
struct Counts {
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Counts {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        Self {
            file: dir.path().join("counts.json"),
            _dir: dir,
        }
    }

    /// `{"counts", "reads", "env", "token_in_env"}` as the server last wrote it.
    fn read(&self) -> Value {
        let text = std::fs::read_to_string(&self.file)
            .unwrap_or_else(|e| panic!("the wrapped server wrote no counts: {e}"));
        serde_json::from_str(&text).expect("counts JSON")
    }

    /// The calls each tool received.
    fn calls(&self) -> Value {
        self.read()["counts"].clone()
    }
}

/// `mandate mcp wrap --name tools --server SERVER [extra] -- python3 mcp_upstream.py --stdio
/// --counts FILE`.
fn wrap_command(server: &str, extra: &[&str], counts: &Path) -> Vec<String> {
    let mut args = vec![
        env!("CARGO_BIN_EXE_mandate").to_owned(),
        "mcp".into(),
        "wrap".into(),
        "--name".into(),
        "tools".into(),
        "--server".into(),
        server.to_owned(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args.extend([
        "--".into(),
        "python3".into(),
        repo()
            .join("tests/peers/mcp_upstream.py")
            .display()
            .to_string(),
        "--stdio".into(),
        "--counts".into(),
        counts.display().to_string(),
    ]);
    args
}

/// The SDK client over stdio through the wrapper, with the agent's token in `MANDATE_TOKEN`
/// (`None`: not set) and also in `AGENT_JWT`, as a desktop agent's `env` might hold it.
async fn client(server: &str, token: Option<&str>, counts: &Counts, steps: Value) -> Run {
    let mut args = vec!["--stdio".to_owned()];
    args.extend(wrap_command(server, &[], &counts.file));
    let mut env = vec![("WRAP_TEST_MARKER".to_owned(), "1".to_owned())];
    if let Some(t) = token {
        env.push(("MANDATE_TOKEN".into(), t.to_owned()));
        env.push(("AGENT_JWT".into(), t.to_owned()));
    }
    common::mcp::client(args, env, steps).await
}

/// Mandate (the example configuration) and the SDK client running `steps` through a new
/// wrapper with the agent's token.
async fn wrapped(steps: Value) -> (TestServer, Counts, Run) {
    let s = TestServer::start(&example_config(&[])).await;
    let counts = Counts::new();
    let run = client(&s.base, Some(&agent()), &counts, steps).await;
    (s, counts, run)
}

/// The counts of a child no call reached.
fn zero() -> Value {
    json!({"read_record": 0, "transfer": 0, "shell": 0, "slow_count": 0, "demote_reads": 0})
}

/// The peers speak MCP over stdio to each other without Mandate: what the wrapper must keep
/// intact. (If this fails, the SDK or the peers changed, not Mandate.)
#[tokio::test]
async fn the_peers_work_directly_over_stdio() {
    let counts = Counts::new();
    let upstream = repo().join("tests/peers/mcp_upstream.py");
    let args = [
        "--stdio",
        "python3",
        &upstream.display().to_string(),
        "--stdio",
        "--counts",
        &counts.file.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let run = common::mcp::client(
        args,
        Vec::new(),
        json!([{"op": "list"}, call("shell", json!({"command": "id"}))]),
    )
    .await;
    let steps = run.steps();
    assert_eq!(steps[0]["tools"].as_array().unwrap().len(), 5, "{run:?}");
    assert_eq!(text(steps[1]), "ran: id");
    assert_eq!(counts.calls()["shell"], 1);
}

/// `tools/list` through the wrapper shows only what the agent could be allowed or escalated to
/// call: the shell is hidden (as at `/mcp/tools`), and `transfer`, which the agent may call on
/// its own for up to 100, is not marked as needing approval. `resources/list` keeps only the
/// `docs://` document and `prompts/list` nothing, the example bundle's rules. Listing calls
/// nothing.
#[tokio::test]
async fn wrapped_lists_show_only_what_the_agent_may_use() {
    let (s, counts, run) =
        wrapped(json!([{"op": "list"}, {"op": "resources"}, {"op": "prompts"}])).await;
    let steps = run.steps();
    let tools = steps[0]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{run:?}"));
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["read_record", "transfer", "slow_count", "demote_reads"],
        "{run:?}"
    );
    let transfer = &tools[1];
    assert_ne!(
        transfer["_meta"]["mandate/approval"], "required",
        "{transfer}"
    );
    assert_eq!(tools[0]["annotations"]["readOnlyHint"], true, "{run:?}");
    assert_eq!(steps[1]["uris"], json!(["docs://handbook"]), "{run:?}");
    assert_eq!(steps[2]["names"], json!([]), "{run:?}");
    assert_eq!(counts.calls(), zero());
    s.shutdown().await;
}

/// An allowed call reaches the child and its own answer comes back, progress and logs
/// included. The token never does: neither `MANDATE_TOKEN` nor another variable holding it
/// is in the child's environment (SECURITY: a credential for Mandate must not become one for
/// every server behind it), while the rest of the environment is.
#[tokio::test]
async fn allowed_calls_reach_the_child_and_the_token_does_not() {
    let (s, counts, run) = wrapped(json!([
        call("read_record", json!({"id": "r-1"})),
        call("transfer", json!({"account": "acct-1", "amount": 50})),
        call("slow_count", json!({"n": 2})),
        {"op": "read", "uri": "docs://handbook"},
    ]))
    .await;
    let steps = run.steps();
    assert_eq!(steps[0]["isError"], false, "{run:?}");
    assert_eq!(text(steps[0]), "record r-1: status active");
    assert_eq!(text(steps[1]), "transferred 50 to acct-1");
    assert_eq!(
        steps[1]["structuredContent"],
        json!({"account": "acct-1", "amount": 50, "transfer_id": "tr-1"})
    );
    assert_eq!(text(steps[2]), "counted to 2");
    assert_eq!(steps[2]["progress"].as_array().unwrap().len(), 2, "{run:?}");
    assert_eq!(steps[2]["logs"], json!(["count 1", "count 2"]), "{run:?}");
    assert_eq!(steps[3]["text"], json!(["the handbook"]), "{run:?}");
    let state = counts.read();
    assert_eq!(
        state["counts"],
        json!({"read_record": 1, "transfer": 1, "shell": 0, "slow_count": 1, "demote_reads": 0})
    );
    assert_eq!(state["reads"]["docs://handbook"], 1);
    assert_eq!(state["token_in_env"], false, "{state}");
    let env: Vec<&str> = state["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(!env.contains(&"AGENT_JWT"), "{env:?}");
    assert!(env.contains(&"WRAP_TEST_MARKER"), "{env:?}");
    s.shutdown().await;
}

/// A denied call is answered in-band by the wrapper, as a tool error the model can read, and
/// never reaches the child; a denied resource read is a JSON-RPC error carrying the decision
/// (SECURITY P-01).
#[tokio::test]
async fn a_denied_call_never_reaches_the_child() {
    let (s, counts, run) = wrapped(json!([
        call("shell", json!({"command": "cat /etc/passwd"})),
        {"op": "read", "uri": "secrets://payroll"},
    ]))
    .await;
    let steps = run.steps();
    let answer = steps[0];
    assert!(answer.get("error").is_none(), "not in-band: {answer}");
    assert_eq!(answer["isError"], true, "{answer}");
    assert!(
        text(answer).starts_with("Mandate denied this call: no policy permits this request."),
        "{answer}"
    );
    assert_eq!(answer["structuredContent"]["decision"], "deny", "{answer}");
    assert_eq!(steps[1]["code"], -32003, "{}", steps[1]);
    assert!(
        steps[1]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("Mandate denied this call")),
        "{}",
        steps[1]
    );
    let state = counts.read();
    assert_eq!(state["counts"], zero(), "a denied call was forwarded");
    assert_eq!(state["reads"]["secrets://payroll"], 0);
    s.shutdown().await;
}

/// A transfer of 250 escalates: answered in-band with the approval request and never
/// forwarded. Once a finance approver approves it, the same call (from a new wrapper: the
/// grant is the agent's) reaches the child; another amount asks again.
#[tokio::test]
async fn an_escalated_call_is_answered_in_band_then_its_grant_lets_exactly_it_through() {
    let s = TestServer::start(&example_config(&[])).await;
    let counts = Counts::new();
    let token = agent();
    let transfer = |amount: i64| call("transfer", json!({"account": "acct-1", "amount": amount}));

    let run = client(&s.base, Some(&token), &counts, json!([transfer(250)])).await;
    let esc = run.only();
    assert!(esc.get("error").is_none(), "not in-band: {esc}");
    assert_eq!(esc["isError"], true, "{esc}");
    assert!(
        text(esc).starts_with("Mandate: this call needs approval."),
        "{esc}"
    );
    let id = esc["structuredContent"]["approval_request"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no approval request: {esc}"))
        .to_owned();
    assert_eq!(
        counts.calls()["transfer"],
        0,
        "an escalated call was forwarded"
    );

    let (st, v) = common::finance_approve(&s, &id, "FIN-6").await;
    assert_eq!(st, 200, "{v}");

    let run = client(
        &s.base,
        Some(&token),
        &counts,
        json!([transfer(250), transfer(300)]),
    )
    .await;
    let steps = run.steps();
    assert_eq!(steps[0]["isError"], false, "{run:?}");
    assert_eq!(text(steps[0]), "transferred 250 to acct-1");
    assert_eq!(steps[1]["isError"], true, "{run:?}");
    let other = steps[1]["structuredContent"]["approval_request"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{run:?}"));
    assert_ne!(other, id);
    assert_eq!(counts.calls()["transfer"], 1);
    s.shutdown().await;
}

/// `mcp.hold`: the wrapper's decide request is held while the approval request is pending,
/// the client hears progress meanwhile (the wrapper's own, every 5 s, as the call sent a
/// progress token), and once approved the call reaches the child and its result is the
/// child's.
#[tokio::test]
async fn a_held_call_is_released_by_its_approval_with_progress_meanwhile() {
    let s = TestServer::start(&example_config(&[("MANDATE_MCP__HOLD", "30s")])).await;
    let counts = Counts::new();
    let steps = json!([call(
        "transfer",
        json!({"account": "acct-7", "amount": 250})
    )]);
    let approver = async {
        let id = common::first_pending(&s).await;
        // Long enough for a progress notification; still held meanwhile.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(counts.calls()["transfer"], 0);
        let (st, body) = common::finance_approve(&s, &id, "FIN-7").await;
        assert_eq!(st, 200, "{body}");
    };
    let token = agent();
    let (run, ()) = tokio::join!(client(&s.base, Some(&token), &counts, steps), approver);
    let answer = run.only();
    assert_eq!(answer["isError"], false, "{answer}");
    assert_eq!(text(answer), "transferred 250 to acct-7", "{answer}");
    assert!(
        answer["progress"].as_array().unwrap().iter().any(|p| p[2]
            .as_str()
            .is_some_and(|m| m.contains("waiting for Mandate's decision"))),
        "{answer}"
    );
    assert_eq!(counts.calls()["transfer"], 1);
    s.shutdown().await;
}

/// Mandate unreachable: the session still starts (`initialize` is not decided), but every
/// decided call is refused with an error naming why, and a list is not shown unfiltered; the
/// child is never called (fail closed, SECURITY §0.1).
#[tokio::test]
async fn with_mandate_down_calls_are_refused_not_forwarded() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let counts = Counts::new();
    let run = client(
        &closed,
        Some(&agent()),
        &counts,
        json!([call("read_record", json!({"id": "r-1"})), {"op": "list"}]),
    )
    .await;
    assert_eq!(
        run.initialize()["serverInfo"],
        "mandate-test-upstream",
        "{run:?}"
    );
    let steps = run.steps();
    let error = steps[0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{run:?}"));
    assert!(error.contains("not forwarded"), "{error}");
    assert!(error.contains("could not be reached"), "{error}");
    assert_eq!(steps[0]["code"], -32603, "{run:?}");
    let error = steps[1]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{run:?}"));
    assert!(error.contains("not shown"), "{error}");
    assert_eq!(counts.calls(), zero());
}

/// A token Mandate does not accept: every decided call is refused naming the 401 and never
/// forwarded. No token at all: the wrapper does not start, and says why.
#[tokio::test]
async fn a_bad_token_refuses_every_call_and_no_token_starts_nothing() {
    let s = TestServer::start(&example_config(&[])).await;
    let counts = Counts::new();
    let run = client(
        &s.base,
        Some("not-a-token"),
        &counts,
        json!([call("read_record", json!({"id": "r-1"}))]),
    )
    .await;
    let error = run.only()["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{run:?}"));
    assert!(error.contains("401"), "{error}");
    assert!(error.contains("not forwarded"), "{error}");
    assert_eq!(counts.calls(), zero());

    let out = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .args(wrap_command(&s.base, &[], &counts.file).iter().skip(1))
        .env_remove("MANDATE_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no token"), "{stderr}");
    s.shutdown().await;
}

/// The wrapper run by hand, line by line.
struct Raw {
    stdin: ChildStdin,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    _process: Killed,
}

impl Raw {
    fn start(server: &str, counts: &Counts) -> Self {
        let args = wrap_command(server, &[], &counts.file);
        let mut child = Command::new(&args[0])
            .args(&args[1..])
            .env("MANDATE_TOKEN", agent())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mandate runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line.unwrap()).is_err() {
                    return;
                }
            }
        });
        Self {
            stdin,
            lines,
            _process: Killed(child),
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next message the wrapper writes (awaited: the server deciding runs on this
    /// test's runtime).
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(30), self.lines.recv())
            .await
            .expect("an answer within 30 s")
            .expect("the wrapper's stdout is open");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }
}

/// What is not one well-formed JSON-RPC message is refused by the wrapper itself and never
/// written to the child: not JSON (a parse error), a duplicate key (SECURITY J-22: the child
/// might read the other `name`), a batch (a second call smuggled past the check of the first),
/// and a decided method sent as a notification. The session goes on: the next good call is
/// decided and forwarded.
#[tokio::test]
async fn malformed_lines_are_refused_and_never_forwarded() {
    let s = TestServer::start(&example_config(&[])).await;
    let counts = Counts::new();
    let mut raw = Raw::start(&s.base, &counts);
    raw.send(
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}})
        .to_string(),
    );
    assert_eq!(raw.next().await["id"], 1);
    raw.send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);

    let read = |id: i64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "read_record", "arguments": {"id": "r-1"}}})
    };
    raw.send("{not json");
    let v = raw.next().await;
    assert_eq!(
        (v["id"].clone(), v["error"]["code"].clone()),
        (Value::Null, json!(-32700)),
        "{v}"
    );

    raw.send(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"shell","name":"read_record","arguments":{"command":"id"}}}"#);
    let v = raw.next().await;
    assert_eq!(v["error"]["code"], -32700, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("duplicate key `name`")),
        "{v}"
    );

    let shell = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "shell", "arguments": {"command": "id"}}});
    raw.send(&json!([read(3), shell]).to_string());
    let v = raw.next().await;
    assert_eq!(v["error"]["code"], -32600, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("batch")),
        "{v}"
    );

    let mut notification = read(0);
    notification.as_object_mut().unwrap().remove("id");
    raw.send(&notification.to_string());
    let v = raw.next().await;
    assert_eq!(v["error"]["code"], -32600, "{v}");

    raw.send(&read(5).to_string());
    let v = raw.next().await;
    assert_eq!(v["id"], 5, "{v}");
    assert_eq!(
        v["result"]["content"][0]["text"], "record r-1: status active",
        "{v}"
    );
    assert_eq!(
        counts.calls(),
        json!({"read_record": 1, "transfer": 0, "shell": 0, "slow_count": 0, "demote_reads": 0})
    );
    s.shutdown().await;
}

/// The endpoints the wrapper calls, by hand: the agent's token is required (as at
/// `/mcp/{name}`); the server name is a label of the agent's own, but never one of the
/// configured HTTP servers' (whose records it would pass for); a call is decided on the
/// annotations sent with it, and a tool not among them cannot be decided.
#[tokio::test]
async fn the_wrap_endpoints_take_the_agents_token_and_a_name_of_its_own() {
    let s = TestServer::start(&example_config_plus(
        "[[mcp.servers]]\nname = \"remote\"\nurl = \"http://127.0.0.1:9/mcp\"\n",
        &[],
    ))
    .await;
    let token = agent();
    let tools = json!([{"name": "read_record", "annotations": {"readOnlyHint": true}},
                       {"name": "shell"}]);
    let tool_call = |tool: &str| {
        json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
               "params": {"name": tool, "arguments": {}}})
    };
    let decide = |server: &str, message: Value| json!({"server": server, "message": message, "tools": tools});

    let (st, v) = s
        .post(
            "/v1/mcp/decide",
            None,
            &decide("local", tool_call("read_record")),
        )
        .await;
    assert_eq!(st, 401, "{v}");

    let (st, v) = s
        .post(
            "/v1/mcp/decide",
            Some(&token),
            &decide("local", tool_call("read_record")),
        )
        .await;
    assert_eq!((st, &v), (200, &json!({"forward": true})));

    let (st, v) = s
        .post(
            "/v1/mcp/decide",
            Some(&token),
            &decide("local", tool_call("shell")),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["forward"], false, "{v}");
    assert_eq!(v["answer"]["id"], 9, "{v}");
    assert_eq!(v["answer"]["result"]["isError"], true, "{v}");
    assert_eq!(
        v["answer"]["result"]["structuredContent"]["decision"], "deny",
        "{v}"
    );

    let (st, v) = s
        .post(
            "/v1/mcp/decide",
            Some(&token),
            &decide("local", tool_call("unlisted")),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["answer"]["error"]["code"], -32602, "{v}");
    assert_eq!(
        v["answer"]["error"]["message"],
        "tool `unlisted` is not in the tools/list of MCP server `local`"
    );

    // Not decided: forwarded, as at /mcp/{name}.
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
    let (st, v) = s
        .post("/v1/mcp/decide", Some(&token), &decide("local", ping))
        .await;
    assert_eq!((st, &v), (200, &json!({"forward": true})));

    for (body, field) in [
        (decide("remote", tool_call("read_record")), "server"),
        (decide("a/b", tool_call("read_record")), "server"),
        (
            json!({"server": "local", "message": tool_call("read_record"), "extra": 1}),
            "extra",
        ),
        (json!({"server": "local"}), "message"),
        (
            json!({"server": "local", "message": tool_call("read_record"), "tools": {}}),
            "tools",
        ),
    ] {
        let (st, v) = s.post("/v1/mcp/decide", Some(&token), &body).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }

    let list = json!({"server": "local", "method": "tools/list", "result": {"tools": tools}});
    let (st, v) = s.post("/v1/mcp/filter", Some(&token), &list).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"]["tools"], json!([tools[0]]), "{v}");
    let (st, v) = s.post("/v1/mcp/filter", None, &list).await;
    assert_eq!(st, 401, "{v}");
    let wrong = json!({"server": "local", "method": "tools/call", "result": {}});
    let (st, v) = s.post("/v1/mcp/filter", Some(&token), &wrong).await;
    assert_eq!((st, v["field"].as_str()), (400, Some("method")), "{v}");
    s.shutdown().await;
}

/// Mandate with a Unix socket in a directory of its own, and `[[mcp.local_principals]]`
/// mapping OS user `uid` to `Agent::"desktop-agent"` (owner bob).
struct LocalServer {
    s: TestServer,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl LocalServer {
    async fn start(uid: u32) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("mandate.sock");
        let extra = format!(
            "[[mcp.local_principals]]\nuid = {uid}\n\
             principal = {{ type = \"Agent\", id = \"desktop-agent\", attributes = {{ owner = \"bob\" }} }}\n"
        );
        let s = TestServer::start(&example_config_plus(
            &extra,
            &[("MANDATE_SERVER__UNIX_SOCKET", socket.to_str().unwrap())],
        ))
        .await;
        Self { s, socket, dir }
    }

    /// `unix:PATH`, as `--server` takes it.
    fn server(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// The audit records that name `Agent::"desktop-agent"`.
    fn local_records(&self) -> Vec<Value> {
        let log =
            std::fs::read_to_string(self.s.running.as_ref().unwrap().service.audit.path()).unwrap();
        log.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["principal"]["id"] == "desktop-agent")
            .collect()
    }
}

/// The user id this test runs as: the owner of a directory it just made (the kernel's
/// effective uid, as `SO_PEERCRED` reports it for the wrapper this test starts).
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::metadata(dir.path()).unwrap().uid()
}

/// A POST over the Unix socket at `socket`, with `headers` as given: the status and the body
/// as JSON.
async fn unix_post(
    socket: &Path,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = body.to_string();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap_or_else(|_| panic!("{out}"));
    let (_, text) = out
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{out}"));
    (
        status,
        serde_json::from_str(text).unwrap_or_else(|_| panic!("{out}")),
    )
}

/// A `/v1/mcp/decide` body for `read_record`, which the example bundle lets any agent call.
fn read_record_decision() -> Value {
    json!({"server": "tools",
           "message": {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "read_record", "arguments": {"id": "r-1"}}},
           "tools": [{"name": "read_record", "annotations": {"readOnlyHint": true}}]})
}

/// Issue 13 item 6, a configured local principal (SECURITY J-35: UDS credentials): the SDK
/// client runs the wrapper with no token at all, pointed at Mandate's Unix socket; the kernel
/// tells Mandate which OS user connected, and `[[mcp.local_principals]]` maps this test's
/// uid to `Agent::"desktop-agent"`. Its calls are decided as any agent's: the read reaches
/// the child, the shell is denied and never does, a transfer of 250 escalates. Audit records
/// and the approval request name the principal with issuer `local:uid=<uid>`, so a reviewer
/// sees the OS vouched for it; once approved, the same call goes through.
#[tokio::test]
async fn j35_a_local_principal_needs_no_token_on_the_unix_socket() {
    let uid = own_uid();
    let l = LocalServer::start(uid).await;
    let counts = Counts::new();
    let transfer = call("transfer", json!({"account": "acct-9", "amount": 250}));
    let run = client(
        &l.server(),
        None,
        &counts,
        json!([
            {"op": "list"},
            call("read_record", json!({"id": "r-1"})),
            call("shell", json!({"command": "id"})),
            transfer,
        ]),
    )
    .await;
    let steps = run.steps();
    let names: Vec<&str> = steps[0]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{run:?}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["read_record", "transfer", "slow_count", "demote_reads"],
        "{run:?}"
    );
    assert_eq!(text(steps[1]), "record r-1: status active", "{run:?}");
    assert_eq!(steps[2]["isError"], true, "{run:?}");
    assert_eq!(steps[2]["structuredContent"]["decision"], "deny", "{run:?}");
    assert!(
        text(steps[3]).starts_with("Mandate: this call needs approval."),
        "{run:?}"
    );
    assert_eq!(
        counts.calls(),
        json!({"read_record": 1, "transfer": 0, "shell": 0, "slow_count": 0, "demote_reads": 0})
    );

    let issuer = format!("local:uid={uid}");
    let records = l.local_records();
    let outcomes: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["action"] != "mcp:list")
        .map(|r| {
            (
                r["decision"].as_str().unwrap(),
                r["issuer"].as_str().unwrap(),
            )
        })
        .collect();
    for wanted in ["allow", "deny", "escalate"] {
        assert!(
            outcomes.contains(&(wanted, issuer.as_str())),
            "no {wanted} record by {issuer}: {records:#?}"
        );
    }
    assert!(
        records.iter().all(|r| r["issuer"] == issuer),
        "{records:#?}"
    );

    let id = common::first_pending(&l.s).await;
    let alice = dev_token(
        "alice",
        json!({"groups": ["finance-approvers"]}),
        Duration::from_secs(300),
    );
    let (_, shown) = l.s.get(&format!("/v1/approvals/{id}"), Some(&alice)).await;
    assert_eq!(
        (
            &shown["principal"]["id"],
            &shown["principal"]["issuer"],
            &shown["principal"]["owner"]
        ),
        (&json!("desktop-agent"), &json!(issuer), &json!("bob")),
        "{shown}"
    );
    let (st, v) = common::finance_approve(&l.s, &id, "FIN-9").await;
    assert_eq!(st, 200, "{v}");
    let run = client(&l.server(), None, &counts, json!([transfer])).await;
    assert_eq!(text(run.only()), "transferred 250 to acct-9", "{run:?}");
    assert_eq!(counts.calls()["transfer"], 1);
    l.s.shutdown().await;
}

/// Fail closed: on the Unix socket, a uid no `[[mcp.local_principals]]` entry names is
/// nobody. The wrapper (this test's uid, mapped to another) gets a 401 naming the uid, and
/// the call never reaches the child; nor is a list shown.
#[tokio::test]
async fn j35_an_unmapped_uid_on_the_unix_socket_gets_nothing() {
    let uid = own_uid();
    let l = LocalServer::start(uid.wrapping_add(1)).await;
    let counts = Counts::new();
    let run = client(
        &l.server(),
        None,
        &counts,
        json!([call("read_record", json!({"id": "r-1"})), {"op": "list"}]),
    )
    .await;
    let steps = run.steps();
    let error = steps[0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{run:?}"));
    assert!(error.contains("not forwarded"), "{error}");
    assert!(error.contains("401"), "{error}");
    assert!(
        error.contains(&format!("uid {uid} on the Unix socket is not a configured")),
        "{error}"
    );
    assert!(
        steps[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not shown")),
        "{run:?}"
    );
    assert_eq!(counts.calls(), zero());
    assert!(l.local_records().is_empty());
    l.s.shutdown().await;
}

/// Where a local principal is not: anywhere but a tokenless request to the wrap endpoints on
/// the Unix socket. Over TCP (127.0.0.1 is any local user) a request without a token is a 401
/// whatever its headers claim; on the socket a token, when sent, is always the one judged (a
/// bad one is a 401, never a fall-back to the uid's principal) and a good one is its agent's;
/// `/v1/check` on the socket still wants a token; a body cannot name who is asking.
#[tokio::test]
async fn j35_the_local_principal_is_only_the_unix_socket_peer_without_a_token() {
    let l = LocalServer::start(own_uid()).await;
    let decide = read_record_decision();
    let claims = [
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Forwarded-User", "desktop-agent"),
        ("X-Remote-User", "root"),
        ("Forwarded", "for=\"unix:\""),
    ];
    let resp =
        l.s.client
            .post(l.s.url("/v1/mcp/decide"))
            .header("content-type", "application/json")
            .headers(
                claims
                    .iter()
                    .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
                    .collect(),
            )
            .body(decide.to_string())
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(v["error"], "token_missing", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("only on the Unix socket"),
        "{v}"
    );
    let (st, v) =
        l.s.post(
            "/v1/mcp/filter",
            None,
            &json!({"server": "tools",
        "method": "tools/list", "result": {"tools": []}}),
        )
        .await;
    assert_eq!((st, &v["error"]), (401, &json!("token_missing")), "{v}");

    // The socket's peer, without a token: the local principal.
    let (st, v) = unix_post(&l.socket, "/v1/mcp/decide", &[], &decide).await;
    assert_eq!((st, &v), (200, &json!({"forward": true})));
    let list = json!({"server": "tools", "method": "tools/list",
                      "result": {"tools": [{"name": "shell"}]}});
    let (st, v) = unix_post(&l.socket, "/v1/mcp/filter", &[], &list).await;
    assert_eq!((st, &v["result"]["tools"]), (200, &json!([])), "{v}");

    // A credential is judged as sent, whatever the uid.
    for bad in ["Bearer not-a-token", "Bearer ", "Basic ZGVza3RvcDo="] {
        let (st, v) = unix_post(
            &l.socket,
            "/v1/mcp/decide",
            &[("Authorization", bad)],
            &decide,
        )
        .await;
        assert_eq!(st, 401, "{bad}: {v}");
        assert_ne!(v["error"], "local_principal_unknown", "{bad}: {v}");
    }
    let expired = common::dev_token_at("agent-1", json!({}), Duration::from_secs(60), 1_000_000);
    let (st, v) = unix_post(
        &l.socket,
        "/v1/mcp/decide",
        &[("Authorization", &format!("Bearer {expired}"))],
        &decide,
    )
    .await;
    assert_eq!((st, &v["error"]), (401, &json!("token_expired")), "{v}");
    let before = l.local_records().len();
    let (st, v) = unix_post(
        &l.socket,
        "/v1/mcp/decide",
        &[("Authorization", &format!("Bearer {}", agent()))],
        &decide,
    )
    .await;
    assert_eq!((st, &v), (200, &json!({"forward": true})));
    assert_eq!(
        l.local_records().len(),
        before,
        "the token's agent is who asked"
    );

    // Only the wrap endpoints know local principals.
    let check = json!({"action": "mcp:call", "resource": {"type": "McpTool", "id": "tools/read_record",
                        "properties": {"readOnlyHint": true}}});
    let (st, v) = unix_post(&l.socket, "/v1/check", &[], &check).await;
    assert_eq!((st, &v["error"]), (401, &json!("token_missing")), "{v}");

    // A body naming a principal is refused as malformed, not read as one.
    let mut named = decide.clone();
    named["principal"] = json!({"type": "Agent", "id": "someone-else"});
    let (st, v) = unix_post(&l.socket, "/v1/mcp/decide", &[], &named).await;
    assert_eq!((st, &v["field"]), (400, &json!("principal")), "{v}");
    l.s.shutdown().await;
}

/// Another OS user on the host gets nothing (SECURITY J-35): `curl` run as uid 65534
/// (`nobody`) asks `/v1/mcp/decide` over the socket, which it may open, and gets a 401 naming
/// its uid; the same request from this test's uid, which is mapped, is forwarded. Needs root
/// to start a process as another user; skipped otherwise.
#[tokio::test]
async fn j35_another_os_user_on_the_socket_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    let uid = own_uid();
    if uid != 0 {
        eprintln!("skipped: starting a process as another user needs root (running as uid {uid})");
        return;
    }
    let l = LocalServer::start(uid).await;
    // Let the other user reach the socket: the refusal must be Mandate's, not the file mode's.
    std::fs::set_permissions(l.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&l.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let curl = |as_user: Option<u32>| {
        let mut c = Command::new("curl");
        c.args(["-q", "-sS", "--max-time", "20", "--unix-socket"])
            .arg(&l.socket)
            .args([
                "-H",
                "content-type: application/json",
                "-w",
                "\n%{http_code}",
                "-d",
            ])
            .arg(read_record_decision().to_string())
            .arg("http://localhost/v1/mcp/decide");
        if let Some(u) = as_user {
            c.uid(u).gid(u);
        }
        tokio::task::spawn_blocking(move || c.output())
    };
    let nobody = match curl(Some(65534)).await.unwrap() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: no `curl` to run as another user");
            return;
        }
        Err(e) => panic!("curl: {e}"),
    };
    let own = curl(None).await.unwrap().unwrap();
    let answer = |out: &std::process::Output| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, status) = text.rsplit_once('\n').unwrap();
        (
            status.to_owned(),
            serde_json::from_str::<Value>(body).unwrap(),
        )
    };
    let (status, v) = answer(&nobody);
    assert_eq!(
        (status.as_str(), &v["error"]),
        ("401", &json!("local_principal_unknown")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("uid 65534 on the Unix socket"),
        "{v}"
    );
    let (status, v) = answer(&own);
    assert_eq!((status.as_str(), &v), ("200", &json!({"forward": true})));
    l.s.shutdown().await;
}
