//! Key sets fetched from a URL, against the real server and a local JWKS server whose
//! content, latency and TLS certificate each test controls: a hung or tarpitting issuer never
//! holds a decision (K-05), a key removed from the set is dropped by the background refresh
//! alone (K-13), and an https issuer is trusted only through the configured CA, failing
//! closed otherwise. Each case names its docs/security.md id.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use common::{TestServer, config_from, make_pki, repo};
use http_body_util::Full;
use hyper::body::Bytes;
use mandate::config::{Config, TlsConfig};
use serde_json::{Value, json};

const ISS: &str = "https://idp.jwks-remote.test";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Generous bound for one decision on a shared, noisy 2-core machine; the sidecar waits at
/// most 100 ms on a fetch.
const FAST: Duration = Duration::from_secs(1);

/// An ES256 signing key and its public JWK.
struct SigningKey {
    kid: String,
    pkcs8: Vec<u8>,
    jwk: Value,
}

impl SigningKey {
    fn new(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let p = kp.public_key().as_ref();
        let jwk = json!({"kty":"EC","crv":"P-256","kid":kid,"alg":"ES256","use":"sig",
                         "x":B64.encode(&p[1..33]),"y":B64.encode(&p[33..65])});
        Self {
            kid: kid.into(),
            pkcs8: pkcs8.as_ref().to_vec(),
            jwk,
        }
    }

    fn token(&self) -> String {
        self.token_with_kid(&self.kid)
    }

    /// Signed by this key, but naming `kid` in the header.
    fn token_with_kid(&self, kid: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        let claims = json!({"iss": ISS, "aud": "mandate", "sub": "agent-remote",
                            "iat": now, "exp": now + 300});
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8),
        )
        .unwrap()
    }
}

/// A JWKS server on 127.0.0.1 (plain or TLS) serving whatever the test sets, counting
/// requests, and able to hang: read the request, then never answer.
#[derive(Clone)]
struct JwksServer {
    addr: SocketAddr,
    tls: bool,
    hits: Arc<AtomicUsize>,
    doc: Arc<Mutex<(String, Option<String>)>>,
    hang: Arc<AtomicBool>,
}

impl JwksServer {
    async fn start(keys: &[&SigningKey], tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            tls: tls.is_some(),
            hits: Arc::new(AtomicUsize::new(0)),
            doc: Arc::new(Mutex::new((String::new(), None))),
            hang: Arc::new(AtomicBool::new(false)),
        };
        server.set(keys, None);
        let me = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (me, tls) = (me.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        // A failed handshake (an untrusting client) just drops the connection.
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                me.serve(s).await;
                            }
                        }
                        None => me.serve(stream).await,
                    }
                });
            }
        });
        server
    }

    async fn serve<S>(self, io: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |_req| {
            let me = self.clone();
            async move {
                me.hits.fetch_add(1, Ordering::SeqCst);
                if me.hang.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                let (body, cache_control) = me.doc.lock().unwrap().clone();
                let mut resp = hyper::Response::builder()
                    .status(200)
                    .header("content-type", "application/json");
                if let Some(cc) = cache_control {
                    resp = resp.header("cache-control", cc);
                }
                Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(body))).unwrap())
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
            .await;
    }

    fn set(&self, keys: &[&SigningKey], cache_control: Option<&str>) {
        let keys: Vec<&Value> = keys.iter().map(|k| &k.jwk).collect();
        *self.doc.lock().unwrap() = (
            json!({ "keys": keys }).to_string(),
            cache_control.map(str::to_owned),
        );
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/jwks", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Accepts TCP connections and then sends nothing, ever.
async fn tarpit() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    url
}

/// The example policy bundle and one issuer whose keys come from `url`.
fn config(dir: &Path, url: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[policy]
bundle = "{bundle}"

[[issuers]]
name = "remote"
issuer = "{ISS}"
audiences = ["mandate"]
algorithms = ["ES256"]
jwks_url = "{url}"
{extra}
"#,
        bundle = repo().join("config/policies").display()
    );
    config_from(&text, &dir.join("mandate.toml"), &[])
}

const READ: &str = r#"{"action":"crm:read","resource":{"type":"CrmRecord","id":"c-1"}}"#;

/// POST a `crm:read` check with `token`: (status, body, how long it took).
async fn check(s: &TestServer, token: &str) -> (u16, Value, Duration) {
    let t0 = Instant::now();
    let (status, body) = s
        .post(
            "/v1/check",
            Some(token),
            &serde_json::from_str(READ).unwrap(),
        )
        .await;
    (status, body, t0.elapsed())
}

async fn readyz(s: &TestServer) -> (u16, Value) {
    let r = s.client.get(s.url("/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap(),
    )
}

/// Poll `/readyz` until the issuer's fetch error satisfies `want` (or `within` passes).
async fn wait_for_jwks_error(s: &TestServer, within: Duration, want: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let (_, v) = readyz(s).await;
        if v["jwks_errors"]["remote"].as_str().is_some_and(&want) {
            return;
        }
        assert!(Instant::now() < deadline, "no matching jwks error: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k05_hung_jwks_endpoint_never_holds_a_check() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = SigningKey::new("k1");
    let jwks = JwksServer::start(&[&k1], None).await;
    // Every unknown kid may start (or join) a refetch: the worst case for the request path.
    // The fetch timeout stays at its 5 s default: no decision may depend on it.
    let cfg = config(
        dir.path(),
        &jwks.url(),
        r#"jwks_min_refetch_interval = "0s""#,
    );
    let s = TestServer::start(&cfg).await;
    let good = k1.token();
    let (status, v, _) = check(&s, &good).await;
    assert_eq!(
        (status, v["decision"].as_str()),
        (200, Some("allow")),
        "{v}"
    );

    jwks.hang.store(true, Ordering::SeqCst);
    let hits = jwks.hits();
    for i in 0..5 {
        let (status, v, took) = check(&s, &k1.token_with_kid(&format!("rotated-{i}"))).await;
        assert_eq!(status, 401, "{v}");
        assert_eq!(v["error"], "key_unknown", "{v}");
        assert!(
            took < FAST,
            "an unknown kid was held {took:?} by a hung issuer"
        );
        let (status, v, took) = check(&s, &good).await;
        assert_eq!(
            (status, v["decision"].as_str()),
            (200, Some("allow")),
            "{v}"
        );
        assert!(took < FAST, "a known kid was held {took:?}");
    }
    // Single flight: one hung refetch, joined by every later miss, never stacked up.
    assert_eq!(jwks.hits(), hits + 1);
    // Last good keys keep the sidecar ready; the hung fetch gives up at its timeout and
    // says so, naming the URL.
    assert_eq!(readyz(&s).await.0, 200);
    wait_for_jwks_error(&s, Duration::from_secs(15), |e| {
        e.contains(&jwks.url()) && e.contains("timed out")
    })
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn k05_tarpit_jwks_at_startup_is_bounded_by_the_fetch_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let url = tarpit().await;
    let cfg = config(dir.path(), &url, r#"jwks_fetch_timeout = "1s""#);
    let t0 = Instant::now();
    let s = TestServer::start(&cfg).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "start-up took {took:?} with a 1 s fetch timeout"
    );
    let (status, v) = readyz(&s).await;
    assert_eq!(status, 503, "{v}");
    let err = v["jwks_errors"]["remote"].as_str().unwrap_or_default();
    assert!(err.contains(&url) && err.contains("timed out"), "{v}");
    let k1 = SigningKey::new("k1");
    for _ in 0..3 {
        let (status, v, took) = check(&s, &k1.token()).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (401, Some("key_unavailable")),
            "{v}"
        );
        assert!(took < FAST, "a check was held {took:?} by a tarpit");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k13_removed_key_is_dropped_by_the_background_refresh_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (SigningKey::new("k1"), SigningKey::new("k2"));
    let jwks = JwksServer::start(&[&k1, &k2], None).await;
    // A server asking for an hour of caching must not stretch the configured refresh.
    jwks.set(&[&k1, &k2], Some("max-age=3600"));
    let cfg = config(
        dir.path(),
        &jwks.url(),
        "jwks_refresh = \"1s\"\njwks_min_refetch_interval = \"1h\"",
    );
    let s = TestServer::start(&cfg).await;
    let (t1, t2) = (k1.token(), k2.token());
    for t in [&t1, &t2] {
        let (status, v, _) = check(&s, t).await;
        assert_eq!(
            (status, v["decision"].as_str()),
            (200, Some("allow")),
            "{v}"
        );
    }
    // Use up the one unknown-kid refetch allowed this hour, so only the background refresh
    // can bring in the new key set.
    let (status, v, _) = check(&s, &k1.token_with_kid("warm-up")).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("key_unknown")),
        "{v}"
    );

    jwks.set(&[&k2], Some("max-age=3600"));
    let removed_at = Instant::now();
    let deadline = removed_at + Duration::from_secs(10);
    loop {
        let (status, v, _) = check(&s, &t1).await;
        if status == 401 {
            assert_eq!(v["error"], "key_unknown", "{v}");
            break;
        }
        assert_eq!(v["decision"], "allow", "{v}");
        assert!(
            Instant::now() < deadline,
            "k1 still accepted 10 s after removal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = removed_at.elapsed();
    // One 1 s refresh period, plus slack for a loaded machine.
    assert!(took < Duration::from_secs(5), "k1 dropped after {took:?}");
    let (status, v, _) = check(&s, &t2).await;
    assert_eq!(
        (status, v["decision"].as_str()),
        (200, Some("allow")),
        "{v}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn https_jwks_is_trusted_only_through_the_configured_ca() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pki = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    make_pki(other.path());
    let acceptor = mandate::api::server::tls_acceptor(&TlsConfig {
        cert: pki.path().join("server.pem"),
        key: pki.path().join("server-key.pem"),
        client_ca: None,
    })
    .unwrap();
    let k1 = SigningKey::new("k1");
    let jwks = JwksServer::start(&[&k1], Some(acceptor)).await;
    let url = jwks.url();
    assert!(url.starts_with("https://127.0.0.1:"));

    // Trusted through `jwks_ca_file`: keys load, the sidecar is ready, tokens verify.
    let ca = pki.path().join("ca.pem");
    let cfg = config(
        pki.path(),
        &url,
        &format!("jwks_ca_file = \"{}\"", ca.display()),
    );
    let s = TestServer::start(&cfg).await;
    let (status, v) = readyz(&s).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["jwks_errors"], json!({}), "{v}");
    let (status, v, _) = check(&s, &k1.token()).await;
    assert_eq!(
        (status, v["decision"].as_str()),
        (200, Some("allow")),
        "{v}"
    );
    s.shutdown().await;

    // Not trusted (the system's roots; another CA): no keys, not ready, every check 401,
    // and the error names the URL and the certificate problem.
    let wrong_ca = other.path().join("ca.pem");
    for extra in [
        String::new(),
        format!("jwks_ca_file = \"{}\"", wrong_ca.display()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let before = jwks.hits();
        let s = TestServer::start(&config(dir.path(), &url, &extra)).await;
        let (status, v) = readyz(&s).await;
        assert_eq!(status, 503, "{extra}: {v}");
        let err = v["jwks_errors"]["remote"].as_str().unwrap_or_default();
        assert!(
            err.contains(&url) && err.contains("invalid peer certificate"),
            "{extra}: {v}"
        );
        let (status, v, _) = check(&s, &k1.token()).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (401, Some("key_unavailable")),
            "{v}"
        );
        // The handshake failed: no request ever reached the key server.
        assert_eq!(jwks.hits(), before, "{extra}");
        s.shutdown().await;
    }
}
