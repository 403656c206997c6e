//! `grpc-load`: a light load client for `envoy.service.auth.v3.Authorization/Check`.
//!
//! One HTTP/2 connection (the `h2` crate directly: no tonic client, no codec, no tower
//! stack) with N unary calls in flight. Each call sends a prepared byte buffer (the 5-byte
//! gRPC frame header and the encoded CheckRequest, built once at start), reads the reply,
//! and checks that the `grpc-status` is 0 and that the CheckResponse's `status.code` is the
//! expected one (`--expect-code`, default 0 = OK). The first failure stops the run, is
//! printed on stderr, and the exit status is 3.
//!
//! The CheckRequest is what Envoy sends for `POST /accounts/acct-1/transfers` with body
//! `{"amount":50}` on host `api.example.com`, with `content-type: application/json` and
//! `authorization: Bearer $TOKEN` (the `TOKEN` environment variable), in
//! `attributes.request.http` (method, path, host, headers, body). `--request FILE` sends the
//! encoded CheckRequest in FILE instead (protobuf bytes, without the gRPC frame).
//! `--distinct`: every call a different resource id (`acct-0000000001`, `acct-0000000002`,
//! …, fixed width so the prepared buffer is patched in place, never re-encoded), so no
//! decision cache answers twice.
//!
//! Usage: `grpc-load --addr HOST:PORT --streams N --seconds S [--warmup S] [--request FILE]
//! [--expect-code C] [--distinct] [--rate R] [--once]`. The target must be loopback.
//! Output, one line: `streams= rps= latency_us_p50= latency_us_p99= latency_us_mean= calls=
//! errors=` (and `rate= late=` with `--rate`).
//!
//! Without `--rate` the load is a closed loop: every stream sends its next call as soon as the
//! last one is answered, so the server runs at capacity and latency is queueing (N ÷ rps on
//! average). `--rate R` makes it open: R calls a second in all, each stream sending its own
//! share on a fixed schedule (stream i at `i/R`, then every `N/R` seconds) whether or not the
//! server keeps up, as agents do; a call due while its stream is still waiting goes as soon as
//! the stream is free and is counted in `late=` (a late call means the rate is past what the
//! server sustains, and the latencies understate the queue). Latency runs from the moment a
//! call is sent. The schedule is kept by a pacer thread that sleeps until each call is due
//! (`nanosleep`, tens of µs of slack), not by tokio's millisecond timer, which would send the
//! calls of each millisecond in one burst. `--once` makes one call and prints `grpc_status= check_code= ok_headers=`.
//! Latency is per call, from sending the request to reading the trailers; calls started
//! during the warm-up (default 1 s) are not counted.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use http::{HeaderValue, Method, Uri};
use prost::Message as _;
use tokio::net::TcpStream;

const PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
const DISTINCT_PLACEHOLDER: &[u8] = b"acct-0000000000";

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
struct Args {
    addr: SocketAddr,
    streams: usize,
    seconds: f64,
    warmup: f64,
    request: Option<String>,
    expect_code: i32,
    distinct: bool,
    once: bool,
    rate: Option<f64>,
}

fn usage() -> ! {
    eprintln!(
        "usage: grpc-load --addr HOST:PORT --streams N --seconds S [--warmup S] \
         [--request FILE] [--expect-code C] [--distinct] [--rate R] [--once]"
    );
    std::process::exit(2)
}

fn parse_args() -> Result<Args, Error> {
    let mut addr = None;
    let mut streams = 1;
    let mut seconds = None;
    let mut warmup = 1.0;
    let mut request = None;
    let mut expect_code = 0;
    let mut distinct = false;
    let mut once = false;
    let mut rate = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--addr" => addr = Some(value()?),
            "--streams" => streams = value()?.parse()?,
            "--seconds" => seconds = Some(value()?.parse()?),
            "--warmup" => warmup = value()?.parse()?,
            "--request" => request = Some(value()?),
            "--expect-code" => expect_code = value()?.parse()?,
            "--distinct" => distinct = true,
            "--once" => once = true,
            "--rate" => rate = Some(value()?.parse::<f64>()?),
            "-h" | "--help" => usage(),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let Some(addr) = addr else { usage() };
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    if !is_loopback(addr.ip()) {
        return Err(format!("refusing non-loopback target {addr}").into());
    }
    let seconds: f64 = match (seconds, once) {
        (Some(s), _) => s,
        (None, true) => 0.0,
        (None, false) => usage(),
    };
    if streams == 0 || !(seconds >= 0.0 && warmup >= 0.0) {
        return Err("--streams must be >= 1, --seconds and --warmup >= 0".into());
    }
    if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number of calls a second".into());
    }
    if distinct && request.is_some() {
        return Err("--distinct patches the built-in request; it cannot vary --request".into());
    }
    Ok(Args {
        addr,
        streams,
        seconds,
        warmup,
        request,
        expect_code,
        distinct,
        once,
        rate,
    })
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// The CheckRequest Envoy sends for the example transfer, resource id `account`.
fn envoy_check(token: &str, account: &str) -> CheckRequest {
    let path = format!("/accounts/{account}/transfers");
    let body = r#"{"amount":50}"#;
    let headers = [
        (":method", "POST"),
        (":path", path.as_str()),
        (":authority", "api.example.com"),
        ("content-type", "application/json"),
        ("authorization", &format!("Bearer {token}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".to_owned(),
                    path,
                    host: "api.example.com".to_owned(),
                    headers,
                    body: body.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The 5-byte gRPC frame header (uncompressed, big-endian length) and the message.
fn grpc_frame(message: &[u8]) -> Result<Bytes, Error> {
    let len = u32::try_from(message.len())?;
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(len);
    b.put_slice(message);
    Ok(b.freeze())
}

/// The prepared request body, and for `--distinct` where in it the resource id's digits
/// are (every occurrence: the `path` field and the `:path` header).
#[derive(Debug)]
struct Prepared {
    frame: Bytes,
    digit_offsets: Vec<usize>,
}

fn prepare(args: &Args) -> Result<Prepared, Error> {
    if let Some(file) = &args.request {
        let message = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
        CheckRequest::decode(message.as_slice())
            .map_err(|e| format!("{file} is not an encoded CheckRequest: {e}"))?;
        return Ok(Prepared {
            frame: grpc_frame(&message)?,
            digit_offsets: Vec::new(),
        });
    }
    let token = std::env::var("TOKEN").unwrap_or_default();
    if token.is_empty() {
        return Err("set TOKEN (the agent's Bearer token) or pass --request FILE".into());
    }
    if !args.distinct {
        let message = envoy_check(&token, "acct-1").encode_to_vec();
        return Ok(Prepared {
            frame: grpc_frame(&message)?,
            digit_offsets: Vec::new(),
        });
    }
    let placeholder = std::str::from_utf8(DISTINCT_PLACEHOLDER)?;
    let frame = grpc_frame(&envoy_check(&token, placeholder).encode_to_vec())?;
    let digit_offsets: Vec<usize> = frame
        .windows(DISTINCT_PLACEHOLDER.len())
        .enumerate()
        .filter(|(_, w)| *w == DISTINCT_PLACEHOLDER)
        .map(|(i, _)| i + b"acct-".len())
        .collect();
    if digit_offsets.len() != 2 {
        return Err(format!(
            "expected the resource id twice in the request (path, :path), found it {} times",
            digit_offsets.len()
        )
        .into());
    }
    Ok(Prepared {
        frame,
        digit_offsets,
    })
}

/// The prepared frame with resource id number `n` (10 digits) written in.
fn distinct_frame(p: &Prepared, n: u64) -> Bytes {
    let mut b = BytesMut::from(&p.frame[..]);
    let digits = format!("{:010}", n % 10_000_000_000);
    for &o in &p.digit_offsets {
        b[o..o + 10].copy_from_slice(digits.as_bytes());
    }
    b.freeze()
}

/// A protobuf varint at the start of `b`: (value, bytes read).
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Field `number` of a protobuf message: the last occurrence, as (wire type, value or
/// payload). Only what this client needs: varint and length-delimited fields are returned,
/// fixed-width ones are skipped.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn field(mut msg: &[u8], number: u64) -> Result<Option<Field<'_>>, String> {
    let mut found = None;
    while !msg.is_empty() {
        let (key, n) = varint(msg).ok_or("bad field key")?;
        msg = &msg[n..];
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let (v, n) = varint(msg).ok_or("bad varint")?;
                msg = &msg[n..];
                if num == number {
                    found = Some(Field::Varint(v));
                }
            }
            2 => {
                let (len, n) = varint(msg).ok_or("bad length")?;
                let len = usize::try_from(len).map_err(|_| "bad length")?;
                let end = n.checked_add(len).filter(|&e| e <= msg.len());
                let end = end.ok_or("truncated field")?;
                if num == number {
                    found = Some(Field::Bytes(&msg[n..end]));
                }
                msg = &msg[end..];
            }
            1 | 5 => {
                let w = if wire == 1 { 8 } else { 4 };
                msg = msg.get(w..).ok_or("truncated fixed field")?;
            }
            _ => return Err(format!("unsupported wire type {wire}")),
        }
    }
    Ok(found)
}

/// `status.code` of an encoded CheckResponse (proto3: absent means 0).
fn check_code(msg: &[u8]) -> Result<i32, String> {
    let status = match field(msg, 1)? {
        Some(Field::Bytes(s)) => s,
        Some(Field::Varint(_)) => return Err("CheckResponse.status is not a message".into()),
        None => return Ok(0),
    };
    match field(status, 1)? {
        // int32 on the wire: a negative value is sign-extended to 64 bits.
        Some(Field::Varint(v)) => Ok(v as i64 as i32),
        Some(Field::Bytes(_)) => Err("Status.code is not a varint".into()),
        None => Ok(0),
    }
}

/// The gRPC message in a reply body: exactly one uncompressed frame.
fn unframe(body: &[u8]) -> Result<&[u8], String> {
    if body.len() < 5 {
        return Err(format!("reply body of {} bytes: no gRPC frame", body.len()));
    }
    if body[0] != 0 {
        return Err("compressed reply frame".into());
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() != 5 + len {
        return Err(format!(
            "reply frame says {len} bytes, body has {}",
            body.len() - 5
        ));
    }
    Ok(&body[5..])
}

#[derive(Clone)]
struct Call {
    client: h2::client::SendRequest<Bytes>,
    uri: Uri,
}

/// One unary Check: the encoded CheckResponse, or why the call failed.
async fn call(c: &mut Call, frame: Bytes) -> Result<(u32, Bytes), String> {
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(c.uri.clone())
        .header("content-type", HeaderValue::from_static("application/grpc"))
        .header("te", HeaderValue::from_static("trailers"))
        .body(())
        .map_err(|e| e.to_string())?;
    let mut client = c
        .client
        .clone()
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let (response, mut send) = client
        .send_request(req, false)
        .map_err(|e| format!("send: {e}"))?;
    send.send_data(frame, true)
        .map_err(|e| format!("send body: {e}"))?;
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", response.status()));
    }
    // A trailers-only reply (an error) carries grpc-status in the headers.
    let header_status = response.headers().get("grpc-status").cloned();
    let mut body = response.into_body();
    let mut data = Bytes::new();
    let mut more: Option<BytesMut> = None;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("body: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if data.is_empty() && more.is_none() {
            data = chunk;
        } else {
            more.get_or_insert_with(|| BytesMut::from(&data[..]))
                .extend_from_slice(&chunk);
        }
    }
    if let Some(m) = more {
        data = m.freeze();
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| format!("trailers: {e}"))?;
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(header_status)
        .ok_or("no grpc-status")?;
    let status: u32 = status
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("bad grpc-status")?;
    if status != 0 {
        let msg = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        return Err(format!("grpc-status {status}: {msg}"));
    }
    Ok((status, data))
}

/// A call whose reply must be grpc-status 0 with CheckResponse code `expect`.
async fn checked_call(c: &mut Call, frame: Bytes, expect: i32) -> Result<(), String> {
    let (_, body) = call(c, frame).await?;
    let code = check_code(unframe(&body)?)?;
    if code != expect {
        return Err(format!(
            "CheckResponse status code {code}, expected {expect}"
        ));
    }
    Ok(())
}

async fn connect(addr: SocketAddr) -> Result<Call, Error> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("grpc-load: connection: {e}");
        }
    });
    let uri: Uri = format!("http://{addr}{PATH}").parse()?;
    Ok(Call { client, uri })
}

/// `--once`: one call, its reply decoded in full.
async fn once(args: &Args, prepared: &Prepared) -> Result<bool, Error> {
    let mut c = connect(args.addr).await?;
    let frame = if args.distinct {
        distinct_frame(prepared, 1)
    } else {
        prepared.frame.clone()
    };
    let (grpc_status, body) = call(&mut c, frame).await?;
    let resp = CheckResponse::decode(unframe(&body)?)?;
    let code = resp.status.as_ref().map_or(0, |s| s.code);
    let headers: Vec<String> = match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| format!("{}:{}", h.key, h.value))
            .collect(),
        _ => Vec::new(),
    };
    println!(
        "grpc_status={grpc_status} check_code={code} ok_headers={}",
        headers.join(",").replace(' ', "")
    );
    if code != args.expect_code {
        eprintln!("grpc-load: CheckResponse: {resp:?}");
    }
    Ok(code == args.expect_code)
}

#[derive(Default)]
struct Totals {
    latencies_ns: Vec<u64>,
    first_error: Option<String>,
    errors: u64,
    /// Open loop: calls sent after their due time because their stream was still waiting.
    late: u64,
}

async fn run(args: &Args, prepared: Prepared) -> Result<bool, Error> {
    let c = connect(args.addr).await?;
    let prepared = Arc::new(prepared);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let streams = args.streams as u64;
    let mut tasks = Vec::with_capacity(args.streams);
    let mut senders = Vec::new();
    for i in 0..streams {
        let mut c = c.clone();
        let (prepared, stop, totals) = (prepared.clone(), stop.clone(), totals.clone());
        let (distinct, expect) = (args.distinct, args.expect_code);
        // Open loop: the pacer hands this stream the due time of each of its calls.
        let every = args
            .rate
            .map(|r| Duration::from_secs_f64(streams as f64 / r));
        let mut paced = every.map(|_| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            senders.push(tx);
            rx
        });
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut n = i + 1;
            let mut err = None;
            let mut late = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let frame = if distinct {
                    n += streams;
                    distinct_frame(&prepared, n)
                } else {
                    prepared.frame.clone()
                };
                if let (Some(rx), Some(every)) = (paced.as_mut(), every) {
                    let Some(due) = rx.recv().await else { break };
                    if Instant::now() >= due + every && due >= measure_from {
                        late += 1;
                    }
                }
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                match checked_call(&mut c, frame, expect).await {
                    Ok(()) if t0 >= measure_from => {
                        lat.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
                    }
                    Ok(()) => {}
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        err = Some(e);
                        break;
                    }
                }
            }
            let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
            t.latencies_ns.extend_from_slice(&lat);
            t.late += late;
            if let Some(e) = err {
                t.errors += 1;
                t.first_error.get_or_insert(e);
            }
        }));
    }
    if let Some(rate) = args.rate {
        grpc_bench::pace(senders, start, rate, end);
    }
    for t in tasks {
        t.await?;
    }
    let measured = end
        .min(Instant::now())
        .saturating_duration_since(measure_from);
    let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
    let mut lat = std::mem::take(&mut t.latencies_ns);
    let summary = grpc_bench::Summary::of(&mut lat);
    let secs = measured.as_secs_f64();
    let rps = if secs > 0.0 {
        lat.len() as f64 / secs
    } else {
        0.0
    };
    let open = args
        .rate
        .map(|r| format!(" rate={r:.0} late={}", t.late))
        .unwrap_or_default();
    println!(
        "streams={} rps={:.0} latency_us_p50={:.1} latency_us_p99={:.1} latency_us_mean={:.1} \
         calls={} errors={}{open}",
        args.streams,
        rps,
        summary.p50_us,
        summary.p99_us,
        summary.mean_us,
        lat.len(),
        t.errors
    );
    if let Some(e) = &t.first_error {
        eprintln!("grpc-load: FAILED: {e}");
        return Ok(false);
    }
    if lat.is_empty() {
        eprintln!("grpc-load: FAILED: no call completed in the measured window");
        return Ok(false);
    }
    Ok(true)
}

fn main() -> ExitCode {
    let result = (|| -> Result<bool, Error> {
        let args = parse_args()?;
        let prepared = prepare(&args)?;
        // One thread: the client stays light, and pinned runs share one CPU with the server.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        if args.once {
            rt.block_on(once(&args, &prepared))
        } else {
            rt.block_on(run(&args, prepared))
        }
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            eprintln!("grpc-load: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::rpc;

    #[test]
    fn check_code_reads_what_prost_encodes() {
        for code in [0, 7, 16, -1] {
            let r = CheckResponse {
                status: Some(rpc::Status {
                    code,
                    message: "x".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert_eq!(check_code(&r.encode_to_vec()), Ok(code));
        }
        assert_eq!(check_code(&CheckResponse::default().encode_to_vec()), Ok(0));
    }

    #[test]
    fn distinct_frames_decode_with_their_resource_id() {
        let args = Args {
            addr: "127.0.0.1:1".parse().unwrap(),
            streams: 1,
            seconds: 1.0,
            warmup: 0.0,
            request: None,
            expect_code: 0,
            distinct: true,
            once: false,
            rate: None,
        };
        std::env::set_var("TOKEN", "t");
        let p = prepare(&args).unwrap();
        let f = distinct_frame(&p, 42);
        let req = CheckRequest::decode(unframe(&f).unwrap()).unwrap();
        let http = req.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(http.path, "/accounts/acct-0000000042/transfers");
        assert_eq!(http.headers[":path"], http.path);
        assert_eq!(http.headers["authorization"], "Bearer t");
        assert_eq!(http.body, r#"{"amount":50}"#);
    }
}
