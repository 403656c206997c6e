//! Listeners and connections: TCP (optionally TLS / mTLS with rustls) and a Unix socket, each
//! served by hyper with the abuse limits of docs/security.md §3.7 set explicitly, each
//! connection under the connection guard (silent, idle and surplus connections closed:
//! `conn_guard`), and a graceful shutdown that lets in-flight checks finish.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::conn_guard::{Conn, Connections, Ended};
use super::{AppState, ConnInfo, PeerCred, mcp, route};
use crate::config::{ServerConfig, TlsConfig};

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read `{path}`: {message}")]
    Read { path: String, message: String },
    #[error("invalid TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid client CA `{path}`: {message}")]
    ClientCa { path: String, message: String },
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Build the TLS acceptor; with `client_ca`, clients must present a certificate it signed.
pub fn tls_acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| read_err(&cfg.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&cfg.cert, e))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| read_err(&cfg.key, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| read_err(ca, e))? {
                roots.add(cert.map_err(|e| read_err(ca, e))?).map_err(|e| {
                    TlsSetupError::ClientCa {
                        path: ca.display().to_string(),
                        message: e.to_string(),
                    }
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsSetupError::ClientCa {
                path: ca.display().to_string(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// URI SANs of a client certificate (SPIFFE IDs for workloads).
fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

fn builder(state: &AppState) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // hyper's header timeout is silently off without a timer (SECURITY H-01).
        .header_read_timeout(state.server.header_read_timeout)
        .max_headers(64)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        .max_header_list_size(16 * 1024)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accept connections until `shutdown` resolves, then wait (bounded) for in-flight requests.
pub async fn serve(
    listener: Listener,
    tls: Option<TlsAcceptor>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = Arc::new(builder(&state));
    let server = state.server.clone();
    let one = move |io: Accepted, conn: Arc<Conn>, connections: Arc<Connections>, watcher| {
        let state = state.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        async move {
            let served = Served {
                state,
                conn,
                connections,
            };
            match (io, tls) {
                (Accepted::Tcp(stream), Some(acceptor)) => {
                    // The guard's header deadline bounds the handshake too.
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let sans = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(uri_sans)
                        .unwrap_or_default();
                    let info = ConnInfo {
                        tls: true,
                        client_uri_sans: sans,
                        ..ConnInfo::default()
                    };
                    serve_io(stream, info, served, &builder, watcher).await;
                }
                (Accepted::Tcp(stream), None) => {
                    serve_io(stream, ConnInfo::default(), served, &builder, watcher).await;
                }
                (Accepted::Unix(stream), _) => {
                    let info = ConnInfo {
                        unix: true,
                        unix_peer: peer_cred(&stream),
                        ..ConnInfo::default()
                    };
                    serve_io(stream, info, served, &builder, watcher).await;
                }
            }
        }
    };
    accept_guarded(listener, &server, "", shutdown, one).await;
}

/// The accept loop every listener shares: each connection under the connection guard
/// (`server.header_read_timeout`, `idle_timeout`, `max_connections`: SECURITY H-01, H-07),
/// served by `one`, until `shutdown`; then in-flight requests get [`SHUTDOWN_GRACE`].
/// `what` names the listener in log lines (empty for the HTTP API).
pub(super) async fn accept_guarded<F, Fut>(
    listener: Listener,
    server: &ServerConfig,
    what: &'static str,
    shutdown: impl Future<Output = ()>,
    one: F,
) where
    F: Fn(Accepted, Arc<Conn>, Arc<Connections>, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(server.max_connections));
    let connections = Arc::new(Connections::new(
        server.header_read_timeout,
        server.idle_timeout,
    ));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            () = &mut shutdown => break,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                // Out of file descriptors and similar: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Accepted::Tcp(s) = &io {
            let _ = s.set_nodelay(true);
        }
        // At max_connections, the quiet connection that has waited longest makes room for
        // this one (see `Connections::shed_one` for why shed rather than queue); when every
        // connection is busy answering, this one waits for the first to finish, and further
        // clients wait in the kernel backlog (SECURITY H-07).
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if connections.shed_one() {
                    tracing::debug!(
                        listener = what,
                        "at max_connections: closing the longest-quiet connection"
                    );
                }
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                    () = &mut shutdown => break,
                }
            }
        };
        let registry = connections.clone();
        let (id, conn) = registry.register();
        let fut = one(io, conn.clone(), connections.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _permit = permit;
            let ended = registry.guard_registered(id, &conn, fut).await;
            if ended != Ended::Finished {
                tracing::debug!(reason = ?ended, listener = what, "connection closed by the connection guard");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = what,
            "in-flight connections did not finish within the shutdown grace period"
        );
    }
}

/// The kernel's word on who connected to the Unix socket. Unreadable credentials are no
/// identity: the connection is served, but with no local principal.
fn peer_cred(stream: &tokio::net::UnixStream) -> Option<PeerCred> {
    match stream.peer_cred() {
        Ok(c) => Some(PeerCred {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the Unix socket peer's credentials");
            None
        }
    }
}

/// What a connection's service needs: the state, and its entry in the connection guard (each
/// request marks the connection busy while it is answered).
struct Served {
    state: Arc<AppState>,
    conn: Arc<Conn>,
    connections: Arc<Connections>,
}

/// An accepted connection, of either listener kind.
pub(super) enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

async fn serve_io<S>(
    stream: S,
    info: ConnInfo,
    served: Served,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let Served {
        state,
        conn,
        connections,
    } = served;
    let service = service_fn(move |req: Request<Incoming>| {
        // Called once a request head is complete: busy until the answer is ready.
        let busy = conn.begin(&connections);
        let state = state.clone();
        let info = info.clone();
        async move {
            // The MCP gateway streams upstream answers (SSE, a held call): the connection
            // stays busy until the stream ends, so the idle timeout never cuts one short.
            // Every other answer is whole, and the connection is quiet once it is made.
            let resp = match req.uri().path().starts_with(mcp::PREFIX) {
                true => mcp::handle(&state, &info, req)
                    .await
                    .map(|b| Answer::Streamed(b, busy)),
                false => {
                    let resp = route(state, info, req).await.map(Answer::Whole);
                    drop(busy);
                    resp
                }
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A response body: whole (every API answer), or streamed from an MCP upstream.
#[derive(Debug)]
enum Answer {
    Whole(super::Body),
    /// With the connection's busy mark, held (never read) until the body is done or
    /// dropped.
    Streamed(
        mcp::McpBody,
        #[allow(
            dead_code,
            reason = "held for its Drop: the connection is busy until then"
        )]
        super::conn_guard::InFlight,
    ),
}

impl hyper::body::Body for Answer {
    type Data = bytes::Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            Answer::Whole(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
            Answer::Streamed(b, _) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Whole(b) => b.is_end_stream(),
            Answer::Streamed(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Answer::Whole(b) => b.size_hint(),
            Answer::Streamed(b, _) => b.size_hint(),
        }
    }
}
