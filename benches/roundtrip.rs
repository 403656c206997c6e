//! Load benchmark of the real `mandate serve` process on loopback, against a floor measured
//! in the same run, the pinned way (benches/pinned/README.md): the whole benchmark, its light
//! client (prepared requests on a blocking socket), the bare server and every `mandate serve`
//! it starts, runs on one CPU (`PIN_CPU`, default the last one), so cross-CPU wake-ups, which
//! add the same tens of µs to both sides and pull every ratio toward 1, are out of the
//! figures and what remains is each server's own work. The servers are measured in turn,
//! each for a block of calls, in interleaved rounds, so machine noise weighs on all of them
//! alike.
//!
//! 1. start-up: spawn to the first `200` from `/readyz` (target < 200 ms);
//! 2. single-connection round trip of `POST /v1/check` (cached token) versus a bare hyper
//!    server answering a fixed JSON body over the same kind of connection, for the same check
//!    repeated and a new check every time, with the example bundle (10 policies) and with
//!    1,000 per-agent policies on the checked action (target <= 1.5x each);
//! 3. resident memory after 100,000 checks from 1,000 distinct tokens (target < 30 MiB).
//!
//! Run: `cargo bench --bench roundtrip`. Bounded: about a minute, loopback only. In test mode
//! (`cargo test --bench roundtrip`, a debug build, as scripts/test runs it) it is a smoke run:
//! the same steps, a few hundred checks, every answer checked, unpinned, no target judged.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark: a failed setup must stop it loudly"
)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
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
        round_trips: 20_000,
        warm_up: 1_000,
        rounds: 5,
        memory_checks: 100_000,
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
        // One worker per CPU this process may use (one when pinned), as `mandate serve` sizes
        // its own runtime: two workers on one CPU would add hand-offs the floor never pays
        // in the wrk-measured method.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
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

fn start_mandate(
    repo: &std::path::Path,
    audit_path: &std::path::Path,
    bundle: &std::path::Path,
) -> Mandate {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .current_dir(repo)
        .arg("serve")
        .env("MANDATE_POLICY__BUNDLE", bundle)
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

/// One round: each stream in turn makes its warm-up calls (not recorded) and then its
/// recorded calls, back to back, so a server is measured with its caches warm as a busy
/// sidecar's are; rounds repeat the sequence, so drift on a shared machine weighs on every
/// stream alike (the interleaved rounds of benches/pinned/ratio.sh).
fn measure(streams: &mut [Stream<'_>], sizes: Sizes) {
    for s in streams.iter_mut() {
        for i in 0..sizes.steps() {
            s.call(i, i >= sizes.warm_up);
        }
    }
}

/// Pin this thread, and so every thread and process it starts from now on, to one CPU.
fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).expect("pin to one CPU");
}

/// The example bundle plus `n` per-agent permits on the checked action, none of which matches
/// the workload: the shape of a fleet of agents each with its own bounds (the `same` mode of
/// benches/pinned/mandate/gen_bundle.py).
fn per_agent_bundle(src: &Path, dst: &Path, n: usize) {
    std::fs::create_dir_all(dst).expect("bundle dir");
    for entry in std::fs::read_dir(src).expect("example bundle") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
        }
    }
    let fillers: String = (0..n)
        .map(|i| {
            format!(
                "@id(\"filler-{i}\")\npermit (principal == Agent::\"filler-{i}\", \
                 action == Action::\"payments:transfer\", resource is Account)\n\
                 when {{ context.amount <= {} }};\n\n",
                i + 1
            )
        })
        .collect();
    std::fs::write(dst.join("fillers.cedar"), fillers).expect("fillers");
}

/// 100,000 checks (`sizes.memory_checks`) from 1,000 distinct tokens, each verified once and
/// then cached: (elapsed, resident KiB after, peak KiB).
fn memory_run(m: &Mandate, tokens: &[Vec<u8>], checks: usize) -> (Duration, u64, u64) {
    let mut conn = Conn::new(m.addr);
    let t = Instant::now();
    for i in 0..checks {
        let (status, body) = conn.call(&tokens[i % tokens.len()]);
        assert_eq!(status, 200);
        assert!(
            find(&body, b"\"allow\"").is_some(),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let elapsed = t.elapsed();
    let pid = m.child.id();
    (elapsed, rss_kib(pid, "VmRSS:"), rss_kib(pid, "VmHWM:"))
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
    // Before any thread or server exists, so all of them inherit it.
    let cpu = (!smoke).then(|| {
        let last = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
        let cpu = std::env::var("PIN_CPU")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(last);
        pin(cpu);
        cpu
    });
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
    let work = tempfile::tempdir().expect("tempdir");
    let per_agent = work.path().join("bundle-1000");
    per_agent_bundle(&repo.join("config/policies"), &per_agent, 1000);
    let mut servers = [
        ("example bundle (10 policies)", repo.join("config/policies")),
        ("1,000 per-agent policies", per_agent),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (name, bundle))| {
        let dir = work.path().join(format!("m{i}"));
        std::fs::create_dir_all(&dir).expect("server dir");
        (
            name,
            start_mandate(&repo, &dir.join("audit.jsonl"), &bundle),
        )
    })
    .collect::<Vec<_>>();
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
    // Interleaved rounds: in each, every stream in turn for a block of calls; five rounds,
    // and the best p50 and p99 of each, as benches/pinned/ratio.sh keeps (the least disturbed
    // round: on a shared machine noise only ever adds; one round in a smoke run). Stream 0 is the floor; then,
    // for each server, the same check repeated and a new check every time.
    let mut p50: Vec<Vec<Duration>> = vec![Vec::new(); 1 + 2 * servers.len()];
    let mut p99: Vec<Vec<Duration>> = vec![Vec::new(); 1 + 2 * servers.len()];
    for round in 0..rounds {
        let start = round * steps;
        let mut streams = vec![Stream::new(bare, 0, &same, b"\"allow\"", sizes)];
        for (_, m) in &servers {
            streams.push(Stream::new(m.addr, 0, &same, b"\"allow\"", sizes));
            streams.push(Stream::new(m.addr, start, &distinct, b"\"allow\"", sizes));
        }
        measure(&mut streams, sizes);
        for (i, s) in streams.iter_mut().enumerate() {
            p50[i].push(s.p50());
            p99[i].push(percentile(&s.samples, 0.99));
        }
    }
    let best = |v: &Vec<Duration>| v.iter().copied().min().unwrap_or_default();
    let p50: Vec<Duration> = p50.iter().map(best).collect();
    let p99: Vec<Duration> = p99.iter().map(best).collect();
    let floor = p50[0];

    // Memory: checks from 1,000 distinct tokens (each verified once, then cached).
    let tokens: Vec<Vec<u8>> = (0..distinct_tokens)
        .map(|i| check_request(&mint(&format!("agent-{i}")), body))
        .collect();
    let memory: Vec<(Duration, u64, u64)> = servers
        .iter()
        .map(|(_, m)| memory_run(m, &tokens, memory_checks))
        .collect();
    let ready_after = servers
        .iter()
        .map(|(_, m)| m.ready_after)
        .max()
        .unwrap_or_default();
    for (_, m) in &mut servers {
        let _ = m.child.kill();
        let _ = m.child.wait();
    }

    if smoke {
        let checks = rounds * steps * 2 * servers.len() + memory_checks * servers.len();
        println!(
            "roundtrip: smoke run (test mode, debug build): {checks} checks against the real server, \
             every answer right; no target judged (ready after {:.0} ms; `cargo bench --bench roundtrip` measures)",
            ready_after.as_secs_f64() * 1e3
        );
        return;
    }

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "mandate roundtrip benchmark, pinned: this process, its client, the bare server and each \
         mandate serve on CPU {}; loopback keep-alive connections measured in turn, {round_trips} \
         requests each x {rounds} interleaved rounds, best round",
        cpu.unwrap_or_default()
    );
    println!(
        "  ready after start              {:>8.1} ms   (target < 200 ms)",
        ready_after.as_secs_f64() * 1e3
    );
    println!(
        "  bare hyper (floor)        p50 {:>7.1} us  p99 {:>7.1} us",
        us(floor),
        us(p99[0])
    );
    let mut ok = ready_after < Duration::from_millis(200);
    for (i, (name, _)) in servers.iter().enumerate() {
        for (j, what) in ["same check repeated", "a new check every time"]
            .iter()
            .enumerate()
        {
            let k = 1 + 2 * i + j;
            let ratio = p50[k].as_secs_f64() / floor.as_secs_f64();
            ok &= ratio <= 1.5;
            println!(
                "  {name}, {what}:\n      /v1/check p50 {:>7.1} us  p99 {:>7.1} us   ratio to the floor {ratio:.2}  (target <= 1.5)",
                us(p50[k]),
                us(p99[k]),
            );
        }
    }
    for ((name, _), (elapsed, rss, hwm)) in servers.iter().zip(&memory) {
        ok &= *rss < 30 * 1024;
        println!(
            "  {name}: {memory_checks} checks from {distinct_tokens} tokens in {:.0} ms ({:.0} checks/s on one CPU with its client), resident after {:.1} MiB (target < 30 MiB; peak {:.1} MiB)",
            elapsed.as_secs_f64() * 1e3,
            memory_checks as f64 / elapsed.as_secs_f64(),
            *rss as f64 / 1024.0,
            *hwm as f64 / 1024.0
        );
    }
    println!(
        "  result                         {}",
        if ok { "PASS" } else { "FAIL" }
    );
}
