//! Envoy `ext_authz` over gRPC (issue 12): `envoy.service.auth.v3.Authorization/Check` and
//! `grpc.health.v1.Health` on a listener of their own (`[ext_authz] grpc_listen`,
//! `grpc_unix_socket`).
//!
//! An adapter only, answering exactly as the HTTP forward-auth endpoints do
//! ([`super::forward_auth`]): the original request Envoy describes in
//! `attributes.request.http` (method, path with its query, host, headers, body) and its
//! `context_extensions` go through the same [`crate::routes`] to a check; the agent is the
//! forwarded `authorization: Bearer` token, verified by the service like every token. The
//! forward-auth answer is then put in gRPC terms:
//!
//! - allow: `OK` (google.rpc code 0), the `[forward_auth]` decision and principal headers in
//!   `ok_response`, each overwriting any value the client sent;
//! - deny: `PERMISSION_DENIED` (7), a `403` `denied_response` with the decision's JSON body;
//! - escalate: `PERMISSION_DENIED`, `forward_auth.escalate_status` with the approval request
//!   in the body and the approval id and URL headers;
//! - a token that does not verify: `UNAUTHENTICATED` (16), a `401` with the reason;
//! - a request that cannot be routed without doubt (no `attributes.request.http`, no method
//!   or path, an ambiguous header): `PERMISSION_DENIED` with a `400` naming what is missing.
//!
//! Fail closed (SECURITY P-01): nothing but an allow decision is `OK`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Api;
use crate::service::Call;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest as EnvoyCheck, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::Value as ProtoValue;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::rpc;
use http_body_util::BodyExt as _;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderName};
use hyper::service::service_fn;
use hyper::{HeaderMap, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::codegen::Service as _;

use super::admin::readiness;
use super::caller::{authenticate, bearer};
use super::conn_guard::{Conn, Connections};
use super::forward_auth::{
    HEADERS_TO_REMOVE, Original, agent, answer, refusal, route_error, settle,
};
use super::server::{Accepted, Listener, accept_guarded};
use super::{ApiError, AppState, Body, ConnInfo, body};
use crate::config::IdentitySource;
use crate::identity::IdentityError;
use crate::routes::Inputs;
use crate::service::Caller;
use crate::service::caller::Asserted;
use crate::vocabulary::Principal;

/// google.rpc.Code values Envoy acts on.
const CODE_OK: i32 = 0;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_UNAUTHENTICATED: i32 = 16;

/// The `Authorization` service: one per listener, sharing the HTTP adapter's state.
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    state: Arc<AppState>,
}

impl ExtAuthz {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: tonic::Request<EnvoyCheck>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let (metadata, _, message) = request.into_parts();
        let call = metadata.into_headers();
        Ok(tonic::Response::new(
            check(&self.state, &call, message).await,
        ))
    }
}

/// Decide the request Envoy describes, and answer in `ext_authz` terms. `call` is the gRPC
/// call's own metadata (where an enforcement point's credential is), not the original
/// request's headers.
pub async fn check(state: &AppState, call: &HeaderMap, req: EnvoyCheck) -> CheckResponse {
    let resp = match decide(state, call, req).await {
        Ok(resp) => resp,
        Err(e) => refusal(e),
    };
    to_check_response(resp).await
}

/// The agent the request is from, by the first of `ext_authz.identity`'s sources the
/// `CheckRequest` carries. That source decides: a token that does not verify, or an
/// assertion from a caller that is not an enforcement point, is a 401, never a fall-through
/// to the next source. None present: `token_missing`.
async fn identify(
    state: &AppState,
    call: &HeaderMap,
    attributes: &AttributeContext,
    headers: &HeaderMap,
) -> Result<Arc<Principal>, ApiError> {
    let config = &state.ext_authz;
    for source in &config.identity {
        let asserted = match source {
            IdentitySource::Authorization => {
                if !headers.contains_key(AUTHORIZATION) {
                    continue;
                }
                return agent(authenticate(state, &ConnInfo::default(), headers).await?);
            }
            IdentitySource::JwtAuthn => {
                let payload = attributes
                    .metadata_context
                    .as_ref()
                    .and_then(|m| m.filter_metadata.get(&config.jwt_authn_namespace))
                    .and_then(|ns| ns.fields.get(&config.jwt_authn_payload_key));
                let Some(payload) = payload else { continue };
                let field = format!(
                    "attributes.metadata_context.filter_metadata[{}].{}",
                    config.jwt_authn_namespace, config.jwt_authn_payload_key
                );
                match json_of(payload, 0) {
                    Ok(Value::Object(claims)) => Asserted::JwtAuthn(claims),
                    Ok(_) => return Err(ApiError::field(field, "is not a claim set (an object)")),
                    Err(why) => return Err(ApiError::field(field, why)),
                }
            }
            IdentitySource::Peer => {
                let principal = attributes
                    .source
                    .as_ref()
                    .map_or("", |p| p.principal.as_str());
                if principal.is_empty() {
                    continue;
                }
                Asserted::Peer {
                    // Validated at load: `peer` in `identity` requires `peer_issuer`.
                    issuer: config.peer_issuer.as_deref().unwrap_or_default(),
                    spiffe_id: principal,
                }
            }
        };
        let by = pep_of_call(state, call).await;
        let result = state.service.asserted_agent(by.as_ref(), asserted);
        if result.is_err() {
            state.service.stats.token_rejected();
        }
        return result.map_err(ApiError::from);
    }
    state.service.stats.token_rejected();
    Err(IdentityError::Missing.into())
}

/// Who made the gRPC call, by the credential in its own metadata (Envoy's
/// `grpc_service.initial_metadata`), as every caller is authenticated.
async fn pep_of_call(state: &AppState, call: &HeaderMap) -> Result<Caller, String> {
    let token = bearer(call).map_err(|e| e.message)?;
    state
        .service
        .authenticate(token, &[])
        .await
        .map_err(|e| e.to_string())
}

/// Deepest `google.protobuf.Struct` accepted in `metadata_context`.
const MAX_STRUCT_DEPTH: usize = 32;

/// A `google.protobuf.Value` as JSON. A whole-number double is an integer again (Envoy's
/// `jwt_authn` turns every claim number into a double: `exp` must compare as the integer it
/// was); a fractional, infinite or NaN number stays as it is and is refused where an
/// integer is required.
fn json_of(v: &ProtoValue, depth: usize) -> Result<Value, String> {
    if depth > MAX_STRUCT_DEPTH {
        return Err(format!("is nested deeper than {MAX_STRUCT_DEPTH} levels"));
    }
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            // Exactly representable range of integers in a double: ±2^53.
            const EXACT: f64 = 9_007_199_254_740_992.0;
            if n.fract() == 0.0 && n.abs() <= EXACT {
                #[allow(clippy::cast_possible_truncation, reason = "whole and within ±2^53")]
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(Value::Number)
                    .ok_or_else(|| "holds a number that is not finite".to_owned())?
            }
        }
        Some(Kind::StructValue(st)) => Value::Object(
            st.fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), json_of(v, depth + 1)?)))
                .collect::<Result<_, String>>()?,
        ),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .iter()
                .map(|v| json_of(v, depth + 1))
                .collect::<Result<_, String>>()?,
        ),
    })
}

async fn decide(
    state: &AppState,
    call: &HeaderMap,
    req: EnvoyCheck,
) -> Result<Response<Body>, ApiError> {
    let origin = Call::new(Api::ExtAuthzGrpc);
    let attributes = req.attributes.unwrap_or_default();
    let http = attributes
        .request
        .as_ref()
        .and_then(|r| r.http.clone())
        .ok_or_else(|| {
            ApiError::field(
                "attributes.request.http",
                "the CheckRequest describes no HTTP request: nothing can be allowed",
            )
        })?;
    let headers = header_map(&http)?;
    // The agent's trace, from the original request (else from Envoy's own call).
    let mut origin = super::join_trace(state, origin, &[&headers, call]);
    // The identity first, as over HTTP: a request from nobody is a 401 whatever it is.
    let principal = origin
        .identify(identify(state, call, &attributes, &headers))
        .await?;
    let original = original(&http)?;
    let found = state
        .routes
        .find(&original.method, original.host.as_deref(), &original.path)
        .map_err(route_error)?;
    let json = match found.reads_body() {
        true => json_body(&headers, &http, state)?,
        false => None,
    };
    let extensions: &HashMap<String, String> = &attributes.context_extensions;
    let inputs = Inputs {
        headers: &headers,
        query: original.query.as_deref(),
        body: json.as_ref(),
        extensions: Some(extensions),
    };
    let routed = found.resolve(&inputs).map_err(route_error)?;
    let settled = settle(state, &principal, &found.matched, routed, &original, origin).await;
    Ok(answer(&state.forward_auth, &settled, &principal))
}

/// The original request's headers. Envoy sends them in `headers` (repeated ones joined with
/// commas) or, with `encode_raw_headers`, in `header_map` (each one as sent, so a repeated
/// header is seen, and refused where a route reads it). Pseudo-headers are not headers.
fn header_map(http: &HttpRequest) -> Result<HeaderMap, ApiError> {
    let mut map = HeaderMap::new();
    let mut add = |key: &str, value: &[u8]| -> Result<(), ApiError> {
        if key.starts_with(':') {
            return Ok(());
        }
        let name = HeaderName::from_bytes(key.as_bytes())
            .map_err(|_| ApiError::field(format!("header {key}"), "not a header name"))?;
        let value = hyper::header::HeaderValue::from_bytes(value)
            .map_err(|_| ApiError::field(format!("header {key}"), "not a header value"))?;
        map.append(name, value);
        Ok(())
    };
    for (k, v) in &http.headers {
        add(k, v.as_bytes())?;
    }
    if let Some(raw) = &http.header_map {
        for h in &raw.headers {
            let value = match h.raw_value.is_empty() {
                true => h.value.as_bytes(),
                false => &h.raw_value,
            };
            add(&h.key, value)?;
        }
    }
    Ok(map)
}

/// Method, path, query and host from `attributes.request.http`: a missing method or path is
/// a misconfigured (or forged) request, and nothing is allowed.
fn original(http: &HttpRequest) -> Result<Original, ApiError> {
    if http.method.is_empty() {
        return Err(ApiError::field(
            "attributes.request.http.method",
            "the original method is required",
        ));
    }
    if !http.path.starts_with('/') {
        return Err(ApiError::field(
            "attributes.request.http.path",
            "the original path is required (and starts with `/`)",
        ));
    }
    let (path, query) = match http.path.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (http.path.clone(), None),
    };
    Ok(Original {
        method: http.method.clone(),
        path,
        query,
        host: (!http.host.is_empty()).then(|| http.host.clone()),
    })
}

/// The JSON body a rule reads (`with_request_body` in Envoy): `None` when none was sent.
/// Same rules as the HTTP mode: JSON or no type, never a partial body, within
/// `server.max_body_bytes`, parsed strictly.
fn json_body(
    headers: &HeaderMap,
    http: &HttpRequest,
    state: &AppState,
) -> Result<Option<Value>, ApiError> {
    if headers.contains_key(CONTENT_TYPE) && !body::is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the route reads the JSON body: it must be `application/json`",
        ));
    }
    let partial = headers
        .get("x-envoy-auth-partial-body")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    if partial {
        return Err(ApiError::field(
            "(body)",
            "Envoy sent part of the body (`x-envoy-auth-partial-body`): the route reads it whole",
        ));
    }
    let bytes = match http.raw_body.is_empty() {
        true => http.body.as_bytes(),
        false => &http.raw_body,
    };
    if bytes.len() > state.server.max_body_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the body is larger than server.max_body_bytes ({})",
                state.server.max_body_bytes
            ),
        ));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    body::parse_value(bytes).map(Some)
}

/// The forward-auth answer in `ext_authz` terms: a `200` is `OK` with its headers for the
/// upstream; anything else is a denial carrying its status, headers and body to the client.
async fn to_check_response(resp: Response<Body>) -> CheckResponse {
    let (parts, body) = resp.into_parts();
    let headers = |skip_entity: bool| -> Vec<HeaderValueOption> {
        parts
            .headers
            .iter()
            .filter(|(n, _)| !(skip_entity && (*n == CONTENT_TYPE || *n == CONTENT_LENGTH)))
            .filter(|(n, _)| n.as_str() != HEADERS_TO_REMOVE)
            .filter_map(|(n, v)| {
                Some(HeaderValueOption {
                    header: Some(HeaderValue {
                        key: n.as_str().to_owned(),
                        value: v.to_str().ok()?.to_owned(),
                        ..Default::default()
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..Default::default()
                })
            })
            .collect()
    };
    if parts.status == StatusCode::OK {
        // The HTTP mode's removal header is the gRPC mode's `headers_to_remove`.
        let headers_to_remove = parts
            .headers
            .get_all(HEADERS_TO_REMOVE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .collect();
        return CheckResponse {
            status: Some(rpc::Status {
                code: CODE_OK,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: headers(true),
                headers_to_remove,
                ..Default::default()
            })),
            ..Default::default()
        };
    }
    let code = match parts.status {
        StatusCode::UNAUTHORIZED => CODE_UNAUTHENTICATED,
        _ => CODE_PERMISSION_DENIED,
    };
    let body = match body.collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(never) => match never {},
    };
    CheckResponse {
        status: Some(rpc::Status {
            code,
            message: parts
                .status
                .canonical_reason()
                .unwrap_or_default()
                .to_owned(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(parts.status.as_u16()),
            }),
            headers: headers(false),
            body,
        })),
        ..Default::default()
    }
}

/// Serve `Authorization` and `grpc.health.v1.Health` (HTTP/2 only) until `shutdown`, each
/// connection under the HTTP listener's guard (`server.header_read_timeout`,
/// `idle_timeout`, `max_connections`), then let in-flight checks finish (bounded).
pub async fn serve(listener: Listener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Health follows readiness (`/readyz`): NOT_SERVING while the audit log, the store or
    // the issuers' keys are failing, so Envoy's health checks see what an orchestrator sees.
    let follow = tokio::spawn(follow_readiness(state.clone(), reporter));
    // A CheckRequest is the original request's head and (with_request_body) its body: the
    // HTTP listener's body limit plus room for headers and metadata, not tonic's 4 MiB
    // (SECURITY H-03); a larger one is refused before it is decoded.
    let authz = AuthorizationServer::new(ExtAuthz::new(state.clone()))
        .max_decoding_message_size(state.server.max_body_bytes + CHECK_REQUEST_OVERHEAD);
    let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        .max_header_list_size(16 * 1024)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let one = move |io: Accepted, conn: Arc<Conn>, connections: Arc<Connections>, watcher| {
        let svc = (authz.clone(), health.clone());
        let builder = builder.clone();
        async move {
            let guard = (conn, connections);
            match io {
                Accepted::Tcp(s) => serve_io(s, svc, guard, builder, watcher).await,
                Accepted::Unix(s) => serve_io(s, svc, guard, builder, watcher).await,
            }
        }
    };
    accept_guarded(listener, &state.server, "ext_authz", shutdown, one).await;
    follow.abort();
}

/// What a CheckRequest may hold besides the body: headers, metadata, attributes.
const CHECK_REQUEST_OVERHEAD: usize = 256 * 1024;

/// How often the health status is brought in line with readiness.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

async fn follow_readiness(state: Arc<AppState>, reporter: tonic_health::server::HealthReporter) {
    let mut last = None;
    loop {
        let status = match readiness(&state).is_empty() {
            true => tonic_health::ServingStatus::Serving,
            false => tonic_health::ServingStatus::NotServing,
        };
        if last != Some(status) {
            reporter
                .set_service_status(AUTHORIZATION_SERVICE, status)
                .await;
            reporter.set_service_status("", status).await;
            last = Some(status);
        }
        tokio::time::sleep(HEALTH_EVERY).await;
    }
}

/// The `Authorization` service's name, as health checks ask for it.
const AUTHORIZATION_SERVICE: &str = "envoy.service.auth.v3.Authorization";

async fn serve_io<S, H>(
    stream: S,
    (authz, health): (AuthorizationServer<ExtAuthz>, H),
    (conn, connections): (Arc<Conn>, Arc<Connections>),
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: tonic::codegen::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    H::Future: Send + 'static,
{
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        // A stream's head is complete: the connection is busy until its answer is ready.
        let busy = conn.begin(&connections);
        let mut authz = authz.clone();
        let mut health = health.clone();
        async move {
            let path = req.uri().path();
            let resp = if path.starts_with("/envoy.service.auth.v3.Authorization/") {
                authz.call(req).await
            } else if path.starts_with("/grpc.health.v1.Health/") {
                health.call(req).await
            } else {
                Ok(tonic::Status::unimplemented("no such service").into_http())
            };
            drop(busy);
            resp
        }
    });
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "ext_authz: connection ended with an error");
    }
}
