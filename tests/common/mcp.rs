//! The Python MCP SDK client peer (tests/peers/mcp_client.py) as tests/mcp.rs and
//! tests/mcp_stdio.rs run it: its steps in, one JSON line per step out.

use std::time::Duration;

use serde_json::{Value, json};

/// What the SDK client printed: one JSON line for `initialize`, one for the session id, then
/// one per step in order.
#[derive(Debug)]
pub struct Run {
    pub lines: Vec<Value>,
}

impl Run {
    pub fn line(&self, op: &str) -> &Value {
        self.lines
            .iter()
            .find(|l| l["op"] == op)
            .unwrap_or_else(|| panic!("no `{op}` line: {:#?}", self.lines))
    }

    /// The `initialize` line: `protocolVersion`, or `error`, `code` and `http_status`.
    pub fn initialize(&self) -> &Value {
        self.line("initialize")
    }

    /// The `Mcp-Session-Id` the client got, if any.
    pub fn session(&self) -> Option<&str> {
        self.line("session")["id"].as_str()
    }

    /// The answer to each step, in the order of the steps.
    pub fn steps(&self) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|l| l["op"] != "initialize" && l["op"] != "session")
            .collect()
    }

    /// The one answer to a one-step run.
    pub fn only(&self) -> &Value {
        let steps = self.steps();
        assert_eq!(steps.len(), 1, "{:#?}", self.lines);
        steps[0]
    }
}

/// Run the SDK client with `args` (`URL TOKEN`, or `--stdio COMMAND…`), `env` added to its
/// environment, and `steps`: `[{"op":"list"}, {"op":"call","tool":..,"arguments":{..}}, …]`.
pub async fn client(args: Vec<String>, env: Vec<(String, String)>, steps: Value) -> Run {
    let run = tokio::task::spawn_blocking(move || {
        super::python_script(
            "tests/peers/mcp_client.py",
            &args,
            &env,
            steps.to_string().as_bytes(),
        )
    });
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the MCP client ran for over 120 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python MCP client failed (scripts/test installs tests/requirements.txt):\n{stderr}"
    );
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{stderr}"))
        })
        .collect();
    Run { lines }
}

/// A `call` step.
pub fn call(tool: &str, arguments: Value) -> Value {
    json!({"op": "call", "tool": tool, "arguments": arguments})
}

/// The texts of a call's content, joined.
pub fn text(answer: &Value) -> String {
    answer["text"]
        .as_array()
        .unwrap_or_else(|| panic!("no text: {answer}"))
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}
