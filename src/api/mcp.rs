//! The MCP gateway (issue 13): every `[[mcp.servers]]` upstream is served at `/mcp/{name}`
//! with the Streamable HTTP transport, and every tool call is decided before it can reach
//! the upstream.
//!
//! - The agent authenticates with its own workload token (`Authorization: Bearer`), verified
//!   like every token; that token is never sent upstream (the server's own configured
//!   headers are).
//! - `tools/call` is a check: action `mcp:<server>/<tool>` when the bundle declares it, else
//!   `mcp:call`; resource `McpTool::"<server>/<tool>"` with the upstream's annotations
//!   (`readOnlyHint`, `destructiveHint`, `idempotentHint`, `openWorldHint`) and `server`,
//!   `tool`; context `{"arguments": …}`. Allow: the message is forwarded as received. Deny
//!   and escalate: nothing is forwarded; the answer is a `CallToolResult` with `isError: true`,
//!   a sentence the model can read, and the decision (with the approval request on an
//!   escalation) in `structuredContent`. Once approved, the same call is allowed by the grant;
//!   other arguments are another request.
//! - `tools/list`: the upstream's answer, with the tools this agent can never call removed and
//!   those it can only call with approval marked (`_meta["mandate/approval"] = "required"`).
//!   Its annotations are remembered for the calls' resources; a call to a tool not seen yet
//!   makes Mandate ask the upstream for the list first (in the agent's session), so a policy
//!   on an annotation is never evaluated without it.
//! - Everything else (`initialize`, notifications, responses, `GET` streams, `DELETE`) is
//!   forwarded with the session headers, and the upstream's answer (JSON or SSE) streamed back.
//!
//! Fail closed: a message that cannot be read with certainty (not JSON, a duplicate key, a
//! batch, oversize) is refused and never forwarded.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::metrics::Api;
use crate::service::Call;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::{Map, Value, json};

use super::caller::authenticate;
use super::forward_auth::{agent, refusal};
use super::http::decision_value;
use super::{ApiError, AppState, ConnInfo, body};
use crate::config::{McpConfig, McpServer};
use crate::service::Settled;
use crate::vocabulary::{CheckRequest, GrantScope, Outcome, Principal, Resource};

/// `/mcp/{name}`.
pub const PREFIX: &str = "/mcp/";
/// The action of a tool call when the bundle declares none for the tool itself.
pub const CALL_ACTION: &str = "mcp:call";
/// The entity type of a tool.
pub const TOOL_TYPE: &str = "McpTool";
/// The `_meta` key marking a listed tool that needs approval.
pub const APPROVAL_META: &str = "mandate/approval";

/// A gateway answer: made here, or the upstream's streamed through (a failed upstream stream
/// is an I/O error of the answer).
pub type McpBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// The annotations the resource of a tool call carries, as the upstream declares them.
const ANNOTATIONS: [&str; 4] = [
    "readOnlyHint",
    "destructiveHint",
    "idempotentHint",
    "openWorldHint",
];
/// Request headers of the transport passed upstream as the agent sent them.
const SESSION_HEADERS: [&str; 4] = [
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
    "accept",
];
/// Response headers passed back to the agent.
const ANSWER_HEADERS: [&str; 4] = [
    "content-type",
    "mcp-session-id",
    "mcp-protocol-version",
    "cache-control",
];
/// Sessions remembered per upstream, and how long an unused one is.
const MAX_SESSIONS: u64 = 100_000;
const SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The methods decided before they are forwarded; each must be a request (with an id).
const DECIDED: [&str; 3] = ["tools/call", "resources/read", "prompts/get"];
/// How long a tool's annotations are trusted without a new `tools/list`: the bound on
/// staleness when an upstream changes its tools without a `notifications/tools/list_changed`
/// the gateway sees pass (one it sees forgets them at once: [`ListChanged`]).
const ANNOTATIONS_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest `tools/list` answer read to filter it.
pub(super) const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;
/// Pages of `tools/list` Mandate reads itself to learn a tool's annotations.
const MAX_LIST_PAGES: usize = 16;

/// The configured upstreams and what was learnt of their tools.
#[derive(Debug)]
pub struct Gateway {
    servers: HashMap<String, Upstream>,
    client: reqwest::Client,
    max_message_bytes: usize,
    hold: std::time::Duration,
    /// `[[mcp.local_principals]]` by uid, each built once: who a tokenless `mcp wrap` request
    /// on the Unix socket is ([`super::mcp_wrap`]).
    local: HashMap<u32, Arc<Principal>>,
}

/// When a tool was listed, and its resource attributes.
type ListedTool = (Instant, Map<String, Value>);

#[derive(Debug)]
struct Upstream {
    name: String,
    url: reqwest::Url,
    headers: HeaderMap,
    /// Tool name → when it was listed, and its resource attributes (annotations, `server`,
    /// `tool`).
    /// Shared with the answers streaming back, which forget it all when the upstream says
    /// its tools changed.
    tools: Arc<RwLock<HashMap<String, ListedTool>>>,
    /// `Mcp-Session-Id` → the principal whose `initialize` opened it: a session is used only
    /// by the agent that opened it (another agent that learns the id gets a 404).
    sessions: moka::sync::Cache<String, String>,
}

impl Gateway {
    /// From the validated configuration.
    pub fn new(c: &McpConfig) -> Result<Self, String> {
        let mut servers = HashMap::new();
        for s in &c.servers {
            servers.insert(s.name.clone(), Upstream::new(s)?);
        }
        let client = reqwest::Client::builder()
            // An upstream's redirect is not followed: the configured URL is the upstream.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(c.upstream_timeout)
            .read_timeout(c.upstream_timeout)
            .build()
            .map_err(|e| format!("mcp: HTTP client: {e}"))?;
        let mut local = HashMap::new();
        for l in &c.local_principals {
            let p = Principal::from_parts(&l.kind, &l.id, &l.issuer(), l.attributes.clone())
                .map_err(|e| format!("mcp.local_principals (uid {}): {e}", l.uid))?;
            local.insert(l.uid, Arc::new(p));
        }
        Ok(Self {
            servers,
            client,
            max_message_bytes: c.max_message_bytes,
            hold: c.hold,
            local,
        })
    }

    /// The local principal of OS user `uid`, if one is configured.
    pub fn local_principal(&self, uid: u32) -> Option<&Arc<Principal>> {
        self.local.get(&uid)
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Whether `name` is a configured upstream's.
    pub fn serves(&self, name: &str) -> bool {
        self.servers.contains_key(name)
    }

    /// Largest JSON-RPC message accepted from an agent (`mcp.max_message_bytes`).
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }
}

impl Upstream {
    fn new(s: &McpServer) -> Result<Self, String> {
        let url =
            reqwest::Url::parse(&s.url).map_err(|e| format!("mcp server `{}`: {e}", s.name))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &s.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("mcp server `{}` header `{k}`: {e}", s.name))?;
            let value = HeaderValue::from_str(v)
                .map_err(|e| format!("mcp server `{}` header `{k}`: {e}", s.name))?;
            headers.insert(name, value);
        }
        Ok(Self {
            name: s.name.clone(),
            url,
            headers,
            tools: Arc::new(RwLock::new(HashMap::new())),
            sessions: moka::sync::Cache::builder()
                .max_capacity(MAX_SESSIONS)
                .time_to_idle(SESSION_IDLE)
                .build(),
        })
    }

    /// A session the upstream opened (its answer names one the request did not carry)
    /// belongs to the agent that asked.
    fn record_session(&self, asked: &HeaderMap, answer: &reqwest::header::HeaderMap, owner: &str) {
        if asked.contains_key("mcp-session-id") {
            return;
        }
        if let Some(s) = answer.get("mcp-session-id").and_then(|v| v.to_str().ok()) {
            self.sessions.insert(s.to_owned(), owner.to_owned());
        }
    }

    /// What the upstream last said of `name`, if it said it within [`ANNOTATIONS_TTL`].
    fn tool(&self, name: &str) -> Option<Map<String, Value>> {
        let known = self.tools.read().ok()?;
        let (at, attrs) = known.get(name)?;
        (at.elapsed() < ANNOTATIONS_TTL).then(|| attrs.clone())
    }

    /// Remember the annotations of the tools of one `tools/list` page.
    fn learn(&self, tools: &[Value]) {
        let Ok(mut known) = self.tools.write() else {
            return;
        };
        for (name, attrs) in tools.iter().filter_map(|t| tool_attributes(&self.name, t)) {
            known.insert(name.to_owned(), (Instant::now(), attrs));
        }
    }
}

/// The notification an upstream sends when its tools change (`tools/list_changed`).
const LIST_CHANGED: &[u8] = b"notifications/tools/list_changed";

/// Watches an answer streaming back from an upstream for [`LIST_CHANGED`] and forgets every
/// learnt annotation when it passes, so the next call lists the tools again instead of
/// deciding on what they were (for up to [`ANNOTATIONS_TTL`]). The stream itself passes
/// unchanged. A mention of the name anywhere (a tool's result quoting it) counts too: at
/// worst one more `tools/list`.
struct ListChanged {
    tools: Arc<RwLock<HashMap<String, ListedTool>>>,
    /// The end of the previous chunk, for a name split across two.
    carry: Vec<u8>,
    finder: memchr::memmem::Finder<'static>,
}

impl ListChanged {
    fn new(tools: Arc<RwLock<HashMap<String, ListedTool>>>) -> Self {
        Self {
            tools,
            carry: Vec::with_capacity(LIST_CHANGED.len()),
            finder: memchr::memmem::Finder::new(LIST_CHANGED),
        }
    }

    fn scan(&mut self, chunk: &[u8]) {
        let keep = LIST_CHANGED.len() - 1;
        let mut seen = self.finder.find(chunk).is_some();
        if !seen && !self.carry.is_empty() {
            // The name may straddle the boundary: the carried end plus this chunk's start.
            let at = self.carry.len();
            self.carry
                .extend_from_slice(&chunk[..chunk.len().min(keep)]);
            seen = self.finder.find(&self.carry).is_some();
            self.carry.truncate(at);
        }
        if seen && let Ok(mut known) = self.tools.write() {
            known.clear();
        }
        // Keep the last `keep` bytes of everything seen so far.
        if chunk.len() >= keep {
            self.carry.clear();
            self.carry.extend_from_slice(&chunk[chunk.len() - keep..]);
        } else {
            self.carry.extend_from_slice(chunk);
            let excess = self.carry.len().saturating_sub(keep);
            self.carry.drain(..excess);
        }
    }
}

/// A listed tool's name and the attributes of its resource: `server`, `tool`, and the
/// boolean annotations the server declares for it (others are ignored). `None`: it has no
/// name.
pub fn tool_attributes<'a>(server: &str, tool: &'a Value) -> Option<(&'a str, Map<String, Value>)> {
    let name = tool.get("name").and_then(Value::as_str)?;
    let mut attrs = Map::new();
    attrs.insert("server".into(), Value::String(server.to_owned()));
    attrs.insert("tool".into(), Value::String(name.to_owned()));
    if let Some(Value::Object(a)) = tool.get("annotations") {
        for key in ANNOTATIONS {
            if let Some(Value::Bool(b)) = a.get(key) {
                attrs.insert(key.into(), Value::Bool(*b));
            }
        }
    }
    Some((name, attrs))
}

/// Serve one request to `/mcp/{name}`.
pub async fn handle(
    state: &Arc<AppState>,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<McpBody> {
    match serve(state, conn, req).await {
        Ok(resp) => resp,
        Err(e) => boxed(refusal(e)),
    }
}

async fn serve(
    state: &Arc<AppState>,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<McpBody>, ApiError> {
    let gateway = &state.mcp;
    let name = req.uri().path().strip_prefix(PREFIX).unwrap_or_default();
    let Some(upstream) = gateway.servers.get(name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no MCP server `{name}` is configured (`[[mcp.servers]]`)"),
        ));
    };
    let principal = agent(authenticate(state, conn, req.headers()).await?)?;
    let owner = owner_key(&principal);
    // One value each: with two session ids, this gateway would check one and the upstream
    // might use the other (another agent's session).
    if let Some(h) = SESSION_HEADERS
        .iter()
        .find(|h| req.headers().get_all(**h).iter().nth(1).is_some())
    {
        return Ok(rpc_answer(
            StatusCode::BAD_REQUEST,
            Value::Null,
            -32600,
            &format!("`{h}` is sent more than once"),
        ));
    }
    if let Some(session) = req.headers().get("mcp-session-id") {
        let session = session.to_str().unwrap_or_default();
        // Unknown (expired, from before a restart, or guessed) or another agent's: the
        // transport's answer to a session that does not exist, so the client starts anew.
        if upstream.sessions.get(session).as_deref() != Some(owner.as_str()) {
            return Ok(rpc_answer(
                StatusCode::NOT_FOUND,
                Value::Null,
                -32001,
                "no such session for this agent: initialize a new one",
            ));
        }
    }
    match *req.method() {
        Method::POST => {}
        Method::GET | Method::DELETE => {
            let (parts, _) = req.into_parts();
            if parts.method == Method::DELETE
                && let Some(s) = parts
                    .headers
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
            {
                upstream.sessions.invalidate(s);
            }
            return forward(
                gateway,
                upstream,
                &owner,
                parts.method,
                &parts.headers,
                None,
            )
            .await;
        }
        ref m => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("`{m}` is not part of the MCP Streamable HTTP transport"),
            ));
        }
    }
    let (parts, incoming) = req.into_parts();
    if !body::is_json(&parts.headers) {
        return Ok(rpc_answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Value::Null,
            -32700,
            "an MCP message is `application/json`",
        ));
    }
    let bytes = read_message(
        &parts.headers,
        incoming,
        (gateway.max_message_bytes, "mcp.max_message_bytes"),
        state,
    )
    .await?;
    let message = match read(body::parse_value(&bytes)) {
        Ok(m) => m,
        Err(refusal) => return Ok(answer(StatusCode::BAD_REQUEST, &refusal.answer())),
    };
    let id = message.get("id").cloned();
    let method = message.get("method").and_then(Value::as_str);
    match (method, id) {
        (Some("tools/call"), Some(id)) => {
            return call(
                state,
                upstream,
                &principal,
                &parts.headers,
                &message,
                id,
                bytes,
            )
            .await;
        }
        (Some(m), Some(id)) if let Some(kind) = Listed::of(m) => {
            return list(
                state,
                upstream,
                &principal,
                &parts.headers,
                &id,
                kind,
                bytes,
            )
            .await;
        }
        (Some(m @ ("resources/read" | "prompts/get")), Some(id)) => {
            if let Verdict::Answer(v) =
                decide_other(state, &upstream.name, &principal, m, &message, id).await
            {
                return Ok(answer(StatusCode::OK, &v));
            }
        }
        // Everything else is forwarded undecided.
        _ => {}
    }
    forward(
        gateway,
        upstream,
        &owner,
        Method::POST,
        &parts.headers,
        Some(bytes),
    )
    .await
}

/// A client message refused before any decision: the id to answer (null when it cannot be
/// known), the JSON-RPC error code, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub id: Value,
    pub code: i64,
    pub message: String,
}

impl Refusal {
    fn new(id: Value, code: i64, message: impl Into<String>) -> Self {
        Self {
            id,
            code,
            message: message.into(),
        }
    }

    /// The JSON-RPC error answering the message.
    pub fn answer(&self) -> Value {
        rpc_error(self.id.clone(), self.code, &self.message)
    }
}

/// One client message, as the gateway and the stdio wrapper (`mandate mcp wrap`) read it:
/// strict JSON (a duplicate key is refused), one JSON-RPC 2.0 object, and a decided method
/// only as a request.
pub fn read(parsed: Result<Value, ApiError>) -> Result<Map<String, Value>, Refusal> {
    let message = match parsed {
        Ok(Value::Object(m)) => m,
        Ok(Value::Array(_)) => {
            return Err(Refusal::new(
                Value::Null,
                -32600,
                "a batch (JSON array) is not accepted: send one JSON-RPC message at a time",
            ));
        }
        Ok(_) => {
            return Err(Refusal::new(
                Value::Null,
                -32600,
                "a JSON-RPC message is an object",
            ));
        }
        Err(e) => {
            return Err(Refusal::new(
                Value::Null,
                -32700,
                format!("{}{}", e.message, field_note(e.field.as_deref())),
            ));
        }
    };
    let id = message.get("id").cloned();
    if message.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(Refusal::new(
            id.unwrap_or(Value::Null),
            -32600,
            "`jsonrpc` must be \"2.0\"",
        ));
    }
    if let Some(m) = message
        .get("method")
        .and_then(Value::as_str)
        .filter(|m| is_decided(m))
        && id.as_ref().is_none_or(Value::is_null)
    {
        // Fail closed: a notification cannot be answered, so it is never decided, and a
        // server that executed it anyway would act unchecked.
        return Err(Refusal::new(
            Value::Null,
            -32600,
            format!("`{m}` must be a request with an `id`"),
        ));
    }
    Ok(message)
}

/// Whether messages of `method` are decided before they reach the server.
pub fn is_decided(method: &str) -> bool {
    DECIDED.contains(&method)
}

fn field_note(field: Option<&str>) -> String {
    field.map(|f| format!(" (at `{f}`)")).unwrap_or_default()
}

/// The message, within `mcp.max_message_bytes` and `server.body_read_timeout`.
pub(super) async fn read_message(
    headers: &HeaderMap,
    incoming: Incoming,
    (limit, limit_name): (usize, &str),
    state: &AppState,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the message is larger than {limit_name} ({limit})"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(
        state.server.body_read_timeout,
        Limited::new(incoming, limit).collect(),
    )
    .await;
    match collected {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the message did not arrive within server.body_read_timeout",
        )),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("cannot read the message: {e}"),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Decide a `tools/call`; forward it only on an allow.
async fn call(
    state: &Arc<AppState>,
    upstream: &Upstream,
    principal: &Arc<Principal>,
    headers: &HeaderMap,
    message: &Map<String, Value>,
    id: Value,
    bytes: Bytes,
) -> Result<Response<McpBody>, ApiError> {
    let call = super::call_from(state, Api::Mcp, headers);
    let (tool, arguments) = match call_params(message) {
        Ok(p) => p,
        Err(why) => return Ok(rpc_answer(StatusCode::OK, id, -32602, &why)),
    };
    let attributes = match annotations(state, upstream, headers, tool).await? {
        Ok(a) => a,
        // Fail closed: without the tool's annotations there is nothing certain to decide on.
        Err(why) => return Ok(rpc_answer(StatusCode::OK, id, -32602, &why)),
    };
    let req = tool_check(
        state,
        &upstream.name,
        principal,
        tool,
        attributes,
        arguments,
    );
    let settled = state.service.check(&req, call).await;
    if let Some(approval) = held_approval(state, &settled)
        && let Some(token) = progress_token(message)
        && accepts_sse(headers)
    {
        let pending = Pending {
            held: Held::new(state, req, approval, settled),
            server: upstream.name.clone(),
            headers: headers.clone(),
            bytes,
            id,
        };
        return Ok(pending.stream(token));
    }
    match settle_call(state, req, settled, id).await {
        Verdict::Forward => {
            let owner = owner_key(principal);
            forward(
                &state.mcp,
                upstream,
                &owner,
                Method::POST,
                headers,
                Some(bytes),
            )
            .await
        }
        Verdict::Answer(v) => Ok(answer(StatusCode::OK, &v)),
    }
}

/// What becomes of a decided message: sent on to the server as received, or answered here
/// (and never sent).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Forward,
    Answer(Value),
}

/// The tool and arguments of a `tools/call`; `Err`: why its params cannot be decided on.
pub fn call_params(message: &Map<String, Value>) -> Result<(&str, Map<String, Value>), String> {
    let params = message.get("params").and_then(Value::as_object);
    let Some(tool) = params.and_then(|p| p.get("name")).and_then(Value::as_str) else {
        return Err("`params.name` (the tool) is required".into());
    };
    let arguments = match params.and_then(|p| p.get("arguments")) {
        None => Map::new(),
        Some(Value::Object(a)) => a.clone(),
        Some(_) => return Err("`params.arguments` must be an object".into()),
    };
    Ok((tool, arguments))
}

/// The progress token a request asked its progress to be reported under.
pub fn progress_token(message: &Map<String, Value>) -> Option<Value> {
    message
        .get("params")
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get("progressToken"))
        .cloned()
}

/// The approval request an escalated call is held for, when `mcp.hold` is set.
fn held_approval(state: &AppState, settled: &Settled) -> Option<String> {
    match (&settled.decision.outcome, &settled.approval) {
        (Outcome::Escalate, Some(a)) if !state.mcp.hold.is_zero() => Some(a.id.to_string()),
        _ => None,
    }
}

/// A tool call's check, settled: forwarded on an allow (at once, or once its approval
/// request is approved within `mcp.hold`), else answered in-band.
pub(super) async fn settle_call(
    state: &Arc<AppState>,
    req: CheckRequest,
    settled: Settled,
    id: Value,
) -> Verdict {
    let released = match (&settled.decision.outcome, held_approval(state, &settled)) {
        (Outcome::Allow, _) => Ok(()),
        (_, Some(approval)) => Held::new(state, req, approval, settled).wait().await,
        _ => Err(settled),
    };
    match released {
        Ok(()) => Verdict::Forward,
        Err(s) => {
            let public_url = state.server.public_url.as_deref().unwrap_or_default();
            Verdict::Answer(in_band(id, &s, public_url))
        }
    }
}

/// Decide a `resources/read` or `prompts/get` of `server`: forwarded on an allow, else
/// refused with a JSON-RPC error carrying the decision.
pub(super) async fn decide_other(
    state: &AppState,
    server: &str,
    principal: &Arc<Principal>,
    method: &str,
    message: &Map<String, Value>,
    id: Value,
) -> Verdict {
    let req = match other_check(server, principal, method, message) {
        Ok(req) => req,
        Err(why) => return Verdict::Answer(rpc_error(id, -32602, &why)),
    };
    let settled = state.service.check(&req, Call::new(Api::Mcp)).await;
    if settled.decision.outcome == Outcome::Allow {
        return Verdict::Forward;
    }
    let public_url = state.server.public_url.as_deref().unwrap_or_default();
    Verdict::Answer(refused(id, &settled, &explain(&settled, public_url)))
}

fn accepts_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// An escalated tool call held open for `mcp.hold` while its approval request is pending:
/// allowed if it is approved in time and the check, made again, now allows it (under the
/// grant); else the escalation (or the new decision) stands.
struct Held {
    state: Arc<AppState>,
    approval: String,
    req: CheckRequest,
    escalated: Settled,
}

/// How often a held call with a progress token hears that it is still waiting.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Held {
    fn new(state: &Arc<AppState>, req: CheckRequest, approval: String, escalated: Settled) -> Self {
        Self {
            state: state.clone(),
            approval,
            req,
            escalated,
        }
    }

    /// Wait up to `wait` for the approval request to leave `pending`: whether it was
    /// approved.
    async fn approved_by(&self, wait: std::time::Duration) -> Option<bool> {
        let caller = crate::service::Caller::Agent(self.req.principal.clone());
        match self
            .state
            .service
            .show(&caller, &self.approval, Some(wait))
            .await
        {
            Ok(r) if r.status == crate::approval::Status::Pending => None,
            Ok(r) => Some(r.status == crate::approval::Status::Approved),
            // The store failing while held: the escalation stands (fail closed).
            Err(_) => Some(false),
        }
    }

    /// After the wait (`approved`: the request was approved in time): `Ok` if the check,
    /// made again, allows the call; else the decision to answer with.
    async fn release(self, approved: bool) -> Result<(), Settled> {
        if !approved {
            return Err(self.escalated);
        }
        let again = self
            .state
            .service
            .check(&self.req, Call::new(Api::Mcp))
            .await;
        match again.decision.outcome {
            Outcome::Allow => Ok(()),
            _ => Err(again),
        }
    }

    /// Hold without progress: one wait, then the outcome.
    async fn wait(self) -> Result<(), Settled> {
        let approved = self.approved_by(self.state.mcp.hold).await == Some(true);
        self.release(approved).await
    }
}

/// A held gateway call and what forwarding it takes.
struct Pending {
    held: Held,
    server: String,
    headers: HeaderMap,
    bytes: Bytes,
    id: Value,
}

impl Pending {
    /// Hold with progress: an SSE answer whose first events are `notifications/progress`
    /// (every few seconds, naming the approval request), and whose last is the call's result:
    /// the upstream's (its own events passed through) or the escalation.
    fn stream(self, token: Value) -> Response<McpBody> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        tokio::spawn(async move {
            let state = self.held.state.clone();
            let until = tokio::time::Instant::now() + state.mcp.hold;
            let mut step = 0u64;
            let mut approved = false;
            loop {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                step += 1;
                let note = json!({"jsonrpc": "2.0", "method": "notifications/progress",
                    "params": {"progressToken": token, "progress": step,
                               "message": format!("waiting for approval request {}", self.held.approval)}});
                if tx.send(sse_event(&note.to_string())).await.is_err() {
                    return; // The client went away.
                }
                match self.held.approved_by(left.min(PROGRESS_EVERY)).await {
                    None => {}
                    Some(a) => {
                        approved = a;
                        break;
                    }
                }
            }
            let id = self.id.clone();
            let public_url = state.server.public_url.clone().unwrap_or_default();
            let owner = owner_key(&self.held.req.principal);
            let answered = match self.held.release(approved).await {
                Err(s) => Ok(answer(StatusCode::OK, &in_band(self.id, &s, &public_url))),
                Ok(()) => match state.mcp.servers.get(&self.server) {
                    Some(upstream) => {
                        forward(
                            &state.mcp,
                            upstream,
                            &owner,
                            Method::POST,
                            &self.headers,
                            Some(self.bytes),
                        )
                        .await
                    }
                    None => Ok(rpc_answer(
                        StatusCode::OK,
                        id.clone(),
                        -32603,
                        "the MCP server is no longer configured",
                    )),
                },
            };
            let resp = match answered {
                Ok(r) => r,
                Err(e) => rpc_answer(StatusCode::OK, id, -32603, &e.message),
            };
            pipe_as_sse(resp, &tx).await;
        });
        let mut r = Response::new(ChannelBody(rx).boxed_unsync());
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        r.headers_mut()
            .insert("cache-control", HeaderValue::from_static("no-cache"));
        r
    }
}

fn sse_event(data: &str) -> Bytes {
    Bytes::from(format!("event: message\ndata: {data}\n\n"))
}

/// An answer into an SSE stream: an SSE answer's bytes as they come, a JSON one as one event.
async fn pipe_as_sse(resp: Response<McpBody>, tx: &tokio::sync::mpsc::Sender<Bytes>) {
    let sse = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut body = resp.into_body();
    if sse {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data()
                && tx.send(data).await.is_err()
            {
                return;
            }
        }
        return;
    }
    if let Ok(whole) = body.collect().await {
        let text = String::from_utf8_lossy(&whole.to_bytes()).into_owned();
        let _ = tx.send(sse_event(text.trim())).await;
    }
}

/// A body fed by a channel (a held call's SSE answer).
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// The check of calling `tool` of `server` with `arguments`.
pub(super) fn tool_check(
    state: &AppState,
    server: &str,
    principal: &Arc<Principal>,
    tool: &str,
    attributes: Map<String, Value>,
    arguments: Map<String, Value>,
) -> CheckRequest {
    let own = format!("mcp:{server}/{tool}");
    let bundle = state.service.engine.bundle();
    let action = match bundle.slice(&own) {
        Some(_) => own,
        None => CALL_ACTION.to_owned(),
    };
    let mut context = Map::new();
    context.insert("arguments".into(), Value::Object(arguments));
    CheckRequest {
        principal: principal.clone(),
        action,
        action_properties: None,
        resource: Resource {
            kind: TOOL_TYPE.to_owned(),
            id: format!("{server}/{tool}"),
            properties: attributes,
        },
        context,
    }
}

/// The resource attributes of `tool`: known from a `tools/list` seen before, or asked of
/// the upstream now (in the agent's session). `Err`: why they cannot be known (the upstream
/// does not list the tool, or refused to list its tools).
async fn annotations(
    state: &AppState,
    upstream: &Upstream,
    headers: &HeaderMap,
    tool: &str,
) -> Result<Result<Map<String, Value>, String>, ApiError> {
    if let Some(a) = upstream.tool(tool) {
        return Ok(Ok(a));
    }
    let mut cursor: Option<String> = None;
    for page in 0..MAX_LIST_PAGES {
        let mut params = Map::new();
        if let Some(c) = &cursor {
            params.insert("cursor".into(), Value::String(c.clone()));
        }
        let ask = json!({"jsonrpc": "2.0", "id": format!("mandate-tools-{page}"), "method": "tools/list", "params": params});
        let resp = send(
            &state.mcp,
            upstream,
            Method::POST,
            headers,
            Some(Bytes::from(ask.to_string())),
        )
        .await?;
        let status = resp.status();
        let (_, body) = read_answer(resp).await?;
        if !status.is_success() {
            return Ok(Err(format!(
                "MCP server `{}` answered {status} when asked for its tools/list, so tool \
                 `{tool}` cannot be decided (has the session been initialized?)",
                upstream.name
            )));
        }
        let mut next = None;
        for msg in messages(&body) {
            if let Some(e) = msg.get("error") {
                return Ok(Err(format!(
                    "MCP server `{}` refused tools/list ({e}), so tool `{tool}` cannot be decided",
                    upstream.name
                )));
            }
            if let Some(result) = msg.get("result") {
                if let Some(Value::Array(tools)) = result.get("tools") {
                    upstream.learn(tools);
                }
                next = result
                    .get("nextCursor")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
            }
        }
        if let Some(a) = upstream.tool(tool) {
            return Ok(Ok(a));
        }
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(Err(not_listed(&upstream.name, tool)))
}

/// Why a call to a tool its server does not list cannot be decided.
pub(super) fn not_listed(server: &str, tool: &str) -> String {
    format!("tool `{tool}` is not in the tools/list of MCP server `{server}`")
}

/// What a `*/list` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    Tools,
    Resources,
    Prompts,
}

impl Listed {
    /// The list a method asks for, if it is one of the three filtered.
    pub fn of(method: &str) -> Option<Self> {
        [Listed::Tools, Listed::Resources, Listed::Prompts]
            .into_iter()
            .find(|l| l.method() == method)
    }

    /// The method that asks for it.
    pub fn method(self) -> &'static str {
        match self {
            Listed::Tools => "tools/list",
            Listed::Resources => "resources/list",
            Listed::Prompts => "prompts/list",
        }
    }

    /// The array of the result that holds the items.
    pub fn key(self) -> &'static str {
        match self {
            Listed::Tools => "tools",
            Listed::Resources => "resources",
            Listed::Prompts => "prompts",
        }
    }
}

/// `tools/list`, `resources/list`, `prompts/list`: the upstream's answer, filtered for this
/// agent.
async fn list(
    state: &AppState,
    upstream: &Upstream,
    principal: &Arc<Principal>,
    headers: &HeaderMap,
    id: &Value,
    kind: Listed,
    bytes: Bytes,
) -> Result<Response<McpBody>, ApiError> {
    let resp = send(&state.mcp, upstream, Method::POST, headers, Some(bytes)).await?;
    upstream.record_session(headers, resp.headers(), &owner_key(principal));
    let status = resp.status();
    let answer_headers = answer_headers(resp.headers());
    let (sse, body) = read_answer(resp).await?;
    let filter = |msg: &mut Value| {
        if msg.get("id") != Some(id) {
            return;
        }
        let Some(Value::Array(items)) = msg.get_mut("result").and_then(|r| r.get_mut(kind.key()))
        else {
            return;
        };
        if let Listed::Tools = kind {
            upstream.learn(items);
        }
        filter_list(state, &upstream.name, principal, kind, items);
    };
    let out = match sse {
        true => rewrite_sse(&body, filter),
        false => match serde_json::from_slice::<Value>(&body) {
            Ok(mut v) => {
                filter(&mut v);
                Bytes::from(v.to_string())
            }
            Err(_) => body,
        },
    };
    let mut r = Response::new(full(out));
    *r.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    *r.headers_mut() = answer_headers;
    r.headers_mut().remove(CONTENT_LENGTH);
    Ok(r)
}

/// The items of one `*/list` answer of `server` that `principal` may see, marked where they
/// need approval.
pub(super) fn filter_list(
    state: &AppState,
    server: &str,
    principal: &Arc<Principal>,
    kind: Listed,
    items: &mut Vec<Value>,
) {
    items.retain_mut(|item| visible(state, server, principal, kind, item));
}

/// Whether a listed tool, resource or prompt may be shown to `principal`, marking it when it
/// needs approval. A probe decision (not recorded) with no arguments: allowed or escalated,
/// it is shown; denied only because a policy needed arguments it did not have (a
/// `policy_error`, or an `invalid_request` for a tool whose action declares the types of its
/// arguments), it is shown too, as some arguments may be allowed; denied outright
/// (forbidden, or no policy could apply), or not identifiable, it is hidden.
fn visible(
    state: &AppState,
    server: &str,
    principal: &Arc<Principal>,
    kind: Listed,
    tool: &mut Value,
) -> bool {
    let (key, method) = match kind {
        Listed::Tools => ("name", ""),
        Listed::Resources => ("uri", "resources/read"),
        Listed::Prompts => ("name", "prompts/get"),
    };
    let Some(name) = tool.get(key).and_then(Value::as_str).map(str::to_owned) else {
        return false;
    };
    let req = match kind {
        Listed::Tools => {
            let Some((_, attributes)) = tool_attributes(server, tool) else {
                return false;
            };
            tool_check(state, server, principal, &name, attributes, Map::new())
        }
        Listed::Resources | Listed::Prompts => {
            let mut params = Map::new();
            params.insert(key.into(), Value::String(name));
            let mut message = Map::new();
            message.insert("params".into(), Value::Object(params));
            match other_check(server, principal, method, &message) {
                Ok(req) => req,
                Err(_) => return false,
            }
        }
    };
    let d = state.service.engine.decide(&req);
    match d.outcome {
        Outcome::Allow => true,
        Outcome::Escalate => {
            if let Some(t) = tool.as_object_mut() {
                let meta = t
                    .entry("_meta")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(m) = meta.as_object_mut() {
                    m.insert(APPROVAL_META.into(), Value::String("required".into()));
                }
            }
            true
        }
        Outcome::Deny => {
            // A tool whose action types its arguments (`mandate mcp schema`) is refused by
            // the probe's empty arguments before any policy reads them.
            let typed = matches!(kind, Listed::Tools)
                && state
                    .service
                    .engine
                    .bundle()
                    .slice(&req.action)
                    .is_some_and(|s| s.context_shape().is_some());
            d.reasons
                .iter()
                .any(|r| r.code == "policy_error" || (typed && r.code == "invalid_request"))
        }
    }
}

/// Forward one request and stream the upstream's answer back.
async fn forward(
    gateway: &Gateway,
    upstream: &Upstream,
    owner: &str,
    method: Method,
    headers: &HeaderMap,
    body: Option<Bytes>,
) -> Result<Response<McpBody>, ApiError> {
    let resp = send(gateway, upstream, method, headers, body).await?;
    upstream.record_session(headers, resp.headers(), owner);
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = answer_headers(resp.headers());
    let streamed: http::Response<reqwest::Body> = resp.into();
    let mut watch = ListChanged::new(upstream.tools.clone());
    let mut r = Response::new(
        streamed
            .into_body()
            .map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    watch.scan(data);
                }
                frame
            })
            .map_err(std::io::Error::other)
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    Ok(r)
}

async fn send(
    gateway: &Gateway,
    upstream: &Upstream,
    method: Method,
    headers: &HeaderMap,
    body: Option<Bytes>,
) -> Result<reqwest::Response, ApiError> {
    let mut out = reqwest::header::HeaderMap::new();
    for name in SESSION_HEADERS {
        for v in headers.get_all(name) {
            if let (Ok(n), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_bytes(v.as_bytes()),
            ) {
                out.append(n, v);
            }
        }
    }
    if !out.contains_key(ACCEPT.as_str()) {
        out.insert(
            reqwest::header::ACCEPT,
            reqwest::header::HeaderValue::from_static("application/json, text/event-stream"),
        );
    }
    for (k, v) in &upstream.headers {
        if let (Ok(n), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(k.as_str().as_bytes()),
            reqwest::header::HeaderValue::from_bytes(v.as_bytes()),
        ) {
            out.insert(n, v);
        }
    }
    let method =
        reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut rb = gateway
        .client
        .request(method, upstream.url.clone())
        .headers(out);
    if let Some(b) = body {
        rb = rb
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(b);
    }
    rb.send().await.map_err(|e| {
        tracing::warn!(server = %upstream.name, error = %e, "mcp: upstream request failed");
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            format!("MCP server `{}` did not answer: {e}", upstream.name),
        )
    })
}

/// The answer headers passed back to the agent.
fn answer_headers(h: &reqwest::header::HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in ANSWER_HEADERS {
        for v in h.get_all(name) {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(v.as_bytes()),
            ) {
                out.append(n, v);
            }
        }
    }
    out
}

/// A whole upstream answer (bounded) and whether it is an SSE stream.
async fn read_answer(resp: reqwest::Response) -> Result<(bool, Bytes), ApiError> {
    let sse = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let streamed: http::Response<reqwest::Body> = resp.into();
    let bytes = Limited::new(streamed.into_body(), MAX_LIST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                format!("the MCP server's answer could not be read: {e}"),
            )
        })?
        .to_bytes();
    Ok((sse, bytes))
}

/// The JSON-RPC messages of an answer: the one JSON body, or each SSE event's data.
pub fn messages(body: &Bytes) -> Vec<Value> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return vec![v];
    }
    sse_events(body)
        .iter()
        .filter_map(|e| serde_json::from_str(&event_data(e)).ok())
        .collect()
}

/// SSE events (blank-line separated), each as its lines.
fn sse_events(body: &[u8]) -> Vec<Vec<String>> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.lines().map(str::to_owned).collect())
        .collect()
}

fn event_data(lines: &[String]) -> String {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The SSE stream with `f` applied to each event's JSON message; other lines (`id:`,
/// `event:`, comments) as they were.
fn rewrite_sse(body: &[u8], mut f: impl FnMut(&mut Value)) -> Bytes {
    let mut out = String::new();
    for lines in sse_events(body) {
        let data = event_data(&lines);
        let message = serde_json::from_str::<Value>(&data).ok().map(|mut v| {
            f(&mut v);
            v.to_string()
        });
        let mut wrote_data = false;
        for l in &lines {
            if l.starts_with("data:") {
                match &message {
                    Some(m) if !wrote_data => {
                        out.push_str("data: ");
                        out.push_str(m);
                        out.push('\n');
                        wrote_data = true;
                    }
                    Some(_) => {}
                    None => {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            } else {
                out.push_str(l);
                out.push('\n');
            }
        }
        out.push('\n');
    }
    Bytes::from(out)
}

/// Who owns a session: the principal, as its type, id and issuer.
fn owner_key(p: &Principal) -> String {
    format!("{}::{}@{}", p.kind, p.id, p.issuer)
}

/// The check of a `resources/read` (`mcp:read` on `McpResource::"<server>/<uri>"`) or a
/// `prompts/get` (`mcp:prompt` on `McpPrompt::"<server>/<name>"`, its arguments in the
/// context).
fn other_check(
    server: &str,
    principal: &Arc<Principal>,
    method: &str,
    message: &Map<String, Value>,
) -> Result<CheckRequest, String> {
    let params = message.get("params").and_then(Value::as_object);
    let (action, kind, key, attr) = match method {
        "resources/read" => ("mcp:read", "McpResource", "uri", "uri"),
        _ => ("mcp:prompt", "McpPrompt", "name", "prompt"),
    };
    let Some(name) = params.and_then(|p| p.get(key)).and_then(Value::as_str) else {
        return Err(format!("`params.{key}` is required"));
    };
    let mut properties = Map::new();
    properties.insert("server".into(), Value::String(server.to_owned()));
    properties.insert(attr.into(), Value::String(name.to_owned()));
    let mut context = Map::new();
    if method == "prompts/get" {
        let arguments = match params.and_then(|p| p.get("arguments")) {
            None => Map::new(),
            Some(Value::Object(a)) => a.clone(),
            Some(_) => return Err("`params.arguments` must be an object".into()),
        };
        context.insert("arguments".into(), Value::Object(arguments));
    }
    Ok(CheckRequest {
        principal: principal.clone(),
        action: action.to_owned(),
        action_properties: None,
        resource: Resource {
            kind: kind.to_owned(),
            id: format!("{server}/{name}"),
            properties,
        },
        context,
    })
}

/// A refused `resources/read` or `prompts/get`: a JSON-RPC error (these results have no
/// error flag), the decision in its `data`.
fn refused(id: Value, settled: &Settled, text: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {
        "code": -32003, "message": text, "data": decision_value(settled)}})
}

/// What the model reads about a refusal: why, or where the approval is awaited.
fn explain(settled: &Settled, public_url: &str) -> String {
    let d = &settled.decision;
    match (&d.outcome, &settled.approval) {
        (Outcome::Escalate, Some(a)) => format!(
            "Mandate: this call needs approval. Approval request {id} was created \
             ({public_url}/v1/approvals/{id}); it expires at {expires}. Once it is approved, \
             {retry} (decision {decision})",
            id = a.id,
            expires = crate::clock::rfc3339(a.expires_at),
            retry = retry_hint(
                d.approval
                    .as_ref()
                    .map(|r| r.grant_scope)
                    .unwrap_or_default()
            ),
            decision = d.id,
        ),
        _ => format!(
            "Mandate denied this call: {}. (decision {})",
            d.reasons
                .iter()
                .map(|r| r.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            d.id
        ),
    }
}

/// What the agent may retry once an approval is granted, by the grant's scope.
fn retry_hint(scope: GrantScope) -> &'static str {
    match scope {
        GrantScope::Call => {
            "retry exactly the same request; other arguments need their own approval."
        }
        GrantScope::Tool => {
            "this tool may be called with any arguments for the grant's lifetime \
             (while the same policies ask)."
        }
        GrantScope::Resource => {
            "any action on this tool's resource may be requested, with any arguments, for \
             the grant's lifetime (while the same policies ask)."
        }
    }
}

/// A denied or escalated tool call, answered in the MCP session: the model reads the text,
/// a client reads `structuredContent`.
fn in_band(id: Value, settled: &Settled, public_url: &str) -> Value {
    let text = explain(settled, public_url);
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "result": {
            "content": [{"type": "text", "text": text}],
            "isError": true,
            "structuredContent": decision_value(settled),
        },
    })
}

/// A JSON-RPC error.
pub fn rpc_error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// A JSON-RPC message as the gateway's answer.
fn answer(status: StatusCode, message: &Value) -> Response<McpBody> {
    let mut r = Response::new(full(Bytes::from(message.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A JSON-RPC error as the gateway's answer.
fn rpc_answer(status: StatusCode, id: Value, code: i64, message: &str) -> Response<McpBody> {
    answer(status, &rpc_error(id, code, message))
}

fn full(b: Bytes) -> McpBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// An API answer as a gateway answer.
pub fn boxed(r: Response<super::Body>) -> Response<McpBody> {
    r.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_rewritten_message_by_message_and_other_lines_kept() {
        let body = b"event: message\r\nid: 1\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\r\n\r\n\
                     : a comment\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\n\
                     data: \"result\":{\"tools\":[{\"name\":\"a\"},{\"name\":\"b\"}]}}\n\n";
        let out = rewrite_sse(body, |m| {
            if let Some(Value::Array(t)) = m.pointer_mut("/result/tools") {
                t.retain(|t| t["name"] != "b");
            }
        });
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains("event: message\nid: 1\n"), "{text}");
        assert!(text.contains(": a comment\n"), "{text}");
        // The multi-line data is one message, filtered, written once.
        let msgs = messages(&out);
        assert_eq!(msgs.len(), 2, "{text}");
        assert_eq!(msgs[1]["result"]["tools"], json!([{"name": "a"}]));
        // A JSON answer is one message.
        assert_eq!(
            messages(&Bytes::from_static(b"{\"id\":1}")),
            [json!({"id": 1})]
        );
    }

    #[test]
    fn a_message_is_one_jsonrpc_object_and_a_decided_one_a_request() {
        let code = |v: Value| read(Ok(v)).map(|_| ()).map_err(|r| (r.id, r.code));
        assert_eq!(
            code(json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}])),
            Err((Value::Null, -32600))
        );
        assert_eq!(code(json!("tools/call")), Err((Value::Null, -32600)));
        assert_eq!(
            code(json!({"jsonrpc": "1.0", "id": 4, "method": "ping"})),
            Err((json!(4), -32600))
        );
        for method in DECIDED {
            assert_eq!(
                code(json!({"jsonrpc": "2.0", "method": method})),
                Err((Value::Null, -32600))
            );
            assert_eq!(
                code(json!({"jsonrpc": "2.0", "id": null, "method": method})),
                Err((Value::Null, -32600))
            );
            assert_eq!(
                code(json!({"jsonrpc": "2.0", "id": 1, "method": method})),
                Ok(())
            );
        }
        // Other notifications pass.
        assert_eq!(
            code(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})),
            Ok(())
        );
        let parse = read(body::parse_value(br#"{"id":1,"id":2}"#)).unwrap_err();
        assert_eq!(parse.code, -32700);
        assert!(parse.message.contains("duplicate key `id`"), "{parse:?}");
        for kind in [Listed::Tools, Listed::Resources, Listed::Prompts] {
            assert_eq!(Listed::of(kind.method()), Some(kind));
        }
        assert_eq!(Listed::of("tools/call"), None);
    }

    #[test]
    fn a_tools_list_changed_passing_by_forgets_what_was_learnt_even_split_across_chunks() {
        let u = Upstream::new(&McpServer {
            name: "tools".into(),
            url: "http://127.0.0.1:1/mcp".into(),
            headers: vec![],
        })
        .unwrap();
        let note = br#"event: message
data: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}

"#;
        let learn = || u.learn(&[json!({"name": "read", "annotations": {"readOnlyHint": true}})]);
        // Whole, or split at every byte: forgotten either way.
        for split in 0..=note.len() {
            learn();
            let mut watch = ListChanged::new(u.tools.clone());
            watch.scan(&note[..split]);
            watch.scan(&note[split..]);
            assert!(u.tool("read").is_none(), "split at {split}");
        }
        // In small pieces, as a slow stream may deliver it.
        for size in 1..=8 {
            learn();
            let mut watch = ListChanged::new(u.tools.clone());
            for part in note.chunks(size) {
                watch.scan(part);
            }
            assert!(u.tool("read").is_none(), "chunks of {size}");
        }
        // Other traffic leaves it alone, however it is cut.
        learn();
        let mut watch = ListChanged::new(u.tools.clone());
        let other = br#"data: {"jsonrpc":"2.0","method":"notifications/tools/list"}"#;
        for part in other.chunks(7) {
            watch.scan(part);
        }
        watch.scan(b"notifications/tools/list_chang");
        watch.scan(b"ing");
        assert!(u.tool("read").is_some());
    }

    #[test]
    fn learnt_annotations_are_booleans_with_server_and_tool() {
        let u = Upstream::new(&McpServer {
            name: "tools".into(),
            url: "http://127.0.0.1:1/mcp".into(),
            headers: vec![],
        })
        .unwrap();
        u.learn(&[
            json!({"name": "read", "annotations": {"readOnlyHint": true, "title": "x", "destructiveHint": "yes"}}),
            json!({"title": "no name"}),
        ]);
        assert_eq!(
            Value::Object(u.tool("read").unwrap()),
            json!({"server": "tools", "tool": "read", "readOnlyHint": true})
        );
        assert!(u.tool("no name").is_none());
    }
}
