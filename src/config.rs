//! Configuration: a TOML file plus `MANDATE_SECTION__KEY` environment overrides, parsed whole.
//!
//! Every bad value is collected with its key path (`issuers[0].algorithms`) and where it came
//! from (the file's line, or the environment variable or flag that set it), and all of them are
//! reported together before start-up fails, so an operator fixes a file in one pass. Unknown
//! keys are errors too: a typo in a security setting must not be silently ignored.
//! Relative paths are resolved against the directory of the configuration file, and shown
//! and used folded (`config/../data/audit.jsonl` is `data/audit.jsonl`: [`normalize`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::{Table, Value};

use crate::audit::AuditSettings;
use crate::identity::{IssuerSettings, JwksSource, Profile};
use crate::policy::Bundle;
use crate::routes::{DefaultRoute, Route, RouteSpec, Routes};

/// The default configuration file, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/mandate.toml";
/// Environment variables with this prefix override file values: `MANDATE_SERVER__LISTEN`.
pub const ENV_PREFIX: &str = "MANDATE_";

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub policy: PolicyConfig,
    pub identity: IdentityConfig,
    pub issuers: Vec<IssuerSettings>,
    pub enforcement_points: Vec<EnforcementPoint>,
    pub dev: Option<DevConfig>,
    pub log: LogConfig,
    pub audit: AuditConfig,
    pub store: StoreConfig,
    pub notifications: crate::notify::WebhookSettings,
    pub forward_auth: ForwardAuthConfig,
    /// `[ext_authz]`: the gRPC Envoy `ext_authz` listener (off when neither key is set).
    pub ext_authz: ExtAuthzConfig,
    /// `[[routes]]` and `forward_auth.default_*`: how a proxied request becomes a check.
    pub routes: Routes,
    /// `[mcp]`: the MCP gateway's upstream servers (`/mcp/{name}`).
    pub mcp: McpConfig,
    /// `[telemetry]`: `/metrics`, and OTLP export when an endpoint is set.
    pub telemetry: TelemetryConfig,
    /// Where each key came from, for problems found after parsing ([`Config::check_routes`]).
    origins: Origins,
}

/// Where the keys of a parsed configuration came from: its file's lines and the overrides.
#[derive(Debug, Clone, Default)]
struct Origins {
    source: String,
    lines: HashMap<String, usize>,
    set: Vec<(String, String)>,
}

/// The forward-auth endpoints (`/authz/envoy/…`, `/authz/nginx`, `/authz/traefik`): the
/// headers they answer with, and the status of an escalation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuthConfig {
    /// On every decision: its id, for the upstream's logs and the client.
    pub decision_header: String,
    /// On an allow: the principal, `Type::"id"`, for the upstream.
    pub principal_header: String,
    /// On an escalation: the approval request's id and its URL.
    pub approval_id_header: String,
    pub approval_url_header: String,
    /// The status of an escalation: 403, the only one nginx `auth_request` passes on, or 429.
    pub escalate_status: u16,
    /// On an allow, have the proxy remove the agent's `authorization` header before the
    /// request goes upstream (gRPC `headers_to_remove`; Envoy's HTTP mode
    /// `x-envoy-auth-headers-to-remove`), so the upstream never holds the agent's token.
    pub strip_authorization: bool,
}

impl Default for ForwardAuthConfig {
    fn default() -> Self {
        Self {
            decision_header: "x-mandate-decision-id".into(),
            principal_header: "x-mandate-principal".into(),
            approval_id_header: "x-mandate-approval-id".into(),
            approval_url_header: "x-mandate-approval-url".into(),
            escalate_status: 403,
            strip_authorization: false,
        }
    }
}

/// The gRPC `envoy.service.auth.v3.Authorization` listener (with `grpc.health.v1`). Its
/// answers use the `[forward_auth]` headers and escalation status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtAuthzConfig {
    /// TCP address, `127.0.0.1:9191` in the example configuration; off when unset.
    pub grpc_listen: Option<SocketAddr>,
    /// A Unix socket for the same service; off when unset.
    pub grpc_unix_socket: Option<PathBuf>,
    /// Where the agent's identity is read, in this order: the first source the
    /// `CheckRequest` carries decides (one that fails is a 401, never a fall-through).
    pub identity: Vec<IdentitySource>,
    /// `filter_metadata` namespace of Envoy's `jwt_authn` filter.
    pub jwt_authn_namespace: String,
    /// The key under that namespace holding the payload (`payload_in_metadata`).
    pub jwt_authn_payload_key: String,
    /// The `[[issuers]]` entry (SPIFFE profile) whose trust domain and principal type a peer
    /// principal (`attributes.source.principal`) is read with.
    pub peer_issuer: Option<String>,
}

impl Default for ExtAuthzConfig {
    fn default() -> Self {
        Self {
            grpc_listen: None,
            grpc_unix_socket: None,
            identity: vec![IdentitySource::Authorization],
            jwt_authn_namespace: "envoy.filters.http.jwt_authn".into(),
            jwt_authn_payload_key: "jwt_payload".into(),
            peer_issuer: None,
        }
    }
}

/// The MCP gateway (`[mcp]`, `[[mcp.servers]]`): each upstream MCP server is served at
/// `/mcp/{name}` on the HTTP listener, every tool call decided before it is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpConfig {
    pub servers: Vec<McpServer>,
    /// Largest JSON-RPC message accepted from an agent.
    pub max_message_bytes: usize,
    /// Longest wait for an upstream to connect and start answering.
    pub upstream_timeout: Duration,
    /// How long an escalated tool call is held open for its approval (then forwarded if
    /// approved); zero answers the escalation at once.
    pub hold: Duration,
    /// `[[mcp.local_principals]]`: who a tokenless `mcp wrap` request on the Unix socket is,
    /// by the OS user of the process that connected.
    pub local_principals: Vec<LocalPrincipal>,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            max_message_bytes: 1024 * 1024,
            upstream_timeout: Duration::from_secs(30),
            hold: Duration::ZERO,
            local_principals: Vec::new(),
        }
    }
}

/// A local principal: the identity of `POST /v1/mcp/decide` and `/v1/mcp/filter` requests
/// that carry no token and arrive on the Unix socket (`server.unix_socket`) from a process
/// whose user id the kernel reports as `uid` (`SO_PEERCRED`). The OS user is the proof, so
/// every process of that user is this principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPrincipal {
    pub uid: u32,
    /// Cedar entity type (`Agent`).
    pub kind: String,
    pub id: String,
    /// Cedar attributes (`owner`, `team`, `groups`…), as for a token's mapped claims.
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

impl LocalPrincipal {
    /// The issuer audit records and approval requests show: the OS vouched for this uid. No
    /// `[[issuers]]` name may start with `local:`, so no token's principal is ever taken for
    /// a local one.
    pub fn issuer(&self) -> String {
        format!("{LOCAL_ISSUER_PREFIX}uid={}", self.uid)
    }
}

/// The issuer prefix of local principals ([`LocalPrincipal::issuer`]).
pub const LOCAL_ISSUER_PREFIX: &str = "local:";

/// Whether `name` may name an MCP server: letters, digits, `-`, `_` or `.`. It is a path
/// segment (`/mcp/{name}`) and the first part of its tools' resource ids
/// (`McpTool::"<name>/<tool>"`), so it never holds a `/`.
pub fn mcp_server_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// One upstream MCP server (Streamable HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpServer {
    /// Path segment (`/mcp/{name}`) and the server part of its tools' resource ids.
    pub name: String,
    /// The upstream's MCP endpoint, `http(s)://…/mcp`.
    pub url: String,
    /// Sent to the upstream with every request (its own credential); the agent's token never is.
    pub headers: Vec<(String, String)>,
}

/// A place a gRPC `CheckRequest` says who the agent is (`ext_authz.identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// The original request's `authorization: Bearer` token, verified here: a proof.
    Authorization,
    /// The payload Envoy's `jwt_authn` filter verified and put in `metadata_context`: a
    /// claim Envoy makes, believed only from an authenticated enforcement point.
    JwtAuthn,
    /// The mTLS peer's SPIFFE ID (`attributes.source.principal`): a claim Envoy makes,
    /// believed only from an authenticated enforcement point.
    Peer,
}

impl IdentitySource {
    pub const NAMES: [&'static str; 3] = ["authorization", "jwt_authn", "peer"];

    pub fn name(self) -> &'static str {
        match self {
            IdentitySource::Authorization => "authorization",
            IdentitySource::JwtAuthn => "jwt_authn",
            IdentitySource::Peer => "peer",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// TCP listener; `None` when only the Unix socket is wanted.
    pub listen: Option<SocketAddr>,
    pub unix_socket: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
    /// The base URL published in AuthZEN discovery; derived from the request when unset.
    pub public_url: Option<String>,
    /// Largest accepted request body (SECURITY H-03: 64 KiB for decision APIs).
    pub max_body_bytes: usize,
    /// Slowloris guard (H-01): a client must finish its request head within this time,
    /// counted from accept for a new connection (a silent one included), from the first byte
    /// for a later request on a kept-alive one.
    pub header_read_timeout: Duration,
    /// Slow-body guard (H-02): the whole body must arrive within this time.
    pub body_read_timeout: Duration,
    /// Most simultaneous connections (H-07). At the limit a new client is admitted by closing
    /// the connection that has been quiet (silent or idle) the longest; only when every one
    /// is busy answering do new clients wait in the kernel backlog.
    pub max_connections: usize,
    /// A kept-alive connection with no request in flight for this long is closed (H-07).
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub bundle: PathBuf,
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Verified tokens kept in the cache (bounded: SECURITY R-02).
    pub token_cache_size: u64,
}

/// A trusted enforcement point (Envoy, a gateway, an AuthZEN PEP): it may name the subject
/// of a check instead of presenting the subject's own token.
#[derive(Debug, Clone)]
pub struct EnforcementPoint {
    pub name: String,
    /// SHA-256 (hex) of the bearer credential the enforcement point presents.
    pub credential_sha256: Option<[u8; 32]>,
    /// URI SANs of client certificates (mTLS) that identify this enforcement point.
    pub mtls_uri_sans: Vec<String>,
    /// Verified token subjects (from any trusted issuer) that identify this enforcement point.
    pub token_subjects: Vec<String>,
}

/// `mandate dev token`: a signing key for local trials. Present only in the example config.
#[derive(Debug, Clone)]
pub struct DevConfig {
    pub signing_key: PathBuf,
    pub kid: String,
    /// Name of the issuer in `[[issuers]]` that trusts this key.
    pub issuer: String,
}

/// The audit log of every decision (docs/design.md §5).
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The hash-chained JSON-lines file; default `audit.jsonl` beside the configuration file.
    pub path: PathBuf,
    /// Interval of the group commit to disk (records are with the OS before any answer).
    pub group_commit: Duration,
    /// Signed checkpoints of the chain, when a key is configured.
    pub checkpoints: Option<CheckpointConfig>,
    /// Below this much free space on the log's filesystem, `/readyz` and the log warn.
    pub min_free_disk: crate::audit::MinFree,
    /// Rotation, compression and retention of the log's segments.
    pub segments: crate::audit::SegmentSettings,
}

/// Where the checkpoint signing key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A PKCS#8 Ed25519 private key file (PEM or DER), `audit.checkpoint_key`.
    File(PathBuf),
    /// An environment variable holding the PEM (or base64 DER), `audit.checkpoint_key_env`.
    Env(String),
}

/// Signed checkpoints of the audit chain (`audit.checkpoint_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointConfig {
    pub key: KeySource,
    /// JSON-lines file the checkpoints are appended to (default: the log's path plus
    /// `.checkpoints`).
    pub file: PathBuf,
    pub schedule: crate::audit::checkpoint::CheckpointSchedule,
}

/// Where approval requests and grants are kept.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `postgres://...` for a fleet sharing approvals, else a SQLite file path (relative to
    /// the configuration file); default `mandate.db` beside it.
    pub url: String,
    /// How long an approval request stays pending before it expires (never approved).
    pub request_ttl: Duration,
    /// How often the server moves due requests to their fallback group or to `expired`.
    pub sweep_interval: Duration,
    /// The grant cache of the hot path (size 0 turns it off).
    pub grant_cache: crate::approval::GrantCacheSettings,
    /// `max_pending_per_principal` and `max_requests_per_hour` (SECURITY A-16).
    pub escalation_limits: crate::approval::EscalationLimits,
    /// `timeout` and `probe_interval` of the store's circuit breaker (SECURITY R-04a).
    pub guard: crate::approval::GuardSettings,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `mandate=debug`.
    pub level: String,
    pub json: bool,
    /// How often a running server logs a summary line (decisions by outcome, approval
    /// requests, token rejections in the interval); zero turns it off.
    pub summary_interval: Duration,
}

/// `[telemetry]`: metrics as Prometheus text on `GET /metrics`, and over OTLP to a collector
/// when `otlp_endpoint` is set.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// Serve `GET /metrics` on the HTTP listener (default on).
    pub metrics: bool,
    /// The OTLP collector, e.g. `http://127.0.0.1:4317` (gRPC) or `http://127.0.0.1:4318`
    /// (HTTP); none: no export.
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// How often metrics are pushed to the collector.
    pub otlp_interval: Duration,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Export a span per check (with an OTLP endpoint).
    pub traces: bool,
    /// Share of checks without a sampled caller trace whose span is exported (0 to 1); a
    /// check whose caller's trace is sampled is always exported.
    pub trace_sample_ratio: f64,
    /// Put the principal and the request context on exported spans.
    pub trace_details: bool,
    /// Export every audit record as an OTLP log record.
    pub decision_logs: bool,
    /// Records waiting for export at most; beyond, a record's export is lost (counted).
    pub decision_log_queue: usize,
}

/// How OTLP reaches the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// One bad value, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
    /// Where the value (or the table a missing key belongs in) came from, when known.
    pub origin: Option<Origin>,
}

/// Where a problem's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line (1-based) of the configuration file.
    Line(usize),
    /// The environment variable (`MANDATE_SERVER__LISTEN`) or flag (`--listen`) that set it.
    Override(String),
}

/// A value set over the file's: by a `MANDATE_SECTION__KEY` variable or a `serve` flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// What set it, as the operator wrote it: `MANDATE_SERVER__LISTEN` or `--listen`.
    pub name: String,
    /// The key path: `["server", "listen"]`, `["issuers", "0", "leeway"]`.
    pub path: Vec<String>,
    pub value: Value,
}

impl Override {
    /// A command-line flag setting the dotted `key` to the string `value`, as given.
    pub fn flag(name: &str, key: &str, value: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            path: key.split('.').map(str::to_owned).collect(),
            value: Value::String(value.into()),
        }
    }
}

/// All the problems found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration `{}` ({} problem{}):",
            self.source,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            match &p.origin {
                Some(Origin::Line(n)) => write!(f, "\n  {}:{n}: ", self.source)?,
                Some(Origin::Override(name)) => write!(f, "\n  {name}: ")?,
                None => write!(f, "\n  ")?,
            }
            write!(f, "{}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Read `path`, apply the process environment's overrides, and validate.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, &[])
    }

    /// [`Config::load`], then `flags` over the file and the environment (`mandate serve
    /// --listen`).
    pub fn load_with(path: &Path, flags: &[Override]) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: path.display().to_string(),
            problems: vec![Problem {
                key: "(file)".into(),
                message: format!("cannot read: {e}"),
                origin: None,
            }],
        })?;
        Self::parse_with(&text, path, &env, flags)
    }

    /// Parse `text` (read from `path`) with the given environment; pure, for tests.
    pub fn parse(text: &str, path: &Path, env: &[(String, String)]) -> Result<Self, ConfigError> {
        Self::parse_with(text, path, env, &[])
    }

    /// [`Config::parse`] with `flags` applied last: flag over environment over file.
    pub fn parse_with(
        text: &str,
        path: &Path,
        env: &[(String, String)],
        flags: &[Override],
    ) -> Result<Self, ConfigError> {
        let fail = |problems| ConfigError {
            source: path.display().to_string(),
            problems,
        };
        let mut table: Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            fail(vec![Problem {
                key: line.map_or("(syntax)".into(), |l| format!("(line {l})")),
                message: e.message().to_owned(),
                origin: None,
            }])
        })?;
        let mut problems = Vec::new();
        let mut overrides = env_overrides(env, &mut problems);
        overrides.extend_from_slice(flags);
        let set = apply_overrides(&mut table, &overrides, &mut problems);
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut r = Reader { base, problems };
        let mut config = r.config(&table);
        config.origins = Origins {
            source: path.display().to_string(),
            lines: key_lines(text),
            set,
        };
        if r.problems.is_empty() {
            return Ok(config);
        }
        Err(config.error(r.problems))
    }

    /// `problems` found in this configuration, each with where its key came from.
    fn error(&self, mut problems: Vec<Problem>) -> ConfigError {
        for p in &mut problems {
            if p.origin.is_none() {
                p.origin = origin_of(&p.key, &self.origins.lines, &self.origins.set);
            }
        }
        ConfigError {
            source: self.origins.source.clone(),
            problems,
        }
    }

    /// Check the routes (and the default action) against `bundle`'s schema: an action it
    /// does not declare, or a resource type it does not declare or the action does not
    /// apply to, is a configuration problem naming the rule.
    pub fn check_routes(&self, bundle: &Bundle) -> Result<(), ConfigError> {
        let problems: Vec<Problem> = self
            .routes
            .check_schema(bundle)
            .into_iter()
            .map(|p| match p.rule {
                Some(i) => Problem {
                    key: format!("routes[{i}].{}", p.key),
                    message: match self.routes.rules().get(i) {
                        Some(r) => format!("route `{}`: {}", r.name(), p.message),
                        None => p.message,
                    },
                    origin: None,
                },
                None => Problem {
                    key: format!("forward_auth.{}", p.key),
                    message: p.message,
                    origin: None,
                },
            })
            .collect();
        if problems.is_empty() {
            return Ok(());
        }
        Err(self.error(problems))
    }
}

/// `MANDATE_SERVER__LISTEN=127.0.0.1:0` sets `server.listen`; `MANDATE_ISSUERS__0__LEEWAY`
/// sets `issuers[0].leeway`. A value that parses as a TOML value (number, bool, array) is
/// taken as one; anything else is a string. Sorted by name, the order they are applied in.
fn env_overrides(env: &[(String, String)], problems: &mut Vec<Problem>) -> Vec<Override> {
    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    let mut out = Vec::with_capacity(vars.len());
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            problems.push(Problem {
                key: name.clone(),
                message: "empty key segment in environment override".into(),
                origin: None,
            });
            continue;
        }
        let value = format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| Value::String(raw.clone()));
        out.push(Override {
            name: name.clone(),
            path,
            value,
        });
    }
    out
}

/// Apply `overrides` in order (a later one wins); returns, in the same order, the dotted key
/// path each one set (`issuers.0.leeway`) with its name, so problems can point at it.
fn apply_overrides(
    table: &mut Table,
    overrides: &[Override],
    problems: &mut Vec<Problem>,
) -> Vec<(String, String)> {
    let mut set = Vec::with_capacity(overrides.len());
    for o in overrides {
        let mut root = Value::Table(std::mem::take(table));
        let mut resolved = Vec::with_capacity(o.path.len());
        let result = set_in(&mut root, &o.path, o.value.clone(), &mut resolved);
        if let Value::Table(t) = root {
            *table = t;
        }
        match result {
            Ok(()) => set.push((resolved.join("."), o.name.clone())),
            Err(message) => problems.push(Problem {
                key: o.name.clone(),
                message,
                origin: None,
            }),
        }
    }
    set
}

/// Set `path` under `node` to `value`, recording the path as resolved (`00` as index `0`).
fn set_in(
    node: &mut Value,
    path: &[String],
    value: Value,
    resolved: &mut Vec<String>,
) -> Result<(), String> {
    let Some((seg, rest)) = path.split_first() else {
        *node = value;
        return Ok(());
    };
    match node {
        Value::Table(t) => {
            resolved.push(seg.clone());
            let child = t
                .entry(seg.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            set_in(child, rest, value, resolved)
        }
        Value::Array(a) => {
            let i: usize = seg
                .parse()
                .map_err(|_| format!("`{seg}` is not an array index"))?;
            resolved.push(i.to_string());
            let child = a
                .get_mut(i)
                .ok_or_else(|| format!("index `{i}` is past the end of the array"))?;
            set_in(child, rest, value, resolved)
        }
        _ => Err(format!("`{seg}` is not inside a table")),
    }
}

/// The line of every key path in `text`, dotted with array indices as segments:
/// `server.listen`, `issuers.0` (its `[[issuers]]` header), `issuers.0.algorithms.1`.
fn key_lines(text: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    let Ok(root) = toml::de::DeTable::parse(text) else {
        return out;
    };
    let newlines: Vec<usize> = text.match_indices('\n').map(|(i, _)| i).collect();
    let line = |offset: usize| newlines.partition_point(|&n| n < offset) + 1;
    lines_of_table(root.get_ref(), "", &line, &mut out);
    out
}

fn lines_of_table(
    t: &toml::de::DeTable<'_>,
    prefix: &str,
    line: &dyn Fn(usize) -> usize,
    out: &mut HashMap<String, usize>,
) {
    for (k, v) in t.iter() {
        let path = join(prefix, k.get_ref());
        out.insert(path.clone(), line(k.span().start));
        lines_of_value(v.get_ref(), &path, line, out);
    }
}

fn lines_of_value(
    v: &toml::de::DeValue<'_>,
    path: &str,
    line: &dyn Fn(usize) -> usize,
    out: &mut HashMap<String, usize>,
) {
    match v {
        toml::de::DeValue::Table(t) => lines_of_table(t, path, line, out),
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("{path}.{i}");
                out.insert(p.clone(), line(item.span().start));
                lines_of_value(item.get_ref(), &p, line, out);
            }
        }
        _ => {}
    }
}

/// Where the problem at `key` (`issuers[0].leeway`) came from: the last override that set it
/// or a table above it; else its line in the file; else, for a key the file lacks, the line
/// of the table it belongs in.
fn origin_of(
    key: &str,
    lines: &HashMap<String, usize>,
    set: &[(String, String)],
) -> Option<Origin> {
    let path = key.replace('[', ".").replace(']', "");
    let under = |p: &str| {
        path == p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('.'))
    };
    if let Some((_, name)) = set.iter().rev().find(|(p, _)| under(p)) {
        return Some(Origin::Override(name.clone()));
    }
    if let Some(&l) = lines.get(&path) {
        return Some(Origin::Line(l));
    }
    let (parent, _) = path.rsplit_once('.')?;
    lines.get(parent).map(|&l| Origin::Line(l))
}

/// Reads typed values out of the TOML tree, recording every problem instead of stopping at
/// the first.
struct Reader {
    base: PathBuf,
    problems: Vec<Problem>,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

impl Reader {
    fn bad(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
            origin: None,
        });
    }

    fn known(&mut self, t: &Table, prefix: &str, keys: &[&str]) {
        for k in t.keys() {
            if !keys.contains(&k.as_str()) {
                self.bad(
                    join(prefix, k),
                    format!("unknown key (expected one of: {})", keys.join(", ")),
                );
            }
        }
    }

    fn table<'a>(&mut self, t: &'a Table, prefix: &str, key: &str) -> Option<&'a Table> {
        match t.get(key) {
            None => None,
            Some(Value::Table(inner)) => Some(inner),
            Some(other) => {
                self.bad(
                    join(prefix, key),
                    format!("expected a table, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// The tables of the array of tables at `key` (`[[key]]`), each with its key path
    /// (`routes[2]`); whatever is not a table is reported and left out.
    fn tables<'a>(&mut self, t: &'a Table, prefix: &str, key: &str) -> Vec<(String, &'a Table)> {
        let full = join(prefix, key);
        let items = match t.get(key) {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(other) => {
                self.bad(
                    &full,
                    format!(
                        "expected an array of tables (`[[{full}]]`), found {}",
                        other.type_str()
                    ),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let p = format!("{full}[{i}]");
            match item {
                Value::Table(t) => out.push((p, t)),
                _ => self.bad(p, "expected a table"),
            }
        }
        out
    }

    fn string(&mut self, t: &Table, prefix: &str, key: &str) -> Option<String> {
        match t.get(key) {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.bad(
                    join(prefix, key),
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn required_string(&mut self, t: &Table, prefix: &str, key: &str) -> String {
        match self.string(t, prefix, key) {
            Some(s) if !s.is_empty() => s,
            Some(_) => {
                self.bad(join(prefix, key), "must not be empty");
                String::new()
            }
            None => {
                if !t.contains_key(key) {
                    self.bad(join(prefix, key), "is required");
                }
                String::new()
            }
        }
    }

    fn strings(&mut self, t: &Table, prefix: &str, key: &str) -> Vec<String> {
        match t.get(key) {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        other => self.bad(
                            format!("{}[{i}]", join(prefix, key)),
                            format!("expected a string, found {}", other.type_str()),
                        ),
                    }
                }
                out
            }
            Some(other) => {
                self.bad(
                    join(prefix, key),
                    format!("expected an array of strings, found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    fn integer(
        &mut self,
        t: &Table,
        prefix: &str,
        key: &str,
        default: u64,
        range: (u64, u64),
    ) -> u64 {
        match t.get(key) {
            None => default,
            Some(Value::Integer(i))
                if (range.0 as i128..=range.1 as i128).contains(&(*i as i128)) =>
            {
                *i as u64
            }
            Some(Value::Integer(i)) => {
                self.bad(
                    join(prefix, key),
                    format!("`{i}` is out of range {}..={}", range.0, range.1),
                );
                default
            }
            Some(other) => {
                self.bad(
                    join(prefix, key),
                    format!("expected an integer, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn duration(
        &mut self,
        t: &Table,
        prefix: &str,
        key: &str,
        default: Duration,
        max: Duration,
    ) -> Duration {
        let Some(s) = self.string(t, prefix, key) else {
            return default;
        };
        match humantime::parse_duration(&s) {
            Ok(d) if d <= max => d,
            Ok(_) => {
                self.bad(
                    join(prefix, key),
                    format!(
                        "`{s}` is longer than the maximum {}",
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Err(e) => {
                self.bad(
                    join(prefix, key),
                    format!("`{s}` is not a duration like `30s` or `5m` ({e})"),
                );
                default
            }
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            normalize(p)
        } else {
            normalize(&self.base.join(p))
        }
    }

    fn config(&mut self, root: &Table) -> Config {
        self.known(
            root,
            "",
            &[
                "server",
                "policy",
                "identity",
                "issuers",
                "enforcement_points",
                "dev",
                "log",
                "audit",
                "store",
                "notifications",
                "forward_auth",
                "ext_authz",
                "routes",
                "mcp",
                "telemetry",
            ],
        );
        let empty = Table::new();
        let server_t = self.table(root, "", "server").unwrap_or(&empty);
        let server = self.server(server_t);
        let policy_t = self.table(root, "", "policy").unwrap_or(&empty);
        self.known(policy_t, "policy", &["bundle"]);
        let bundle = self
            .string(policy_t, "policy", "bundle")
            .unwrap_or_else(|| "policies".into());
        let policy = PolicyConfig {
            bundle: self.path(&bundle),
        };
        let identity_t = self.table(root, "", "identity").unwrap_or(&empty);
        self.known(identity_t, "identity", &["token_cache_size"]);
        let identity = IdentityConfig {
            token_cache_size: self.integer(
                identity_t,
                "identity",
                "token_cache_size",
                10_000,
                (1, 10_000_000),
            ),
        };
        let issuers = self.issuers(root);
        let enforcement_points = self.enforcement_points(root, &issuers);
        let dev = self.table(root, "", "dev").map(|t| self.dev(t, &issuers));
        let log_t = self.table(root, "", "log").unwrap_or(&empty);
        self.known(log_t, "log", &["level", "format", "summary_interval"]);
        let level = self
            .string(log_t, "log", "level")
            .unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            self.bad(
                "log.level",
                format!("`{level}` is not a log filter like `info` or `mandate=debug`"),
            );
        }
        let json = match self.string(log_t, "log", "format").as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                self.bad("log.format", format!("`{other}` is not `text` or `json`"));
                false
            }
        };
        let summary_interval = self.duration(
            log_t,
            "log",
            "summary_interval",
            Duration::from_secs(60),
            Duration::from_secs(24 * 3600),
        );
        let audit_t = self.table(root, "", "audit").unwrap_or(&empty);
        let audit = self.audit(audit_t);
        let store_t = self.table(root, "", "store").unwrap_or(&empty);
        let store = self.store(store_t);
        let notify_t = self.table(root, "", "notifications").unwrap_or(&empty);
        self.known(
            notify_t,
            "notifications",
            &["webhooks", "max_attempts", "backoff"],
        );
        let urls = self.strings(notify_t, "notifications", "webhooks");
        for (i, u) in urls.iter().enumerate() {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                self.bad(
                    format!("notifications.webhooks[{i}]"),
                    format!("`{u}` is not an http(s) URL"),
                );
            }
        }
        let notifications = crate::notify::WebhookSettings {
            urls,
            max_attempts: self.integer(notify_t, "notifications", "max_attempts", 5, (1, 20))
                as u32,
            backoff: self.duration(
                notify_t,
                "notifications",
                "backoff",
                Duration::from_secs(1),
                Duration::from_secs(300),
            ),
        };
        let forward_t = self.table(root, "", "forward_auth").unwrap_or(&empty);
        let (forward_auth, default) = self.forward_auth(forward_t);
        let routes = Routes::new(self.routes(root), default);
        let ext_t = self.table(root, "", "ext_authz").unwrap_or(&empty);
        let ext_authz = self.ext_authz(ext_t, &issuers, &enforcement_points);
        let mcp_t = self.table(root, "", "mcp").unwrap_or(&empty);
        let mcp = self.mcp(mcp_t);
        let telemetry_t = self.table(root, "", "telemetry").unwrap_or(&empty);
        let telemetry = self.telemetry(telemetry_t);
        if !mcp.local_principals.is_empty() && server.unix_socket.is_none() {
            self.bad(
                "mcp.local_principals",
                "needs `server.unix_socket`: a local principal is known by the user id the \
                 kernel reports for a Unix socket's peer, which no TCP connection has",
            );
        }
        Config {
            server,
            policy,
            identity,
            issuers,
            enforcement_points,
            dev,
            log: LogConfig {
                level,
                json,
                summary_interval,
            },
            audit,
            store,
            notifications,
            forward_auth,
            ext_authz,
            routes,
            mcp,
            telemetry,
            origins: Origins::default(),
        }
    }

    fn telemetry(&mut self, t: &Table) -> TelemetryConfig {
        const P: &str = "telemetry";
        self.known(
            t,
            P,
            &[
                "metrics",
                "otlp_endpoint",
                "otlp_protocol",
                "otlp_interval",
                "service_name",
                "traces",
                "trace_sample_ratio",
                "trace_details",
                "decision_logs",
                "decision_log_queue",
            ],
        );
        let otlp_endpoint = self.string(t, P, "otlp_endpoint").filter(|e| !e.is_empty());
        if let Some(e) = &otlp_endpoint {
            let ok = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
            if !ok {
                self.bad(
                    "telemetry.otlp_endpoint",
                    format!("`{e}` is not an http(s) URL like `http://127.0.0.1:4317`"),
                );
            }
        }
        let otlp_protocol = match self.string(t, P, "otlp_protocol").as_deref() {
            None | Some("grpc") => OtlpProtocol::Grpc,
            Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some(other) => {
                self.bad(
                    "telemetry.otlp_protocol",
                    format!("`{other}` is not `grpc` or `http/protobuf`"),
                );
                OtlpProtocol::Grpc
            }
        };
        // The gRPC exporter is built without TLS (one TLS stack in the tree, DESIGN §8): an
        // https collector is reached over HTTP, whose client has rustls.
        if otlp_protocol == OtlpProtocol::Grpc
            && otlp_endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("https://"))
        {
            self.bad(
                "telemetry.otlp_endpoint",
                "an `https://` collector needs `otlp_protocol = \"http/protobuf\"` (the gRPC \
                 exporter speaks plain HTTP/2 only, for a collector on loopback or a sidecar)",
            );
        }
        let otlp_interval = self.duration(
            t,
            P,
            "otlp_interval",
            Duration::from_secs(60),
            Duration::from_secs(3600),
        );
        if otlp_interval < Duration::from_millis(100) {
            self.bad("telemetry.otlp_interval", "must be at least 100ms");
        }
        let service_name = self
            .string(t, P, "service_name")
            .unwrap_or_else(|| "mandate".into());
        if service_name.is_empty() {
            self.bad("telemetry.service_name", "must not be empty");
        }
        let trace_sample_ratio = match t.get("trace_sample_ratio") {
            None => 0.01,
            Some(Value::Float(f)) if (0.0..=1.0).contains(f) => *f,
            Some(Value::Integer(i @ (0 | 1))) => *i as f64,
            Some(other) => {
                self.bad(
                    "telemetry.trace_sample_ratio",
                    format!("`{other}` is not a share from 0 to 1, like 0.01"),
                );
                0.01
            }
        };
        let decision_logs = self.boolean(t, P, "decision_logs", false);
        if decision_logs && otlp_endpoint.is_none() {
            self.bad(
                "telemetry.decision_logs",
                "needs `telemetry.otlp_endpoint`: the records are exported as OTLP logs",
            );
        }
        TelemetryConfig {
            decision_logs,
            decision_log_queue: self.integer(t, P, "decision_log_queue", 10_000, (1, 1_000_000))
                as usize,
            traces: self.boolean(t, P, "traces", true),
            trace_sample_ratio,
            trace_details: self.boolean(t, P, "trace_details", false),
            metrics: self.boolean(t, P, "metrics", true),
            otlp_endpoint,
            otlp_protocol,
            otlp_interval,
            service_name,
        }
    }

    fn ext_authz(
        &mut self,
        t: &Table,
        issuers: &[IssuerSettings],
        peps: &[EnforcementPoint],
    ) -> ExtAuthzConfig {
        let p = "ext_authz";
        self.known(
            t,
            p,
            &[
                "grpc_listen",
                "grpc_unix_socket",
                "identity",
                "jwt_authn_namespace",
                "jwt_authn_payload_key",
                "peer_issuer",
            ],
        );
        let defaults = ExtAuthzConfig::default();
        let grpc_listen = match self.string(t, p, "grpc_listen") {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => match SocketAddr::from_str(&s) {
                Ok(a) => Some(a),
                Err(_) => {
                    self.bad(
                        "ext_authz.grpc_listen",
                        format!("`{s}` is not an address like `127.0.0.1:9191`"),
                    );
                    None
                }
            },
        };
        let grpc_unix_socket = self
            .string(t, p, "grpc_unix_socket")
            .filter(|s| !s.is_empty())
            .map(|s| self.path(&s));
        let identity = match t.contains_key("identity") {
            false => defaults.identity.clone(),
            true => self.identity_sources(t, p),
        };
        let non_empty = |r: &mut Self, key: &str, default: String| match r.string(t, p, key) {
            None => default,
            Some(s) if s.is_empty() => {
                r.bad(join(p, key), "must not be empty");
                default
            }
            Some(s) => s,
        };
        let jwt_authn_namespace =
            non_empty(self, "jwt_authn_namespace", defaults.jwt_authn_namespace);
        let jwt_authn_payload_key = non_empty(
            self,
            "jwt_authn_payload_key",
            defaults.jwt_authn_payload_key,
        );
        let peer_issuer = self.string(t, p, "peer_issuer").filter(|s| !s.is_empty());
        let wants = |s: IdentitySource| identity.contains(&s);
        if wants(IdentitySource::Peer) {
            match &peer_issuer {
                None => self.bad(
                    join(p, "peer_issuer"),
                    "is required with `peer` in `ext_authz.identity`: the `[[issuers]]` entry \
                     (SPIFFE profile) whose trust domain a peer's SPIFFE ID must be in",
                ),
                Some(name) => match issuers.iter().find(|i| &i.name == name) {
                    None => self.bad(
                        join(p, "peer_issuer"),
                        format!("`{name}` is not the name of an `[[issuers]]` entry"),
                    ),
                    Some(i) if i.profile != Profile::Spiffe => self.bad(
                        join(p, "peer_issuer"),
                        format!(
                            "issuer `{name}` is not a SPIFFE issuer (`profile = \"spiffe\"`): a \
                             peer principal is a SPIFFE ID"
                        ),
                    ),
                    Some(_) => {}
                },
            }
        } else if peer_issuer.is_some() {
            self.bad(
                join(p, "peer_issuer"),
                "is set but `peer` is not in `ext_authz.identity`",
            );
        }
        // jwt_authn and peer are Envoy's word, not a proof the agent holds: only a caller
        // that proves it is an enforcement point may give it (an identity taken from an
        // unauthenticated message is no identity; cf. SECURITY A-25).
        let asserted = identity
            .iter()
            .filter(|s| **s != IdentitySource::Authorization)
            .map(|s| s.name())
            .collect::<Vec<_>>();
        let authenticated = peps
            .iter()
            .any(|e| e.credential_sha256.is_some() || !e.token_subjects.is_empty());
        if !asserted.is_empty() && !authenticated {
            self.bad(
                join(p, "identity"),
                format!(
                    "`{}` is Envoy's assertion, believed only on a call an enforcement point \
                     authenticates: add an `[[enforcement_points]]` entry with \
                     `credential_sha256` or `token_subjects`, and have Envoy send it \
                     (`grpc_service.initial_metadata`: `authorization: Bearer …`)",
                    asserted.join("`, `")
                ),
            );
        }
        ExtAuthzConfig {
            grpc_listen,
            grpc_unix_socket,
            identity,
            jwt_authn_namespace,
            jwt_authn_payload_key,
            peer_issuer,
        }
    }

    fn mcp(&mut self, t: &Table) -> McpConfig {
        let p = "mcp";
        self.known(
            t,
            p,
            &[
                "servers",
                "max_message_bytes",
                "upstream_timeout",
                "hold",
                "local_principals",
            ],
        );
        let defaults = McpConfig::default();
        let max_message_bytes = self.integer(
            t,
            p,
            "max_message_bytes",
            defaults.max_message_bytes as u64,
            (1024, 64 * 1024 * 1024),
        ) as usize;
        let upstream_timeout = self.duration(
            t,
            p,
            "upstream_timeout",
            defaults.upstream_timeout,
            Duration::from_secs(300),
        );
        // The approvals API's longest wait is 60 s; an agent's MCP client times out as well.
        let hold = self.duration(t, p, "hold", defaults.hold, Duration::from_secs(60));
        let mut servers: Vec<McpServer> = Vec::new();
        for (sp, st) in self.tables(t, "mcp", "servers") {
            self.known(st, &sp, &["name", "url", "headers"]);
            let name = self.required_string(st, &sp, "name");
            if !name.is_empty() && !mcp_server_name_ok(&name) {
                self.bad(
                    format!("{sp}.name"),
                    format!(
                        "`{name}` must be letters, digits, `-`, `_` or `.` (it is a path segment)"
                    ),
                );
            }
            if servers.iter().any(|s| s.name == name) {
                self.bad(format!("{sp}.name"), format!("`{name}` is named twice"));
            }
            let url = self.required_string(st, &sp, "url");
            let http = url.starts_with("http://") || url.starts_with("https://");
            if !url.is_empty() && !http {
                self.bad(
                    format!("{sp}.url"),
                    format!("`{url}` is not an http:// or https:// URL"),
                );
            }
            let mut headers = Vec::new();
            match st.get("headers") {
                None => {}
                Some(Value::Table(h)) => {
                    for (k, v) in h {
                        let key = format!("{sp}.headers.{k}");
                        match (upstream_header_name(k), v) {
                            (Ok(n), Value::String(v)) if !v.is_empty() => {
                                headers.push((n, v.clone()));
                            }
                            (Err(e), _) => self.bad(key, e),
                            (_, _) => self.bad(key, "expected a non-empty string"),
                        }
                    }
                }
                Some(other) => self.bad(
                    format!("{sp}.headers"),
                    format!(
                        "expected a table of header = value, found {}",
                        other.type_str()
                    ),
                ),
            }
            servers.push(McpServer { name, url, headers });
        }
        McpConfig {
            servers,
            max_message_bytes,
            upstream_timeout,
            hold,
            local_principals: self.local_principals(t),
        }
    }

    /// `[[mcp.local_principals]]`: `uid = 1000` and `principal = { type, id, attributes }`.
    fn local_principals(&mut self, t: &Table) -> Vec<LocalPrincipal> {
        let mut out: Vec<LocalPrincipal> = Vec::new();
        // Every entry's uid by its key, the entries with other problems too.
        let mut seen: Vec<(u32, String)> = Vec::new();
        for (p, lt) in self.tables(t, "mcp", "local_principals") {
            self.known(lt, &p, &["uid", "principal"]);
            let uid = match lt.get("uid") {
                Some(Value::Integer(n)) => match u32::try_from(*n) {
                    Ok(uid) => Some(uid),
                    Err(_) => {
                        self.bad(
                            format!("{p}.uid"),
                            format!("`{n}` is not a user id (0..={})", u32::MAX),
                        );
                        None
                    }
                },
                Some(other) => {
                    self.bad(
                        format!("{p}.uid"),
                        format!(
                            "expected an integer (a numeric user id, as `id -u` prints it), \
                             found {}",
                            other.type_str()
                        ),
                    );
                    None
                }
                None => {
                    self.bad(format!("{p}.uid"), "is required");
                    None
                }
            };
            if let Some(uid) = uid {
                if let Some((_, first)) = seen.iter().find(|(u, _)| *u == uid) {
                    self.bad(
                        format!("{p}.uid"),
                        format!("uid `{uid}` is already {first}'s: one OS user is one principal"),
                    );
                }
                seen.push((uid, p.clone()));
            }
            let Some(pt) = self.table(lt, &p, "principal") else {
                if !lt.contains_key("principal") {
                    self.bad(format!("{p}.principal"), "is required");
                }
                continue;
            };
            let pp = format!("{p}.principal");
            self.known(pt, &pp, &["type", "id", "attributes"]);
            let kind = self.required_string(pt, &pp, "type");
            let id = self.required_string(pt, &pp, "id");
            let attributes = match self.table(pt, &pp, "attributes") {
                None => serde_json::Map::new(),
                Some(a) => {
                    let ap = format!("{pp}.attributes");
                    match json_of_table(a, &ap) {
                        Ok(m) => m,
                        Err((key, message)) => {
                            self.bad(key, message);
                            continue;
                        }
                    }
                }
            };
            if kind.is_empty() || id.is_empty() {
                continue;
            }
            if let Err(e) = crate::policy::values::entity_uid(&format!("{pp}.type"), &kind, &id)
                .and_then(|_| {
                    crate::policy::values::entity_from_json(
                        &format!("{pp}.attributes"),
                        &kind,
                        &id,
                        &attributes,
                        Default::default(),
                    )
                })
            {
                self.bad(e.path, e.message);
                continue;
            }
            if let Some(uid) = uid {
                out.push(LocalPrincipal {
                    uid,
                    kind,
                    id,
                    attributes,
                });
            }
        }
        out
    }

    fn identity_sources(&mut self, t: &Table, p: &str) -> Vec<IdentitySource> {
        let key = join(p, "identity");
        let names = self.strings(t, p, "identity");
        if names.is_empty() {
            self.bad(
                key.clone(),
                format!(
                    "must name at least one source ({})",
                    IdentitySource::NAMES.join(", ")
                ),
            );
        }
        let mut out: Vec<IdentitySource> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let source = match name.as_str() {
                "authorization" => IdentitySource::Authorization,
                "jwt_authn" => IdentitySource::JwtAuthn,
                "peer" => IdentitySource::Peer,
                other => {
                    self.bad(
                        format!("{key}[{i}]"),
                        format!(
                            "`{other}` is not an identity source (expected one of: {})",
                            IdentitySource::NAMES.join(", ")
                        ),
                    );
                    continue;
                }
            };
            if out.contains(&source) {
                self.bad(format!("{key}[{i}]"), format!("`{name}` is listed twice"));
                continue;
            }
            out.push(source);
        }
        out
    }

    fn boolean(&mut self, t: &Table, prefix: &str, key: &str, default: bool) -> bool {
        match t.get(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                self.bad(
                    join(prefix, key),
                    format!("expected true or false, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn forward_auth(&mut self, t: &Table) -> (ForwardAuthConfig, Option<DefaultRoute>) {
        let p = "forward_auth";
        self.known(
            t,
            p,
            &[
                "decision_header",
                "principal_header",
                "approval_id_header",
                "approval_url_header",
                "escalate_status",
                "default_action",
                "default_resource_type",
                "strip_authorization",
            ],
        );
        let defaults = ForwardAuthConfig::default();
        let header = |r: &mut Self, key: &str, default: String| match r.string(t, p, key) {
            None => default,
            Some(name) => match header_name(&name) {
                Ok(h) => h,
                Err(e) => {
                    r.bad(join(p, key), e);
                    default
                }
            },
        };
        let config = ForwardAuthConfig {
            decision_header: header(self, "decision_header", defaults.decision_header),
            principal_header: header(self, "principal_header", defaults.principal_header),
            approval_id_header: header(self, "approval_id_header", defaults.approval_id_header),
            approval_url_header: header(self, "approval_url_header", defaults.approval_url_header),
            escalate_status: match self.integer(t, p, "escalate_status", 403, (400, 499)) {
                s @ (403 | 429) => s as u16,
                s => {
                    self.bad(
                        join(p, "escalate_status"),
                        format!("`{s}` is not 403 or 429 (nginx `auth_request` passes on only 401 and 403)"),
                    );
                    403
                }
            },
            strip_authorization: self.boolean(t, p, "strip_authorization", false),
        };
        let names = [
            ("decision_header", &config.decision_header),
            ("principal_header", &config.principal_header),
            ("approval_id_header", &config.approval_id_header),
            ("approval_url_header", &config.approval_url_header),
        ];
        for (i, (key, name)) in names.iter().enumerate() {
            if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
                self.bad(
                    join(p, key),
                    format!("`{name}` is `forward_auth.{other}` already"),
                );
            }
        }
        let action = self.string(t, p, "default_action");
        let kind = self.string(t, p, "default_resource_type");
        let default = match (action, kind) {
            (Some(action), Some(resource_type))
                if !action.is_empty() && !resource_type.is_empty() =>
            {
                Some(DefaultRoute {
                    action,
                    resource_type,
                })
            }
            (None, None) => None,
            (Some(_), Some(_)) => {
                self.bad(
                    join(p, "default_action"),
                    "must not be empty (leave both out for none)",
                );
                None
            }
            (Some(_), None) => {
                self.bad(
                    join(p, "default_resource_type"),
                    "is required with `default_action` (the resource's type; its id is the path)",
                );
                None
            }
            (None, Some(_)) => {
                self.bad(
                    join(p, "default_action"),
                    "is required with `default_resource_type`",
                );
                None
            }
        };
        (config, default)
    }

    /// `[[routes]]`, compiled; a rule with problems is reported and left out (the
    /// configuration is then refused whole).
    fn routes(&mut self, root: &Table) -> Vec<Route> {
        let mut out = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for (p, t) in self.tables(root, "", "routes") {
            let spec = self.route_spec(t, &p);
            if let Some(j) = names.iter().position(|n| !n.is_empty() && *n == spec.name) {
                self.bad(
                    format!("{p}.name"),
                    format!("`{}` is the name of routes[{j}] already", spec.name),
                );
            }
            names.push(spec.name.clone());
            // Only a rule whose fields all read compiles (else its problems are above).
            let Some(spec) = spec.complete else {
                continue;
            };
            match Route::compile(&spec) {
                Ok(route) => out.push(route),
                Err(problems) => {
                    for pr in problems {
                        self.bad(
                            format!("{p}.{}", pr.key),
                            format!("route `{}`: {}", spec.name, pr.message),
                        );
                    }
                }
            }
        }
        out
    }

    fn route_spec(&mut self, t: &Table, p: &str) -> ReadSpec {
        self.known(
            t,
            p,
            &[
                "name", "host", "method", "path", "action", "resource", "context",
            ],
        );
        let before = self.problems.len();
        let name = self.required_string(t, p, "name");
        let host = self.string(t, p, "host");
        let methods = self.strings(t, p, "method");
        if !t.contains_key("method") {
            self.bad(join(p, "method"), "is required (`\"*\"` for any method)");
        }
        let path = self.required_string(t, p, "path");
        let action = self.required_string(t, p, "action");
        let rp = join(p, "resource");
        let (resource_type, resource_id) = match self.table(t, p, "resource") {
            Some(rt) => {
                self.known(rt, &rp, &["type", "id"]);
                (
                    self.required_string(rt, &rp, "type"),
                    self.required_string(rt, &rp, "id"),
                )
            }
            None => {
                if !t.contains_key("resource") {
                    self.bad(
                        rp,
                        "is required, e.g. `{ type = \"Account\", id = \"{id}\" }`",
                    );
                }
                (String::new(), String::new())
            }
        };
        let mut context = Vec::new();
        if let Some(ct) = self.table(t, p, "context") {
            for (key, v) in ct {
                match v {
                    Value::String(s) => context.push((key.clone(), s.clone())),
                    other => self.bad(
                        format!("{p}.context.{key}"),
                        format!(
                            "expected a source like `\"body:/amount\"`, found {}",
                            other.type_str()
                        ),
                    ),
                }
            }
        }
        let spec = RouteSpec {
            name: name.clone(),
            host,
            methods,
            path,
            action,
            resource_type,
            resource_id,
            context,
        };
        ReadSpec {
            name,
            complete: (self.problems.len() == before).then_some(spec),
        }
    }

    fn store(&mut self, t: &Table) -> StoreConfig {
        let p = "store";
        self.known(
            t,
            p,
            &[
                "url",
                "request_ttl",
                "sweep_interval",
                "grant_cache_size",
                "grant_cache_negative_ttl",
                "max_pending_per_principal",
                "max_requests_per_hour",
                "timeout",
                "probe_interval",
            ],
        );
        let cache_defaults = crate::approval::GrantCacheSettings::default();
        let guard_defaults = crate::approval::GuardSettings::default();
        let guard = crate::approval::GuardSettings {
            timeout: self.duration(
                t,
                p,
                "timeout",
                guard_defaults.timeout,
                Duration::from_secs(10),
            ),
            probe_interval: self.duration(
                t,
                p,
                "probe_interval",
                guard_defaults.probe_interval,
                Duration::from_secs(60),
            ),
        };
        for (key, d) in [
            ("timeout", guard.timeout),
            ("probe_interval", guard.probe_interval),
        ] {
            if d < Duration::from_millis(10) {
                self.bad(format!("{p}.{key}"), "must be at least 10ms");
            }
        }
        let url = match self.string(t, p, "url") {
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => u,
            Some(u) if u.is_empty() => {
                self.bad("store.url", "must not be empty");
                String::new()
            }
            Some(u) => {
                let file = u
                    .strip_prefix("sqlite://")
                    .or_else(|| u.strip_prefix("sqlite:"))
                    .unwrap_or(&u);
                self.path(file).display().to_string()
            }
            None => self.path("mandate.db").display().to_string(),
        };
        StoreConfig {
            url,
            // Teleport's default pending TTL (SECURITY A-11).
            request_ttl: self.duration(
                t,
                p,
                "request_ttl",
                Duration::from_secs(3600),
                Duration::from_secs(14 * 24 * 3600),
            ),
            sweep_interval: self.duration(
                t,
                p,
                "sweep_interval",
                Duration::from_secs(1),
                Duration::from_secs(60),
            ),
            grant_cache: crate::approval::GrantCacheSettings {
                max_entries: self.integer(
                    t,
                    p,
                    "grant_cache_size",
                    cache_defaults.max_entries,
                    (0, 10_000_000),
                ),
                negative_ttl: self.duration(
                    t,
                    p,
                    "grant_cache_negative_ttl",
                    cache_defaults.negative_ttl,
                    crate::approval::cache::MAX_ENTRY_TTL,
                ),
            },
            // SECURITY A-16: at least one (a principal that may never escalate is better said
            // with a forbid policy), at most what an approver could ever look at.
            escalation_limits: crate::approval::EscalationLimits {
                max_pending: self.integer(
                    t,
                    p,
                    "max_pending_per_principal",
                    u64::from(crate::approval::EscalationLimits::DEFAULT_MAX_PENDING),
                    (1, 1000),
                ) as u32,
                max_per_hour: self.integer(
                    t,
                    p,
                    "max_requests_per_hour",
                    u64::from(crate::approval::EscalationLimits::DEFAULT_MAX_PER_HOUR),
                    (1, 10_000),
                ) as u32,
            },
            guard,
        }
    }

    fn audit(&mut self, t: &Table) -> AuditConfig {
        let p = "audit";
        self.known(
            t,
            p,
            &[
                "path",
                "group_commit",
                "checkpoint_key",
                "checkpoint_key_env",
                "checkpoint_every",
                "checkpoint_interval",
                "checkpoint_file",
                "min_free_disk",
                "rotate_size",
                "rotate_age",
                "compress",
                "keep_segments",
                "keep_age",
                "keep_size",
            ],
        );
        let path = match self.string(t, p, "path") {
            Some(s) if s.is_empty() => {
                self.bad(
                    "audit.path",
                    "must not be empty (the audit log is not optional)",
                );
                String::new()
            }
            Some(s) => s,
            None => "audit.jsonl".into(),
        };
        let group_commit = self.duration(
            t,
            p,
            "group_commit",
            AuditSettings::DEFAULT_GROUP_COMMIT,
            Duration::from_secs(1),
        );
        if group_commit < AuditSettings::MIN_GROUP_COMMIT {
            self.bad(
                "audit.group_commit",
                format!(
                    "`{}` is shorter than the minimum 1ms",
                    humantime::format_duration(group_commit)
                ),
            );
        }
        let path = self.path(&path);
        let checkpoints = self.checkpoints(t, p, &path);
        // A size with its unit or a share (`"1GiB"`, `"5%"`), or a number of bytes.
        let min_free_disk = match t.get("min_free_disk") {
            Some(Value::String(s)) => crate::audit::MinFree::parse(s).unwrap_or_else(|e| {
                self.bad(join(p, "min_free_disk"), e);
                crate::audit::MinFree::DEFAULT
            }),
            _ => self
                .size(t, p, "min_free_disk")
                .map_or(crate::audit::MinFree::DEFAULT, crate::audit::MinFree::Bytes),
        };
        let segments = self.audit_segments(t, p);
        AuditConfig {
            path,
            group_commit,
            checkpoints,
            min_free_disk,
            segments,
        }
    }

    /// A size: a string with its unit (`"64MiB"`) or a number of bytes; `None` when absent.
    fn size(&mut self, t: &Table, prefix: &str, key: &str) -> Option<u64> {
        match t.get(key)? {
            Value::Integer(i) => u64::try_from(*i).ok().or_else(|| {
                self.bad(join(prefix, key), format!("`{i}` is negative"));
                None
            }),
            Value::String(s) => crate::audit::disk::parse_size(s)
                .map_err(|e| self.bad(join(prefix, key), e))
                .ok(),
            other => {
                self.bad(
                    join(prefix, key),
                    format!(
                        "expected a size like `64MiB` or a number of bytes, found {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    /// `audit.rotate_*`, `audit.compress` and `audit.keep_*`.
    fn audit_segments(&mut self, t: &Table, p: &str) -> crate::audit::SegmentSettings {
        use crate::audit::{Retention, SegmentSettings as S};
        let rotate_size = match self.size(t, p, "rotate_size") {
            Some(b) if b < S::MIN_ROTATE_SIZE => {
                self.bad(
                    join(p, "rotate_size"),
                    format!("`{b}` bytes is smaller than the minimum 4KiB"),
                );
                S::DEFAULT_ROTATE_SIZE
            }
            Some(b) => b,
            None => S::DEFAULT_ROTATE_SIZE,
        };
        const YEAR: Duration = Duration::from_secs(366 * 24 * 3600);
        let rotate_age = self.duration(t, p, "rotate_age", S::DEFAULT_ROTATE_AGE, YEAR);
        if rotate_age < S::MIN_ROTATE_AGE {
            self.bad(join(p, "rotate_age"), "must be at least 1s");
        }
        let compress = self.boolean(t, p, "compress", true);
        let keep_segments = t
            .contains_key("keep_segments")
            .then(|| self.integer(t, p, "keep_segments", 0, (0, 10_000_000)));
        let keep_age = t.contains_key("keep_age").then(|| {
            self.duration(
                t,
                p,
                "keep_age",
                YEAR,
                Duration::from_secs(100 * 366 * 24 * 3600),
            )
        });
        let keep_size = self.size(t, p, "keep_size");
        if let Some(k) = keep_size
            && k < rotate_size
        {
            self.bad(
                join(p, "keep_size"),
                format!(
                    "`{k}` bytes is less than one segment (`rotate_size` = {rotate_size} bytes): \
                     every closed segment would be deleted at once"
                ),
            );
        }
        S {
            rotate_size,
            rotate_age,
            compress,
            retention: Retention {
                keep_segments,
                keep_age,
                keep_size,
            },
        }
    }

    fn checkpoints(&mut self, t: &Table, p: &str, log: &Path) -> Option<CheckpointConfig> {
        let key = match (
            self.string(t, p, "checkpoint_key"),
            self.string(t, p, "checkpoint_key_env"),
        ) {
            (Some(_), Some(_)) => {
                self.bad(
                    format!("{p}.checkpoint_key_env"),
                    "set either `checkpoint_key` or `checkpoint_key_env`, not both",
                );
                return None;
            }
            (Some(f), None) => KeySource::File(self.path(&f)),
            (None, Some(var)) => KeySource::Env(var),
            (None, None) => {
                for key in ["checkpoint_every", "checkpoint_interval", "checkpoint_file"] {
                    if t.contains_key(key) {
                        self.bad(
                            format!("{p}.{key}"),
                            "only applies with `checkpoint_key` or `checkpoint_key_env`",
                        );
                    }
                }
                return None;
            }
        };
        let every = self.integer(t, p, "checkpoint_every", 1000, (1, 10_000_000));
        let interval = self.duration(
            t,
            p,
            "checkpoint_interval",
            Duration::from_secs(10),
            Duration::from_secs(3600),
        );
        if interval < Duration::from_secs(1) {
            self.bad(format!("{p}.checkpoint_interval"), "must be at least 1s");
        }
        let file = match self.string(t, p, "checkpoint_file") {
            Some(f) => self.path(&f),
            None => {
                let mut name = log.as_os_str().to_owned();
                name.push(".checkpoints");
                PathBuf::from(name)
            }
        };
        Some(CheckpointConfig {
            key,
            file,
            schedule: crate::audit::checkpoint::CheckpointSchedule { every, interval },
        })
    }

    fn server(&mut self, t: &Table) -> ServerConfig {
        let p = "server";
        self.known(
            t,
            p,
            &[
                "listen",
                "unix_socket",
                "tls",
                "public_url",
                "max_body_bytes",
                "header_read_timeout",
                "body_read_timeout",
                "max_connections",
                "idle_timeout",
            ],
        );
        let listen = match self.string(t, p, "listen") {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 8181))),
            Some(s) if s.is_empty() => None,
            Some(s) => match SocketAddr::from_str(&s) {
                Ok(a) => Some(a),
                Err(_) => {
                    self.bad(
                        "server.listen",
                        format!("`{s}` is not an address like `127.0.0.1:8181`"),
                    );
                    None
                }
            },
        };
        let unix_socket = self
            .string(t, p, "unix_socket")
            .filter(|s| !s.is_empty())
            .map(|s| self.path(&s));
        if listen.is_none() && unix_socket.is_none() {
            self.bad(
                "server.listen",
                "no listener: set `listen` or `unix_socket`",
            );
        }
        let tls = self.table(t, p, "tls").map(|tt| {
            let tp = "server.tls";
            self.known(tt, tp, &["cert", "key", "client_ca"]);
            let cert = self.required_string(tt, tp, "cert");
            let key = self.required_string(tt, tp, "key");
            let client_ca = self.string(tt, tp, "client_ca").map(|s| self.path(&s));
            TlsConfig {
                cert: self.path(&cert),
                key: self.path(&key),
                client_ca,
            }
        });
        let public_url = self.string(t, p, "public_url");
        if let Some(u) = &public_url
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            self.bad("server.public_url", format!("`{u}` is not an http(s) URL"));
        }
        let server = ServerConfig {
            listen,
            unix_socket,
            tls,
            public_url: public_url.map(|u| u.trim_end_matches('/').to_owned()),
            max_body_bytes: self.integer(
                t,
                p,
                "max_body_bytes",
                64 * 1024,
                (1024, 16 * 1024 * 1024),
            ) as usize,
            header_read_timeout: self.duration(
                t,
                p,
                "header_read_timeout",
                Duration::from_secs(10),
                Duration::from_secs(300),
            ),
            body_read_timeout: self.duration(
                t,
                p,
                "body_read_timeout",
                Duration::from_secs(10),
                Duration::from_secs(300),
            ),
            max_connections: self.integer(t, p, "max_connections", 1024, (1, 65_536)) as usize,
            idle_timeout: self.duration(
                t,
                p,
                "idle_timeout",
                Duration::from_secs(60),
                Duration::from_secs(3600),
            ),
        };
        // The connection guard closes a connection once these run out: zero would close
        // every connection as soon as it is accepted.
        for (key, d) in [
            ("header_read_timeout", server.header_read_timeout),
            ("idle_timeout", server.idle_timeout),
        ] {
            if d.is_zero() {
                self.bad(join(p, key), "must be longer than `0s`");
            }
        }
        server
    }

    fn issuers(&mut self, root: &Table) -> Vec<IssuerSettings> {
        let mut out: Vec<IssuerSettings> = Vec::new();
        for (p, t) in self.tables(root, "", "issuers") {
            let issuer = self.issuer(t, &p);
            if out.iter().any(|o| o.name == issuer.name) {
                self.bad(
                    format!("{p}.name"),
                    format!("`{}` is used by another issuer", issuer.name),
                );
            }
            if out.iter().any(|o| o.issuer == issuer.issuer) {
                self.bad(
                    format!("{p}.issuer"),
                    format!("`{}` is configured twice", issuer.issuer),
                );
            }
            out.push(issuer);
        }
        out
    }

    fn issuer(&mut self, t: &Table, p: &str) -> IssuerSettings {
        self.known(
            t,
            p,
            &[
                "name",
                "issuer",
                "profile",
                "audiences",
                "algorithms",
                "jwks_file",
                "jwks_url",
                "jwks_refresh",
                "jwks_min_refetch_interval",
                "jwks_max_staleness",
                "jwks_fetch_timeout",
                "jwks_ca_file",
                "hmac_secret_env",
                "leeway",
                "max_lifetime",
                "trust_domain",
                "principal_type",
                "claims",
                "typ",
            ],
        );
        let name = self.required_string(t, p, "name");
        if name.starts_with(LOCAL_ISSUER_PREFIX) {
            self.bad(
                format!("{p}.name"),
                format!(
                    "`{name}` starts with `{LOCAL_ISSUER_PREFIX}`, which names the OS-identified \
                     principals of `[[mcp.local_principals]]`"
                ),
            );
        }
        let issuer = self.required_string(t, p, "issuer");
        let profile = self.issuer_profile(t, p);
        let audiences = self.strings(t, p, "audiences");
        if audiences.is_empty() {
            self.bad(
                format!("{p}.audiences"),
                "at least one audience is required (tokens must be minted for this sidecar)",
            );
        }
        let algorithms = self.issuer_algorithms(t, p, profile);
        let hmac_secret = self.issuer_hmac_secret(t, p, &algorithms);
        let jwks = self.issuer_jwks(t, p, &algorithms);
        let trust_domain = self.string(t, p, "trust_domain");
        if profile == Profile::Spiffe && trust_domain.is_none() {
            self.bad(
                format!("{p}.trust_domain"),
                "is required for the spiffe profile",
            );
        }
        let default_lifetime = match profile {
            Profile::Oidc => Duration::from_secs(24 * 3600),
            Profile::Spiffe | Profile::Kubernetes => Duration::from_secs(3600),
        };
        let claims = self.issuer_claims(t, p);
        IssuerSettings {
            name,
            issuer,
            profile,
            audiences,
            algorithms,
            jwks,
            hmac_secret,
            leeway: self.duration(
                t,
                p,
                "leeway",
                Duration::from_secs(30),
                Duration::from_secs(60),
            ),
            max_lifetime: self.duration(
                t,
                p,
                "max_lifetime",
                default_lifetime,
                Duration::from_secs(7 * 24 * 3600),
            ),
            trust_domain,
            principal_type: self
                .string(t, p, "principal_type")
                .unwrap_or_else(|| "Agent".into()),
            claims,
            typ: self.strings(t, p, "typ"),
        }
    }

    fn issuer_profile(&mut self, t: &Table, p: &str) -> Profile {
        match self.string(t, p, "profile").as_deref() {
            None | Some("oidc") => Profile::Oidc,
            Some("spiffe") => Profile::Spiffe,
            Some("kubernetes") => Profile::Kubernetes,
            Some(other) => {
                self.bad(
                    format!("{p}.profile"),
                    format!("`{other}` is not one of oidc, spiffe, kubernetes"),
                );
                Profile::Oidc
            }
        }
    }

    /// The issuer's `alg` allowlist: known algorithms only (`none` never is), and RS/ES/PS
    /// only for JWT-SVIDs.
    fn issuer_algorithms(
        &mut self,
        t: &Table,
        p: &str,
        profile: Profile,
    ) -> Vec<jsonwebtoken::Algorithm> {
        let mut algorithms = Vec::new();
        let alg_names = self.strings(t, p, "algorithms");
        if alg_names.is_empty() {
            self.bad(
                format!("{p}.algorithms"),
                "at least one algorithm is required, e.g. [\"ES256\"]",
            );
        }
        for (j, a) in alg_names.iter().enumerate() {
            match jsonwebtoken::Algorithm::from_str(a) {
                Ok(alg) => {
                    if profile == Profile::Spiffe
                        && !matches!(
                            alg,
                            jsonwebtoken::Algorithm::RS256
                                | jsonwebtoken::Algorithm::RS384
                                | jsonwebtoken::Algorithm::RS512
                                | jsonwebtoken::Algorithm::ES256
                                | jsonwebtoken::Algorithm::ES384
                                | jsonwebtoken::Algorithm::PS256
                                | jsonwebtoken::Algorithm::PS384
                                | jsonwebtoken::Algorithm::PS512
                        )
                    {
                        self.bad(
                            format!("{p}.algorithms[{j}]"),
                            format!("`{a}` is not allowed for JWT-SVIDs (RS/ES/PS only)"),
                        );
                    }
                    algorithms.push(alg);
                }
                Err(_) => self.bad(
                    format!("{p}.algorithms[{j}]"),
                    format!("`{a}` is not a supported algorithm (`none` never is)"),
                ),
            }
        }
        algorithms
    }

    /// The HS* secret, read from the environment variable the issuer names (at least 32
    /// bytes); HS* algorithms without one are refused.
    fn issuer_hmac_secret(
        &mut self,
        t: &Table,
        p: &str,
        algorithms: &[jsonwebtoken::Algorithm],
    ) -> Option<Vec<u8>> {
        let hmac = algorithms.iter().any(|a| {
            matches!(
                a,
                jsonwebtoken::Algorithm::HS256
                    | jsonwebtoken::Algorithm::HS384
                    | jsonwebtoken::Algorithm::HS512
            )
        });
        let hmac_secret = match self.string(t, p, "hmac_secret_env") {
            None => None,
            Some(var) => match std::env::var(&var) {
                Ok(s) if s.len() >= 32 => Some(s.into_bytes()),
                Ok(_) => {
                    self.bad(
                        format!("{p}.hmac_secret_env"),
                        format!("the secret in `{var}` is shorter than 32 bytes"),
                    );
                    None
                }
                Err(_) => {
                    self.bad(
                        format!("{p}.hmac_secret_env"),
                        format!("environment variable `{var}` is not set"),
                    );
                    None
                }
            },
        };
        if hmac && hmac_secret.is_none() && !t.contains_key("hmac_secret_env") {
            self.bad(
                format!("{p}.algorithms"),
                "HS* algorithms need `hmac_secret_env`",
            );
        }
        hmac_secret
    }

    /// Where the issuer's keys come from: a file, or a URL with its refresh settings.
    fn issuer_jwks(
        &mut self,
        t: &Table,
        p: &str,
        algorithms: &[jsonwebtoken::Algorithm],
    ) -> Option<JwksSource> {
        let jwks_file = self.string(t, p, "jwks_file");
        let jwks_url = self.string(t, p, "jwks_url");
        let jwks_ca_file = self.string(t, p, "jwks_ca_file");
        if let Some(url) = &jwks_url
            && jwks_ca_file.is_some()
            && !url.starts_with("https://")
        {
            self.bad(
                format!("{p}.jwks_ca_file"),
                format!("set, but `jwks_url` `{url}` is not https"),
            );
        }
        if jwks_url.is_none() {
            for key in [
                "jwks_ca_file",
                "jwks_fetch_timeout",
                "jwks_refresh",
                "jwks_min_refetch_interval",
                "jwks_max_staleness",
            ] {
                if t.contains_key(key) {
                    self.bad(format!("{p}.{key}"), "only applies with `jwks_url`");
                }
            }
        }
        match (jwks_file, jwks_url) {
            (Some(_), Some(_)) => {
                self.bad(
                    format!("{p}.jwks_url"),
                    "set either `jwks_file` or `jwks_url`, not both",
                );
                None
            }
            (Some(f), None) => Some(JwksSource::File(self.path(&f))),
            (None, Some(url)) => {
                if !jwks_url_allowed(&url) {
                    self.bad(
                        format!("{p}.jwks_url"),
                        format!("`{url}` must be https (plain http only on a loopback host)"),
                    );
                }
                let refresh = self.duration(
                    t,
                    p,
                    "jwks_refresh",
                    Duration::from_secs(300),
                    Duration::from_secs(3600),
                );
                if refresh < Duration::from_secs(1) {
                    self.bad(format!("{p}.jwks_refresh"), "must be at least 1s");
                }
                let fetch_timeout = self.duration(
                    t,
                    p,
                    "jwks_fetch_timeout",
                    Duration::from_secs(5),
                    Duration::from_secs(5),
                );
                if fetch_timeout.is_zero() {
                    self.bad(format!("{p}.jwks_fetch_timeout"), "must be above 0");
                }
                Some(JwksSource::Url {
                    url,
                    refresh,
                    min_refetch_interval: self.duration(
                        t,
                        p,
                        "jwks_min_refetch_interval",
                        Duration::from_secs(30),
                        Duration::from_secs(3600),
                    ),
                    max_staleness: self.duration(
                        t,
                        p,
                        "jwks_max_staleness",
                        Duration::from_secs(24 * 3600),
                        Duration::from_secs(7 * 24 * 3600),
                    ),
                    fetch_timeout,
                    ca_file: jwks_ca_file.map(|f| self.path(&f)),
                })
            }
            (None, None) => {
                if algorithms.iter().any(|a| !is_hmac(*a)) {
                    self.bad(
                        format!("{p}.jwks_file"),
                        "asymmetric algorithms need `jwks_file` or `jwks_url`",
                    );
                }
                None
            }
        }
    }

    /// `claims`: Cedar attribute name -> claim name.
    fn issuer_claims(&mut self, t: &Table, p: &str) -> BTreeMap<String, String> {
        let mut claims = BTreeMap::new();
        if let Some(ct) = self.table(t, p, "claims") {
            for (attr, v) in ct {
                match v {
                    Value::String(c) if !c.is_empty() => {
                        claims.insert(attr.clone(), c.clone());
                    }
                    other => self.bad(
                        format!("{p}.claims.{attr}"),
                        format!("expected a claim name, found {}", other.type_str()),
                    ),
                }
            }
        }
        claims
    }

    fn enforcement_points(
        &mut self,
        root: &Table,
        issuers: &[IssuerSettings],
    ) -> Vec<EnforcementPoint> {
        let mut out = Vec::new();
        for (p, t) in self.tables(root, "", "enforcement_points") {
            self.known(
                t,
                &p,
                &[
                    "name",
                    "credential_sha256",
                    "mtls_uri_sans",
                    "token_subjects",
                ],
            );
            let name = self.required_string(t, &p, "name");
            let credential_sha256 = self.string(t, &p, "credential_sha256").and_then(|h| {
                let mut out = [0u8; 32];
                match hex::decode_to_slice(h.trim(), &mut out) {
                    Ok(()) => Some(out),
                    Err(_) => {
                        self.bad(
                            format!("{p}.credential_sha256"),
                            "expected 64 hex characters (`sha256sum` of the credential)",
                        );
                        None
                    }
                }
            });
            let mtls_uri_sans = self.strings(t, &p, "mtls_uri_sans");
            let token_subjects = self.strings(t, &p, "token_subjects");
            if credential_sha256.is_none() && mtls_uri_sans.is_empty() && token_subjects.is_empty()
            {
                self.bad(p.clone(), "needs `credential_sha256`, `mtls_uri_sans` or `token_subjects` to authenticate it");
            }
            if !token_subjects.is_empty() && issuers.is_empty() {
                self.bad(
                    format!("{p}.token_subjects"),
                    "no `[[issuers]]` are configured to verify their tokens",
                );
            }
            out.push(EnforcementPoint {
                name,
                credential_sha256,
                mtls_uri_sans,
                token_subjects,
            });
        }
        out
    }

    fn dev(&mut self, t: &Table, issuers: &[IssuerSettings]) -> DevConfig {
        let p = "dev";
        self.known(t, p, &["signing_key", "kid", "issuer"]);
        let key = self.required_string(t, p, "signing_key");
        let issuer = self.required_string(t, p, "issuer");
        if !issuer.is_empty() && !issuers.iter().any(|i| i.name == issuer) {
            self.bad(
                "dev.issuer",
                format!("no `[[issuers]]` entry is named `{issuer}`"),
            );
        }
        DevConfig {
            signing_key: self.path(&key),
            kid: self.string(t, p, "kid").unwrap_or_else(|| "dev-1".into()),
            issuer,
        }
    }
}

/// A `[[routes]]` entry as read: its name, and the spec when every field read cleanly.
struct ReadSpec {
    name: String,
    complete: Option<RouteSpec>,
}

/// A header name the forward-auth endpoints may answer with: an HTTP token, lowercased, and
/// none that means something to HTTP itself (a misnamed setting must not set `Authorization`
/// on the upstream request).
/// A header Mandate sends an MCP upstream (its credential, an API key): any valid name but
/// those the transport or the MCP session own.
fn upstream_header_name(name: &str) -> Result<String, String> {
    const OWNED: &[&str] = &[
        "connection",
        "content-length",
        "content-type",
        "accept",
        "host",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
    ];
    let lower = name.to_ascii_lowercase();
    if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
        return Err(format!("`{name}` is not a header name"));
    }
    if OWNED.contains(&lower.as_str()) {
        return Err(format!(
            "`{name}` is set by the transport or the MCP session, not by configuration"
        ));
    }
    Ok(lower)
}

fn header_name(name: &str) -> Result<String, String> {
    const RESERVED: &[&str] = &[
        "authorization",
        "connection",
        "content-length",
        "content-type",
        "cookie",
        "host",
        "keep-alive",
        "proxy-authorization",
        "set-cookie",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "www-authenticate",
    ];
    let token = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
    if !token {
        return Err(format!("`{name}` is not a header name"));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED.contains(&lower.as_str()) {
        return Err(format!("`{name}` is a header HTTP itself uses"));
    }
    Ok(lower)
}

/// A TOML table as a JSON object, for Cedar attributes: strings, integers, booleans, arrays
/// and tables. A float or a date is refused at its key (Cedar has neither; a rounded number
/// would change what a policy decides).
fn json_of_table(
    t: &Table,
    path: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, (String, String)> {
    fn one(v: &Value, path: String) -> Result<serde_json::Value, (String, String)> {
        Ok(match v {
            Value::String(s) => s.clone().into(),
            Value::Integer(i) => (*i).into(),
            Value::Boolean(b) => (*b).into(),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| one(item, format!("{path}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?
                .into(),
            Value::Table(t) => json_of_table(t, &path)?.into(),
            Value::Float(_) | Value::Datetime(_) => {
                return Err((
                    path,
                    format!(
                        "a {} is not a Cedar value (use an integer or a string)",
                        v.type_str()
                    ),
                ));
            }
        })
    }
    t.iter()
        .map(|(k, v)| Ok((k.clone(), one(v, join(path, k))?)))
        .collect()
}

/// `p` with its `.` components dropped and each `dir/..` folded, the way the kernel resolves
/// it, without needing the files to exist: `config/../data/audit.jsonl` is
/// `data/audit.jsonl`. A `..` after a symbolic link is kept (`link/..` is the parent of the
/// link's target, which only the filesystem knows); a `..` at the root is the root.
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) if !is_symlink(&out) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

fn is_hmac(a: jsonwebtoken::Algorithm) -> bool {
    matches!(
        a,
        jsonwebtoken::Algorithm::HS256
            | jsonwebtoken::Algorithm::HS384
            | jsonwebtoken::Algorithm::HS512
    )
}

/// HTTPS only; plain HTTP is accepted for loopback hosts so tests and local issuers work
/// (SECURITY K-11).
pub fn jwks_url_allowed(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']')
            .next()
            .map(|h| h.trim_start_matches('['))
            .unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::parse(text, Path::new("/etc/mandate/mandate.toml"), &env)
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8181"
[policy]
bundle = "policies"
[[issuers]]
name = "dev"
issuer = "https://dev.example"
audiences = ["mandate"]
algorithms = ["ES256"]
jwks_file = "dev/jwks.json"
[issuers.claims]
owner = "owner"
"#;

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse(GOOD, &[]).unwrap();
        assert_eq!(c.server.listen, Some("127.0.0.1:8181".parse().unwrap()));
        assert_eq!(c.server.max_body_bytes, 65536);
        assert_eq!(c.policy.bundle, PathBuf::from("/etc/mandate/policies"));
        assert_eq!(
            c.issuers[0].jwks,
            Some(JwksSource::File("/etc/mandate/dev/jwks.json".into()))
        );
        assert_eq!(c.issuers[0].principal_type, "Agent");
        assert_eq!(c.issuers[0].leeway, Duration::from_secs(30));
    }

    #[test]
    fn h01_h07_connection_timeouts_default_and_zero_is_refused() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        let err = parse(
            "",
            &[
                ("MANDATE_SERVER__HEADER_READ_TIMEOUT", "0s"),
                ("MANDATE_SERVER__IDLE_TIMEOUT", "0s"),
            ],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["server.header_read_timeout", "server.idle_timeout"]);
    }

    #[test]
    fn empty_file_listens_on_localhost_8181() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c.server.listen, Some("127.0.0.1:8181".parse().unwrap()));
        assert!(c.issuers.is_empty());
    }

    #[test]
    fn env_overrides_scalars_arrays_and_indexed_tables() {
        let c = parse(
            GOOD,
            &[
                ("MANDATE_SERVER__LISTEN", "127.0.0.1:0"),
                ("MANDATE_SERVER__MAX_BODY_BYTES", "4096"),
                ("MANDATE_ISSUERS__0__AUDIENCES", r#"["a","b"]"#),
                ("MANDATE_POLICY__BUNDLE", "/srv/bundle"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c.server.max_body_bytes, 4096);
        assert_eq!(c.issuers[0].audiences, vec!["a", "b"]);
        assert_eq!(c.policy.bundle, PathBuf::from("/srv/bundle"));
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let err = parse(
            r#"
[server]
listen = "nowhere"
max_body_bytes = "big"
colour = "blue"
[[issuers]]
name = "x"
issuer = "https://x"
algorithms = ["none", "ES256"]
leeway = "5 fortnights"
[log]
format = "xml"
"#,
            &[("MANDATE_ISSUERS__3__LEEWAY", "1s")],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "server.listen",
            "server.max_body_bytes",
            "server.colour",
            "issuers[0].audiences",
            "issuers[0].algorithms[0]",
            "issuers[0].leeway",
            "issuers[0].jwks_file",
            "log.format",
            "MANDATE_ISSUERS__3__LEEWAY",
        ] {
            assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
        }
        let text = err.to_string();
        assert!(
            text.contains("server.listen: `nowhere` is not an address"),
            "{text}"
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = parse("[server]\nlisten = \n", &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "(line 2)");
    }

    #[test]
    fn leeway_above_sixty_seconds_is_refused() {
        let err = parse(
            &GOOD.replace("[issuers.claims]", "leeway = \"5m\"\n[issuers.claims]"),
            &[],
        )
        .unwrap_err();
        assert_eq!(err.problems[0].key, "issuers[0].leeway");
    }

    #[test]
    fn k11_jwks_url_must_be_https_unless_loopback() {
        assert!(jwks_url_allowed("https://issuer.example/jwks"));
        assert!(jwks_url_allowed("http://127.0.0.1:8080/jwks"));
        assert!(jwks_url_allowed("http://[::1]:8080/jwks"));
        assert!(jwks_url_allowed("http://localhost/jwks"));
        assert!(!jwks_url_allowed("http://169.254.169.254/latest"));
        assert!(!jwks_url_allowed("http://127.0.0.1.evil.example/jwks"));
        assert!(!jwks_url_allowed("http://localhost@evil.example/jwks"));
        assert!(!jwks_url_allowed("file:///etc/passwd"));
    }

    fn url_issuer(extra: &str) -> String {
        GOOD.replace(
            "jwks_file = \"dev/jwks.json\"\n",
            &format!("jwks_url = \"https://idp.example/jwks\"\n{extra}"),
        )
    }

    #[test]
    fn k05_jwks_url_defaults_fetch_timeout_and_ca_file() {
        let c = parse(
            &url_issuer("jwks_fetch_timeout = \"750ms\"\njwks_ca_file = \"ca/idp.pem\"\njwks_refresh = \"1s\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            url_settings(&c),
            (
                Duration::from_secs(1),
                Duration::from_millis(750),
                Some(PathBuf::from("/etc/mandate/ca/idp.pem"))
            )
        );
        let c = parse(&url_issuer(""), &[]).unwrap();
        assert_eq!(
            url_settings(&c),
            (Duration::from_secs(300), Duration::from_secs(5), None)
        );
    }

    /// `(refresh, fetch_timeout, ca_file)` of the first issuer's JWKS URL source.
    fn url_settings(c: &Config) -> (Duration, Duration, Option<PathBuf>) {
        let Some(JwksSource::Url {
            refresh,
            fetch_timeout,
            ca_file,
            ..
        }) = &c.issuers[0].jwks
        else {
            panic!("url source expected");
        };
        (*refresh, *fetch_timeout, ca_file.clone())
    }

    #[test]
    fn k05_jwks_fetch_timeout_and_refresh_bounds_are_enforced() {
        for (extra, key) in [
            (
                "jwks_fetch_timeout = \"6s\"\n",
                "issuers[0].jwks_fetch_timeout",
            ),
            (
                "jwks_fetch_timeout = \"0s\"\n",
                "issuers[0].jwks_fetch_timeout",
            ),
            ("jwks_refresh = \"500ms\"\n", "issuers[0].jwks_refresh"),
        ] {
            let err = parse(&url_issuer(extra), &[]).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{extra}: {err}");
            assert_eq!(err.problems[0].key, key, "{extra}: {err}");
        }
    }

    #[test]
    fn jwks_ca_file_needs_an_https_jwks_url() {
        let err = parse(
            &GOOD.replace(
                "jwks_file = \"dev/jwks.json\"\n",
                "jwks_url = \"http://127.0.0.1:9/jwks\"\njwks_ca_file = \"ca.pem\"\n",
            ),
            &[],
        )
        .unwrap_err();
        assert_eq!(err.problems[0].key, "issuers[0].jwks_ca_file");
        assert!(err.problems[0].message.contains("not https"), "{err}");
        // With a key file there is nothing to fetch: URL-only settings are mistakes.
        let err = parse(
            &GOOD.replace(
                "[issuers.claims]",
                "jwks_ca_file = \"ca.pem\"\njwks_fetch_timeout = \"1s\"\n[issuers.claims]",
            ),
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["issuers[0].jwks_ca_file", "issuers[0].jwks_fetch_timeout"]
        );
    }

    #[test]
    fn audit_defaults_beside_the_config_file() {
        let c = parse(GOOD, &[]).unwrap();
        assert_eq!(c.audit.path, PathBuf::from("/etc/mandate/audit.jsonl"));
        assert_eq!(c.audit.group_commit, Duration::from_millis(5));
        let c = parse(
            "[audit]\npath = \"../data/audit.jsonl\"\ngroup_commit = \"20ms\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.audit.path, PathBuf::from("/etc/data/audit.jsonl"));
        assert_eq!(c.audit.group_commit, Duration::from_millis(20));
        let c = parse("", &[("MANDATE_AUDIT__PATH", "/var/log/mandate/a.jsonl")]).unwrap();
        assert_eq!(c.audit.path, PathBuf::from("/var/log/mandate/a.jsonl"));
    }

    #[test]
    fn audit_problems_are_reported_with_their_key_path() {
        let err = parse(
            "[audit]\npath = \"\"\ngroup_commit = \"2s\"\nfsync = true\n",
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["audit.fsync", "audit.path", "audit.group_commit"]);
        let err = parse("[audit]\ngroup_commit = \"100us\"\n", &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "audit.group_commit");
        let err = parse("audit = 1\n", &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "audit");
        // The free-disk alarm: a size, a share or bytes; anything else names the key.
        use crate::audit::MinFree;
        assert_eq!(
            parse("", &[]).unwrap().audit.min_free_disk,
            MinFree::DEFAULT
        );
        for (value, want) in [
            ("\"5%\"", MinFree::Percent(5)),
            ("\"2GiB\"", MinFree::Bytes(2 << 30)),
            ("4096", MinFree::Bytes(4096)),
        ] {
            let c = parse(&format!("[audit]\nmin_free_disk = {value}\n"), &[]).unwrap();
            assert_eq!(c.audit.min_free_disk, want, "{value}");
        }
        for bad in ["\"lots\"", "-1", "true"] {
            let err = parse(&format!("[audit]\nmin_free_disk = {bad}\n"), &[]).unwrap_err();
            assert_eq!(err.problems[0].key, "audit.min_free_disk", "{bad}");
        }
    }

    #[test]
    fn audit_segments_default_parse_and_bad_values_name_their_key() {
        use crate::audit::{Retention, SegmentSettings};
        assert_eq!(
            parse("", &[]).unwrap().audit.segments,
            SegmentSettings::default()
        );
        let c = parse(
            "[audit]\nrotate_size = \"1MiB\"\nrotate_age = \"1h\"\ncompress = false\n\
             keep_segments = 10\nkeep_age = \"30days\"\nkeep_size = 10485760\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.audit.segments,
            SegmentSettings {
                rotate_size: 1 << 20,
                rotate_age: Duration::from_secs(3600),
                compress: false,
                retention: Retention {
                    keep_segments: Some(10),
                    keep_age: Some(Duration::from_secs(30 * 86_400)),
                    keep_size: Some(10 << 20),
                },
            }
        );
        for (bad, key, says) in [
            (
                "rotate_size = \"1KiB\"",
                "audit.rotate_size",
                "minimum 4KiB",
            ),
            (
                "rotate_size = \"big\"",
                "audit.rotate_size",
                "expected a size",
            ),
            ("rotate_size = true", "audit.rotate_size", "found boolean"),
            ("rotate_age = \"0s\"", "audit.rotate_age", "at least 1s"),
            ("keep_segments = -1", "audit.keep_segments", "out of range"),
            ("keep_age = \"soon\"", "audit.keep_age", "not a duration"),
            (
                "keep_size = \"1MiB\"",
                "audit.keep_size",
                "less than one segment",
            ),
            ("compress = \"zstd\"", "audit.compress", ""),
        ] {
            let err = parse(&format!("[audit]\n{bad}\n"), &[]).unwrap_err();
            assert_eq!(err.problems[0].key, key, "{bad}");
            assert!(err.problems[0].message.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a16_escalation_limits_default_validate_and_override() {
        let c = parse(GOOD, &[]).unwrap();
        assert_eq!(
            c.store.escalation_limits,
            crate::approval::EscalationLimits {
                max_pending: 5,
                max_per_hour: 30
            }
        );
        let c = parse(
            "[store]\nmax_pending_per_principal = 2\n",
            &[("MANDATE_STORE__MAX_REQUESTS_PER_HOUR", "7")],
        )
        .unwrap();
        assert_eq!(
            (
                c.store.escalation_limits.max_pending,
                c.store.escalation_limits.max_per_hour
            ),
            (2, 7)
        );
        let err = parse(
            "[store]\nmax_pending_per_principal = 0\nmax_requests_per_hour = \"30\"\n",
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "store.max_pending_per_principal",
                "store.max_requests_per_hour"
            ]
        );
    }

    /// Each problem's key with where it came from.
    fn origins(err: &ConfigError) -> Vec<(&str, Option<Origin>)> {
        err.problems
            .iter()
            .map(|p| (p.key.as_str(), p.origin.clone()))
            .collect()
    }

    fn env_var(name: &str) -> Option<Origin> {
        Some(Origin::Override(name.to_owned()))
    }

    #[test]
    fn unknown_key_in_the_file_names_the_file_and_line() {
        let err = parse(
            "# comment\n[server]\nlisten = \"127.0.0.1:0\"\nlistn = \"127.0.0.1:1\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(origins(&err), [("server.listn", Some(Origin::Line(4)))]);
        let text = err.to_string();
        assert!(
            text.contains(
                "\n  /etc/mandate/mandate.toml:4: server.listn: unknown key (expected one of: listen,"
            ),
            "{text}"
        );
    }

    #[test]
    fn bad_values_in_a_second_issuer_name_their_own_lines() {
        // GOOD's lines 1-13; the second `[[issuers]]` starts on line 14.
        let text = format!(
            "{GOOD}[[issuers]]\nname = \"b\"\nissuer = \"https://b\"\n\
             algorithms = [\"ES256\", \"none\"]\njwks_file = \"b.json\"\n\
             leeway = \"5 fortnights\"\n[issuers.claims]\nteam = 7\n"
        );
        let err = parse(&text, &[]).unwrap_err();
        assert_eq!(
            origins(&err),
            [
                // Missing: the line of the `[[issuers]]` header it belongs under.
                ("issuers[1].audiences", Some(Origin::Line(14))),
                ("issuers[1].algorithms[1]", Some(Origin::Line(17))),
                ("issuers[1].claims.team", Some(Origin::Line(21))),
                ("issuers[1].leeway", Some(Origin::Line(19))),
            ]
        );
        let err = parse("[server.tls]\ncert = \"c.pem\"\n", &[]).unwrap_err();
        assert_eq!(origins(&err), [("server.tls.key", Some(Origin::Line(1)))]);
    }

    #[test]
    fn env_override_problems_name_the_variable() {
        let err = parse(
            GOOD,
            &[
                ("MANDATE_SERVER__LISTN", "127.0.0.1:1"),
                // Over a value the file sets (line 3): the variable, not the line.
                ("MANDATE_SERVER__LISTEN", "nowhere"),
                // `00` is index 0; the array's items belong to the variable that set it.
                ("MANDATE_ISSUERS__00__LEEWAY", "5m"),
                ("MANDATE_ISSUERS__0__ALGORITHMS", r#"["ES256", "none"]"#),
            ],
        )
        .unwrap_err();
        assert_eq!(
            origins(&err),
            [
                ("server.listn", env_var("MANDATE_SERVER__LISTN")),
                // Not an address, and so no listener.
                ("server.listen", env_var("MANDATE_SERVER__LISTEN")),
                ("server.listen", env_var("MANDATE_SERVER__LISTEN")),
                (
                    "issuers[0].algorithms[1]",
                    env_var("MANDATE_ISSUERS__0__ALGORITHMS")
                ),
                ("issuers[0].leeway", env_var("MANDATE_ISSUERS__00__LEEWAY")),
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains("\n  MANDATE_SERVER__LISTN: server.listn: unknown key (expected one of:"),
            "{text}"
        );
        // A missing key in a table only the environment made has no line to point at.
        let err = parse("", &[("MANDATE_DEV__KID", "k")]).unwrap_err();
        assert_eq!(
            origins(&err),
            [("dev.signing_key", None), ("dev.issuer", None)]
        );
        assert!(
            err.to_string().contains("\n  dev.issuer: is required"),
            "{err}"
        );
    }

    #[test]
    fn file_and_env_problems_are_reported_together() {
        let err = parse(
            "[log]\nlevel = \"info\"\nformat = \"xml\"\n",
            &[("MANDATE_LOG__LEVL", "debug")],
        )
        .unwrap_err();
        assert_eq!(
            origins(&err),
            [
                ("log.levl", env_var("MANDATE_LOG__LEVL")),
                ("log.format", Some(Origin::Line(3))),
            ]
        );
        let text = err.to_string();
        assert!(text.contains("(2 problems)"), "{text}");
        assert!(
            text.contains("\n  MANDATE_LOG__LEVL: log.levl: unknown key"),
            "{text}"
        );
        assert!(
            text.contains("\n  /etc/mandate/mandate.toml:3: log.format: `xml` is not"),
            "{text}"
        );
    }

    #[test]
    fn flags_win_over_the_environment_and_name_themselves() {
        let path = Path::new("/etc/mandate/mandate.toml");
        let env = [("MANDATE_SERVER__LISTEN".to_owned(), "nowhere".to_owned())];
        let flags = [
            Override::flag("--listen", "server.listen", "127.0.0.1:9000"),
            Override::flag("--bundle", "policy.bundle", "/srv/bundle"),
        ];
        let c = Config::parse_with(GOOD, path, &env, &flags).unwrap();
        assert_eq!(c.server.listen, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(c.policy.bundle, PathBuf::from("/srv/bundle"));
        let flags = [Override::flag("--log-level", "log.level", "mandate=loud")];
        let err = Config::parse_with(GOOD, path, &env, &flags).unwrap_err();
        assert_eq!(
            origins(&err),
            [
                ("server.listen", env_var("MANDATE_SERVER__LISTEN")),
                ("server.listen", env_var("MANDATE_SERVER__LISTEN")),
                ("log.level", env_var("--log-level")),
            ]
        );
        assert!(
            err.to_string().contains("\n  --log-level: log.level: "),
            "{err}"
        );
    }

    #[test]
    fn paths_are_folded_as_the_example_config_is_run_from_the_repository() {
        let env: Vec<(String, String)> = Vec::new();
        let text = "[policy]\nbundle = \"./policies\"\n[audit]\npath = \"../data/audit.jsonl\"\n\
                    [store]\nurl = \"sqlite://../data/mandate.db\"\n";
        let c = Config::parse(text, Path::new("config/mandate.toml"), &env).unwrap();
        assert_eq!(c.audit.path, PathBuf::from("data/audit.jsonl"));
        assert_eq!(c.store.url, "data/mandate.db");
        assert_eq!(c.policy.bundle, PathBuf::from("config/policies"));
        let c = Config::parse(text, Path::new("mandate.toml"), &env).unwrap();
        assert_eq!(c.audit.path, PathBuf::from("../data/audit.jsonl"));
        assert_eq!(c.policy.bundle, PathBuf::from("policies"));
    }

    #[test]
    fn normalize_folds_dots_but_not_through_a_symlink() {
        for (from, to) in [
            ("a/./b/../c", "a/c"),
            ("../a/../../b", "../../b"),
            ("/../etc/x/..", "/etc"),
            ("a/..", "."),
            ("./", "."),
        ] {
            assert_eq!(normalize(Path::new(from)), PathBuf::from(to), "{from}");
        }
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real/inner");
        std::fs::create_dir_all(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // `link/..` is `real`, not `dir`: the `..` stays for the kernel to resolve.
        assert_eq!(normalize(&link.join("../x")), link.join("../x"));
        assert_eq!(
            normalize(&dir.path().join("real/inner/../x")),
            dir.path().join("real/x")
        );
    }

    #[test]
    fn log_summary_interval_defaults_to_a_minute_and_zero_turns_it_off() {
        assert_eq!(
            parse("", &[]).unwrap().log.summary_interval,
            Duration::from_secs(60)
        );
        let c = parse("[log]\nsummary_interval = \"0s\"\n", &[]).unwrap();
        assert_eq!(c.log.summary_interval, Duration::ZERO);
        let c = parse("", &[("MANDATE_LOG__SUMMARY_INTERVAL", "5m")]).unwrap();
        assert_eq!(c.log.summary_interval, Duration::from_secs(300));
        let err = parse("[log]\nsummary_interval = \"soon\"\n", &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "log.summary_interval");
    }

    const ROUTES: &str = r#"
[[routes]]
name = "transfer"
method = "POST"
path = "/accounts/{id}/transfers"
action = "payments:transfer"
resource = { type = "Account", id = "{id}" }
context = { amount = "body:/amount" }

[[routes]]
name = "read"
method = ["GET", "HEAD"]
path = "/crm/{id}"
action = "crm:read"
resource = { type = "CrmRecord", id = "{id}" }
"#;

    #[test]
    fn routes_and_forward_auth_defaults() {
        let c = parse("", &[]).unwrap();
        assert!(c.routes.rules().is_empty());
        assert_eq!(c.routes.default_route(), None);
        assert_eq!(c.forward_auth, ForwardAuthConfig::default());
        let c = parse(ROUTES, &[]).unwrap();
        let names: Vec<&str> = c.routes.rules().iter().map(|r| r.name()).collect();
        assert_eq!(names, ["transfer", "read"]);
    }

    #[test]
    fn route_problems_name_the_rule_its_key_and_line() {
        // ROUTES is lines 1-16; the third rule starts on line 17.
        let text = format!(
            "{ROUTES}\n[[routes]]\nname = \"read\"\nmethod = \"get\"\npath = \"/x/{{y}}/{{y}}\"\n\
             action = \"crm:read\"\nresource = {{ type = \"CrmRecord\", id = \"{{z}}\" }}\n\
             context = {{ amount = \"cookie:a\", n = 3 }}\nmethd = \"GET\"\n\n\
             [[routes]]\nname = \"incomplete\"\npath = \"/\"\n"
        );
        let err = parse(&text, &[]).unwrap_err();
        assert_eq!(
            origins(&err),
            [
                ("routes[2].methd", Some(Origin::Line(24))),
                ("routes[2].context.n", Some(Origin::Line(23))),
                ("routes[2].name", Some(Origin::Line(18))),
                ("routes[3].method", Some(Origin::Line(26))),
                ("routes[3].action", Some(Origin::Line(26))),
                ("routes[3].resource", Some(Origin::Line(26))),
            ]
        );
        assert!(err.problems[2].message.contains("routes[1]"), "{err}");
        // Once its fields read, a rule's own problems are all reported, named by the rule.
        let text = format!(
            "{ROUTES}\n[[routes]]\nname = \"bad\"\nmethod = \"get\"\npath = \"/x/{{y}}/{{y}}\"\n\
             action = \"crm:read\"\nresource = {{ type = \"CrmRecord\", id = \"{{z}}\" }}\n\
             context = {{ amount = \"cookie:a\" }}\n"
        );
        let err = parse(&text, &[]).unwrap_err();
        assert_eq!(
            origins(&err),
            [
                ("routes[2].path", Some(Origin::Line(20))),
                ("routes[2].method", Some(Origin::Line(19))),
                ("routes[2].resource.id", Some(Origin::Line(22))),
                ("routes[2].context.amount", Some(Origin::Line(23))),
            ]
        );
        assert!(
            err.to_string()
                .contains("mandate.toml:19: routes[2].method: route `bad`: `get` is not a method"),
            "{err}"
        );
    }

    #[test]
    fn forward_auth_settings_are_validated() {
        let err = parse(
            "[forward_auth]\ndecision_header = \"Authorization\"\nprincipal_header = \"x y\"\n\
             approval_id_header = \"X-Mandate-Decision-Id\"\nescalate_status = 404\n\
             default_action = \"http:request\"\n",
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "forward_auth.decision_header",
                "forward_auth.principal_header",
                "forward_auth.escalate_status",
                "forward_auth.approval_id_header",
                "forward_auth.default_resource_type",
            ]
        );
        let c = parse(
            "[forward_auth]\nprincipal_header = \"X-Agent\"\nescalate_status = 429\n\
             default_action = \"http:request\"\ndefault_resource_type = \"Path\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.forward_auth.principal_header, "x-agent");
        assert_eq!(c.forward_auth.escalate_status, 429);
        assert_eq!(
            c.routes.default_route().map(|d| d.action.as_str()),
            Some("http:request")
        );
    }

    /// GOOD plus a SPIFFE issuer `spire`, an enforcement point authenticated by a
    /// credential, and `[ext_authz]` with `extra`.
    fn ext_authz_config(extra: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "{GOOD}[[issuers]]\nname = \"spire\"\nissuer = \"https://spire.example\"\n\
             profile = \"spiffe\"\ntrust_domain = \"example.org\"\naudiences = [\"mandate\"]\n\
             algorithms = [\"ES256\"]\njwks_file = \"spire/jwks.json\"\n\
             [[enforcement_points]]\nname = \"envoy\"\ncredential_sha256 = \"{}\"\n\
             [ext_authz]\n{extra}",
            "ab".repeat(32)
        );
        parse(&text, &[])
    }

    #[test]
    fn ext_authz_defaults_identity_sources_and_their_problems() {
        let c = parse(GOOD, &[]).unwrap();
        assert_eq!(c.ext_authz, ExtAuthzConfig::default());
        assert_eq!(c.ext_authz.identity, [IdentitySource::Authorization]);
        assert!(!c.forward_auth.strip_authorization);

        let c = ext_authz_config(
            "grpc_listen = \"127.0.0.1:9191\"\nidentity = [\"jwt_authn\", \"peer\", \"authorization\"]\n\
             peer_issuer = \"spire\"\njwt_authn_payload_key = \"payload\"\n",
        )
        .unwrap();
        assert_eq!(
            c.ext_authz.identity,
            [
                IdentitySource::JwtAuthn,
                IdentitySource::Peer,
                IdentitySource::Authorization
            ]
        );
        assert_eq!(
            c.ext_authz.grpc_listen,
            Some("127.0.0.1:9191".parse().unwrap())
        );
        assert_eq!(c.ext_authz.jwt_authn_payload_key, "payload");
        assert_eq!(
            c.ext_authz.jwt_authn_namespace,
            "envoy.filters.http.jwt_authn"
        );
        assert_eq!(c.ext_authz.peer_issuer.as_deref(), Some("spire"));

        // Each problem at its own key: an unknown and a repeated source, `peer` without its
        // issuer, an empty namespace, a bad address.
        let err = ext_authz_config(
            "grpc_listen = \"9191\"\nidentity = [\"peer\", \"cookie\", \"peer\"]\n\
             jwt_authn_namespace = \"\"\n",
        )
        .unwrap_err();
        let problems: Vec<(&str, &str)> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.message.as_str()))
            .collect();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "ext_authz.grpc_listen",
                "ext_authz.identity[1]",
                "ext_authz.identity[2]",
                "ext_authz.jwt_authn_namespace",
                "ext_authz.peer_issuer",
            ],
            "{problems:?}"
        );
        assert!(problems[1].1.contains("`cookie` is not an identity source"));
        assert!(problems[2].1.contains("listed twice"));

        // The peer issuer must be a SPIFFE issuer that exists.
        for (issuer, why) in [
            ("nobody", "not the name of an `[[issuers]]` entry"),
            ("dev", "is not a SPIFFE issuer"),
        ] {
            let err = ext_authz_config(&format!(
                "identity = [\"peer\"]\npeer_issuer = \"{issuer}\"\n"
            ))
            .unwrap_err();
            assert_eq!(err.problems[0].key, "ext_authz.peer_issuer");
            assert!(err.problems[0].message.contains(why), "{err}");
        }
        let err = ext_authz_config("peer_issuer = \"spire\"\n").unwrap_err();
        assert!(
            err.problems[0].message.contains("`peer` is not in"),
            "{err}"
        );
        let err = ext_authz_config("identity = []\n").unwrap_err();
        assert!(
            err.problems[0].message.contains("at least one source"),
            "{err}"
        );

        let err = parse("[forward_auth]\nstrip_authorization = \"yes\"\n", &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "forward_auth.strip_authorization");
        let c = parse("[forward_auth]\nstrip_authorization = true\n", &[]).unwrap();
        assert!(c.forward_auth.strip_authorization);
    }

    #[test]
    fn mcp_servers_and_their_problems() {
        let c = parse(GOOD, &[]).unwrap();
        assert_eq!(c.mcp, McpConfig::default());
        let c = parse(
            "[mcp]\nmax_message_bytes = 4096\nupstream_timeout = \"5s\"\nhold = \"20s\"\n\
             [[mcp.servers]]\nname = \"tools\"\nurl = \"http://127.0.0.1:9000/mcp\"\n\
             headers = { Authorization = \"Bearer upstream\", \"X-Api-Key\" = \"k\" }\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.mcp.max_message_bytes, 4096);
        assert_eq!(c.mcp.upstream_timeout, Duration::from_secs(5));
        assert_eq!(c.mcp.hold, Duration::from_secs(20));
        assert_eq!(c.mcp.servers[0].name, "tools");
        assert_eq!(
            c.mcp.servers[0].headers,
            [
                ("authorization".to_owned(), "Bearer upstream".to_owned()),
                ("x-api-key".to_owned(), "k".to_owned())
            ]
        );
        let err = parse(
            "[[mcp.servers]]\nname = \"a/b\"\nurl = \"ftp://x\"\nheaders = { Mcp-Session-Id = \"s\" }\n\
             [[mcp.servers]]\nurl = \"http://x\"\n",
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "mcp.servers[0].name",
                "mcp.servers[0].url",
                "mcp.servers[0].headers.Mcp-Session-Id",
                "mcp.servers[1].name",
            ],
            "{err}"
        );
    }

    #[test]
    fn local_principals_are_read_whole() {
        let c = parse(
            "[server]\nunix_socket = \"/run/mandate/mandate.sock\"\n\
             [[mcp.local_principals]]\nuid = 1000\n\
             principal = { type = \"Agent\", id = \"desktop-agent\", attributes = { owner = \"bob\", \
             groups = [\"dev\"], limits = { daily = 100 } } }\n\
             [[mcp.local_principals]]\nuid = 0\nprincipal = { type = \"Ns::Agent\", id = \"root-agent\" }\n",
            &[],
        )
        .unwrap();
        let l = &c.mcp.local_principals;
        assert_eq!(l.len(), 2);
        assert_eq!(
            (l[0].uid, &*l[0].kind, &*l[0].id),
            (1000, "Agent", "desktop-agent")
        );
        assert_eq!(
            serde_json::Value::Object(l[0].attributes.clone()),
            serde_json::json!({"owner": "bob", "groups": ["dev"], "limits": {"daily": 100}})
        );
        // The issuer says the OS vouched for this uid, in audit records and approvals.
        assert_eq!(l[0].issuer(), "local:uid=1000");
        assert_eq!((l[1].uid, &*l[1].kind), (0, "Ns::Agent"));
        assert!(l[1].attributes.is_empty());
    }

    #[test]
    fn local_principal_problems_name_their_keys() {
        let socket = "[server]\nunix_socket = \"/run/m.sock\"\n";
        let cases: &[(&str, &str, &str)] = &[
            (
                "uid = \"1000\"\nprincipal = { type = \"Agent\", id = \"a\" }",
                "mcp.local_principals[0].uid",
                "expected an integer",
            ),
            (
                "uid = -1\nprincipal = { type = \"Agent\", id = \"a\" }",
                "mcp.local_principals[0].uid",
                "is not a user id",
            ),
            (
                "uid = 4294967296\nprincipal = { type = \"Agent\", id = \"a\" }",
                "mcp.local_principals[0].uid",
                "is not a user id",
            ),
            (
                "principal = { type = \"Agent\", id = \"a\" }",
                "mcp.local_principals[0].uid",
                "is required",
            ),
            (
                "uid = 1",
                "mcp.local_principals[0].principal",
                "is required",
            ),
            (
                "uid = 1\nprincipal = \"Agent::a\"",
                "mcp.local_principals[0].principal",
                "expected a table",
            ),
            (
                "uid = 1\nprincipal = { type = \"not a type\", id = \"a\" }",
                "mcp.local_principals[0].principal.type",
                "not a valid Cedar entity type name",
            ),
            (
                "uid = 1\nprincipal = { type = \"Agent::\", id = \"a\" }",
                "mcp.local_principals[0].principal.type",
                "not a valid Cedar entity type name",
            ),
            (
                "uid = 1\nprincipal = { id = \"a\" }",
                "mcp.local_principals[0].principal.type",
                "is required",
            ),
            (
                "uid = 1\nprincipal = { type = \"Agent\", id = \"\" }",
                "mcp.local_principals[0].principal.id",
                "must not be empty",
            ),
            (
                "uid = 1\nprincipal = { type = \"Agent\", id = \"a\", attributes = { rate = 0.5 } }",
                "mcp.local_principals[0].principal.attributes.rate",
                "a float is not a Cedar value",
            ),
            (
                "uid = 1\nprincipal = { type = \"Agent\", id = \"a\", attributes = { l = [1, { at = 1979-05-27 }] } }",
                "mcp.local_principals[0].principal.attributes.l[1].at",
                "is not a Cedar value",
            ),
            (
                "uid = 1\nprincipal = { type = \"Agent\", id = \"a\", attributes = \"owner=bob\" }",
                "mcp.local_principals[0].principal.attributes",
                "expected a table",
            ),
            (
                "uid = 1\nprincipal = { type = \"Agent\", id = \"a\", groups = [] }",
                "mcp.local_principals[0].principal.groups",
                "unknown key",
            ),
            (
                "uid = 1\ngid = 1\nprincipal = { type = \"Agent\", id = \"a\" }",
                "mcp.local_principals[0].gid",
                "unknown key",
            ),
        ];
        for (entry, key, message) in cases {
            let text = format!("{socket}[[mcp.local_principals]]\n{entry}\n");
            let err = parse(&text, &[]).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{entry}: {err}");
            assert_eq!(err.problems[0].key, *key, "{entry}: {err}");
            assert!(err.problems[0].message.contains(message), "{entry}: {err}");
        }

        // One OS user is one principal.
        let twice = format!(
            "{socket}[[mcp.local_principals]]\nuid = 1000\nprincipal = {{ type = \"Agent\", id = \"a\" }}\n\
             [[mcp.local_principals]]\nuid = 1000\nprincipal = {{ type = \"Agent\", id = \"b\" }}\n"
        );
        let err = parse(&twice, &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "mcp.local_principals[1].uid", "{err}");
        assert!(
            err.problems[0].message.contains("mcp.local_principals[0]"),
            "{err}"
        );

        // Only the Unix socket knows who connected: without one, the entries could never apply.
        let err = parse(
            "[[mcp.local_principals]]\nuid = 1\nprincipal = { type = \"Agent\", id = \"a\" }\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(err.problems[0].key, "mcp.local_principals", "{err}");
        assert!(
            err.problems[0].message.contains("server.unix_socket"),
            "{err}"
        );
        let err = parse("[mcp]\nlocal_principals = { uid = 1 }\n", &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "mcp.local_principals", "{err}");

        // No token issuer may pass for the OS.
        let err = parse(
            &GOOD.replace("name = \"dev\"", "name = \"local:uid=1000\""),
            &[],
        )
        .unwrap_err();
        assert_eq!(err.problems[0].key, "issuers[0].name", "{err}");
    }

    #[test]
    fn asserted_identity_sources_need_an_authenticated_enforcement_point() {
        // Envoy's word (jwt_authn metadata, the peer) from an unauthenticated caller is no
        // identity: without an enforcement point that can prove itself, refused at load.
        let err = parse(
            &format!("{GOOD}[ext_authz]\nidentity = [\"authorization\", \"jwt_authn\"]\n"),
            &[],
        )
        .unwrap_err();
        assert_eq!(err.problems[0].key, "ext_authz.identity");
        assert!(
            err.problems[0]
                .message
                .contains("`jwt_authn` is Envoy's assertion"),
            "{err}"
        );
        // An mTLS-only enforcement point cannot authenticate a gRPC call here (no TLS on
        // that listener): still refused.
        let err = parse(
            &format!(
                "{GOOD}[[enforcement_points]]\nname = \"gw\"\nmtls_uri_sans = [\"spiffe://x/gw\"]\n\
                 [ext_authz]\nidentity = [\"jwt_authn\"]\n"
            ),
            &[],
        )
        .unwrap_err();
        assert_eq!(err.problems[0].key, "ext_authz.identity");
        assert!(ext_authz_config("identity = [\"jwt_authn\"]\n").is_ok());
    }

    #[test]
    fn routes_unknown_to_the_bundle_are_problems_naming_the_rule_and_line() {
        let bundle = crate::policy::Bundle::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies"),
        )
        .unwrap();
        assert_eq!(parse(ROUTES, &[]).unwrap().check_routes(&bundle), Ok(()));
        let text = ROUTES.replace("\"crm:read\"", "\"crm:raed\"")
            + "[forward_auth]\ndefault_action = \"crm:read\"\ndefault_resource_type = \"Path\"\n";
        let err = parse(&text, &[])
            .unwrap()
            .check_routes(&bundle)
            .unwrap_err();
        assert_eq!(
            origins(&err),
            [
                ("routes[1].action", Some(Origin::Line(14))),
                ("forward_auth.default_resource_type", Some(Origin::Line(18))),
            ]
        );
        let shown = err.to_string();
        assert!(
            shown.contains(
                "/etc/mandate/mandate.toml:14: routes[1].action: route `read`: action `crm:raed` \
                 is not declared in the bundle's schema"
            ),
            "{shown}"
        );
    }

    #[test]
    fn enforcement_point_needs_a_credential() {
        let err = parse("[[enforcement_points]]\nname = \"envoy\"\n", &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "enforcement_points[0]");
    }
}
