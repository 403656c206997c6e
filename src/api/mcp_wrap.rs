//! The decisions of `mandate mcp wrap` (issue 13): a local stdio MCP server, run as a child of
//! the agent's own wrapper, has no URL for the gateway to front, so the wrapper asks here,
//! message by message, and the gateway's own functions ([`super::mcp`]) answer: the same
//! checks, refusal texts, held escalations and list filtering as `/mcp/{name}`.
//!
//! - `POST /v1/mcp/decide` `{"server", "message", "tools"?}`: `message` is one JSON-RPC
//!   message from the agent's client, `tools` the child's `tools/list` (for a `tools/call`,
//!   so its annotations are known). Answer: `{"forward": true}`, or `{"forward": false,
//!   "answer": …}` with the JSON-RPC response to give the client instead.
//! - `POST /v1/mcp/filter` `{"server", "method", "result"}`: a `tools/list`,
//!   `resources/list` or `prompts/list` result of the child. Answer: `{"result": …}`
//!   without what this agent may never use, marked where it needs approval.
//!
//! Both take the agent's own workload token, verified as `/mcp/{name}` verifies it, or, on
//! the Unix socket only, no token from a process whose OS user is a configured local
//! principal ([`caller`]). The decisions are the server's (policy, grants, approvals,
//! audit); the wrapper only carries them out, and refuses whatever it could not get decided.
//!
//! Trust: `server` is the name the wrapper was started with (`--name`): a label in the
//! agent's own tool configuration, not a configured upstream, and `tools` is what the child
//! said of itself, relayed by the agent's own process. Policies keyed on a stdio server's
//! name or annotations are only as strong as that; what a policy denies by the principal,
//! the tool's name or its arguments stays denied under any name. A name of a configured
//! `[[mcp.servers]]` upstream is refused, so a decision recorded for one of its tools is
//! always about that upstream.

use crate::metrics::Api;
use crate::service::Call;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::{Map, Value, json};

use super::body;
use super::caller::authenticate;
use super::forward_auth::{agent, refusal};
use super::mcp::{self, Listed, Verdict};
use super::{ApiError, AppState, Body, ConnInfo, json_response};
use crate::config::mcp_server_name_ok;
use crate::strict_json::shown;
use crate::vocabulary::Principal;

/// `POST /v1/mcp/decide`.
pub const DECIDE: &str = "/v1/mcp/decide";
/// `POST /v1/mcp/filter`.
pub const FILTER: &str = "/v1/mcp/filter";

/// `POST /v1/mcp/decide`: whether one client message may reach the wrapped server.
pub async fn decide(
    state: &Arc<AppState>,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<Body> {
    match decide_inner(state, conn, req).await {
        Ok(Verdict::Forward) => json_response(StatusCode::OK, &json!({"forward": true})),
        Ok(Verdict::Answer(answer)) => {
            json_response(StatusCode::OK, &json!({"forward": false, "answer": answer}))
        }
        Err(e) => refusal(e),
    }
}

/// `POST /v1/mcp/filter`: a list result of the wrapped server, as this agent may see it.
pub async fn filter(state: &AppState, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    match filter_inner(state, conn, req).await {
        Ok(result) => json_response(StatusCode::OK, &json!({"result": result})),
        Err(e) => refusal(e),
    }
}

async fn decide_inner(
    state: &Arc<AppState>,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Verdict, ApiError> {
    let origin = super::call_from(state, Api::Mcp, req.headers());
    let (principal, body) = read_body(state, conn, req).await?;
    body::only_known(&body, "", &["server", "message", "tools"])?;
    let server = server_name(state, &body)?;
    let tools = match body.get("tools") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(t)) => t.as_slice(),
        Some(other) => {
            return Err(ApiError::field(
                "tools",
                format!(
                    "must be the array of a tools/list result, not {}",
                    body::kind(other)
                ),
            ));
        }
    };
    let Some(message) = body.get("message") else {
        return Err(ApiError::field("message", "is required"));
    };
    let limit = state.mcp.max_message_bytes();
    if message.to_string().len() > limit {
        // Refused as the gateway refuses it: what is too large to read is not forwarded.
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        return Ok(Verdict::Answer(mcp::rpc_error(
            id,
            -32600,
            &format!("the message is larger than mcp.max_message_bytes ({limit})"),
        )));
    }
    let message = match mcp::read(Ok(message.clone())) {
        Ok(m) => m,
        Err(refused) => return Ok(Verdict::Answer(refused.answer())),
    };
    let id = message.get("id").cloned();
    let method = message.get("method").and_then(Value::as_str);
    Ok(match (method, id) {
        (Some("tools/call"), Some(id)) => {
            call(state, server, &principal, &message, id, tools, origin).await
        }
        (Some(m @ ("resources/read" | "prompts/get")), Some(id)) => {
            mcp::decide_other(state, server, &principal, m, &message, id).await
        }
        // Nothing else is decided (as at `/mcp/{name}`): the list answers are filtered.
        _ => Verdict::Forward,
    })
}

/// Decide a `tools/call` on the annotations the child listed for the tool.
async fn call(
    state: &Arc<AppState>,
    server: &str,
    principal: &Arc<Principal>,
    message: &Map<String, Value>,
    id: Value,
    tools: &[Value],
    origin: Call,
) -> Verdict {
    let (tool, arguments) = match mcp::call_params(message) {
        Ok(p) => p,
        Err(why) => return Verdict::Answer(mcp::rpc_error(id, -32602, &why)),
    };
    // The last entry of that name, as the gateway remembers a list.
    let listed = tools
        .iter()
        .rev()
        .filter_map(|t| mcp::tool_attributes(server, t))
        .find(|(name, _)| *name == tool)
        .map(|(_, attributes)| attributes);
    let Some(attributes) = listed else {
        // Fail closed: without the tool's annotations there is nothing certain to decide on.
        return Verdict::Answer(mcp::rpc_error(id, -32602, &mcp::not_listed(server, tool)));
    };
    let req = mcp::tool_check(state, server, principal, tool, attributes, arguments);
    let settled = state.service.check(&req, origin).await;
    mcp::settle_call(state, req, settled, id).await
}

async fn filter_inner(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Value, ApiError> {
    let (principal, body) = read_body(state, conn, req).await?;
    body::only_known(&body, "", &["server", "method", "result"])?;
    let server = server_name(state, &body)?;
    let method = body::string(&body, "", "method")?;
    let Some(kind) = Listed::of(method) else {
        return Err(ApiError::field(
            "method",
            format!(
                "`{}` is not filtered: tools/list, resources/list or prompts/list",
                shown(method)
            ),
        ));
    };
    let mut result = body::object(&body, "", "result")?.clone();
    match result.get_mut(kind.key()) {
        Some(Value::Array(items)) => mcp::filter_list(state, server, &principal, kind, items),
        // Fail closed: a list that is not a list cannot be shown item by item.
        Some(other) => {
            return Err(ApiError::field(
                format!("result.{}", kind.key()),
                format!("must be an array, not {}", body::kind(other)),
            ));
        }
        None => {}
    }
    Ok(Value::Object(result))
}

/// The agent (its own token, before the body is read) and the body, a JSON object.
async fn read_body(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<(Arc<Principal>, Map<String, Value>), ApiError> {
    let principal = caller(state, conn, req.headers()).await?;
    if !body::is_json(req.headers()) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the request body must be `application/json`",
        ));
    }
    let (parts, incoming) = req.into_parts();
    // A message and the tools it is decided on, or a whole list to filter.
    let limit = state.mcp.max_message_bytes() + mcp::MAX_LIST_BYTES;
    let bytes = mcp::read_message(
        &parts.headers,
        incoming,
        (limit, "mcp.max_message_bytes plus 8 MiB for a list"),
        state,
    )
    .await?;
    Ok((principal, body::parse_object(&bytes)?))
}

/// Who is asking. A credential, when one is sent, is judged as at `/mcp/{name}`: a bad token
/// is a 401, never a fall-back to a local principal. Without one, the only other proof is
/// the kernel's: on the Unix socket, the uid of the process that connected names a
/// configured `[[mcp.local_principals]]` entry. TCP has no such proof (a connection from
/// 127.0.0.1 may be any local user's), and nothing the client writes (a header, a body
/// field) has a say. Every other API takes tokens only.
async fn caller(
    state: &AppState,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> Result<Arc<Principal>, ApiError> {
    if headers.contains_key(AUTHORIZATION) || !conn.unix {
        return match authenticate(state, conn, headers).await {
            Err(e) if e.code == "token_missing" => Err(ApiError {
                message: format!(
                    "{}; a request without one is a local principal's only on the Unix socket \
                     (`server.unix_socket`, `[[mcp.local_principals]]`)",
                    e.message
                ),
                ..e
            }),
            caller => agent(caller?),
        };
    }
    // Fail closed: a connection the kernel named no user for, or a user no entry names, is
    // nobody.
    let refused = |message: String| {
        state.service.stats.token_rejected();
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            LOCAL_UNKNOWN,
            message,
        ))
    };
    let Some(peer) = conn.unix_peer else {
        return refused(
            "no token, and the credentials of this Unix socket connection could not be read".into(),
        );
    };
    match state.mcp.local_principal(peer.uid) {
        Some(p) => {
            tracing::debug!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, principal = %p.id,
                "mcp wrap: local principal by Unix socket credentials");
            Ok(p.clone())
        }
        None => refused(format!(
            "no token, and uid {} on the Unix socket is not a configured \
             `mcp.local_principals` entry",
            peer.uid
        )),
    }
}

/// The 401 code of a tokenless request that names no local principal.
pub const LOCAL_UNKNOWN: &str = "local_principal_unknown";

/// The wrapped server's name: a label of the agent's own (see the module's notes on trust),
/// never a configured upstream's.
fn server_name<'a>(state: &AppState, body: &'a Map<String, Value>) -> Result<&'a str, ApiError> {
    let name = body::string(body, "", "server")?;
    if !mcp_server_name_ok(name) {
        return Err(ApiError::field(
            "server",
            format!(
                "`{}` must be letters, digits, `-`, `_` or `.` (it is the first part of a \
                 tool's resource id, `McpTool::\"<server>/<tool>\"`)",
                shown(name)
            ),
        ));
    }
    if state.mcp.serves(name) {
        return Err(ApiError::field(
            "server",
            format!(
                "`{name}` is an HTTP MCP server of this Mandate (`[[mcp.servers]]`, served at \
                 /mcp/{name}): a wrapped stdio server needs a name of its own, or its calls \
                 would be decided and recorded as that server's"
            ),
        ));
    }
    Ok(name)
}
