//! A real nginx (Debian's package) with `auth_request` to Mandate, in front of a small
//! upstream that counts what reaches it (issue 12 item 5; SECURITY A-27: the agent reaches
//! the upstream only through the check; P-01: whatever is not an allow does not reach it).
//! The nginx configuration is the shipped `deploy/nginx/mandate.conf`, with only its three
//! addresses changed, so the file operators copy is the one tested.
//!
//! nginx must be installed (`apt-get install nginx`; CI's `.ci/run` installs it): without
//! it this test fails rather than pass unseen.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestServer, config_from, dev_token, repo};
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::json;

/// A route for what nginx can send: no body, so the amount is in the query string.
const PAY_ROUTE: &str = r#"
[[routes]]
name = "pay"
method = "POST"
path = "/pay/{account}"
action = "payments:transfer"
resource = { type = "Account", id = "{account}" }
context = { amount = "query:amount:number" }
"#;

/// The addresses of the shipped file, each replaced by the test's own.
const MANDATE_ADDR: &str = "server 127.0.0.1:8181;";
const UPSTREAM_ADDR: &str = "server 127.0.0.1:3000;";
const LISTEN_ADDR: &str = "listen 127.0.0.1:8080;";

/// What reached the upstream: method, path and query, and the Mandate headers it got.
#[derive(Debug, Clone)]
struct Seen {
    uri: String,
    decision_id: Option<String>,
    principal: Option<String>,
}

/// A tiny HTTP server on port 0 that records every request and answers `200 upstream ok`.
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let header =
                        |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                    log.lock().unwrap().push(Seen {
                        uri: req.uri().to_string(),
                        decision_id: header("x-mandate-decision-id"),
                        principal: header("x-mandate-principal"),
                    });
                    async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                            "upstream ok",
                        ))))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// nginx on PATH, or where Debian puts it (`/usr/sbin` is not on a user's PATH).
fn nginx_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file());
    let found = on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nginx");
        sbin.is_file().then_some(sbin)
    });
    match found {
        Some(p) => p,
        None => panic!(
            "nginx is not installed: `apt-get install nginx` (Debian's package; .ci/run \
             installs it). This test runs a real nginx in front of Mandate."
        ),
    }
}

/// A running nginx, stopped (by its pid) when dropped, the test failing or not.
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// The shipped file with the test's addresses, inside a main configuration that keeps
/// everything (pid, logs, temporary files) in `dir` and runs in the foreground.
fn write_config(dir: &Path, mandate: SocketAddr, api: SocketAddr, port: u16) {
    let shipped = std::fs::read_to_string(repo().join("deploy/nginx/mandate.conf")).unwrap();
    let mut site = shipped.clone();
    for (from, to) in [
        (MANDATE_ADDR, format!("server {mandate};")),
        (UPSTREAM_ADDR, format!("server {api};")),
        (LISTEN_ADDR, format!("listen 127.0.0.1:{port};")),
    ] {
        assert_eq!(
            shipped.matches(from).count(),
            1,
            "deploy/nginx/mandate.conf must hold `{from}` once: the test replaces it"
        );
        site = site.replace(from, &to);
    }
    std::fs::write(dir.join("mandate.conf"), site).unwrap();
    let d = dir.display();
    let main = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/client_body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         include {d}/mandate.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
}

/// Start nginx on a free port (found by binding port 0 and letting it go: another process
/// may take it meanwhile, so a failed bind is retried on another).
fn start_nginx(mandate: SocketAddr, api: SocketAddr) -> Nginx {
    let binary = nginx_binary();
    let mut last_log = String::new();
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::Builder::new()
            .prefix("nginx-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        write_config(dir.path(), mandate, api, port);
        let child = Command::new(&binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx { child, port, dir };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return nginx;
            }
            if nginx.child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        last_log = nginx.error_log();
        if !last_log.contains("Address already in use") {
            break;
        }
    }
    panic!("nginx did not start:\n{last_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a27_nginx_auth_request_lets_through_only_what_mandate_allows() {
    let path = repo().join("config/mandate.toml");
    let text = std::fs::read_to_string(&path).unwrap() + PAY_ROUTE;
    let s = TestServer::start(&config_from(&text, &path, &[])).await;
    let mandate: SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let (api, seen) = upstream().await;
    let nginx = start_nginx(mandate, api);
    let base = format!("http://127.0.0.1:{}", nginx.port);
    let agent = dev_token("agent-1", json!({"owner": "bob"}), Duration::from_secs(300));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let pay = |amount: i64, token: Option<&str>| {
        let mut req = client
            .post(format!("{base}/pay/acct-1?amount={amount}"))
            // A client's own claim to be someone is overwritten, never passed on.
            .header("x-mandate-principal", "Agent::\"root\"");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let count = || seen.lock().unwrap().len();
    let header =
        |r: &reqwest::Response, n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_owned());

    // Allowed: it reaches the upstream, with the decision and the principal Mandate set.
    let r = pay(50, Some(&agent)).await.unwrap();
    let decision = header(&r, "x-mandate-decision-id");
    assert_eq!(r.status(), 200, "{}", nginx.error_log());
    assert_eq!(r.text().await.unwrap(), "upstream ok");
    let got = seen.lock().unwrap()[0].clone();
    assert_eq!(got.uri, "/pay/acct-1?amount=50");
    assert!(got.decision_id.is_some());
    assert_eq!(
        got.decision_id, decision,
        "the client sees the same decision id"
    );
    assert_eq!(got.principal.as_deref(), Some("Agent::\"agent-1\""));

    // Denied: 403, and the upstream never hears of it.
    let r = pay(20_000, Some(&agent)).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(header(&r, "x-mandate-decision-id").is_some());
    assert_eq!(count(), 1);

    // No token, or a bad one: 401 with Mandate's challenge; nothing reaches the upstream.
    let r = pay(50, None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate").as_deref(), Some("Bearer"));
    let r = pay(50, Some("not.a.token")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(count(), 1);

    // Unrouted: denied, not passed through.
    let r = client
        .get(format!("{base}/admin"))
        .bearer_auth(&agent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(count(), 1);

    // Escalated: 403 with the approval request's id and URL for the client to wait on.
    let r = pay(250, Some(&agent)).await.unwrap();
    assert_eq!(r.status(), 403);
    let id = header(&r, "x-mandate-approval-id").expect("approval id reaches the client");
    assert_eq!(
        header(&r, "x-mandate-approval-url"),
        Some(format!("/v1/approvals/{id}"))
    );
    assert_eq!(count(), 1);

    // Approved through Mandate's API: the same request now reaches the upstream.
    let (st, v) = common::finance_approve(&s, &id, "FIN-10").await;
    assert_eq!(st, 200, "{v}");
    let r = pay(250, Some(&agent)).await.unwrap();
    assert_eq!(r.status(), 200, "{}", nginx.error_log());
    assert_eq!(count(), 2);
    assert_eq!(seen.lock().unwrap()[1].uri, "/pay/acct-1?amount=250");
    // Another amount is another request: asked again, not let through.
    let r = pay(260, Some(&agent)).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(count(), 2);

    drop(nginx);
    s.shutdown().await;
}
