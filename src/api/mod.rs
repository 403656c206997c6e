//! The HTTP adapter: wire types stop here. Requests become core types
//! ([`crate::vocabulary::CheckRequest`], [`crate::service::ReviewInput`], ...), the
//! [`crate::service::Service`] decides, and its results become JSON. Each service error enum
//! maps to HTTP statuses in one `match` here ([`ApiError`]'s `From` impls); parse errors are
//! `400`s naming their field.
//!
//! Status discipline (docs/design.md §3): a deny is a `200` with the decision in the body;
//! 4xx are for malformed requests and failed caller authentication, always with a JSON body
//! that names what was wrong. Nothing here can turn an error into an allow: every path that
//! fails returns early with an error status or a deny decision.

pub mod admin;
pub mod approvals;
pub mod authzen;
pub mod body;
pub mod caller;
pub mod conn_guard;
pub mod ext_authz;
pub mod forward_auth;
pub mod http;
pub mod mcp;
pub mod mcp_wrap;
pub mod server;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::approval::{ApprovalRequest, Grant};
use crate::clock::rfc3339;
use crate::config::ServerConfig;
use crate::identity::IdentityError;
use crate::metrics::Api;
use crate::service::{ApprovalError, Call, Service, SubjectError};

pub type Body = Full<Bytes>;

/// What the HTTP adapter needs: the core service every adapter shares, and its own
/// transport settings.
#[derive(Debug)]
pub struct AppState {
    pub service: Arc<Service>,
    pub server: ServerConfig,
    /// Request → action routes of the forward-auth endpoints.
    pub routes: Arc<crate::routes::Routes>,
    pub forward_auth: forward_auth::Settings,
    /// `[ext_authz]`: the gRPC adapter's identity sources.
    pub ext_authz: crate::config::ExtAuthzConfig,
    /// `[mcp]`: the MCP gateway's upstreams.
    pub mcp: mcp::Gateway,
    /// The metrics behind `GET /metrics`.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

/// What the transport knows about the peer, for caller authentication.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// True when the connection is TLS (discovery then publishes `https` URLs).
    pub tls: bool,
    /// URI SANs of a verified client certificate (mTLS).
    pub client_uri_sans: Vec<String>,
    /// The peer process of a connection on the Unix socket listener, as the kernel reported
    /// it when the peer connected (`SO_PEERCRED`); `None` on TCP and TLS, where nothing the
    /// kernel knows names the peer (127.0.0.1 is any local user), and on a Unix connection
    /// whose credentials could not be read.
    pub unix_peer: Option<PeerCred>,
    /// True for a connection on the Unix socket listener.
    pub unix: bool,
}

/// Who connected to the Unix socket: the credentials of the process at `connect(2)`, which
/// it cannot choose (SECURITY J-35: UDS credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Effective user id.
    pub uid: u32,
    pub gid: u32,
    /// The process id, when the kernel reports one (it may have exited or been reused since:
    /// for logs, never for identity).
    pub pid: Option<i32>,
}

/// A request refused before any decision was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable snake_case code (`invalid_request`, `token_expired`, `subject_mismatch`, ...).
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when there is one (`resource.type`).
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A 400 naming the field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut body = serde_json::json!({
            "error": self.code,
            "message": self.message,
        });
        if let (Some(field), Some(obj)) = (self.field, body.as_object_mut()) {
            obj.insert("field".into(), field.into());
        }
        let mut resp = json_response(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// Failed caller authentication: a 401 naming the token's rejection reason.
impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string())
    }
}

impl ApiError {
    /// A subject the caller may not ask about, or cannot describe, at request field `field`.
    pub fn subject(e: SubjectError, field: &str) -> Self {
        match e {
            SubjectError::Mismatch { .. } => ApiError {
                status: StatusCode::FORBIDDEN,
                code: "subject_mismatch",
                message: e.to_string(),
                field: Some(field.to_owned()),
            },
            SubjectError::Missing { .. } => ApiError::field(field, e.to_string()),
            SubjectError::Properties(v) => {
                ApiError::field(format!("{field}.properties"), v.to_string())
            }
        }
    }
}

/// The one mapping of approvals-workflow errors to HTTP statuses. Fail closed: whatever the
/// store or the audit log could not do is a 503 (the change was not acknowledged, or was
/// acknowledged as not audited), never a 2xx; refusals by rule are 403, 404 or 409.
impl From<ApprovalError> for ApiError {
    fn from(e: ApprovalError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            ApprovalError::ApproverRequired(_) => (StatusCode::FORBIDDEN, "approver_required"),
            ApprovalError::Invalid { field, .. } => return ApiError::field(field.clone(), message),
            ApprovalError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            ApprovalError::SelfApproval { .. } => {
                (StatusCode::FORBIDDEN, "self_approval_forbidden")
            }
            ApprovalError::NotInGroup { .. } => (StatusCode::FORBIDDEN, "not_an_approver"),
            ApprovalError::NotPermitted { .. } => (StatusCode::FORBIDDEN, "approval_not_permitted"),
            ApprovalError::Mismatch { .. } => (StatusCode::CONFLICT, "request_mismatch"),
            ApprovalError::Refused(s) => (StatusCode::CONFLICT, s.code()),
            ApprovalError::StoreUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            ApprovalError::NotAudited { .. } | ApprovalError::AppliedNotAudited { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable")
            }
        };
        ApiError::new(status, code, message)
    }
}

/// What a check response says about the grant that allowed it.
pub fn grant_json(g: &Grant) -> serde_json::Value {
    serde_json::json!({
        "id": g.id.to_string(),
        "approval_request": g.request_id.to_string(),
        "expires_at": rfc3339(g.expires_at),
    })
}

/// What a check response says about the approval request of an escalation.
pub fn approval_request_json(a: &ApprovalRequest) -> serde_json::Value {
    serde_json::json!({
        "id": a.id.to_string(),
        "status": a.status.as_str(),
        "status_url": format!("/v1/approvals/{}", a.id),
        "expires_at": rfc3339(a.expires_at),
    })
}

/// Serialize `value` as a JSON response. Serialization of our own types cannot fail; if it
/// ever did, the client gets a 500 with no decision in it, never an allow.
pub fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(b) => json_bytes_response(status, b),
        Err(_) => json_bytes_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":"internal","message":"response serialization failed"}"#.to_vec(),
        ),
    }
}

/// A response whose body is JSON already serialized.
pub fn json_bytes_response(status: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A check through `api` starting now, joining the trace in `headers` (W3C `traceparent`).
pub(crate) fn call_from(state: &AppState, api: Api, headers: &hyper::HeaderMap) -> Call {
    join_trace(state, Call::new(api), &[headers])
}

/// `call`, joining the first trace (W3C `traceparent`) found in `sources`, in order, when
/// this server exports spans; nothing is read otherwise.
pub(crate) fn join_trace(state: &AppState, call: Call, sources: &[&hyper::HeaderMap]) -> Call {
    let Some(traces) = &state.service.traces else {
        return call;
    };
    let parent = sources
        .iter()
        .find_map(|h| crate::service::trace::parent_from(&opentelemetry_http::HeaderExtractor(h)));
    call.traced(traces, parent)
}

/// Route one request. `X-Request-ID` is echoed on every response (AuthZEN §transport).
pub async fn route(
    state: Arc<AppState>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<Body> {
    let request_id = req.headers().get("x-request-id").cloned();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut resp = match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => admin::healthz(),
        (&Method::GET, "/readyz") => admin::readyz(&state),
        (&Method::GET, "/metrics") => admin::metrics(&state),
        (&Method::POST, "/v1/check") => http::check(&state, &conn, req).await,
        // Any method: Envoy's is the original request's.
        (_, p) if let Some(proxy) = forward_auth::Proxy::of(p) => {
            forward_auth::check(&state, &conn, req, proxy).await
        }
        (&Method::POST, "/access/v1/evaluation") => authzen::evaluation(&state, &conn, req).await,
        (&Method::POST, "/access/v1/evaluations") => authzen::evaluations(&state, &conn, req).await,
        (&Method::POST, mcp_wrap::DECIDE) => mcp_wrap::decide(&state, &conn, req).await,
        (&Method::POST, mcp_wrap::FILTER) => mcp_wrap::filter(&state, &conn, req).await,
        (&Method::GET, "/v1/approvals") => approvals::list(&state, &conn, req).await,
        (&Method::GET, approvals::GRANTS) => approvals::grants(&state, &conn, req).await,
        (&Method::POST, p) if p.starts_with(approvals::GRANTS) && p.ends_with("/revoke") => {
            approvals::revoke(&state, &conn, req).await
        }
        (&Method::POST, p) if p.starts_with(approvals::PREFIX) && p.ends_with("/cancel") => {
            approvals::cancel(&state, &conn, req).await
        }
        (&Method::GET, p) if p.starts_with(approvals::PREFIX) => {
            approvals::show(&state, &conn, req).await
        }
        (&Method::POST, p) if p.starts_with(approvals::PREFIX) && p.ends_with("/approve") => {
            approvals::review(&state, &conn, req, crate::approval::Verdict::Approve).await
        }
        (&Method::POST, p) if p.starts_with(approvals::PREFIX) && p.ends_with("/deny") => {
            approvals::review(&state, &conn, req, crate::approval::Verdict::Deny).await
        }
        (&Method::GET, p) if p.starts_with("/.well-known/authzen-configuration") => {
            authzen::discovery(&state, &conn, &req)
        }
        (
            _,
            "/healthz"
            | "/readyz"
            | "/metrics"
            | "/v1/check"
            | "/access/v1/evaluation"
            | "/access/v1/evaluations"
            | "/.well-known/authzen-configuration"
            | mcp_wrap::DECIDE
            | mcp_wrap::FILTER,
        ) => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("`{method}` is not allowed on `{path}`"),
        )
        .into_response(),
        _ => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint at `{path}`"),
        )
        .into_response(),
    };
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    resp
}
