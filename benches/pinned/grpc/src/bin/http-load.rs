//! `http-load`: an open-loop HTTP/1.1 load client for the pinned benches, the HTTP twin of
//! `grpc-load --rate`, with which it shares its pacer and summary (this crate's `lib.rs`).
//!
//! N keep-alive connections; R requests a second in all, each connection sending its own share
//! on a fixed schedule (connection i at `i/R`, then every `N/R` seconds) whether or not the
//! server keeps up, as N agents each calling now and then do. A request due while its
//! connection still waits for the last answer goes as soon as the connection is free and is
//! counted in `late=` (a late request means the rate is past what the server sustains). Each
//! request is the same prepared bytes (built once, as `lib/check.lua` builds wrk's: `TOKEN`,
//! `BODY`, `METHOD`, `NO_BODY=1`, `HEADERS="Name: value|…"`); each answer must be `200`
//! (checked, with its whole body read by `Content-Length`). Latency runs from the moment a
//! request is written to the last byte of its answer. The schedule is kept by a pacer thread
//! that sleeps until each request is due (`nanosleep`, tens of µs of slack), not by tokio's
//! millisecond timer, which would send the requests of each millisecond in one burst.
//!
//! Usage: `http-load URL CONNS RATE SECONDS [WARMUP_S]` (loopback `http://` only). Prints one
//! line: `conns= rate= rps= latency_us_p50= latency_us_p99= latency_us_mean= requests= late=
//! errors=`; exits 3 at the first failed request (printed on stderr).

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Target {
    addr: SocketAddr,
    request: Vec<u8>,
}

fn target(url: &str) -> Result<Target, Error> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("the URL must be http://")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("refusing non-loopback target {addr}").into());
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let token = env("TOKEN").unwrap_or_else(|| "perf-token".into());
    let method = env("METHOD").unwrap_or_else(|| "POST".into());
    let body = env("BODY").unwrap_or_else(|| {
        r#"{"action":"payments:transfer","resource":{"type":"Account","id":"acct-1"},"context":{"amount":50}}"#.into()
    });
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n");
    if let Some(extra) = env("HEADERS") {
        for h in extra.split('|') {
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| format!("HEADERS: not `Name: value`: {h}"))?;
            head.push_str(&format!("{}: {}\r\n", k.trim(), v.trim()));
        }
    }
    let body = if env("NO_BODY").as_deref() == Some("1") {
        String::new()
    } else {
        head.push_str("Content-Type: application/json\r\n");
        body
    };
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    Ok(Target {
        addr,
        request: head.into_bytes(),
    })
}

/// Write the request, read one whole answer; its status.
async fn exchange(conn: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> Result<u16, String> {
    conn.write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("answer without content-length")?;
        while buf.len() < end + 4 + len {
            let n = conn
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read body: {e}"))?;
            if n == 0 {
                return Err("connection closed mid-body".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "no status".to_owned());
    }
}

struct Outcome {
    latencies_ns: Vec<u64>,
    late: u64,
    error: Option<String>,
}

async fn run(t: Target, conns: usize, rate: f64, secs: f64, warmup: f64) -> Result<bool, Error> {
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(secs);
    let every = Duration::from_secs_f64(conns as f64 / rate);
    let request = std::sync::Arc::new(t.request);
    let mut tasks = Vec::with_capacity(conns);
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut conn = TcpStream::connect(t.addr).await?;
        conn.set_nodelay(true)?;
        let request = request.clone();
        let (tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome {
                latencies_ns: Vec::with_capacity(1 << 16),
                late: 0,
                error: None,
            };
            let mut buf = Vec::with_capacity(4096);
            while let Some(due) = due_rx.recv().await {
                let t0 = Instant::now();
                if t0 >= due + every && due >= measure_from {
                    out.late += 1;
                }
                if t0 >= end {
                    break;
                }
                match exchange(&mut conn, &request, &mut buf).await {
                    Ok(200) if t0 >= measure_from => out
                        .latencies_ns
                        .push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX)),
                    Ok(200) => {}
                    Ok(status) => {
                        out.error = Some(format!(
                            "status {status}: {}",
                            String::from_utf8_lossy(&buf)
                        ));
                        break;
                    }
                    Err(e) => {
                        out.error = Some(e);
                        break;
                    }
                }
            }
            out
        }));
    }
    grpc_bench::pace(senders, start, rate, end);
    let mut lat = Vec::new();
    let (mut late, mut errors, mut first_error) = (0, 0, None);
    for task in tasks {
        let o = task.await?;
        lat.extend_from_slice(&o.latencies_ns);
        late += o.late;
        if let Some(e) = o.error {
            errors += 1;
            first_error.get_or_insert(e);
        }
    }
    let summary = grpc_bench::Summary::of(&mut lat);
    println!(
        "conns={conns} rate={rate:.0} rps={:.0} latency_us_p50={:.1} latency_us_p99={:.1} \
         latency_us_mean={:.1} requests={} late={late} errors={errors}",
        lat.len() as f64 / secs,
        summary.p50_us,
        summary.p99_us,
        summary.mean_us,
        lat.len()
    );
    if let Some(e) = first_error {
        eprintln!("http-load: FAILED: {e}");
        return Ok(false);
    }
    Ok(!lat.is_empty())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = (|| -> Result<bool, Error> {
        let [url, conns, rate, secs, rest @ ..] = &args[..] else {
            return Err("usage: http-load URL CONNS RATE SECONDS [WARMUP_S]".into());
        };
        let conns: usize = conns.parse()?;
        let rate: f64 = rate.parse()?;
        let secs: f64 = secs.parse()?;
        let warmup: f64 = rest.first().map_or(Ok(1.0), |w| w.parse())?;
        if conns == 0 || !(rate > 0.0 && secs > 0.0 && warmup >= 0.0) {
            return Err("CONNS, RATE and SECONDS must be positive".into());
        }
        let t = target(url)?;
        // One thread: the client stays light beside the server it measures.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(t, conns, rate, secs, warmup))
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            eprintln!("http-load: {e}");
            ExitCode::from(1)
        }
    }
}
