//! `grpc-floor`: the bare gRPC floor for Mandate's Envoy `ext_authz` listener.
//!
//! It serves `envoy.service.auth.v3.Authorization/Check` with the stack Mandate's
//! `[ext_authz] grpc_listen` uses (tonic 0.14's generated `AuthorizationServer` and
//! envoy-types 0.7, served by hyper-util's auto builder in HTTP/2-only mode with the same
//! HTTP/2 settings), decodes each CheckRequest and answers a fixed `OK` CheckResponse with
//! one header, without token verification, routing or policy evaluation. Its latency is the
//! fastest this stack answers a Check on this machine, so a candidate's latency divided by
//! the floor's is the candidate's overhead.
//!
//! Usage: `grpc-floor PORT` (0 picks a free port). Prints `listening on 127.0.0.1:NNNN`.
//! Env: `FLOOR_WORKERS` = tokio worker threads (default: one per core, tokio's default;
//! `1` = a single-threaded `current_thread` runtime), as for the HTTP floor.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use envoy_types::pb::google::rpc;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tonic::codegen::Service as _;

/// Answers every Check with the same allow.
#[derive(Debug, Clone)]
struct Floor {
    answer: Arc<CheckResponse>,
}

#[tonic::async_trait]
impl Authorization for Floor {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        // Honest floor: the request was decoded; refuse one that describes no HTTP request.
        let described = request
            .get_ref()
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .is_some_and(|h| !h.path.is_empty());
        if !described {
            return Err(tonic::Status::invalid_argument(
                "no attributes.request.http.path",
            ));
        }
        Ok(tonic::Response::new((*self.answer).clone()))
    }
}

/// A fixed allow: status OK and one header for the upstream, shaped like Mandate's.
fn fixed_answer() -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status {
            code: 0,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "x-mandate-decision-id".to_owned(),
                    value: "01HZX3FLOOR0000000000000000".to_owned(),
                    ..Default::default()
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let workers: usize = match std::env::var("FLOOR_WORKERS") {
        Ok(w) if !w.is_empty() => w
            .parse()
            .map_err(|e| format!("bad FLOOR_WORKERS {w:?}: {e}"))?,
        _ => 0,
    };
    let runtime = match workers {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(serve())
}

async fn serve() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let port: u16 = match std::env::args().nth(1) {
        Some(p) => p.parse().map_err(|e| format!("bad port {p:?}: {e}"))?,
        None => {
            eprintln!("usage: grpc-floor PORT   (0 = pick a free port)");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    // The same HTTP/2 settings as Mandate's ext_authz listener (src/api/ext_authz.rs).
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
    let authz = AuthorizationServer::new(Floor {
        answer: Arc::new(fixed_answer()),
    });
    // println! flushes on newline, so a script reading our stdout sees this at once.
    println!("listening on {}", listener.local_addr()?);

    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let authz = authz.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let mut authz = authz.clone();
                async move {
                    if req
                        .uri()
                        .path()
                        .starts_with("/envoy.service.auth.v3.Authorization/")
                    {
                        authz.call(req).await
                    } else {
                        Ok::<_, Infallible>(
                            tonic::Status::unimplemented("no such service").into_http(),
                        )
                    }
                }
            });
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection: {e}");
            }
        });
    }
}
