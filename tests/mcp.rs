//! The MCP gateway (issue 13) between two peers nobody here wrote: the official Python MCP SDK
//! (`mcp` 2.x, installed by scripts/test and .ci/run from tests/requirements.txt) on both
//! sides. The upstream (tests/peers/mcp_upstream.py) is an `MCPServer` over Streamable HTTP
//! that counts every tool call reaching it and records the headers it came with; the agent
//! (tests/peers/mcp_client.py) is the SDK's Streamable HTTP client running JSON steps in one
//! session. Mandate serves the upstream as `/mcp/tools` and decides every `tools/call`:
//! an allow is forwarded; a deny or an escalation is answered in-band (`isError: true`) and
//! never reaches the upstream (SECURITY P-01), which its counts prove.
//!
//! Each test starts its own upstream and Mandate, both on port 0.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mcp::{Run, call, text};
use common::{Killed, TestServer, dev_token, example_config_plus, finance_approve, repo};
use serde_json::{Value, json};

/// The protocol revision the SDK client negotiates over `initialize` (mcp 2.3.0's
/// `LATEST_HANDSHAKE_VERSION`), sent on raw requests after the handshake.
const PROTOCOL_VERSION: &str = "2025-11-25";

// ---------------------------------------------------------------------------------------------
// The peers
// ---------------------------------------------------------------------------------------------

/// The upstream MCP server, killed when the test ends however it ends.
struct Upstream {
    /// Its MCP endpoint, `http://127.0.0.1:PORT/mcp`.
    url: String,
    /// `http://127.0.0.1:PORT`, for `/counts` and `/calls`.
    base: String,
    _process: Killed,
}

impl Upstream {
    async fn start() -> Self {
        let script = repo().join("tests/peers/mcp_upstream.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().expect("stdout");
        // Held here, so a timeout below still kills it (and so ends the blocking read).
        let process = Killed(child);
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("upstream stdout");
            line
        });
        let line = tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .expect("the upstream printed no `listening on` line in 60 s")
            .unwrap();
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            panic!(
                "the upstream MCP server did not start (scripts/test installs \
                 tests/requirements.txt, which pins mcp): {line:?}"
            );
        };
        let base = url.strip_suffix("/mcp").expect("…/mcp").to_owned();
        Self {
            url: url.to_owned(),
            base,
            _process: process,
        }
    }

    /// The calls each tool received: `{"read_record": 0, "transfer": 0, "shell": 0,
    /// "slow_count": 0, "demote_reads": 0}`.
    async fn counts(&self) -> Value {
        get_json(&format!("{}/counts", self.base)).await
    }

    /// The count of one tool.
    async fn count(&self, tool: &str) -> i64 {
        let counts = self.counts().await;
        counts[tool]
            .as_i64()
            .unwrap_or_else(|| panic!("no count for {tool}: {counts}"))
    }

    /// Every call that reached the upstream, in order: `{"tool", "arguments", "session",
    /// "authorization"}`.
    async fn calls(&self) -> Vec<Value> {
        match get_json(&format!("{}/calls", self.base)).await {
            Value::Array(calls) => calls,
            other => panic!("/calls: {other}"),
        }
    }
}

async fn get_json(url: &str) -> Value {
    let resp = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("upstream answers");
    assert_eq!(resp.status().as_u16(), 200, "{url}");
    serde_json::from_str(&resp.text().await.unwrap()).expect("JSON")
}

/// Run the SDK client against `url` with `Authorization: Bearer token` (none if `None`) and
/// `steps`: `[{"op":"list"}, {"op":"call","tool":..,"arguments":{..}}, {"op":"sleep",..}]`.
async fn client(url: &str, token: Option<&str>, steps: Value) -> Run {
    let args = vec![url.to_owned(), token.unwrap_or("-").to_owned()];
    common::mcp::client(args, Vec::new(), steps).await
}

// ---------------------------------------------------------------------------------------------
// Mandate in front of it
// ---------------------------------------------------------------------------------------------

/// The upstream and Mandate (the example configuration and bundle) serving it as `tools`.
async fn gateway() -> (Upstream, TestServer) {
    gateway_with(&[]).await
}

/// The upstream, and Mandate's example configuration serving it as `tools` with `env`.
async fn gateway_with(env: &[(&str, &str)]) -> (Upstream, TestServer) {
    let upstream = Upstream::start().await;
    let s = TestServer::start(&example_config_plus(
        &format!(
            "[[mcp.servers]]\nname = \"tools\"\nurl = \"{}\"\n",
            upstream.url
        ),
        env,
    ))
    .await;
    (upstream, s)
}

fn mcp_url(s: &TestServer) -> String {
    s.url("/mcp/tools")
}

/// The agent of the example bundle.
fn agent() -> String {
    dev_token("agent-1", json!({"owner": "bob"}), Duration::from_secs(300))
}

/// A raw POST to the gateway: (status, headers, body).
async fn post_raw(
    s: &TestServer,
    token: Option<&str>,
    session: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = s
        .client
        .post(mcp_url(s))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(id) = session {
        req = req
            .header("mcp-session-id", id)
            .header("mcp-protocol-version", PROTOCOL_VERSION);
    }
    let resp = req.body(body).send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.expect("body"))
}

fn initialize_request() -> String {
    json!({
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}
        }
    })
    .to_string()
}

fn tools_call_request(id: i64, tool: &str, arguments: Value) -> String {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments}
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

/// The peers speak MCP to each other without Mandate: what the gateway must keep intact.
/// (If this fails, the SDK or the peers changed, not Mandate.)
#[tokio::test]
async fn the_peers_work_directly() {
    let up = Upstream::start().await;
    let run = client(
        &up.url,
        Some("direct"),
        json!([{"op": "list"}, call("read_record", json!({"id": "r-1"})), call("slow_count", json!({"n": 2}))]),
    )
    .await;
    assert_eq!(run.initialize()["protocolVersion"], PROTOCOL_VERSION);
    assert!(run.session().is_some(), "{run:?}");
    let steps = run.steps();
    let names: Vec<&str> = steps[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "read_record",
            "transfer",
            "shell",
            "slow_count",
            "demote_reads"
        ],
        "{run:?}"
    );
    assert_eq!(text(steps[1]), "record r-1: status active");
    assert_eq!(steps[2]["progress"].as_array().unwrap().len(), 2, "{run:?}");
    assert_eq!(
        up.counts().await,
        json!({"read_record": 1, "transfer": 0, "shell": 0, "slow_count": 1, "demote_reads": 0})
    );
}

/// `tools/list` answers only the tools the agent could be allowed or escalated to call: the
/// shell, which no agent may ever run, is not even shown (SECURITY: least privilege; a tool the
/// agent cannot see is one it will not be talked into trying). The upstream's annotations
/// pass through.
#[tokio::test]
async fn tools_list_hides_what_the_agent_may_never_call() {
    let (up, s) = gateway().await;
    let run = client(&mcp_url(&s), Some(&agent()), json!([{"op": "list"}])).await;
    let list = run.only();
    let tools = list["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{run:?}"));
    let tool = |name: &str| tools.iter().find(|t| t["name"] == name);
    assert!(tool("read_record").is_some(), "{list}");
    assert!(tool("transfer").is_some(), "{list}");
    assert!(tool("shell").is_none(), "the shell is listed: {list}");
    assert_eq!(
        tool("read_record").unwrap()["annotations"]["readOnlyHint"],
        true,
        "{list}"
    );
    // Transfers of up to 100 are the agent's own call, so `transfer` is not marked as needing
    // approval (the mark is for tools every allowed path of which needs one).
    assert_ne!(
        tool("transfer").unwrap()["_meta"]["mandate/approval"],
        "required",
        "{list}"
    );
    // Listing is not calling.
    assert_eq!(
        up.counts().await,
        json!({"read_record": 0, "transfer": 0, "shell": 0, "slow_count": 0, "demote_reads": 0})
    );
    s.shutdown().await;
}

/// An allowed call is forwarded and the upstream's own answer comes back unchanged. The
/// agent's bearer token authenticates it to Mandate only: it is never forwarded upstream
/// (SECURITY: a credential for Mandate must not become one for every server behind it).
#[tokio::test]
async fn allowed_calls_reach_the_upstream_without_the_agents_token() {
    let (up, s) = gateway().await;
    let token = agent();
    let run = client(
        &mcp_url(&s),
        Some(&token),
        json!([
            call("read_record", json!({"id": "r-1"})),
            call("transfer", json!({"account": "acct-1", "amount": 50})),
        ]),
    )
    .await;
    let steps = run.steps();
    assert_eq!(steps[0]["isError"], false, "{run:?}");
    assert_eq!(text(steps[0]), "record r-1: status active");
    assert_eq!(steps[1]["isError"], false, "{run:?}");
    assert_eq!(text(steps[1]), "transferred 50 to acct-1");
    assert_eq!(
        steps[1]["structuredContent"],
        json!({"account": "acct-1", "amount": 50, "transfer_id": "tr-1"})
    );
    assert_eq!(up.count("read_record").await, 1);
    assert_eq!(up.count("transfer").await, 1);
    let calls = up.calls().await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    for c in &calls {
        let auth = c["authorization"].as_str().unwrap_or("");
        assert!(
            !auth.contains(&token),
            "the agent's token reached the upstream: {c}"
        );
    }
    assert_eq!(
        calls[1]["arguments"],
        json!({"account": "acct-1", "amount": 50})
    );
    s.shutdown().await;
}

/// A denied call is answered by Mandate in-band, as a tool error the model can read, and never
/// reaches the upstream (SECURITY P-01: whatever is not an allow is not forwarded).
#[tokio::test]
async fn a_denied_call_never_reaches_the_upstream() {
    let (up, s) = gateway().await;
    let run = client(
        &mcp_url(&s),
        Some(&agent()),
        json!([call("shell", json!({"command": "cat /etc/passwd"}))]),
    )
    .await;
    let answer = run.only();
    assert!(answer.get("error").is_none(), "not in-band: {answer}");
    assert_eq!(answer["isError"], true, "{answer}");
    let reason = text(answer);
    assert!(
        reason.starts_with("Mandate denied this call: no policy permits this request."),
        "{answer}"
    );
    assert_eq!(answer["structuredContent"]["decision"], "deny", "{answer}");
    assert_eq!(
        answer["structuredContent"]["reasons"][0]["code"], "no_matching_policy",
        "{answer}"
    );
    assert_eq!(up.count("shell").await, 0, "a denied call was forwarded");
    assert!(up.calls().await.is_empty());
    s.shutdown().await;
}

/// A transfer above 100 escalates: not forwarded, answered with the approval request. Once a
/// finance approver approves it (with the ticket the bundle asks for), the same call is
/// allowed by its grant and reaches the upstream; another amount asks again (SECURITY: a grant
/// covers exactly what was approved).
#[tokio::test]
async fn an_escalated_call_waits_for_approval_then_its_grant_allows_exactly_it() {
    let (up, s) = gateway().await;
    let url = mcp_url(&s);
    let token = agent();
    let transfer = |amount: i64| call("transfer", json!({"account": "acct-1", "amount": amount}));

    let run = client(&url, Some(&token), json!([transfer(250), transfer(250)])).await;
    let steps = run.steps();
    let esc = steps[0];
    assert!(esc.get("error").is_none(), "not in-band: {esc}");
    assert_eq!(esc["isError"], true, "{esc}");
    let request = &esc["structuredContent"]["approval_request"];
    let id = request["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no approval request id: {esc}"))
        .to_owned();
    assert!(
        request["status_url"]
            .as_str()
            .is_some_and(|u| u.contains(&id)),
        "{esc}"
    );
    assert!(request["expires_at"].is_string(), "{esc}");
    // Asking again while it is pending returns the same request (no approval flood).
    assert_eq!(
        steps[1]["structuredContent"]["approval_request"]["id"],
        id.as_str(),
        "{:?}",
        steps[1]
    );
    assert_eq!(
        up.count("transfer").await,
        0,
        "an escalated call was forwarded"
    );

    let (st, v) = finance_approve(&s, &id, "FIN-13").await;
    assert_eq!(st, 200, "{v}");

    // The same call, in a new session: the grant is the agent's, not the session's.
    let run = client(&url, Some(&token), json!([transfer(250)])).await;
    let allowed = run.only();
    assert_eq!(allowed["isError"], false, "{allowed}");
    assert_eq!(text(allowed), "transferred 250 to acct-1");
    assert_eq!(up.count("transfer").await, 1);

    // Another amount is another request.
    let run = client(&url, Some(&token), json!([transfer(300)])).await;
    let again = run.only();
    assert_eq!(again["isError"], true, "{again}");
    let other = again["structuredContent"]["approval_request"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{again}"));
    assert_ne!(other, id);
    assert_eq!(up.count("transfer").await, 1);
    s.shutdown().await;
}

/// `@grant_scope("tool")` (issue 13 item 5): the example bundle with its transfer approval
/// split in two, up to 1,000 tool-scoped and above it call-scoped (finance leads). The
/// escalation says what the grant will cover (to the agent, and to the approver who sees it
/// before approving); once approved, other amounts the same policy asks about go through for
/// the grant's lifetime, while an amount another policy asks about escalates anew (SECURITY
/// A-08: a wider grant is the policy's explicit choice, and never reaches past its own
/// approvers).
#[tokio::test]
async fn a08_a_tool_scoped_grant_covers_other_arguments_of_the_same_policy_only() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    common::copy_dir(&repo().join("config/policies"), &bundle);
    let cedar = bundle.join("mcp.cedar");
    let source = std::fs::read_to_string(&cedar).unwrap();
    let from = r#"@grant_ttl("1h")
@fallback("finance-leads")
@fallback_after("30m")
permit (
  principal is Agent,
  action == Action::"mcp:tools/transfer",
  resource is McpTool
)
when { context.arguments.amount > 100 && context.arguments.amount <= 10000 };"#;
    assert!(
        source.contains(from),
        "the example's transfer approval changed"
    );
    let to = r#"@grant_ttl("1h")
@grant_scope("tool")
permit (
  principal is Agent,
  action == Action::"mcp:tools/transfer",
  resource is McpTool
)
when { context.arguments.amount > 100 && context.arguments.amount <= 1000 };

@id("mcp-transfer-approval-large")
@approval("finance-leads")
permit (
  principal is Agent,
  action == Action::"mcp:tools/transfer",
  resource is McpTool
)
when { context.arguments.amount > 1000 && context.arguments.amount <= 10000 };"#;
    std::fs::write(&cedar, source.replace(from, to)).unwrap();
    // The bundle's own tests still describe the example; this one is about the change.
    std::fs::remove_dir_all(bundle.join("tests")).unwrap();

    let upstream = Upstream::start().await;
    let bundle_s = bundle.display().to_string();
    let s = TestServer::start(&example_config_plus(
        &format!(
            "[[mcp.servers]]\nname = \"tools\"\nurl = \"{}\"\n",
            upstream.url
        ),
        &[("MANDATE_POLICY__BUNDLE", &bundle_s)],
    ))
    .await;
    let url = mcp_url(&s);
    let token = agent();
    let transfer = |amount: i64| call("transfer", json!({"account": "acct-1", "amount": amount}));

    let run = client(&url, Some(&token), json!([transfer(250)])).await;
    let esc = run.only();
    assert_eq!(esc["isError"], true, "{esc}");
    assert_eq!(
        esc["structuredContent"]["approval"]["grant_scope"], "tool",
        "{esc}"
    );
    assert!(text(esc).contains("with any arguments"), "{esc}");
    let id = esc["structuredContent"]["approval_request"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{esc}"))
        .to_owned();
    // The approver sees the scope before deciding.
    let alice = dev_token(
        "alice",
        json!({"groups": ["finance-approvers"]}),
        Duration::from_secs(300),
    );
    let (_, shown) = s.get(&format!("/v1/approvals/{id}"), Some(&alice)).await;
    assert_eq!(shown["grant_scope"], "tool", "{shown}");
    let (st, v) = finance_approve(&s, &id, "FIN-14").await;
    assert_eq!(st, 200, "{v}");

    // The approved amount and another one the same policy asks about: both reach the tool.
    let run = client(&url, Some(&token), json!([transfer(250), transfer(999)])).await;
    let steps = run.steps();
    assert_eq!(
        text(steps[0]),
        "transferred 250 to acct-1",
        "{:?}",
        steps[0]
    );
    assert_eq!(
        text(steps[1]),
        "transferred 999 to acct-1",
        "{:?}",
        steps[1]
    );
    assert_eq!(upstream.count("transfer").await, 2);
    // Above 1,000 another policy asks: its approvers gave nothing, so it escalates.
    let run = client(&url, Some(&token), json!([transfer(5000)])).await;
    let again = run.only();
    assert_eq!(again["isError"], true, "{again}");
    assert_eq!(
        again["structuredContent"]["policy_ids"],
        json!(["mcp-transfer-approval-large"]),
        "{again}"
    );
    assert!(
        again["structuredContent"]["approval"]
            .get("grant_scope")
            .is_none(),
        "{again}"
    );
    assert!(
        text(again).contains("retry exactly the same request"),
        "{again}"
    );
    // Another agent (another owner) is not covered by bob's agent's grant.
    let other = dev_token(
        "agent-1",
        json!({"owner": "carol"}),
        Duration::from_secs(300),
    );
    let run = client(&url, Some(&other), json!([transfer(250)])).await;
    assert_eq!(run.only()["isError"], true, "{:?}", run.only());
    assert_eq!(upstream.count("transfer").await, 2);
    s.shutdown().await;
}

/// Typed arguments (issue 13 item 4): `mandate mcp schema --server tools` asks the upstream
/// for its tools and prints one action per tool with its arguments typed from the
/// inputSchema (what the example bundle's schema declares for `transfer`); a call whose
/// arguments do not fit those types is refused naming the argument, and never forwarded, even
/// where no policy would read the value (SECURITY P-01).
#[tokio::test]
async fn mcp_schema_types_the_arguments_and_a_mistyped_argument_is_refused_by_name() {
    let (up, s) = gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mandate.toml");
    std::fs::write(
        &cfg,
        format!("[[mcp.servers]]\nname = \"tools\"\nurl = \"{}\"\n", up.url),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        common::mandate()
            .arg("--config")
            .arg(&cfg)
            .args(["mcp", "schema", "--server", "tools"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let fragment = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{fragment}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let transfer = fragment
        .split("\n\n")
        .find(|b| b.contains("action \"mcp:tools/transfer\""))
        .unwrap_or_else(|| panic!("no transfer action in:\n{fragment}"));
    assert!(
        transfer.contains("account: String,") && transfer.contains("amount: Long,"),
        "{transfer}"
    );
    assert!(transfer.contains("(destructiveHint)"), "{transfer}");
    assert!(
        fragment.contains("action \"mcp:tools/read_record\""),
        "{fragment}"
    );
    // The listing it read was the upstream's own; no tool call reached it.
    assert_eq!(up.count("transfer").await, 0);

    let run = client(
        &mcp_url(&s),
        Some(&agent()),
        json!([
            call("transfer", json!({"account": "acct-1", "amount": "50"})),
            call("transfer", json!({"account": "acct-1"})),
            call("transfer", json!({"account": 7, "amount": 50})),
        ]),
    )
    .await;
    let steps = run.steps();
    for (step, field, want) in [
        (
            steps[0],
            "context.arguments.amount",
            "expected Long, got the string \"50\"",
        ),
        (steps[1], "context.arguments.amount", "is required (Long)"),
        (steps[2], "context.arguments.account", "expected String"),
    ] {
        assert_eq!(step["isError"], true, "{step}");
        assert_eq!(
            step["structuredContent"]["reasons"][0]["code"], "invalid_request",
            "{step}"
        );
        let said = text(step);
        assert!(said.contains(field) && said.contains(want), "{said}");
    }
    assert_eq!(
        up.count("transfer").await,
        0,
        "a mistyped call was forwarded"
    );
    s.shutdown().await;
}

/// An upstream whose tools change says so (`notifications/tools/list_changed`); the gateway
/// passes it on and forgets the annotations it learnt, so the next call is decided on what
/// the upstream says now, not on what it said a minute ago: `read_record`, allowed while it
/// is read-only, is denied once the upstream takes that back (the example bundle allows
/// read-only tools only), and never reaches it.
#[tokio::test]
async fn a_tools_list_changed_makes_the_next_call_decided_on_the_new_annotations() {
    let (up, s) = gateway().await;
    let read = call("read_record", json!({"id": "r-1"}));
    let run = client(
        &mcp_url(&s),
        Some(&agent()),
        json!([read, call("demote_reads", json!({})), read]),
    )
    .await;
    let steps = run.steps();
    assert_eq!(steps[0]["isError"], false, "{:?}", steps[0]);
    assert_eq!(
        text(steps[1]),
        "read_record is no longer read-only",
        "{:?}",
        steps[1]
    );
    assert_eq!(steps[2]["isError"], true, "{:?}", steps[2]);
    assert_eq!(
        steps[2]["structuredContent"]["decision"], "deny",
        "{:?}",
        steps[2]
    );
    assert_eq!(
        up.count("read_record").await,
        1,
        "the demoted tool was called"
    );
    assert_eq!(up.count("demote_reads").await, 1);
    s.shutdown().await;
}

/// No token, or one Mandate cannot verify: HTTP 401 before anything is forwarded (SECURITY
/// P-05: an unauthenticated agent reaches nothing, not even the upstream's `initialize`).
#[tokio::test]
async fn no_token_or_a_bad_token_is_401_and_nothing_is_forwarded() {
    let (up, s) = gateway().await;
    let url = mcp_url(&s);
    let steps = json!([call("read_record", json!({"id": "r-1"}))]);
    for token in [None, Some("not-a-token"), Some("Zm9v.YmFy.YmF6")] {
        let run = client(&url, token, steps.clone()).await;
        let init = run.initialize();
        assert_eq!(init["http_status"], 401, "{token:?}: {run:?}");
        assert!(run.session().is_none(), "{token:?}: {run:?}");
        assert!(run.only().get("error").is_some(), "{run:?}");
    }
    // The same by hand: the status a plain HTTP client sees.
    let (st, _, body) = post_raw(&s, None, None, initialize_request()).await;
    assert_eq!(st, 401, "{body}");
    let (st, _, body) = post_raw(
        &s,
        None,
        None,
        tools_call_request(2, "read_record", json!({"id": "r-1"})),
    )
    .await;
    assert_eq!(st, 401, "{body}");
    assert_eq!(
        up.counts().await,
        json!({"read_record": 0, "transfer": 0, "shell": 0, "slow_count": 0, "demote_reads": 0})
    );
    assert!(up.calls().await.is_empty());
    s.shutdown().await;
}

/// A tool that streams progress and log notifications before its result: the SSE stream
/// passes through Mandate intact and in order, and the result at its end is the upstream's.
///
/// The example bundle permits `slow_count` (`mcp-count`, and it is annotated read-only).
#[tokio::test]
async fn a_streamed_answer_passes_through_as_sse() {
    let (up, s) = gateway().await;
    let run = client(
        &mcp_url(&s),
        Some(&agent()),
        json!([call("slow_count", json!({"n": 3}))]),
    )
    .await;
    let answer = run.only();
    assert_eq!(answer["isError"], false, "{answer}");
    assert_eq!(text(answer), "counted to 3");
    assert_eq!(
        answer["progress"],
        json!([
            [1.0, 3.0, "step 1"],
            [2.0, 3.0, "step 2"],
            [3.0, 3.0, "step 3"]
        ]),
        "{answer}"
    );
    assert_eq!(
        answer["logs"],
        json!(["count 1", "count 2", "count 3"]),
        "{answer}"
    );
    assert!(
        answer["content_type"]
            .as_str()
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{answer}"
    );
    assert_eq!(up.count("slow_count").await, 1);
    s.shutdown().await;
}

/// One client session is one upstream session across its steps, and two clients' sessions
/// are never merged into one upstream session (SECURITY: one agent's MCP session state is not
/// another's).
#[tokio::test]
async fn a_session_is_kept_across_steps_and_never_shared() {
    let (up, s) = gateway().await;
    let url = mcp_url(&s);
    let steps = json!([
        call("read_record", json!({"id": "r-1"})),
        {"op": "sleep", "seconds": 0.3},
        {"op": "list"},
        call("read_record", json!({"id": "r-2"})),
    ]);
    let first = client(&url, Some(&agent()), steps.clone()).await;
    assert!(first.session().is_some(), "{first:?}");
    for step in first.steps() {
        assert!(step.get("error").is_none(), "{first:?}");
    }
    let calls = up.calls().await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    let upstream_session = calls[0]["session"].as_str().expect("upstream session");
    assert_eq!(calls[1]["session"], upstream_session, "{calls:?}");

    let second = client(&url, Some(&agent()), steps).await;
    assert!(second.session().is_some(), "{second:?}");
    assert_ne!(first.session(), second.session());
    let calls = up.calls().await;
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(calls[2]["session"], calls[3]["session"], "{calls:?}");
    assert_ne!(calls[2]["session"], upstream_session, "{calls:?}");
    s.shutdown().await;
}

/// A session id is not a credential: another agent presenting it (with its own valid token)
/// gets nothing through that session (SECURITY: no session riding).
#[tokio::test]
async fn another_agent_cannot_ride_a_session() {
    let (up, s) = gateway().await;
    let (st, headers, body) = post_raw(&s, Some(&agent()), None, initialize_request()).await;
    assert_eq!(st, 200, "{body}");
    let session = headers
        .get("mcp-session-id")
        .expect("a session id")
        .to_str()
        .unwrap()
        .to_owned();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
    let (st, _, body) = post_raw(&s, Some(&agent()), Some(&session), initialized).await;
    assert!((200..300).contains(&st), "{st} {body}");

    let intruder = dev_token("agent-2", json!({"owner": "eve"}), Duration::from_secs(300));
    let read = || tools_call_request(2, "read_record", json!({"id": "r-1"}));
    let (st, _, body) = post_raw(&s, Some(&intruder), Some(&session), read()).await;
    assert!(
        (400..500).contains(&st),
        "another agent used the session: {st} {body}"
    );
    assert_eq!(up.count("read_record").await, 0);
    // Nor by sending its own session id and the victim's: two ids are refused outright (the
    // gateway would check one, the upstream might use the other).
    let (st, own, body) = post_raw(&s, Some(&intruder), None, initialize_request()).await;
    assert_eq!(st, 200, "{body}");
    let own = own["mcp-session-id"].to_str().unwrap().to_owned();
    let resp = s
        .client
        .post(mcp_url(&s))
        .bearer_auth(&intruder)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", own.as_str())
        .header("mcp-session-id", session.as_str())
        .body(read())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.text().await.unwrap().contains("more than once"));
    assert_eq!(up.count("read_record").await, 0);
    // The session itself was good: its own agent's call goes through.
    let (st, _, body) = post_raw(&s, Some(&agent()), Some(&session), read()).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("record r-1: status active"), "{body}");
    assert_eq!(up.count("read_record").await, 1);
    s.shutdown().await;
}

/// What is not one well-formed JSON-RPC message is refused by Mandate with a JSON-RPC error
/// and never forwarded (SECURITY P-01: nothing undecided reaches the upstream): not JSON (parse
/// error), a batch (gone from MCP since 2025-06-18, and a way to smuggle a second call past a
/// check of the first), and a body over the listener's limit.
#[tokio::test]
async fn malformed_or_oversize_requests_are_refused() {
    let (up, s) = gateway().await;
    let token = agent();

    let (st, _, body) = post_raw(&s, Some(&token), None, "{not json").await;
    assert_eq!(st, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["jsonrpc"], "2.0", "{v}");
    assert_eq!(v["error"]["code"], -32700, "parse error: {v}");

    let batch = format!(
        "[{}, {}]",
        tools_call_request(1, "read_record", json!({"id": "r-1"})),
        tools_call_request(2, "shell", json!({"command": "id"}))
    );
    let (st, _, body) = post_raw(&s, Some(&token), None, batch).await;
    assert_eq!(st, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["jsonrpc"], "2.0", "{v}");
    // JSON-RPC's Invalid Request: Mandate's own answer. (The SDK upstream would answer a batch
    // with -32602, so a batch passed through would not pass here.)
    assert_eq!(v["error"]["code"], -32600, "invalid request: {v}");

    // Over `mcp.max_message_bytes` (1 MiB by default).
    let big = tools_call_request(3, "read_record", json!({"id": "x".repeat(1100 * 1024)}));
    let (st, _, body) = post_raw(&s, Some(&token), None, big).await;
    assert_eq!(st, 413, "{body}");

    assert_eq!(
        up.counts().await,
        json!({"read_record": 0, "transfer": 0, "shell": 0, "slow_count": 0, "demote_reads": 0})
    );
    s.shutdown().await;
}

/// `mcp.hold`: an escalated call is held open while its approval request is pending, the
/// client hears progress naming the request, and once a finance approver approves it the
/// call is checked again (the grant allows exactly it) and reaches the upstream; the result
/// the client gets is the upstream's.
#[tokio::test]
async fn a_held_call_is_released_by_its_approval() {
    let (up, s) = gateway_with(&[("MANDATE_MCP__HOLD", "30s")]).await;
    let url = mcp_url(&s);
    let token = agent();
    let steps = json!([call(
        "transfer",
        json!({"account": "acct-7", "amount": 250})
    )]);
    let approver = async {
        let id = common::first_pending(&s).await;
        // Still held: the upstream has not been called.
        assert_eq!(up.count("transfer").await, 0);
        let (st, body) = common::finance_approve(&s, &id, "FIN-7").await;
        assert_eq!(st, 200, "{body}");
    };
    let (run, ()) = tokio::join!(client(&url, Some(&token), steps), approver);
    let answer = run.only();
    assert_eq!(answer["isError"], false, "{answer}");
    assert_eq!(text(answer), "transferred 250 to acct-7", "{answer}");
    let progress = answer["progress"].as_array().unwrap();
    assert!(
        progress.iter().any(|p| p[2]
            .as_str()
            .is_some_and(|m| m.contains("waiting for approval request"))),
        "{answer}"
    );
    assert_eq!(up.count("transfer").await, 1);
    s.shutdown().await;
}

/// `resources/list` and `prompts/list` are filtered like `tools/list`, and `resources/read`
/// is decided (`mcp:read`): the example bundle lets agents read `docs://` documents only and
/// use no prompt, so the payroll resource and the prompt are hidden, and reading the payroll
/// anyway is refused without reaching the server.
#[tokio::test]
async fn resources_and_prompts_are_listed_and_read_by_policy() {
    let (up, s) = gateway().await;
    let run = client(
        &mcp_url(&s),
        Some(&agent()),
        json!([
            {"op": "resources"},
            {"op": "prompts"},
            {"op": "read", "uri": "docs://handbook"},
            {"op": "read", "uri": "secrets://payroll"},
        ]),
    )
    .await;
    let steps = run.steps();
    assert_eq!(steps[0]["uris"], json!(["docs://handbook"]), "{}", steps[0]);
    assert_eq!(steps[1]["names"], json!([]), "{}", steps[1]);
    assert_eq!(steps[2]["text"], json!(["the handbook"]), "{}", steps[2]);
    assert!(
        steps[3]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("Mandate denied this call")),
        "{}",
        steps[3]
    );
    assert_eq!(steps[3]["code"], -32003, "{}", steps[3]);
    let reads = get_json(&format!("{}/reads", up.url.trim_end_matches("/mcp"))).await;
    assert_eq!(reads, json!({"docs://handbook": 1, "secrets://payroll": 0}));
    s.shutdown().await;
}

/// Issue 15 item 2: a tool call's decision joins the agent's trace (its `traceparent` on the
/// MCP request), and the audit record names that trace.
#[tokio::test]
async fn a_tool_calls_decision_joins_the_agents_trace() {
    // Spans go nowhere (nothing listens on port 9): joining a trace needs no collector.
    let (_up, s) = gateway_with(&[
        ("MANDATE_TELEMETRY__OTLP_ENDPOINT", "http://127.0.0.1:9"),
        ("MANDATE_TELEMETRY__TRACE_SAMPLE_RATIO", "0.0"),
    ])
    .await;
    let audit = s.running.as_ref().unwrap().service.audit.path().to_owned();
    let (st, headers, body) = post_raw(&s, Some(&agent()), None, initialize_request()).await;
    assert_eq!(st, 200, "{body}");
    let session = headers["mcp-session-id"].to_str().unwrap().to_owned();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
    let (st, _, body) = post_raw(&s, Some(&agent()), Some(&session), initialized).await;
    assert!((200..300).contains(&st), "{st} {body}");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = s
        .client
        .post(mcp_url(&s))
        .bearer_auth(agent())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", session.as_str())
        .header("mcp-protocol-version", PROTOCOL_VERSION)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-00"))
        .body(tools_call_request(2, "read_record", json!({"id": "r-1"})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.text().await.unwrap().contains("record r-1"));
    let decisions: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "decision")
        .collect();
    let call = decisions
        .iter()
        .rev()
        .find(|r| r["action"] == "mcp:call" && r["resource"]["id"] == "tools/read_record")
        .unwrap_or_else(|| panic!("no decision of the call: {decisions:?}"));
    assert_eq!(call["trace_id"], trace, "{call}");
    s.shutdown().await;
}
