//! The instruments every part of the service records into: what was decided and how fast,
//! tokens verified, cache hits, approval events, escalations refused, audit syncs. A leaf like
//! `vocabulary`: it knows the OpenTelemetry metrics API (a facade, as `tracing` is for logs)
//! and nothing of where the numbers go; `telemetry` builds the SDK behind it and exports them
//! (Prometheus text on `/metrics`, OTLP). Values read from state the service already keeps
//! (policy version, audit records written, JWKS fetches, pending approvals) are observed by
//! `telemetry` at collection time instead, so the hot path pays nothing for them.
//!
//! Names follow the OpenTelemetry conventions (dotted, unit in `unit`, not in the name); the
//! Prometheus exporter turns `mandate.decision.duration` with unit `s` into
//! `mandate_decision_duration_seconds`. No attribute ever carries an unbounded value: no
//! principal, resource or token; issuers and approver groups come from configuration and
//! policy, reason codes from the code.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};

use crate::vocabulary::Outcome;

/// Bucket bounds (seconds) of the decision latency histogram: a check on a warm cache is tens
/// of microseconds, a first token verification or a store write milliseconds.
pub const DECISION_BUCKETS: [f64; 17] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_075, 0.000_1, 0.000_25, 0.000_5, 0.001,
    0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Bucket bounds (seconds) of the audit sync latency histogram (`fdatasync`).
pub const SYNC_BUCKETS: [f64; 13] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The metric names, as exported over OTLP (the Prometheus names are derived from them).
pub mod names {
    pub const DECISIONS: &str = "mandate.decisions";
    pub const DECISION_DURATION: &str = "mandate.decision.duration";
    pub const TOKEN_VERIFICATIONS: &str = "mandate.token.verifications";
    pub const CACHE_LOOKUPS: &str = "mandate.cache.lookups";
    pub const APPROVAL_EVENTS: &str = "mandate.approval.events";
    pub const ESCALATIONS_RATE_LIMITED: &str = "mandate.escalations.rate_limited";
    pub const POLICY_RELOADS: &str = "mandate.policy.reloads";
    pub const AUDIT_SYNC_DURATION: &str = "mandate.audit.sync.duration";
    pub const DECISION_LOGS_EXPORTED: &str = "mandate.decision_logs.exported";
    pub const DECISION_LOGS_DROPPED: &str = "mandate.decision_logs.dropped";
}

/// Which adapter a check came through (the `api` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/check`.
    Native,
    /// The AuthZEN evaluation API.
    Authzen,
    /// Envoy's gRPC `Authorization/Check`.
    ExtAuthzGrpc,
    /// The HTTP forward-auth family: Envoy HTTP ext_authz, nginx `auth_request`, Traefik.
    ExtAuthzHttp,
    /// Tool calls through the MCP gateway or a wrapped MCP server.
    Mcp,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Native => "native",
            Api::Authzen => "authzen",
            Api::ExtAuthzGrpc => "ext_authz_grpc",
            Api::ExtAuthzHttp => "ext_authz_http",
            Api::Mcp => "mcp",
        }
    }
}

/// Hits and misses of a cache on the check path: two relaxed atomic counters (no attribute
/// lookup on the hot path), observed by `telemetry` as `mandate.cache.lookups`.
#[derive(Debug, Default)]
pub struct Lookups {
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Lookups {
    pub fn record(&self, hit: bool) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (hits, misses) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// The synchronous instruments. Cheap to clone (each instrument is a shared handle).
#[derive(Debug, Clone)]
pub struct Metrics {
    decisions: Counter<u64>,
    decision_duration: Histogram<f64>,
    tokens: Counter<u64>,
    approvals: Counter<u64>,
    rate_limited: Counter<u64>,
    reloads: Counter<u64>,
    audit_sync: Histogram<f64>,
    logs_exported: Counter<u64>,
    logs_dropped: Counter<u64>,
}

static OFF: LazyLock<Metrics> =
    LazyLock::new(|| Metrics::new(&opentelemetry::metrics::NoopMeterProvider::new().meter("")));

impl Metrics {
    /// The instruments of `meter` (one per name: building them twice from one meter would
    /// give the same streams).
    pub fn new(meter: &Meter) -> Self {
        let m = Self {
            decisions: meter
                .u64_counter(names::DECISIONS)
                .with_unit("{decision}")
                .with_description(
                    "Decisions answered, by API, outcome (as answered) and first reason code",
                )
                .build(),
            decision_duration: meter
                .f64_histogram(names::DECISION_DURATION)
                .with_unit("s")
                .with_description(
                    "Time from a request's arrival to its decision being recorded, by API and outcome",
                )
                .with_boundaries(DECISION_BUCKETS.to_vec())
                .build(),
            tokens: meter
                .u64_counter(names::TOKEN_VERIFICATIONS)
                .with_unit("{verification}")
                .with_description(
                    "Credentials verified in full (not from the cache), by configured issuer and result (`ok` or the refusal code)",
                )
                .build(),
            approvals: meter
                .u64_counter(names::APPROVAL_EVENTS)
                .with_unit("{request}")
                .with_description(
                    "Approval requests created, approved, denied, moved to fallback and expired, by event and approver group",
                )
                .build(),
            rate_limited: meter
                .u64_counter(names::ESCALATIONS_RATE_LIMITED)
                .with_unit("{escalation}")
                .with_description(
                    "Escalations denied because the principal was at its escalation limits",
                )
                .build(),
            reloads: meter
                .u64_counter(names::POLICY_RELOADS)
                .with_unit("{reload}")
                .with_description("Policy bundle reloads, by result (`ok` or `refused`)")
                .build(),
            audit_sync: meter
                .f64_histogram(names::AUDIT_SYNC_DURATION)
                .with_unit("s")
                .with_description("Time to sync the audit log to disk")
                .with_boundaries(SYNC_BUCKETS.to_vec())
                .build(),
            logs_exported: meter
                .u64_counter(names::DECISION_LOGS_EXPORTED)
                .with_unit("{record}")
                .with_description("Audit records exported as OTLP logs")
                .build(),
            logs_dropped: meter
                .u64_counter(names::DECISION_LOGS_DROPPED)
                .with_unit("{record}")
                .with_description(
                    "Audit records the OTLP log export lost (`queue_full` or `export_failed`); the audit file still holds them",
                )
                .build(),
        };
        // Counters of rare events start at 0, so a dashboard or an alert on them has a series
        // before the first one happens.
        m.rate_limited.add(0, &[]);
        for result in ["ok", "refused"] {
            m.reloads.add(0, &[KeyValue::new("result", result)]);
        }
        m
    }

    /// Instruments that record nothing: for a component nobody wired to telemetry (tests).
    pub fn off() -> &'static Metrics {
        &OFF
    }

    /// A decision was answered.
    pub fn decided(&self, api: Api, outcome: Outcome, reason: &'static str, took: Duration) {
        let api = KeyValue::new("api", api.as_str());
        let outcome = KeyValue::new("outcome", outcome.as_str());
        self.decision_duration
            .record(took.as_secs_f64(), &[api.clone(), outcome.clone()]);
        self.decisions
            .add(1, &[api, outcome, KeyValue::new("reason", reason)]);
    }

    /// A credential went through the whole verification: `issuer` is the configured issuer's
    /// name (`none` before one was found), `result` `ok` or the refusal code.
    pub fn token_verified(&self, issuer: &str, result: &'static str) {
        self.tokens.add(
            1,
            &[
                KeyValue::new("issuer", issuer.to_owned()),
                KeyValue::new("result", result),
            ],
        );
    }

    /// An approval request event (`created`, `approved`, `denied`, `fallback`, `expired`,
    /// `cancelled`), counted by the request's first approver group of `groups`.
    pub fn approval_event(&self, event: &'static str, groups: &[String]) {
        let group = groups.first().map_or("", String::as_str);
        self.approvals.add(
            1,
            &[
                KeyValue::new("event", event),
                KeyValue::new("group", group.to_owned()),
            ],
        );
    }

    pub fn escalation_rate_limited(&self) {
        self.rate_limited.add(1, &[]);
    }

    pub fn policy_reloaded(&self, ok: bool) {
        self.reloads.add(
            1,
            &[KeyValue::new("result", if ok { "ok" } else { "refused" })],
        );
    }

    pub fn decision_logs_exported(&self, n: u64) {
        self.logs_exported.add(n, &[]);
    }

    pub fn decision_logs_dropped(&self, reason: &'static str, n: u64) {
        self.logs_dropped.add(n, &[KeyValue::new("reason", reason)]);
    }

    pub fn audit_synced(&self, took: Duration) {
        self.audit_sync.record(took.as_secs_f64(), &[]);
    }
}
