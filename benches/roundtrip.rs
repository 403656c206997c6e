//! Load benchmark of the real `mandate serve` process on loopback, against a floor measured
//! in the same run (these machines are shared and noisy, so only ratios mean much):
//!
//! 1. start-up: spawn to the first `200` from `/readyz` (target < 200 ms);
//! 2. single-connection round trip of `POST /v1/check` (cached token) versus a bare hyper
//!    server answering a fixed JSON body over the same kind of connection (target <= 1.5x);
//! 3. resident memory after 10,000 checks from 1,000 distinct tokens (target < 30 MiB).
//!
//! Run: `cargo bench --bench roundtrip`. Bounded: about 30 s, loopback only. In test mode
//! (`cargo test --bench roundtrip`, a debug build, as scripts/test runs it) it is a smoke run:
//! the same steps, a few hundred checks, every answer checked, no target judged.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark: a failed setup must stop it loudly"
)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// How much to do: the measurement (`cargo bench`) or a smoke run (test mode).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    /// Recorded calls per stream and round.
    round_trips: usize,
    warm_up: usize,
    rounds: usize,
    memory_checks: usize,
    distinct_tokens: usize,
}

impl Sizes {
    const BENCH: Sizes = Sizes {
        round_trips: 5_000,
        warm_up: 500,
        rounds: 3,
        memory_checks: 10_000,
        distinct_tokens: 1_000,
    };
    const SMOKE: Sizes = Sizes {
        round_trips: 100,
        warm_up: 10,
        rounds: 1,
        memory_checks: 200,
        distinct_tokens: 20,
    };

    /// Calls per stream and round.
    fn steps(self) -> usize {
        self.warm_up + self.round_trips
    }
}

/// A keep-alive HTTP/1.1 client on one connection: writes a request, reads exactly one
/// response (by Content-Length). Hand-rolled so both servers see the identical client.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Self {
            stream,
            buf: Vec::with_capacity(8192),
        }
    }

    /// Send `request` and return (status, body).
    fn call(&mut self, request: &[u8]) -> (u16, Vec<u8>) {
        self.stream.write_all(request).expect("write");
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        loop {
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.stream.read(&mut chunk).expect("read body");
                    assert!(n > 0, "connection closed mid-body");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return (status, self.buf[end + 4..end + 4 + len].to_vec());
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn check_request(token: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The floor: hyper with nothing behind it, answering a decision-sized JSON body.
fn start_bare_hyper() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        let body = Bytes::from_static(br#"{"decision":"allow","decision_id":"0192f5f0-0000-7000-8000-000000000000","policy_version":"1+0000000000000000","policy_ids":["payments-autonomous"],"reasons":[{"code":"permitted","policy_id":"payments-autonomous","message":"permitted by `payments-autonomous`"}]}"#);
                        let mut resp = hyper::Response::new(Full::new(body));
                        resp.headers_mut().insert("content-type", "application/json".parse().expect("hv"));
                        Ok::<_, Infallible>(resp)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().expect("bare server address")
}

struct Mandate {
    child: Child,
    addr: SocketAddr,
    ready_after: Duration,
}

fn start_mandate(repo: &std::path::Path, audit_path: &std::path::Path) -> Mandate {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .current_dir(repo)
        .arg("serve")
        .env("MANDATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("MANDATE_EXT_AUTHZ__GRPC_LISTEN", "127.0.0.1:0")
        .env("MANDATE_AUDIT__PATH", audit_path)
        .env(
            "MANDATE_STORE__URL",
            audit_path.with_file_name("mandate.db"),
        )
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn mandate");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr: SocketAddr = loop {
        let line = lines
            .next()
            .expect("mandate exited before listening")
            .expect("line");
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .and_then(|a| a.parse().ok())
                .expect("address");
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let ready_after = loop {
        if let Ok(mut c) = TcpStream::connect(addr) {
            let _ = c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                break started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "mandate never became ready"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    Mandate {
        child,
        addr,
        ready_after,
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One measured stream: a keep-alive connection and the requests it cycles through (one
/// request: the same check repeated; `round_trips` distinct ones: every check a new one).
struct Stream<'a> {
    conn: Conn,
    /// Where in `requests` this round starts (requests never repeat across rounds).
    start: usize,
    requests: &'a [Vec<u8>],
    expect: &'a [u8],
    samples: Vec<Duration>,
}

impl<'a> Stream<'a> {
    fn new(
        addr: SocketAddr,
        start: usize,
        requests: &'a [Vec<u8>],
        expect: &'a [u8],
        sizes: Sizes,
    ) -> Self {
        Self {
            conn: Conn::new(addr),
            start,
            requests,
            expect,
            samples: Vec::with_capacity(sizes.round_trips),
        }
    }

    fn call(&mut self, i: usize, record: bool) {
        let request = &self.requests[(self.start + i) % self.requests.len()];
        let t = Instant::now();
        let (status, body) = self.conn.call(request);
        let elapsed = t.elapsed();
        assert_eq!(status, 200);
        assert!(
            find(&body, self.expect).is_some(),
            "{}",
            String::from_utf8_lossy(&body)
        );
        if record {
            self.samples.push(elapsed);
        }
    }

    fn p50(&mut self) -> Duration {
        self.samples.sort();
        percentile(&self.samples, 0.5)
    }
}

/// Sample the streams in turn, one call each per step, so that whatever else the machine is
/// doing at any moment weighs on all of them alike; the warm-up steps are not recorded.
fn measure(streams: &mut [Stream<'_>], sizes: Sizes) {
    for i in 0..sizes.steps() {
        for s in streams.iter_mut() {
            s.call(i, i >= sizes.warm_up);
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` (a debug build) does not: there, a smoke
    // run that checks every answer and judges no target.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let smoke = !args.iter().any(|a| a == "--bench");
    let sizes = if smoke { Sizes::SMOKE } else { Sizes::BENCH };
    let Sizes {
        round_trips,
        rounds,
        memory_checks,
        distinct_tokens,
        ..
    } = sizes;
    let steps = sizes.steps();
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let key = std::fs::read(repo.join("config/dev/signing-key.pem")).expect("dev key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let mint = |sub: &str| {
        mandate::identity::dev::mint(
            &key,
            "dev-1",
            "https://dev.mandate.invalid",
            "mandate",
            sub,
            Default::default(),
            Duration::from_secs(3600),
            now,
        )
        .expect("mint")
    };
    let body = r#"{"action":"payments:transfer","resource":{"type":"Account","id":"acct-1"},"context":{"amount":50}}"#;

    let bare = start_bare_hyper();
    // The audit log is on: every decision measured here is recorded before it is answered.
    let audit_dir = tempfile::tempdir().expect("tempdir");
    let mut m = start_mandate(&repo, &audit_dir.path().join("audit.jsonl"));
    let token = mint("agent-1");
    let check = check_request(&token, body);

    // Every check distinct (another resource id each time): each one is decided, none is a
    // repeat the decision cache could answer.
    let distinct: Vec<Vec<u8>> = (0..rounds * steps)
        .map(|i| {
            let body = format!(
                r#"{{"action":"payments:transfer","resource":{{"type":"Account","id":"acct-{i}"}},"context":{{"amount":50}}}}"#
            );
            check_request(&token, &body)
        })
        .collect();
    let same = vec![check.clone()];
    // Interleave the measurements call by call so drift on a shared machine hits them alike;
    // three rounds, and the median round of each (one round in a smoke run).
    let mut bare_p50 = Vec::new();
    let mut mandate_p50 = Vec::new();
    let mut mandate_p99 = Vec::new();
    let mut distinct_p50 = Vec::new();
    for round in 0..rounds {
        let start = round * steps;
        let mut streams = [
            Stream::new(bare, 0, &same, b"\"allow\"", sizes),
            Stream::new(m.addr, 0, &same, b"\"allow\"", sizes),
            Stream::new(m.addr, start, &distinct, b"\"allow\"", sizes),
        ];
        measure(&mut streams, sizes);
        let [b, s, d] = &mut streams;
        bare_p50.push(b.p50());
        mandate_p50.push(s.p50());
        mandate_p99.push(percentile(&s.samples, 0.99));
        distinct_p50.push(d.p50());
    }
    bare_p50.sort();
    mandate_p50.sort();
    mandate_p99.sort();
    distinct_p50.sort();
    let mid = rounds / 2;
    let (bare_med, mandate_med) = (bare_p50[mid], mandate_p50[mid]);
    let ratio = mandate_med.as_secs_f64() / bare_med.as_secs_f64();
    let distinct_ratio = distinct_p50[mid].as_secs_f64() / bare_med.as_secs_f64();

    // Memory: 10,000 checks from 1,000 distinct tokens (each verified once, then cached).
    let tokens: Vec<Vec<u8>> = (0..distinct_tokens)
        .map(|i| check_request(&mint(&format!("agent-{i}")), body))
        .collect();
    let mut conn = Conn::new(m.addr);
    let t = Instant::now();
    for i in 0..memory_checks {
        let (status, body) = conn.call(&tokens[i % distinct_tokens]);
        assert_eq!(status, 200);
        assert!(
            find(&body, b"\"allow\"").is_some(),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let spread_elapsed = t.elapsed();
    let pid = m.child.id();
    let rss = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");
    let _ = m.child.kill();
    let _ = m.child.wait();

    if smoke {
        let checks = rounds * steps * 2 + memory_checks;
        println!(
            "roundtrip: smoke run (test mode, debug build): {checks} checks against the real server, \
             every answer right; no target judged (ready after {:.0} ms; `cargo bench --bench roundtrip` measures)",
            m.ready_after.as_secs_f64() * 1e3
        );
        return;
    }

    println!(
        "mandate roundtrip benchmark (loopback, keep-alive connections sampled in turn, {round_trips} requests each x {rounds} rounds)"
    );
    println!(
        "  ready after start          {:>10.1} ms   (target < 200 ms)",
        m.ready_after.as_secs_f64() * 1e3
    );
    println!(
        "  bare hyper p50             {:>10.1} us",
        bare_med.as_secs_f64() * 1e6
    );
    println!(
        "  mandate /v1/check p50      {:>10.1} us",
        mandate_med.as_secs_f64() * 1e6
    );
    println!(
        "  mandate /v1/check p99      {:>10.1} us",
        mandate_p99[mid].as_secs_f64() * 1e6
    );
    println!(
        "  ratio mandate / bare       {:>10.2}      (target <= 1.5)",
        ratio
    );
    println!(
        "  distinct checks p50        {:>10.1} us   (a new check every time: each one decided)",
        distinct_p50[mid].as_secs_f64() * 1e6
    );
    println!(
        "  ratio distinct / bare      {:>10.2}      (target <= 1.5)",
        distinct_ratio
    );
    println!(
        "  {memory_checks} checks, {distinct_tokens} tokens {:>7.0} ms   ({:.0} checks/s, first use of each token verifies ES256)",
        spread_elapsed.as_secs_f64() * 1e3,
        memory_checks as f64 / spread_elapsed.as_secs_f64()
    );
    println!(
        "  resident memory after      {:>10.1} MiB  (target < 30 MiB; peak {:.1} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    let ok = m.ready_after < Duration::from_millis(200)
        && ratio <= 1.5
        && distinct_ratio <= 1.5
        && rss < 30 * 1024;
    println!(
        "  result                     {}",
        if ok { "PASS" } else { "FAIL" }
    );
}
