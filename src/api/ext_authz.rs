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
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest as EnvoyCheck, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc;
use http_body_util::BodyExt as _;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName};
use hyper::service::service_fn;
use hyper::{HeaderMap, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::codegen::Service as _;

use super::caller::authenticate;
use super::forward_auth::{Original, agent, answer, refusal, route_error, settle};
use super::server::Listener;
use super::{ApiError, AppState, Body, ConnInfo, body};
use crate::routes::Inputs;

/// google.rpc.Code values Envoy acts on.
const CODE_OK: i32 = 0;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_UNAUTHENTICATED: i32 = 16;

/// In-flight checks get this long to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
        Ok(tonic::Response::new(
            check(&self.state, request.into_inner()).await,
        ))
    }
}

/// Decide the request Envoy describes, and answer in `ext_authz` terms.
pub async fn check(state: &AppState, req: EnvoyCheck) -> CheckResponse {
    let resp = match decide(state, req).await {
        Ok(resp) => resp,
        Err(e) => refusal(e),
    };
    to_check_response(resp).await
}

async fn decide(state: &AppState, req: EnvoyCheck) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let attributes = req.attributes.unwrap_or_default();
    let http = attributes.request.and_then(|r| r.http).ok_or_else(|| {
        ApiError::field(
            "attributes.request.http",
            "the CheckRequest describes no HTTP request: nothing can be allowed",
        )
    })?;
    let headers = header_map(&http)?;
    // The identity first, as over HTTP: a request from nobody is a 401 whatever it is.
    let principal = agent(authenticate(state, &ConnInfo::default(), &headers).await?)?;
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
    let settled = settle(
        state,
        &principal,
        &found.matched,
        routed,
        &original,
        started,
    )
    .await;
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
        return CheckResponse {
            status: Some(rpc::Status {
                code: CODE_OK,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: headers(true),
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

/// Serve `Authorization` and `grpc.health.v1.Health` (HTTP/2 only) until `shutdown`, then
/// let in-flight checks finish (bounded).
pub async fn serve(listener: Listener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let (reporter, health) = tonic_health::server::health_reporter();
    // The service is built (bundle, keys, store) before any listener serves: ready.
    reporter
        .set_serving::<AuthorizationServer<ExtAuthz>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let authz = AuthorizationServer::new(ExtAuthz::new(state.clone()));
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
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            () = &mut shutdown => break,
        };
        let svc = (authz.clone(), health.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        match accepted {
            Ok(Accepted::Tcp(s)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(serve_io(s, svc, builder, watcher));
            }
            Ok(Accepted::Unix(s)) => {
                tokio::spawn(serve_io(s, svc, builder, watcher));
            }
            Err(e) => {
                tracing::warn!(error = %e, "ext_authz: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("ext_authz: in-flight checks did not finish within the shutdown grace");
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

async fn serve_io<S, H>(
    stream: S,
    (authz, health): (AuthorizationServer<ExtAuthz>, H),
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
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
        let mut authz = authz.clone();
        let mut health = health.clone();
        async move {
            let path = req.uri().path();
            if path.starts_with("/envoy.service.auth.v3.Authorization/") {
                authz.call(req).await
            } else if path.starts_with("/grpc.health.v1.Health/") {
                health.call(req).await
            } else {
                Ok(tonic::Status::unimplemented("no such service").into_http())
            }
        }
    });
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "ext_authz: connection ended with an error");
    }
}
