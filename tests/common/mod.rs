//! Shared test harness: the real server on 127.0.0.1 port 0, and token helpers.
#![allow(
    dead_code,
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test harness: a failed setup must stop the test loudly"
)]

pub mod mcp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mandate::app::{self, Running};
use mandate::clock::Clock;
use mandate::config::Config;
use serde_json::{Map, Value};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Parse a config as `path` would be read, with the listener forced to port 0 plus `env`.
/// Unless `env` sets `MANDATE_AUDIT__PATH`, the audit log goes to a fresh file of its own, so
/// parallel tests never share one chain (nor write into the repository's `data/`).
pub fn config_from(text: &str, path: &Path, env: &[(&str, &str)]) -> Config {
    // Every listener on a free port: the example configuration's gRPC one included.
    let mut vars: Vec<(String, String)> = vec![
        ("MANDATE_SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        (
            "MANDATE_EXT_AUTHZ__GRPC_LISTEN".into(),
            "127.0.0.1:0".into(),
        ),
    ];
    if !env.iter().any(|(k, _)| *k == "MANDATE_AUDIT__PATH") {
        vars.push(("MANDATE_AUDIT__PATH".into(), fresh_audit_path()));
    }
    if !env.iter().any(|(k, _)| *k == "MANDATE_STORE__URL") {
        let db = Path::new(&fresh_audit_path()).with_file_name("mandate.db");
        vars.push(("MANDATE_STORE__URL".into(), db.display().to_string()));
    }
    // A loaded test machine can take seconds over a synchronous commit: the store's breaker
    // must not mistake that for an outage (the breaker's own tests set their timeout).
    if !env.iter().any(|(k, _)| *k == "MANDATE_STORE__TIMEOUT") {
        vars.push(("MANDATE_STORE__TIMEOUT".into(), "10s".into()));
    }
    vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    match Config::parse(text, path, &vars) {
        Ok(c) => c,
        Err(e) => panic!("test config invalid: {e}"),
    }
}

/// A new audit log path in a directory of its own. The directory is deliberately kept (not
/// deleted on drop): a `Config` is a plain value that cannot own it, and the server writes to
/// it until the test ends. It lives under cargo's per-target temporary directory, so
/// `cargo clean` removes it.
pub fn fresh_audit_path() -> String {
    let dir = tempfile::Builder::new()
        .prefix("audit-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("audit directory")
        .keep();
    dir.join("audit.jsonl").display().to_string()
}

/// The example configuration (config/mandate.toml) on port 0.
pub fn example_config(env: &[(&str, &str)]) -> Config {
    let path = repo().join("config/mandate.toml");
    let text = std::fs::read_to_string(&path).expect("example config");
    config_from(&text, &path, env)
}

/// The example configuration with `extra` TOML appended (new `[[issuers]]` or
/// `[[enforcement_points]]` entries, which environment overrides cannot add).
pub fn example_config_plus(extra: &str, env: &[(&str, &str)]) -> Config {
    let path = repo().join("config/mandate.toml");
    let text = std::fs::read_to_string(&path).expect("example config");
    config_from(&format!("{text}\n{extra}"), &path, env)
}

/// A SPIFFE issuer `spire` (trust domain `example.org`, the dev keys) and an enforcement
/// point `envoy` authenticated by the credential whose SHA-256 is `credential_sha256`: what
/// `ext_authz.identity` needs to believe Envoy's `jwt_authn` metadata and peer principal.
pub fn spire_and_envoy(credential_sha256: &str) -> String {
    format!(
        r#"
[[issuers]]
name = "spire"
issuer = "https://spire.example.org"
profile = "spiffe"
trust_domain = "example.org"
audiences = ["mandate"]
algorithms = ["ES256"]
jwks_file = "dev/jwks.json"
principal_type = "Agent"

[[enforcement_points]]
name = "envoy"
credential_sha256 = "{credential_sha256}"
"#
    )
}

pub struct TestServer {
    pub base: String,
    pub running: Option<Running>,
    pub client: reqwest::Client,
}

impl TestServer {
    pub async fn start(config: &Config) -> Self {
        Self::start_with_clock(config, mandate::clock::system()).await
    }

    /// The server with every expiry read from `clock` (a `ManualClock` to move time).
    pub async fn start_with_clock(config: &Config, clock: Arc<dyn Clock>) -> Self {
        let running = app::start(config, clock).await.expect("server starts");
        let addr = running.local_addr.expect("tcp listener");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        Self {
            base: format!("http://{addr}"),
            running: Some(running),
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST JSON with an optional bearer token; returns (status, body as JSON).
    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        let req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        answer(req, token).await
    }

    /// GET with an optional bearer token; returns (status, body as JSON).
    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        answer(self.client.get(self.url(path)), token).await
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// The example bundle's payment check: allowed up to 100, escalated above, forbidden above
/// 10,000.
pub fn transfer(amount: i64) -> Value {
    serde_json::json!({"action":"payments:transfer","resource":{"type":"Account","id":"acct-1"},"context":{"amount":amount}})
}

/// A payments agent's dev token (owner `bob`, group `payments-agents`), valid 5 minutes.
pub fn payments_agent_token(sub: &str) -> String {
    dev_token(
        sub,
        serde_json::json!({"owner":"bob","groups":["payments-agents"]}),
        Duration::from_secs(300),
    )
}

/// Run a Python script of the repository with `args` and `env`, writing `stdin` to it; its
/// output.
pub fn python_script(
    script: &str,
    args: &[String],
    env: &[(String, String)],
    stdin: &[u8],
) -> std::process::Output {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("python3")
        .arg(repo().join(script))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("stdin written");
    child.wait_with_output().expect("python output")
}

/// A token from the example config's dev key, as `mandate dev token` mints it.
pub fn dev_token(sub: &str, claims: Value, ttl: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    dev_token_at(sub, claims, ttl, now)
}

/// A dev token issued at `now` (unix seconds): for a server on a manual clock.
pub fn dev_token_at(sub: &str, claims: Value, ttl: Duration, now: i64) -> String {
    let key = std::fs::read(repo().join("config/dev/signing-key.pem")).expect("dev key");
    let extra: Map<String, Value> = claims.as_object().cloned().unwrap_or_default();
    mandate::identity::dev::mint(
        &key,
        "dev-1",
        "https://dev.mandate.invalid",
        "mandate",
        sub,
        extra,
        ttl,
        now,
    )
    .expect("mint")
}

/// Run a Python snippet (PyJWT, installed by scripts/test) and return its stdout, trimmed.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `alice`, a `finance-approvers` member, approves request `id` with a rationale and the
/// ticket the example bundle asks for as evidence; the status and answer of the review.
pub async fn finance_approve(s: &TestServer, id: &str, ticket: &str) -> (u16, Value) {
    let alice = dev_token(
        "alice",
        serde_json::json!({"groups": ["finance-approvers"]}),
        Duration::from_secs(300),
    );
    s.post(
        &format!("/v1/approvals/{id}/approve"),
        Some(&alice),
        &serde_json::json!({"rationale": format!("invoice for {ticket}"), "evidence": {"ticket": ticket}}),
    )
    .await
}

/// The id of the first pending approval request that `alice`, a finance approver, sees:
/// polled (for an escalation another task is making) for up to 60 s.
pub async fn first_pending(s: &TestServer) -> String {
    let alice = dev_token(
        "alice",
        serde_json::json!({"groups": ["finance-approvers"]}),
        Duration::from_secs(300),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no request to approve"
        );
        let (_, v) = s.get("/v1/approvals?status=pending", Some(&alice)).await;
        if let Some(id) = v["requests"][0]["id"].as_str() {
            return id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Send `req` with `token` as its bearer token, if any: (status, body as JSON, or as a string
/// when it is not JSON).
async fn answer(mut req: reqwest::RequestBuilder, token: Option<&str>) -> (u16, Value) {
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A child process killed when the test ends, however it ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `mandate` binary, run from the repository's root (where `config/mandate.toml` is).
pub fn mandate() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mandate"));
    c.current_dir(repo());
    c
}

/// `mandate serve` as a real process (example configuration, port 0, audit log at `audit`),
/// with its listening address read from its log. Its stderr keeps being drained so the
/// server never blocks on a full pipe.
pub fn spawn_serve(audit: &Path) -> (std::process::Child, String) {
    spawn_serve_env(audit, &[])
}

/// `mandate serve` from the repository on free ports, with the audit log at `audit` and the
/// store beside it, text logs at `info`, then the `env` overrides.
fn serve_command(audit: &Path, env: &[(&str, &str)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mandate"));
    cmd.current_dir(repo())
        .arg("serve")
        .env("MANDATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("MANDATE_EXT_AUTHZ__GRPC_LISTEN", "127.0.0.1:0")
        .env("MANDATE_AUDIT__PATH", audit)
        .env("MANDATE_STORE__URL", audit.with_file_name("mandate.db"))
        .env("MANDATE_LOG__FORMAT", "text")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied());
    cmd
}

/// [`spawn_serve`] with more `MANDATE_…` overrides in its environment.
pub fn spawn_serve_env(audit: &Path, env: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let started = std::time::Instant::now();
    let mut child = serve_command(audit, env)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn mandate serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.expect("log line");
        if let Some(rest) = line.split("addr=").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no listening line"
        );
    }
    std::thread::spawn(move || for _ in lines {});
    (child, addr.expect("listening address logged"))
}

/// `mandate serve` as [`spawn_serve_env`] starts it, its whole log (stderr) going to `log`;
/// the child and its listening address.
#[allow(
    clippy::zombie_processes,
    reason = "the child is returned: the caller kills and waits for it"
)]
pub fn spawn_serve_logged(
    audit: &Path,
    env: &[(&str, &str)],
    log: &Path,
) -> (std::process::Child, String) {
    let file = std::fs::File::create(log).expect("log file");
    let mut child = serve_command(audit, env)
        .stderr(file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn mandate serve");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Text logs say `addr=127.0.0.1:N`, JSON logs `"addr":"127.0.0.1:N"`.
        let addr = text
            .lines()
            .filter(|l| l.contains("listening") && !l.contains("gRPC"))
            .find_map(|l| {
                let rest = l.split("addr=").nth(1).or(l.split("\"addr\":\"").nth(1))?;
                Some(rest.split(['"', ' ']).next()?.to_owned())
            });
        if let Some(addr) = addr {
            return (child, addr);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no listening line:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copy a directory tree (a policy bundle) so a test can change its copy.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("copy");
    for entry in std::fs::read_dir(from).expect("copy") {
        let entry = entry.expect("copy");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("copy").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// Writes a CA, a server certificate for 127.0.0.1 and a client certificate whose URI SAN
/// is a SPIFFE ID, all PEM, into argv[1].
const MAKE_PKI: &str = r#"
import datetime, sys, ipaddress
from cryptography import x509
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

out = sys.argv[1]
now = datetime.datetime.now(datetime.timezone.utc)

def key():
    return ec.generate_private_key(ec.SECP256R1())

def pem_key(k, path):
    open(path, "wb").write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

def pem_cert(c, path):
    open(path, "wb").write(c.public_bytes(serialization.Encoding.PEM))

ca_key = key()
ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mandate test ca")])
ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
      .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
      .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                   key_encipherment=False, data_encipherment=False, key_agreement=False,
                                   encipher_only=False, decipher_only=False), critical=True)
      .sign(ca_key, hashes.SHA256()))
pem_cert(ca, out + "/ca.pem")

def leaf(name, sans, usage):
    k = key()
    c = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(ca_name).public_key(k.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName(sans), critical=False)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .sign(ca_key, hashes.SHA256()))
    return k, c

sk, sc = leaf("localhost", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
              ExtendedKeyUsageOID.SERVER_AUTH)
pem_key(sk, out + "/server-key.pem"); pem_cert(sc, out + "/server.pem")
ck, cc = leaf("gateway", [x509.UniformResourceIdentifier("spiffe://example.org/ns/edge/sa/gateway")],
              ExtendedKeyUsageOID.CLIENT_AUTH)
pem_key(ck, out + "/client-key.pem"); pem_cert(cc, out + "/client.pem")
"#;

/// A test PKI in `dir` (Python `cryptography`): `ca.pem`, a server certificate for
/// `localhost` and 127.0.0.1 (`server.pem`, `server-key.pem`) and a client certificate with a
/// SPIFFE URI SAN (`client.pem`, `client-key.pem`).
pub fn make_pki(dir: &Path) {
    python(MAKE_PKI, &[dir.to_str().expect("utf-8 path")]);
}
