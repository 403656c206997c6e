//! Soak run (docs/security.md R-02a, R-02b): the release `mandate serve` process under a
//! steady mix of checks, escalations and reviews from 1,000 distinct tokens for N minutes,
//! its memory sampled every 10 s, and a verdict on whether resident memory stays flat once
//! warmed up. Not part of CI; run it through `scripts/soak [MINUTES]`.
//!
//! Load (per second, `--rps`, default 1,000): 75 % checks inside the agent's authority
//! (allow), 10 % refused ones (deny), 10 % escalations (a new amount each time, so each is a
//! new approval request), 5 % repeats of an approved request (allowed by its grant); an
//! approver client lists the pending requests and approves or denies them all the while.
//!
//! Every 10 s one CSV row (`--csv`): elapsed seconds, VmRSS and VmHWM (KiB), open file
//! descriptors, threads, requests and errors so far. The verdict looks at the last two
//! thirds of the run (the first third is warm-up): RSS growth (mean of its last three
//! samples minus mean of its first three) below `--max-growth-mib` (default 4, R-02b), and
//! for windows of 20 minutes or more, the least-squares slope below
//! `--max-slope-mib-per-10min` (default 1, R-02a); shorter windows report the slope without
//! judging it (it would extrapolate noise). Any error (a status other than the expected
//! one, a lost connection) fails the run too. Exit 0 only when all hold.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "a load script: a failed setup must stop it loudly"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DISTINCT_TOKENS: usize = 1_000;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const LOAD_THREADS: usize = 2;

struct Options {
    minutes: f64,
    rps: f64,
    csv: PathBuf,
    max_growth_mib: f64,
    max_slope_mib: f64,
}

fn options() -> Options {
    let mut o = Options {
        minutes: 30.0,
        rps: 1_000.0,
        csv: PathBuf::from("soak.csv"),
        max_growth_mib: 4.0,
        max_slope_mib: 1.0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--minutes" => o.minutes = value().parse().expect("--minutes"),
            "--rps" => o.rps = value().parse().expect("--rps"),
            "--csv" => o.csv = PathBuf::from(value()),
            "--max-growth-mib" => o.max_growth_mib = value().parse().expect("--max-growth-mib"),
            "--max-slope-mib-per-10min" => {
                o.max_slope_mib = value().parse().expect("--max-slope-mib-per-10min");
            }
            // `cargo bench` passes `--bench`; nothing else is expected.
            _ => {}
        }
    }
    o
}

/// A keep-alive HTTP/1.1 connection: one request, exactly one response (by Content-Length).
struct Conn {
    addr: SocketAddr,
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            addr,
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    /// (status, body); reconnects once if the server closed the connection.
    fn call(&mut self, request: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        match self.call_once(request) {
            Ok(r) => Ok(r),
            Err(_) => {
                *self = Conn::new(self.addr)?;
                self.call_once(request)
            }
        }
    }

    fn call_once(&mut self, request: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        self.stream.write_all(request)?;
        self.buf.clear();
        let mut chunk = [0u8; 16384];
        loop {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.stream.read(&mut chunk)?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return Ok((status, self.buf[end + 4..end + 4 + len].to_vec()));
            }
        }
    }
}

fn request(method: &str, path: &str, token: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn transfer(account: u64, amount: u64) -> String {
    format!(
        r#"{{"action":"payments:transfer","resource":{{"type":"Account","id":"acct-{account}"}},"context":{{"amount":{amount}}}}}"#
    )
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn mint(key: &[u8], sub: &str, claims: serde_json::Value, ttl: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    mandate::identity::dev::mint(
        key,
        "dev-1",
        "https://dev.mandate.invalid",
        "mandate",
        sub,
        claims.as_object().cloned().unwrap_or_default(),
        ttl,
        now,
    )
    .expect("mint")
}

fn start_mandate(repo: &Path, audit: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .current_dir(repo)
        .arg("serve")
        .env("MANDATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("MANDATE_EXT_AUTHZ__GRPC_LISTEN", "127.0.0.1:0")
        .env("MANDATE_AUDIT__PATH", audit)
        .env("MANDATE_STORE__URL", audit.with_file_name("mandate.db"))
        // The flood guard (A-16) is not under test: a steady stream of escalations from
        // 1,000 agents must not be refused by it.
        .env("MANDATE_STORE__MAX_PENDING_PER_PRINCIPAL", "1000")
        .env("MANDATE_STORE__MAX_REQUESTS_PER_HOUR", "10000")
        .env("MANDATE_LOG__FORMAT", "text")
        .env("RUST_LOG", "warn,mandate=info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn mandate");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
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
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn count_dir(path: &str) -> u64 {
    std::fs::read_dir(path)
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    counters: Counters,
    stop: AtomicBool,
    /// Approved (agent, account, amount): repeated to use their grant.
    granted: Mutex<Vec<(usize, u64, u64)>>,
    /// Escalated and not yet reviewed: request id -> (agent, account, amount).
    escalated: Mutex<std::collections::HashMap<String, (usize, u64, u64)>>,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn error(&self, what: String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap() = Some(what);
    }
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
}

/// One load thread: `rps` requests a second, paced, on one keep-alive connection.
fn load(addr: SocketAddr, tokens: Arc<Vec<String>>, shared: Arc<Shared>, rps: f64, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut conn = Conn::new(addr).expect("connect");
    let interval = Duration::from_secs_f64(1.0 / rps);
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            // Far behind (the machine is shared): drop the backlog rather than burst.
            next = now;
        }
        next += interval;
        let agent = rng.below(DISTINCT_TOKENS as u64) as usize;
        let pick = rng.below(100);
        let (agent, account, amount, want) = match pick {
            0..75 => (agent, rng.below(100), 1 + rng.below(100), "allow"),
            75..85 => (agent, rng.below(100), 10_001 + rng.below(10_000), "deny"),
            85..95 => (agent, rng.below(100), 101 + rng.below(9_900), "escalate"),
            _ => {
                let granted = {
                    let g = shared.granted.lock().unwrap();
                    (!g.is_empty()).then(|| g[rng.below(g.len() as u64) as usize])
                };
                match granted {
                    Some((agent, account, amount)) => (agent, account, amount, "grant"),
                    None => (agent, rng.below(100), 1 + rng.below(100), "allow"),
                }
            }
        };
        let req = request(
            "POST",
            "/v1/check",
            &tokens[agent],
            &transfer(account, amount),
        );
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        match conn.call(&req) {
            Ok((200, body)) => {
                let v = json(&body);
                match (want, v["decision"].as_str().unwrap_or("")) {
                    ("escalate", "escalate") => {
                        if let Some(id) = v["approval_request"]["id"].as_str() {
                            shared
                                .escalated
                                .lock()
                                .unwrap()
                                .insert(id.to_owned(), (agent, account, amount));
                        }
                    }
                    // An amount approved before for the same agent and account is allowed
                    // by its grant; a grant used again may have been denied meanwhile.
                    ("allow", "allow") | ("deny", "deny") | ("escalate", "allow") => {}
                    ("grant", "allow" | "escalate") => {}
                    _ => shared.error(format!("wanted {want}, got {v}")),
                }
            }
            Ok((status, body)) => {
                shared.error(format!("check answered {status}: {}", json(&body)));
            }
            Err(e) => shared.error(format!("check failed: {e}")),
        }
    }
}

/// The approver: list pending requests, approve four in five, deny the rest.
fn approve(addr: SocketAddr, token: String, shared: Arc<Shared>) {
    let mut conn = Conn::new(addr).expect("connect");
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let ids: Vec<String> = shared
            .escalated
            .lock()
            .unwrap()
            .keys()
            .take(50)
            .cloned()
            .collect();
        if ids.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let list = request("GET", "/v1/approvals?status=pending&limit=50", &token, "");
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        match conn.call(&list) {
            Ok((200, _)) => {}
            Ok((s, b)) => shared.error(format!("list answered {s}: {}", json(&b))),
            Err(e) => shared.error(format!("list failed: {e}")),
        }
        for id in ids {
            let Some(what) = shared.escalated.lock().unwrap().remove(&id) else {
                continue;
            };
            n += 1;
            let (verb, body) = if n.is_multiple_of(5) {
                ("deny", r#"{"rationale":"soak"}"#)
            } else {
                (
                    "approve",
                    r#"{"rationale":"soak","evidence":{"ticket":"FIN-1"}}"#,
                )
            };
            let req = request("POST", &format!("/v1/approvals/{id}/{verb}"), &token, body);
            shared.counters.requests.fetch_add(1, Ordering::Relaxed);
            match conn.call(&req) {
                Ok((200, _)) if verb == "approve" => shared.granted.lock().unwrap().push(what),
                Ok((200, _)) => {}
                // The same request escalated twice while pending is one request: the second
                // review finds it decided.
                Ok((409, _)) => {}
                Ok((s, b)) => shared.error(format!("{verb} answered {s}: {}", json(&b))),
                Err(e) => shared.error(format!("{verb} failed: {e}")),
            }
        }
        // Grants expire after an hour; keep the list of grants to reuse bounded.
        let mut g = shared.granted.lock().unwrap();
        if g.len() > 10_000 {
            g.drain(..5_000);
        }
    }
}

struct Sample {
    secs: f64,
    rss_kib: u64,
}

/// Least-squares slope of RSS in MiB per 10 minutes.
fn slope_mib_per_10min(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    let mx = samples.iter().map(|s| s.secs).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.secs - mx) * (s.rss_kib as f64 - my);
        den += (s.secs - mx).powi(2);
    }
    if den == 0.0 {
        return 0.0;
    }
    num / den * 600.0 / 1024.0
}

fn main() {
    // `cargo bench` (scripts/soak) passes `--bench`; `cargo test --benches` (a debug build)
    // does not, and a half-hour run judged against release targets means nothing there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("soak: not run in test mode (a release run of minutes: scripts/soak)");
        return;
    }
    let o = options();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("mandate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("soak directory");
    let audit = dir.join("audit.jsonl");
    let key = std::fs::read(repo.join("config/dev/signing-key.pem")).expect("dev key");
    let ttl = Duration::from_secs_f64(o.minutes * 60.0 + 900.0);
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..DISTINCT_TOKENS)
            .map(|i| {
                mint(
                    &key,
                    &format!("agent-{i}"),
                    serde_json::json!({"owner": "bob"}),
                    ttl,
                )
            })
            .collect(),
    );
    let alice = mint(
        &key,
        "alice",
        serde_json::json!({"groups": ["finance-approvers"]}),
        ttl,
    );
    let (mut child, addr) = start_mandate(&repo, &audit);
    let pid = child.id();
    println!(
        "soak: {} min at {} requests/s against pid {pid} on {addr}; {DISTINCT_TOKENS} tokens; \
         samples every {}s to {}",
        o.minutes,
        o.rps,
        SAMPLE_EVERY.as_secs(),
        o.csv.display()
    );
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        stop: AtomicBool::new(false),
        granted: Mutex::new(Vec::new()),
        escalated: Mutex::new(std::collections::HashMap::new()),
        last_error: Mutex::new(None),
    });
    let mut threads = Vec::new();
    for i in 0..LOAD_THREADS {
        let (t, s) = (Arc::clone(&tokens), Arc::clone(&shared));
        let rps = o.rps / LOAD_THREADS as f64;
        threads.push(std::thread::spawn(move || {
            load(addr, t, s, rps, 0x9E37_79B9_7F4A_7C15 ^ i as u64)
        }));
    }
    {
        let s = Arc::clone(&shared);
        threads.push(std::thread::spawn(move || approve(addr, alice, s)));
    }

    let mut csv = std::fs::File::create(&o.csv).expect("csv");
    writeln!(csv, "elapsed_s,rss_kib,hwm_kib,fds,threads,requests,errors").expect("csv");
    let started = Instant::now();
    let end = Duration::from_secs_f64(o.minutes * 60.0);
    let mut samples = Vec::new();
    let mut alive = true;
    loop {
        let secs = started.elapsed().as_secs_f64();
        if let Ok(Some(status)) = child.try_wait() {
            println!("soak: mandate exited early: {status}");
            alive = false;
            break;
        }
        let rss = status_kib(pid, "VmRSS:");
        let hwm = status_kib(pid, "VmHWM:");
        let fds = count_dir(&format!("/proc/{pid}/fd"));
        let threads_n = count_dir(&format!("/proc/{pid}/task"));
        let requests = shared.counters.requests.load(Ordering::Relaxed);
        let errors = shared.counters.errors.load(Ordering::Relaxed);
        writeln!(
            csv,
            "{secs:.0},{rss},{hwm},{fds},{threads_n},{requests},{errors}"
        )
        .expect("csv");
        println!(
            "  {secs:>6.0} s  rss {:>6.1} MiB  hwm {:>6.1} MiB  fds {fds:>3}  threads {threads_n:>2}  \
             requests {requests:>8}  errors {errors}",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        samples.push(Sample { secs, rss_kib: rss });
        if started.elapsed() >= end {
            break;
        }
        let next = SAMPLE_EVERY * samples.len() as u32;
        std::thread::sleep(next.saturating_sub(started.elapsed()).min(end));
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();

    let requests = shared.counters.requests.load(Ordering::Relaxed);
    let errors = shared.counters.errors.load(Ordering::Relaxed);
    let granted = shared.granted.lock().unwrap().len();
    let window: Vec<Sample> = samples
        .into_iter()
        .filter(|s| s.secs >= elapsed / 3.0 - 1.0)
        .collect();
    let mean = |s: &[Sample]| s.iter().map(|x| x.rss_kib as f64).sum::<f64>() / s.len() as f64;
    let k = window.len().min(3);
    let first = mean(&window[..k]);
    let last = mean(&window[window.len() - k..]);
    let growth_mib = (last - first) / 1024.0;
    let slope = slope_mib_per_10min(&window);
    let window_min = window
        .last()
        .zip(window.first())
        .map_or(0.0, |(l, f)| (l.secs - f.secs) / 60.0);
    let peak_mib = window.iter().map(|s| s.rss_kib).max().unwrap_or(0) as f64 / 1024.0;
    // Judged from the run asked for (the last two thirds of a 30-minute run are 20 minutes),
    // not from sample times, whose window falls a few seconds short of it.
    let judge_slope = o.minutes * 2.0 / 3.0 >= 20.0;
    let flat = growth_mib < o.max_growth_mib && (!judge_slope || slope < o.max_slope_mib);
    println!(
        "soak: {requests} requests in {elapsed:.0} s ({:.0}/s), {errors} errors, {granted} approvals \
         granted",
        requests as f64 / elapsed
    );
    println!(
        "soak: after warm-up ({:.1} min window, {} samples): RSS {:.1} -> {:.1} MiB, growth \
         {growth_mib:+.2} MiB (bound {} MiB), slope {slope:+.2} MiB per 10 min ({}), peak {peak_mib:.1} MiB",
        window_min,
        window.len(),
        first / 1024.0,
        last / 1024.0,
        o.max_growth_mib,
        if judge_slope {
            format!("bound {} MiB", o.max_slope_mib)
        } else {
            "not judged under 20 min".to_owned()
        }
    );
    if let Some(e) = shared.last_error.lock().unwrap().as_ref() {
        println!("soak: last error: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let pass = alive && errors == 0 && flat;
    println!(
        "soak: {}",
        if pass {
            "PASS (RSS flat after warm-up, no errors)"
        } else {
            "FAIL"
        }
    );
    if !pass {
        std::process::exit(1);
    }
}
