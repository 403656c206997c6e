//! `mandate mcp wrap --name NAME -- CMD [ARGS…]`: a local stdio MCP server run as a child,
//! with the running server's decisions between it and the agent's MCP client, so a desktop
//! agent's tool configuration points at `mandate mcp wrap` instead of at the server.
//!
//! The transport is MCP's stdio one: newline-delimited JSON-RPC on the child's stdin and
//! stdout (its stderr is the wrapper's). The decisions are the server's, asked over HTTP with
//! the agent's own token ([`crate::api::mcp_wrap`]), or, with `--server unix:PATH`, over the
//! server's Unix socket, where a request without a token is the configured local principal
//! of the OS user the wrapper runs as (`[[mcp.local_principals]]`: the kernel tells the
//! server who connected). The wrapper carries the decisions out:
//!
//! - client → child: each line is read strictly (one JSON-RPC object, no duplicate key, no
//!   batch). A `tools/call`, `resources/read` or `prompts/get` goes to `/v1/mcp/decide` first
//!   and reaches the child only on `forward`; otherwise the answer is written to the client
//!   and the child never sees the call. A `tools/call` is decided on the child's own
//!   annotations: the wrapper lists the child's tools itself when it has not seen the tool
//!   within the last minute (its own request ids, whose answers the client never sees).
//!   Anything else is passed on as received.
//! - child → client: the answers to the client's `tools/list`, `resources/list` and
//!   `prompts/list` go through `/v1/mcp/filter`; anything else is passed on as written. A line
//!   that is not one strict JSON-RPC object is dropped (it could be a list nobody filtered).
//!
//! Fail closed: when Mandate cannot be asked (unreachable, a refused token, an answer that is
//! not a decision), a decided call is answered with a JSON-RPC error naming why and is never
//! forwarded, and a list is not shown. The token (`MANDATE_TOKEN`, and any variable holding
//! it) is not in the child's environment. The wrapper ends with the child: its exit status is
//! the child's; when the client closes stdin, the child's stdin is closed and the child is
//! waited for; a SIGTERM, SIGINT or SIGHUP closes the child's stdin and kills it after a
//! grace period.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::render;
use crate::api::body::parse_value;
use crate::api::mcp::{self, Listed, Verdict};
use crate::api::mcp_wrap::{DECIDE, FILTER};
use crate::config::mcp_server_name_ok;

/// Longest line read from either side: the largest `mcp.max_message_bytes` a configuration
/// may set.
const MAX_LINE: usize = 64 * 1024 * 1024;
/// How long the child's listed tools are decided on before they are listed again (as the
/// gateway does).
const TOOLS_TTL: Duration = Duration::from_secs(60);
/// Pages of `tools/list` the wrapper reads itself.
const MAX_LIST_PAGES: usize = 16;
/// How long the child has to answer the wrapper's own `tools/list`.
const CHILD_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest Mandate may take to decide: a held escalation waits up to `mcp.hold` (at most
/// 60 s).
const DECIDE_TIMEOUT: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a call that sent a progress token hears that its decision is awaited.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long the child has to exit after its stdin is closed on a signal.
const GRACE: Duration = Duration::from_secs(2);
/// Lines queued towards either side.
const QUEUE: usize = 64;

/// What `mandate mcp wrap` runs.
#[derive(Debug)]
pub struct WrapArgs {
    /// The server part of its tools' resource ids (`McpTool::"<name>/<tool>"`).
    pub name: String,
    /// The Mandate server: a base URL, or `unix:PATH` for its Unix socket.
    pub server: String,
    /// Required over TCP; over the Unix socket, without one the OS user is the identity.
    pub token: Option<Token>,
    /// The stdio server's command and arguments.
    pub command: Vec<OsString>,
}

/// Where the agent's token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum Token {
    /// `--token`, or `MANDATE_TOKEN`.
    Value(String),
    /// `--token-file`: read again for every request, so a rotated token (a file a SPIFFE
    /// helper keeps fresh) is used as soon as it is written.
    File(PathBuf),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::Value(_) => f.write_str("Token::Value(…)"),
            Token::File(p) => write!(f, "Token::File({})", p.display()),
        }
    }
}

impl Token {
    /// `--token`, else `--token-file`, else `MANDATE_TOKEN` (`env`); `None`: none of them
    /// (an empty `MANDATE_TOKEN` is none).
    pub fn choose(
        token: Option<String>,
        file: Option<PathBuf>,
        env: Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        match (token, file, env) {
            (Some(t), _, _) if t.trim().is_empty() => bail!("--token is empty"),
            (Some(t), _, _) => Ok(Some(Token::Value(t.trim().to_owned()))),
            (None, Some(f), _) => Ok(Some(Token::File(f))),
            (None, None, Some(t)) if !t.trim().is_empty() => {
                Ok(Some(Token::Value(t.trim().to_owned())))
            }
            _ => Ok(None),
        }
    }

    /// The token to send now.
    fn current(&self) -> Result<String, String> {
        match self {
            Token::Value(t) => Ok(t.clone()),
            Token::File(path) => match std::fs::read_to_string(path) {
                Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
                Ok(_) => Err(format!("--token-file `{}` is empty", path.display())),
                Err(e) => Err(format!("--token-file `{}`: {e}", path.display())),
            },
        }
    }
}

/// `mandate mcp wrap`: the child's exit status.
pub fn wrap(args: WrapArgs) -> anyhow::Result<u8> {
    if !mcp_server_name_ok(&args.name) {
        bail!(
            "--name `{}` must be letters, digits, `-`, `_` or `.` (it is the first part of its \
             tools' resource ids, `McpTool::\"<name>/<tool>\"`)",
            args.name
        );
    }
    let endpoint = Endpoint::of(&args.server)?;
    if args.token.is_none() && !matches!(endpoint, Endpoint::Unix(_)) {
        bail!(
            "no token: pass --token TOKEN or --token-file PATH, or set MANDATE_TOKEN (the \
             agent's own workload token: every call is decided for it); without a token, only \
             `--server unix:PATH` (Mandate's Unix socket) identifies the agent, by its OS user's \
             `[[mcp.local_principals]]` entry"
        );
    }
    // A token file that cannot be read now is a mistake to report before the child runs.
    let token = match &args.token {
        Some(t) => t.current().map_err(anyhow::Error::msg)?,
        None => String::new(),
    };
    let Some((program, rest)) = args.command.split_first() else {
        bail!("no command to run: `mandate mcp wrap --name NAME -- COMMAND [ARGS…]`");
    };

    let mut command = Command::new(program);
    command
        .args(rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for key in scrubbed(std::env::vars_os(), &token) {
        command.env_remove(key);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run `{}`", program.to_string_lossy()))?;
    let (Some(child_in), Some(child_out)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        bail!("the child's stdin and stdout could not be piped");
    };

    let (client_tx, client_lines) = mpsc::channel(QUEUE);
    let (child_tx, child_lines) = mpsc::channel(QUEUE);
    // Unbounded towards each side: the loop never waits on a peer that is not reading (a
    // child blocked writing its stdout while the wrapper waits to write its stdin).
    let (to_child, child_queue) = mpsc::unbounded_channel();
    let (to_client, client_queue) = mpsc::unbounded_channel();
    // Plain threads for the pipes: a blocked read never holds up the runtime, and the
    // process may end while one still waits for the client.
    std::thread::spawn(move || pump_lines(std::io::stdin().lock(), &client_tx));
    std::thread::spawn(move || pump_lines(std::io::BufReader::new(child_out), &child_tx));
    std::thread::spawn(move || pump_out(child_in, child_queue));
    let stdout = std::thread::spawn(move || pump_out(std::io::stdout().lock(), client_queue));

    let wrapper = Arc::new(Wrapper {
        name: args.name,
        server: args.server.trim_end_matches('/').to_owned(),
        endpoint,
        token: args.token,
        to_child,
        to_client,
        tools: Mutex::new(HashMap::new()),
        lists: Mutex::new(HashMap::new()),
        own: Mutex::new(HashMap::new()),
        nonce: uuid::Uuid::new_v4().simple().to_string(),
        next: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = runtime.block_on(run(wrapper, client_lines, child_lines, &mut child));
    // Every task (and its queue sender) is gone with the runtime; what is queued for the
    // client is written before the process ends.
    drop(runtime);
    let _ = stdout.join();
    code
}

/// The names of the variables the child does not get: `MANDATE_TOKEN`, and any whose value
/// holds the token.
fn scrubbed(vars: impl Iterator<Item = (OsString, OsString)>, token: &str) -> Vec<OsString> {
    vars.filter(|(k, v)| {
        k == "MANDATE_TOKEN" || (!token.is_empty() && v.to_str().is_some_and(|v| v.contains(token)))
    })
    .map(|(k, _)| k)
    .collect()
}

/// One line read from either side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// Without its `\n`.
    Text(Vec<u8>),
    /// Longer than [`MAX_LINE`]: skipped to its end, unread.
    TooLong,
}

/// The next line of `r`, at most `cap` bytes (a longer one is skipped to its `\n`); `None`
/// at the end. A last line without a `\n` is still a line.
fn next_line(r: &mut impl BufRead, cap: usize) -> std::io::Result<Option<Line>> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = r.fill_buf()?;
        if available.is_empty() {
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => Some(Line::TooLong),
                (false, true) => None,
                (false, false) => Some(Line::Text(line)),
            });
        }
        let (chunk, end) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if !too_long && line.len() + chunk.len() > cap {
            too_long = true;
            line = Vec::new();
        }
        if !too_long {
            line.extend_from_slice(chunk);
        }
        let used = end.unwrap_or(chunk.len());
        r.consume(used);
        if end.is_some() {
            return Ok(Some(match too_long {
                true => Line::TooLong,
                false => Line::Text(line),
            }));
        }
    }
}

/// Read lines into `tx` until the end (or a read error, which ends the stream the same way).
fn pump_lines(mut r: impl BufRead, tx: &mpsc::Sender<Line>) {
    while let Ok(Some(line)) = next_line(&mut r, MAX_LINE) {
        if tx.blocking_send(line).is_err() {
            return;
        }
    }
}

/// Write each line (and its `\n`) until `None`, the queue's end, or a write error.
fn pump_out(mut w: impl Write, mut rx: mpsc::UnboundedReceiver<Option<Vec<u8>>>) {
    while let Some(Some(line)) = rx.blocking_recv() {
        let written = w
            .write_all(&line)
            .and_then(|()| w.write_all(b"\n"))
            .and_then(|()| w.flush());
        if written.is_err() {
            return;
        }
    }
}

/// A listed tool of the child, and when it was listed.
type Listing = (Instant, Value);

#[derive(Debug)]
struct Wrapper {
    name: String,
    /// `--server`, as shown in errors.
    server: String,
    endpoint: Endpoint,
    token: Option<Token>,
    /// Lines for the child's stdin; `None` closes it.
    to_child: mpsc::UnboundedSender<Option<Vec<u8>>>,
    /// Lines for the client (stdout); `None` ends them.
    to_client: mpsc::UnboundedSender<Option<Vec<u8>>>,
    /// The child's tools by name, as it last listed them.
    tools: Mutex<HashMap<String, Listing>>,
    /// The client's list requests awaiting the child's answer, by id (as JSON text).
    lists: Mutex<HashMap<String, Listed>>,
    /// The wrapper's own requests to the child, by id (as JSON text).
    own: Mutex<HashMap<String, oneshot::Sender<Map<String, Value>>>>,
    /// The wrapper's own request ids are `mandate-wrap-<nonce>-<n>`: a client does not know
    /// the nonce, so its ids never collide with them.
    nonce: String,
    next: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Until the child closes its stdout: both directions, each decided message in a task of
/// its own (a held escalation holds up nothing else). Then the child's exit status.
async fn run(
    w: Arc<Wrapper>,
    mut from_client: mpsc::Receiver<Line>,
    mut from_child: mpsc::Receiver<Line>,
    child: &mut Child,
) -> anyhow::Result<u8> {
    let mut signals = Signals::new()?;
    let mut deciding = JoinSet::new();
    let mut filtering = JoinSet::new();
    let mut client_open = true;
    let stopped = loop {
        tokio::select! {
            line = from_client.recv(), if client_open => match line {
                Some(line) => w.from_client(line, &mut deciding),
                None => {
                    // The client is gone: nothing undecided is forwarded after it, and the
                    // child reads to its end.
                    client_open = false;
                    deciding.abort_all();
                    let _ = w.to_child.send(None);
                }
            },
            line = from_child.recv() => match line {
                Some(line) => w.from_child(line, &mut filtering),
                None => break None,
            },
            Some(_) = deciding.join_next(), if !deciding.is_empty() => {}
            Some(_) = filtering.join_next(), if !filtering.is_empty() => {}
            signal = signals.next() => break Some(signal),
        }
    };
    deciding.abort_all();
    let signal = match stopped {
        Some(signal) => signal,
        None => {
            let ended = async {
                // The child's last lists are still answered.
                while filtering.join_next().await.is_some() {}
                reap(child, None).await
            };
            tokio::select! {
                status = ended => {
                    let _ = w.to_client.send(None);
                    return Ok(exit_code(status.context("waiting for the child")?));
                }
                signal = signals.next() => signal,
            }
        }
    };
    let _ = w.to_child.send(None);
    let _ = reap(child, Some(GRACE)).await;
    let _ = w.to_client.send(None);
    Ok(128 + signal)
}

/// The signals that stop the wrapper (and, after [`GRACE`], the child).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signals")
    }
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The number of the next one received.
    async fn next(&mut self) -> u8 {
        tokio::select! {
            _ = self.term.recv() => 15,
            _ = self.int.recv() => 2,
            _ = self.hup.recv() => 1,
        }
    }
}

/// The child's exit status, once it has exited (killed after `grace`, if given).
async fn reap(child: &mut Child, grace: Option<Duration>) -> std::io::Result<ExitStatus> {
    let deadline = grace.map(|g| tokio::time::Instant::now() + g);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            child.kill()?;
            return child.wait();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process's exit status as an exit code: its own, or 128 + the signal that ended it.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1),
        (None, Some(s)) => u8::try_from(128 + (s & 0x7f)).unwrap_or(1),
        (None, None) => 1,
    }
}

impl Wrapper {
    /// A line for the child.
    fn forward(&self, line: Vec<u8>) {
        let _ = self.to_child.send(Some(line));
    }

    /// A message for the client.
    fn answer(&self, message: &Value) {
        let _ = self.to_client.send(Some(message.to_string().into_bytes()));
    }

    /// One line from the client: refused, decided (in a task of its own), or passed on.
    fn from_client(self: &Arc<Self>, line: Line, deciding: &mut JoinSet<()>) {
        let bytes = match line {
            Line::Text(b) => b,
            Line::TooLong => {
                let why = format!("a line longer than {MAX_LINE} bytes is not read");
                self.answer(&mcp::rpc_error(Value::Null, -32600, &why));
                return;
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let message = match mcp::read(parse_value(&bytes)) {
            Ok(m) => m,
            Err(refused) => return self.answer(&refused.answer()),
        };
        let method = message.get("method").and_then(Value::as_str);
        if method.is_some_and(mcp::is_decided) {
            let w = self.clone();
            deciding.spawn(async move { w.decide(bytes, message).await });
            return;
        }
        if let Some(kind) = method.and_then(Listed::of)
            && let Some(id) = message.get("id").filter(|id| !id.is_null())
        {
            lock(&self.lists).insert(id.to_string(), kind);
        }
        self.forward(bytes);
    }

    /// Ask Mandate about a decided message: forward it as received, or answer it.
    async fn decide(self: Arc<Self>, line: Vec<u8>, message: Map<String, Value>) {
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let tool = match message.get("method").and_then(Value::as_str) {
            Some("tools/call") => message
                .get("params")
                .and_then(|p| p.get("name"))
                .and_then(Value::as_str),
            _ => None,
        };
        let tools = match tool {
            None => Vec::new(),
            Some(tool) => match self.listed(tool).await {
                Ok(t) => t.into_iter().collect(),
                // Fail closed: without the tool's annotations there is nothing certain to
                // decide on.
                Err(why) => {
                    let why = format!("{why}, so tool `{tool}` cannot be decided");
                    return self.answer(&mcp::rpc_error(id, -32602, &why));
                }
            },
        };
        let asked = self.post(DECIDE, decide_body(&self.name, &line, &tools));
        let answered = match mcp::progress_token(&message) {
            Some(token) => self.with_progress(asked, token).await,
            None => asked.await,
        };
        match answered.and_then(|v| verdict(&v)) {
            Ok(Verdict::Forward) => self.forward(line),
            Ok(Verdict::Answer(a)) => self.answer(&a),
            Err(why) => {
                let why = format!(
                    "mandate mcp wrap: not forwarded, as Mandate could not decide it: {why}"
                );
                self.answer(&mcp::rpc_error(id, -32603, &why));
            }
        }
    }

    /// Await `asked`, telling the client every few seconds that the decision is awaited
    /// (a held escalation waits for its approval).
    async fn with_progress<T>(&self, asked: impl Future<Output = T>, token: Value) -> T {
        tokio::pin!(asked);
        let start = tokio::time::Instant::now() + PROGRESS_EVERY;
        let mut every = tokio::time::interval_at(start, PROGRESS_EVERY);
        let mut step = 0u64;
        loop {
            tokio::select! {
                out = &mut asked => return out,
                _ = every.tick() => {
                    step += 1;
                    self.answer(&json!({"jsonrpc": "2.0", "method": "notifications/progress",
                        "params": {"progressToken": token, "progress": step,
                        "message": "waiting for Mandate's decision (an approval may be pending)"}}));
                }
            }
        }
    }

    /// The child's entry for `tool`, listed within [`TOOLS_TTL`] (the child is asked again
    /// otherwise); `Ok(None)`: it does not list it.
    async fn listed(&self, tool: &str) -> Result<Option<Value>, String> {
        if let Some(t) = self.fresh(tool) {
            return Ok(Some(t));
        }
        let mut cursor: Option<Value> = None;
        for _ in 0..MAX_LIST_PAGES {
            let mut params = Map::new();
            if let Some(c) = cursor.take() {
                params.insert("cursor".into(), c);
            }
            let result = self.ask_child("tools/list", params).await?;
            if let Some(Value::Array(tools)) = result.get("tools") {
                self.learn(tools);
            }
            match result.get("nextCursor") {
                Some(c @ Value::String(_)) => cursor = Some(c.clone()),
                _ => break,
            }
        }
        Ok(self.fresh(tool))
    }

    fn fresh(&self, tool: &str) -> Option<Value> {
        let tools = lock(&self.tools);
        let (at, entry) = tools.get(tool)?;
        (at.elapsed() < TOOLS_TTL).then(|| entry.clone())
    }

    fn learn(&self, listed: &[Value]) {
        let mut tools = lock(&self.tools);
        for t in listed {
            if let Some(name) = t.get("name").and_then(Value::as_str) {
                tools.insert(name.to_owned(), (Instant::now(), t.clone()));
            }
        }
    }

    /// A request of the wrapper's own to the child: its `result`.
    async fn ask_child(&self, method: &str, params: Map<String, Value>) -> Result<Value, String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = Value::String(format!("mandate-wrap-{}-{n}", self.nonce));
        let (tx, rx) = oneshot::channel();
        lock(&self.own).insert(id.to_string(), tx);
        let ask = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.forward(ask.to_string().into_bytes());
        let answer = match tokio::time::timeout(CHILD_TIMEOUT, rx).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => return Err(format!("the stdio server ended before answering {method}")),
            Err(_) => {
                lock(&self.own).remove(&id.to_string());
                return Err(format!(
                    "the stdio server did not answer {method} within {}s",
                    CHILD_TIMEOUT.as_secs()
                ));
            }
        };
        if let Some(e) = answer.get("error") {
            return Err(format!("the stdio server refused {method} ({e})"));
        }
        match answer.get("result") {
            Some(r @ Value::Object(_)) => Ok(r.clone()),
            _ => Err(format!(
                "the stdio server's answer to {method} has no result"
            )),
        }
    }

    /// One line from the child: an answer to the wrapper, a list to filter, or passed on.
    fn from_child(self: &Arc<Self>, line: Line, filtering: &mut JoinSet<()>) {
        let bytes = match line {
            Line::Text(b) => b,
            Line::TooLong => {
                eprintln!(
                    "mandate mcp wrap: dropped a line of the server longer than {MAX_LINE} bytes"
                );
                return;
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        // Fail closed: what cannot be read with certainty may be a list nobody filtered.
        let message = match parse_value(&bytes) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                eprintln!(
                    "mandate mcp wrap: dropped a line of the server that is not one JSON-RPC \
                     object (a batch is not passed on)"
                );
                return;
            }
            Err(e) => {
                eprintln!(
                    "mandate mcp wrap: dropped a line of the server that is not strict JSON: {}",
                    e.message
                );
                return;
            }
        };
        if !message.contains_key("method")
            && let Some(id) = message.get("id").map(Value::to_string)
        {
            if let Some(tx) = lock(&self.own).remove(&id) {
                let _ = tx.send(message);
                return;
            }
            if let Some(kind) = lock(&self.lists).remove(&id) {
                let w = self.clone();
                filtering.spawn(async move { w.filter(kind, message).await });
                return;
            }
        }
        if message.get("method").and_then(Value::as_str) == Some("notifications/tools/list_changed")
        {
            lock(&self.tools).clear();
        }
        let _ = self.to_client.send(Some(bytes));
    }

    /// The child's answer to a client's list, as Mandate filters it for this agent.
    async fn filter(self: Arc<Self>, kind: Listed, mut message: Map<String, Value>) {
        let Some(result) = message.get("result") else {
            // An error answer lists nothing.
            return self.answer(&Value::Object(message));
        };
        if kind == Listed::Tools
            && let Some(Value::Array(tools)) = result.get("tools")
        {
            self.learn(tools);
        }
        let body = json!({"server": self.name, "method": kind.method(), "result": result});
        match self.post(FILTER, body.to_string()).await.and_then(filtered) {
            Ok(result) => {
                message.insert("result".into(), result);
                self.answer(&Value::Object(message));
            }
            Err(why) => {
                let id = message.get("id").cloned().unwrap_or(Value::Null);
                let why = format!(
                    "mandate mcp wrap: the list is not shown, as Mandate could not filter it: {why}"
                );
                self.answer(&mcp::rpc_error(id, -32603, &why));
            }
        }
    }

    /// POST `body` to `path` with the agent's token, if it has one: the JSON answer, or why
    /// there is none.
    async fn post(&self, path: &str, body: String) -> Result<Value, String> {
        let token = self.token.as_ref().map(Token::current).transpose()?;
        let unreachable = |e: &dyn std::error::Error| {
            format!(
                "Mandate at {} could not be reached ({})",
                self.server,
                causes(e)
            )
        };
        let (status, text) = match &self.endpoint {
            Endpoint::Http { client, base } => {
                let mut req = client
                    .post(format!("{base}{path}"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await.map_err(|e| unreachable(&e))?;
                let status = resp.status();
                let text = resp
                    .text()
                    .await
                    .map_err(|e| format!("Mandate's answer could not be read ({})", causes(&e)))?;
                (status, text)
            }
            Endpoint::Unix(socket) => {
                match tokio::time::timeout(
                    DECIDE_TIMEOUT,
                    post_unix(socket, path, token.as_deref(), body),
                )
                .await
                {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(UnixError::Connect(e))) => return Err(unreachable(&e)),
                    Ok(Err(UnixError::Http(e))) => {
                        return Err(format!(
                            "Mandate's answer could not be read ({})",
                            causes(&e)
                        ));
                    }
                    Ok(Err(UnixError::TooLarge)) => {
                        return Err(format!("Mandate's answer is larger than {MAX_LINE} bytes"));
                    }
                    Err(_) => {
                        return Err(format!(
                            "Mandate at {} did not answer within {}s",
                            self.server,
                            DECIDE_TIMEOUT.as_secs()
                        ));
                    }
                }
            }
        };
        let parsed = serde_json::from_str::<Value>(&text);
        match (status.is_success(), parsed) {
            (true, Ok(v)) => Ok(v),
            (true, Err(e)) => Err(format!("Mandate's answer is not JSON ({e})")),
            (false, Ok(v)) => Err(format!(
                "Mandate refused: {status}: {}",
                render::api_error(&v)
            )),
            (false, Err(_)) => Err(format!("Mandate refused: {status}")),
        }
    }
}

/// Where Mandate is asked.
#[derive(Debug)]
enum Endpoint {
    /// `http(s)://…`: the agent's token is its identity.
    Http {
        client: reqwest::Client,
        base: String,
    },
    /// `unix:PATH`: Mandate's Unix socket, where the kernel tells the server which OS user
    /// connected, so a request without a token can be a configured local principal's.
    Unix(PathBuf),
}

impl Endpoint {
    /// From `--server`: `unix:PATH`, or an `http://` or `https://` base URL.
    fn of(server: &str) -> anyhow::Result<Self> {
        if let Some(path) = server.strip_prefix("unix:") {
            if path.is_empty() {
                bail!(
                    "--server: `unix:` needs the socket's path, `unix:/run/mandate/mandate.sock`"
                );
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let base = server.trim_end_matches('/');
        let url = reqwest::Url::parse(base)
            .with_context(|| format!("--server: `{base}` is not a URL or `unix:PATH`"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("--server: `{base}` is not an http:// or https:// URL, or `unix:PATH`");
        }
        crate::app::install_crypto()?;
        let client = reqwest::Client::builder()
            // The configured server is the server: a redirect is not followed with the token.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(DECIDE_TIMEOUT)
            .build()?;
        Ok(Endpoint::Http {
            client,
            base: base.to_owned(),
        })
    }
}

/// Why a request over the Unix socket got no answer.
#[derive(Debug)]
enum UnixError {
    Connect(std::io::Error),
    Http(hyper::Error),
    TooLarge,
}

/// POST `body` to `path` over the Unix socket `socket` (HTTP/1.1, one connection a request):
/// the status and the answer's text.
async fn post_unix(
    socket: &std::path::Path,
    path: &str,
    token: Option<&str>,
    body: String,
) -> Result<(reqwest::StatusCode, String), UnixError> {
    use http_body_util::{BodyExt as _, Full, Limited};
    use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};

    let stream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::UnixStream::connect(socket),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(UnixError::Connect(e)),
        Err(_) => {
            return Err(UnixError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
            )));
        }
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(UnixError::Http)?;
    let driver = tokio::spawn(connection);
    let mut req = hyper::Request::post(path)
        .header(HOST, "localhost")
        .header(CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| UnixError::Connect(std::io::Error::other(e)))?;
    let answer = async {
        let resp = sender.send_request(req).await.map_err(UnixError::Http)?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_LINE)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => UnixError::Http(*e),
                Err(_) => UnixError::TooLarge,
            })?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
    .await;
    driver.abort();
    answer
}

/// An error and its causes, as one line (`error sending request: … : Connection refused`).
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The `/v1/mcp/decide` body: the message exactly as the client sent it (what the child will
/// read is what Mandate decides on), and the child's entry for the tool, if any.
fn decide_body(server: &str, line: &[u8], tools: &[Value]) -> String {
    let message = String::from_utf8_lossy(line);
    format!(
        "{{\"server\":{},\"message\":{},\"tools\":{}}}",
        Value::String(server.to_owned()),
        message.trim_end(),
        Value::Array(tools.to_vec())
    )
}

/// A `/v1/mcp/decide` answer. Only `"forward": true` forwards.
fn verdict(v: &Value) -> Result<Verdict, String> {
    match (v.get("forward"), v.get("answer")) {
        (Some(Value::Bool(true)), _) => Ok(Verdict::Forward),
        (Some(Value::Bool(false)), Some(a @ Value::Object(_))) => Ok(Verdict::Answer(a.clone())),
        _ => Err(format!("its answer is not a decision: {v}")),
    }
}

/// A `/v1/mcp/filter` answer: the filtered result.
fn filtered(v: Value) -> Result<Value, String> {
    match v {
        Value::Object(mut m) => match m.remove("result") {
            Some(r @ Value::Object(_)) => Ok(r),
            _ => Err("its answer has no result".into()),
        },
        other => Err(format!("its answer is not an object: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], cap: usize) -> Vec<Line> {
        let mut r = std::io::BufReader::with_capacity(4, input);
        std::iter::from_fn(|| next_line(&mut r, cap).unwrap()).collect()
    }

    #[test]
    fn lines_are_split_on_newlines_and_a_long_one_is_skipped_whole() {
        let text = |s: &str| Line::Text(s.as_bytes().to_vec());
        assert_eq!(
            lines(b"{\"a\":1}\n\n{\"b\":2}\r\nlast", 16),
            [
                text("{\"a\":1}"),
                text(""),
                text("{\"b\":2}\r"),
                text("last")
            ]
        );
        // Over the cap: one TooLong (read through to its newline), then the next line whole.
        assert_eq!(
            lines(b"0123456789abcdefXYZ\nok\n", 16),
            [Line::TooLong, text("ok")]
        );
        assert_eq!(lines(b"0123456789abcdefXYZ", 16), [Line::TooLong]);
        assert_eq!(lines(b"0123456789abcdef\n", 16), [text("0123456789abcdef")]);
        assert!(lines(b"", 16).is_empty());
    }

    #[test]
    fn the_decide_body_carries_the_message_as_sent() {
        let line = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"t","arguments":{"amount":1e2}}}"#;
        let tool = json!({"name": "t", "annotations": {"readOnlyHint": true}});
        let body = decide_body("my-tools", line, std::slice::from_ref(&tool));
        assert!(body.contains(r#""amount":1e2"#), "{body}");
        let parsed = crate::strict_json::parse(body.as_bytes(), 16).unwrap();
        assert_eq!(parsed["server"], "my-tools");
        assert_eq!(parsed["message"]["id"], 7);
        assert_eq!(parsed["tools"], json!([tool]));
        let none = decide_body("x", b"{\"id\":1}\r", &[]);
        assert_eq!(none, r#"{"server":"x","message":{"id":1},"tools":[]}"#);
    }

    #[test]
    fn only_forward_true_forwards() {
        assert_eq!(verdict(&json!({"forward": true})), Ok(Verdict::Forward));
        let answer = json!({"jsonrpc": "2.0", "id": 1, "result": {"isError": true}});
        assert_eq!(
            verdict(&json!({"forward": false, "answer": answer})),
            Ok(Verdict::Answer(answer))
        );
        for bad in [
            json!({"forward": "true"}),
            json!({"forward": false}),
            json!({"forward": false, "answer": "no"}),
            json!({"error": "token_expired"}),
            json!([true]),
        ] {
            assert!(verdict(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            filtered(json!({"result": {"tools": []}})),
            Ok(json!({"tools": []}))
        );
        assert!(filtered(json!({"result": []})).is_err());
        assert!(filtered(json!({})).is_err());
    }

    #[test]
    fn the_token_and_any_variable_holding_it_are_scrubbed() {
        let vars = [
            ("MANDATE_TOKEN", "tok.en.value"),
            ("AGENT_JWT", "Bearer tok.en.value"),
            ("PATH", "/usr/bin"),
            ("MANDATE_SERVER", "http://127.0.0.1:8181"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        assert_eq!(
            scrubbed(vars.clone().into_iter(), "tok.en.value"),
            ["MANDATE_TOKEN", "AGENT_JWT"]
        );
        // MANDATE_TOKEN goes whatever it holds; an empty token matches nothing else.
        assert_eq!(scrubbed(vars.into_iter(), ""), ["MANDATE_TOKEN"]);
    }

    #[test]
    fn the_token_is_the_flag_then_the_file_then_the_environment() {
        let t = |s: &str| Some(s.to_owned());
        let file = Some(PathBuf::from("/run/token"));
        assert_eq!(
            Token::choose(t(" a "), file.clone(), t("c")).unwrap(),
            Some(Token::Value("a".into()))
        );
        assert_eq!(
            Token::choose(None, file.clone(), t("c")).unwrap(),
            Some(Token::File(PathBuf::from("/run/token")))
        );
        assert_eq!(
            Token::choose(None, None, t("c")).unwrap(),
            Some(Token::Value("c".into()))
        );
        // None at all is for `wrap` to judge: enough over the Unix socket only.
        assert_eq!(Token::choose(None, None, None).unwrap(), None);
        assert_eq!(Token::choose(None, None, t("  ")).unwrap(), None);
        assert!(Token::choose(t(""), None, t("c")).is_err());
        assert_eq!(
            format!("{:?}", Token::Value("secret".into())),
            "Token::Value(…)"
        );
    }

    #[test]
    fn the_server_is_a_url_or_a_unix_socket_and_only_the_socket_goes_without_a_token() {
        assert!(matches!(
            Endpoint::of("unix:/run/mandate/mandate.sock").unwrap(),
            Endpoint::Unix(p) if p == std::path::Path::new("/run/mandate/mandate.sock")
        ));
        assert!(matches!(
            Endpoint::of("http://127.0.0.1:8181/").unwrap(),
            Endpoint::Http { base, .. } if base == "http://127.0.0.1:8181"
        ));
        for bad in ["unix:", "ftp://x", "127.0.0.1:8181", "not a url"] {
            let e = Endpoint::of(bad).unwrap_err().to_string();
            assert!(e.starts_with("--server: "), "{bad}: {e}");
        }
        let args = |server: &str| WrapArgs {
            name: "tools".into(),
            server: server.into(),
            token: None,
            command: vec!["true".into()],
        };
        let e = wrap(args("http://127.0.0.1:8181")).unwrap_err().to_string();
        assert!(e.starts_with("no token") && e.contains("unix:PATH"), "{e}");
    }

    #[test]
    fn a_token_file_is_read_for_each_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let token = Token::File(path.clone());
        assert!(token.current().unwrap_err().contains("--token-file"));
        std::fs::write(&path, "first\n").unwrap();
        assert_eq!(token.current().unwrap(), "first");
        std::fs::write(&path, "second").unwrap();
        assert_eq!(token.current().unwrap(), "second");
        std::fs::write(&path, " \n").unwrap();
        assert!(token.current().unwrap_err().contains("is empty"));
    }

    #[test]
    fn exit_codes_are_the_childs() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGKILL (9): 128 + 9, as a shell reports it.
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
