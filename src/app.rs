//! Wiring: from a validated [`Config`] to running listeners. `start` returns a handle with
//! the bound addresses and a shutdown switch, so tests run the real server on port 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::AppState;
use crate::api::server::{self, Listener};
use crate::approval::{GrantCache, GuardedStore};
use crate::audit::checkpoint::{CheckpointFile, CheckpointSink};
use crate::audit::{AuditLog, AuditSettings, CheckpointKey, Checkpointer};
use crate::clock::Clock;
use crate::config::{Config, KeySource};
use crate::decision::{DecisionCache, Engine};
use crate::identity::{CacheSettings, Verifier};
use crate::lockfile::DataLock;
use crate::policy::{Bundle, BundleError, Problem};
use crate::routes::Routes;
use crate::service::{DECISION_CACHE_ENTRIES, Service};
use crate::telemetry::Telemetry;

/// Install aws-lc-rs as the process's rustls provider, and check jsonwebtoken found its
/// backend. A second TLS backend in the build (ring, OpenSSL) would make rustls panic at run
/// time (docs/design.md §8), so fail at start instead.
pub fn install_crypto() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    anyhow::ensure!(
        rustls::crypto::CryptoProvider::get_default().is_some(),
        "no rustls crypto provider is installed"
    );
    anyhow::ensure!(
        jsonwebtoken::crypto::CryptoProvider::try_get_default().is_some(),
        "jsonwebtoken has no crypto backend (exactly one of its backends must be enabled)"
    );
    Ok(())
}

/// Load the bundle and the issuers' keys, open the audit log and the store, and build the
/// service every adapter shares, recording into `telemetry`'s instruments and tracer. Every
/// expiry reads `clock`.
pub async fn build_service(
    config: &Config,
    clock: Arc<dyn Clock>,
    telemetry: &Telemetry,
) -> anyhow::Result<Service> {
    let metrics = telemetry.metrics();
    install_crypto()?;
    let bundle = Bundle::load(&config.policy.bundle).map_err(|e| {
        anyhow::anyhow!(
            "policy bundle `{}` is invalid:\n{e}",
            config.policy.bundle.display()
        )
    })?;
    // A route naming an action or resource type the bundle does not declare would only
    // ever deny: refused at start, named like every configuration problem.
    config.check_routes(&bundle)?;
    let engine = Engine::new(Arc::new(bundle), clock.clone());
    let verifier = Verifier::new(
        config.issuers.clone(),
        CacheSettings {
            max_entries: config.identity.token_cache_size,
        },
        clock,
    )
    .context("trusted issuers")?;
    verifier.record_into(metrics.clone());
    verifier.start().await;
    // Opening names the path on failure; there is no running without an audit log.
    let audit = AuditLog::open(
        &config.audit.path,
        AuditSettings {
            group_commit: config.audit.group_commit,
            segments: config.audit.segments,
        },
    )?;
    audit.record_syncs(metrics.clone());
    tracing::info!(path = %config.audit.path.display(), seq = audit.last_seq(), "audit log open");
    // The store is where escalations become approval requests: without it, no escalation
    // could ever be approved, so start-up fails (the URL is logged without credentials).
    let store = crate::store::connect(&config.store.url)
        .await
        .map_err(|e| anyhow::anyhow!("approval store: {e}"))?;
    tracing::info!(
        location = %crate::store::location(&config.store.url),
        "approval store open"
    );
    // Past start-up, an outage fails escalations fast instead of stalling each one.
    let store = Arc::new(GuardedStore::new(store, config.store.guard));
    // A shared (PostgreSQL) store is trusted only once the change listener `start` runs is
    // connected; a SQLite file has no other writer.
    let grants = Arc::new(GrantCache::new(
        config.store.grant_cache,
        !crate::store::is_shared(&config.store.url),
    ));
    Ok(Service {
        engine,
        verifier,
        audit_disk: crate::audit::DiskWatch::new(&config.audit.path, config.audit.min_free_disk),
        audit,
        decisions: DecisionCache::new(DECISION_CACHE_ENTRIES),
        store,
        grants,
        request_ttl: config.store.request_ttl,
        escalation_limits: config.store.escalation_limits,
        notifier: crate::notify::Notifier::start(config.notifications.clone()),
        enforcement_points: config.enforcement_points.clone(),
        stats: Default::default(),
        metrics,
        gauges: Default::default(),
        traces: telemetry.traces(),
        decision_lookups: Default::default(),
    })
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// The bound TCP address (port 0 resolved), when TCP is configured.
    pub local_addr: Option<SocketAddr>,
    /// The bound gRPC `ext_authz` address (`ext_authz.grpc_listen`), when configured.
    pub grpc_addr: Option<SocketAddr>,
    /// The core service the listeners call.
    pub service: Arc<Service>,
    bundle_dir: PathBuf,
    /// The routes a reloaded bundle must still declare every action and type of.
    routes: Arc<Routes>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Metrics export; flushed to the collector at shutdown.
    pub telemetry: Arc<Telemetry>,
    /// One writer per data file, for as long as this server runs ([`lock_data_files`]).
    _locks: Vec<DataLock>,
}

impl Running {
    /// Load the configured bundle again and make it active. A bundle that fails to load or
    /// validate is refused and the active one stays (last known good); in-flight checks
    /// finish on the bundle they started with.
    /// Counted in `mandate.policy.reloads` by result.
    pub fn reload(&self) -> Result<Arc<str>, BundleError> {
        let result = self.load_bundle();
        self.service.metrics.policy_reloaded(result.is_ok());
        result
    }

    fn load_bundle(&self) -> Result<Arc<str>, BundleError> {
        let bundle = Bundle::load(&self.bundle_dir)?;
        // A bundle that drops an action or type a route names is refused like a bad one.
        let problems: Vec<Problem> = self
            .routes
            .check_schema(&bundle)
            .into_iter()
            .map(|p| Problem {
                file: None,
                line: None,
                policy_id: None,
                message: match p.rule {
                    Some(i) => format!("routes[{i}].{}: {}", p.key, p.message),
                    None => format!("forward_auth.{}: {}", p.key, p.message),
                },
            })
            .collect();
        if !problems.is_empty() {
            return Err(BundleError { problems });
        }
        let version = bundle.version();
        self.service.engine.swap(Arc::new(bundle));
        Ok(version)
    }

    /// Stop accepting, let in-flight requests finish, and wait for the listeners to close.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.telemetry.shutdown().await;
    }
}

/// Bind every configured listener, lock the data files, build the service, and serve in
/// background tasks. Every expiry (tokens, approval requests, grants, recertification dates)
/// reads `clock`, so tests can move time instead of sleeping.
pub async fn start(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
    // Binding comes first: a start that cannot listen must leave the audit log (and the
    // store) untouched, since another server may be writing them.
    let bound = bind_listeners(config).await?;
    let locks = lock_data_files(config)?;
    warn_published_dev_issuers(config);
    let telemetry = Arc::new(Telemetry::new(&config.telemetry)?);
    let service = Arc::new(build_service(config, clock, &telemetry).await?);
    telemetry.observe(&service);
    let checkpoint_key = match &config.audit.checkpoints {
        Some(cp) => Some(Arc::new(load_checkpoint_key(&cp.key)?)),
        None => None,
    };
    if let Some(key) = &checkpoint_key
        && key.public_hex() == PUBLISHED_CHECKPOINT_KEY
    {
        tracing::warn!(
            key_id = key.key_id(),
            "audit checkpoints are signed with the published dev key \
             (config/dev/audit-checkpoint-key.pem): anyone can forge them; make your own \
             with `mandate audit keygen FILE`"
        );
    }
    let routes = Arc::new(config.routes.clone());
    let state = Arc::new(AppState {
        service: service.clone(),
        server: config.server.clone(),
        routes: routes.clone(),
        forward_auth: crate::api::forward_auth::Settings::new(
            &config.forward_auth,
            config.server.public_url.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("forward_auth: {e}"))?,
        ext_authz: config.ext_authz.clone(),
        mcp: crate::api::mcp::Gateway::new(&config.mcp).map_err(|e| anyhow::anyhow!(e))?,
        telemetry: telemetry.clone(),
    });
    let tls = match &config.server.tls {
        Some(t) => Some(server::tls_acceptor(t).context("server.tls")?),
        None => None,
    };
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut local_addr = None;
    if let Some(listener) = bound.tcp {
        local_addr = Some(listener.local_addr()?);
        tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "listening");
        tasks.push(tokio::spawn(server::serve(
            Listener::Tcp(listener),
            tls.clone(),
            state.clone(),
            wait_stop(stopped.clone()),
        )));
    }
    if let (Some(listener), Some(path)) = (bound.unix, &config.server.unix_socket) {
        tracing::info!(path = %path.display(), "listening on unix socket");
        tasks.push(tokio::spawn(server::serve(
            Listener::Unix(listener),
            None,
            state.clone(),
            wait_stop(stopped.clone()),
        )));
    }
    // Envoy ext_authz over gRPC, with grpc.health.v1, on listeners of its own.
    let mut grpc_addr = None;
    if let Some(listener) = bound.grpc_tcp {
        grpc_addr = Some(listener.local_addr()?);
        tracing::info!(addr = %listener.local_addr()?, "ext_authz gRPC listening");
        tasks.push(tokio::spawn(crate::api::ext_authz::serve(
            Listener::Tcp(listener),
            state.clone(),
            wait_stop(stopped.clone()),
        )));
    }
    if let (Some(listener), Some(path)) = (bound.grpc_unix, &config.ext_authz.grpc_unix_socket) {
        tracing::info!(path = %path.display(), "ext_authz gRPC listening on unix socket");
        tasks.push(tokio::spawn(crate::api::ext_authz::serve(
            Listener::Unix(listener),
            state.clone(),
            wait_stop(stopped.clone()),
        )));
    }
    // Signed checkpoints of the audit chain, kept outside the log (DESIGN §5).
    if let (Some(cp), Some(key)) = (&config.audit.checkpoints, checkpoint_key) {
        tracing::info!(key_id = key.key_id(), file = %cp.file.display(), "audit checkpoints on");
        // The file beside the log, and the approval store, where the log's writer cannot
        // rewrite them (a fleet's PostgreSQL).
        let sinks: Vec<Arc<dyn CheckpointSink>> = vec![
            Arc::new(CheckpointFile::new(cp.file.clone())),
            service.store.clone(),
        ];
        let checkpointer = Checkpointer::new(
            service.audit.clone(),
            key,
            sinks,
            service.engine.clock().clone(),
        );
        tasks.push(tokio::spawn(
            checkpointer.run(cp.schedule, wait_stop(stopped.clone())),
        ));
    }
    // Grants created or revoked by other sidecars sharing the store reach this one's cache.
    if crate::store::is_shared(&config.store.url) {
        tasks.push(tokio::spawn(crate::store::listen_grant_changes(
            config.store.url.clone(),
            service.grants.clone(),
            wait_stop(stopped.clone()),
        )));
    }
    // Approval timers live in the store (expires_at, fallback_at), so they survive a restart:
    // this task only acts on them when due.
    tasks.push(tokio::spawn(sweep_loop(
        service.clone(),
        config.store.sweep_interval,
        wait_stop(stopped.clone()),
    )));
    // The audit log's disk is watched, so a full disk (every check denied) is announced
    // while there is still room.
    tasks.push(tokio::spawn(disk_loop(
        service.clone(),
        wait_stop(stopped.clone()),
    )));
    // A running server is not silent: what it did, every `log.summary_interval`.
    if !config.log.summary_interval.is_zero() {
        tasks.push(tokio::spawn(summary_loop(
            service.clone(),
            config.log.summary_interval,
            wait_stop(stopped.clone()),
        )));
    }
    let bundle = service.engine.bundle();
    tracing::info!(
        bundle = bundle.name(),
        path = %config.policy.bundle.display(),
        version = &*bundle.version(),
        policies = bundle.policy_count(),
        ready = service.verifier.ready(),
        "mandate started"
    );
    Ok(Running {
        local_addr,
        grpc_addr,
        service,
        bundle_dir: config.policy.bundle.clone(),
        routes,
        stop,
        tasks,
        telemetry,
        _locks: locks,
    })
}

/// `x` of the published dev issuer's ES256 public key (config/dev/jwks.json, kid `dev-1`),
/// whose private key is config/dev/signing-key.pem: a key set holding it trusts tokens
/// anyone can mint.
const PUBLISHED_DEV_JWK_X: &str = "5Ws-CcdYwssV17if-kBv1P36ptSJX7x4D4Ejl3_AIcc";
/// The public key (hex) of config/dev/audit-checkpoint-key.pem, also published.
const PUBLISHED_CHECKPOINT_KEY: &str =
    "362d58ef4af6cd06ee4439ba9ee2a34ab4459525273c957ba4462b9bcd4fe4ef";

/// The trusted issuers that accept tokens anyone can mint: the one `[dev]` names for
/// `mandate dev token`, and any whose key file holds the published dev key.
pub fn published_dev_issuers(config: &Config) -> Vec<String> {
    config
        .issuers
        .iter()
        .filter(|i| {
            config.dev.as_ref().is_some_and(|d| d.issuer == i.name)
                || matches!(&i.jwks, Some(crate::identity::JwksSource::File(path))
                    if std::fs::read_to_string(path)
                        .is_ok_and(|text| text.contains(PUBLISHED_DEV_JWK_X)))
        })
        .map(|i| i.name.clone())
        .collect()
}

/// One warning line per issuer that trusts the published dev key: whoever reads this log
/// must not mistake the example configuration for a production one.
fn warn_published_dev_issuers(config: &Config) {
    for name in published_dev_issuers(config) {
        tracing::warn!(
            issuer = %name,
            "the dev issuer is trusted: its private key is published (config/dev/), so anyone \
             can mint tokens it accepts; do not use this configuration in production"
        );
    }
}

/// The checkpoint signing key, from its file or environment variable (PEM, DER, or base64
/// of the DER).
pub fn load_checkpoint_key(source: &KeySource) -> anyhow::Result<CheckpointKey> {
    use base64::Engine as _;
    let (bytes, what) = match source {
        KeySource::File(path) => (
            std::fs::read(path).with_context(|| {
                format!("audit.checkpoint_key: cannot read `{}`", path.display())
            })?,
            path.display().to_string(),
        ),
        KeySource::Env(var) => {
            let text = std::env::var(var).with_context(|| {
                format!("audit.checkpoint_key_env: environment variable `{var}` is not set")
            })?;
            let bytes = if text.contains("-----BEGIN") {
                text.into_bytes()
            } else {
                base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .with_context(|| {
                        format!("audit.checkpoint_key_env: `{var}` is neither PEM nor base64")
                    })?
            };
            (bytes, format!("${var}"))
        }
    };
    Ok(CheckpointKey::from_pkcs8(&bytes, &what)?)
}

/// The listeners of `server.listen` and `server.unix_socket`, bound but not yet served.
struct Bound {
    tcp: Option<TcpListener>,
    unix: Option<UnixListener>,
    grpc_tcp: Option<TcpListener>,
    grpc_unix: Option<UnixListener>,
}

async fn bind_listeners(config: &Config) -> anyhow::Result<Bound> {
    let tcp = match config.server.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on `{addr}`"))?,
        ),
        None => None,
    };
    let unix = match &config.server.unix_socket {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let grpc_tcp = match config.ext_authz.grpc_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("ext_authz.grpc_listen: cannot listen on `{addr}`"))?,
        ),
        None => None,
    };
    let grpc_unix = match &config.ext_authz.grpc_unix_socket {
        Some(path) => Some(bind_unix(path).context("ext_authz.grpc_unix_socket")?),
        None => None,
    };
    Ok(Bound {
        tcp,
        unix,
        grpc_tcp,
        grpc_unix,
    })
}

fn bind_unix(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    // A stale socket file from a previous run would make bind fail; a live one is
    // another server's, and removing it would cut that server's clients off.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "cannot listen on `{}`: another server is listening there",
            path.display()
        );
    }
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket `{}`", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on `{}`", path.display()))
}

/// Lock the audit log and a SQLite store file for this process (`<file>.lock`, holding the
/// pid): a second server on the same files would fork the audit chain and write behind the
/// first one's grant cache, so it stops here, naming the holder ([`crate::lockfile`]).
pub fn lock_data_files(config: &Config) -> anyhow::Result<Vec<DataLock>> {
    let mut files = vec![config.audit.path.clone()];
    files.extend(crate::store::sqlite_file(&config.store.url));
    let mut locks = Vec::new();
    for file in files {
        locks.extend(crate::lockfile::acquire(&file)?);
    }
    Ok(locks)
}

/// Sweep approval requests every `every` until `stop` (see [`Service::sweep`]).
async fn sweep_loop(
    service: Arc<Service>,
    every: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => { service.sweep().await; }
            () = &mut stop => break,
        }
    }
}

/// How often the audit log's free space is read for the log's warning (`/readyz` reads it
/// on every call).
const DISK_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Read the audit log's free space every [`DISK_CHECK_EVERY`] until `stop`; the watch logs
/// when it crosses `audit.min_free_disk`.
async fn disk_loop(service: Arc<Service>, stop: impl std::future::Future<Output = ()>) {
    let mut tick = tokio::time::interval(DISK_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => { let _ = service.audit_disk.check(); }
            () = &mut stop => break,
        }
    }
}

/// Log what the service did every `every` until `stop`: decisions by outcome, approval
/// requests created, credentials refused; `idle` when nothing came.
async fn summary_loop(
    service: Arc<Service>,
    every: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interval = humantime::format_duration(every).to_string();
    let mut last = service.stats.counts();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = service.stats.counts();
                let c = now.since(last);
                last = now;
                if c.is_idle() {
                    tracing::info!(%interval, "summary: idle (no checks, no refused credentials)");
                } else {
                    tracing::info!(
                        %interval,
                        decisions = c.decisions(),
                        allow = c.allow,
                        deny = c.deny,
                        escalate = c.escalate,
                        approval_requests = c.approval_requests,
                        token_rejections = c.token_rejections,
                        "summary"
                    );
                }
            }
            () = &mut stop => break,
        }
    }
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// `mandate serve`: run until SIGINT or SIGTERM; SIGHUP reloads the policy bundle.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // The handlers are in place before the server is ready: a supervisor may signal as soon
    // as `/readyz` answers, and a signal with no handler yet would kill the process instead
    // of stopping it cleanly.
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let running = start(&config, crate::clock::system()).await?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match running.reload() {
                Ok(version) => tracing::info!(version = &*version, "policy bundle reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    active = &*running.service.engine.bundle().version(),
                    "policy bundle refused; the active bundle stays"
                ),
            },
        }
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_file(path: &str) -> String {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
            .unwrap()
    }

    #[test]
    fn the_published_keys_are_the_ones_in_config_dev() {
        assert!(repo_file("config/dev/jwks.json").contains(PUBLISHED_DEV_JWK_X));
        assert_eq!(
            repo_file("config/dev/audit-checkpoint-key.pem.pub").trim(),
            PUBLISHED_CHECKPOINT_KEY
        );
        let key = load_checkpoint_key(&KeySource::File(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config/dev/audit-checkpoint-key.pem"),
        ))
        .unwrap();
        assert_eq!(key.public_hex(), PUBLISHED_CHECKPOINT_KEY);
    }

    #[test]
    fn the_example_configs_dev_issuer_is_published_and_found_by_its_key_too() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mandate.toml");
        let text = repo_file("config/mandate.toml");
        let config = Config::parse(&text, &path, &[]).unwrap();
        assert_eq!(published_dev_issuers(&config), ["dev"]);
        // Without the `[dev]` section, the key file still gives it away.
        let mut config = config;
        config.dev = None;
        assert_eq!(published_dev_issuers(&config), ["dev"]);
        config.issuers.clear();
        assert!(published_dev_issuers(&config).is_empty());
    }
}
