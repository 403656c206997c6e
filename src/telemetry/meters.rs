//! The OpenTelemetry SDK behind [`crate::metrics`]: one meter provider per running server (no
//! global), read by the Prometheus exporter for `GET /metrics` and, when an endpoint is
//! configured, pushed over OTLP every `telemetry.otlp_interval`. Values the service already
//! keeps (the active bundle, audit records written, JWKS fetches, free disk, pending
//! approvals) are observed here at collection time, so the hot path pays nothing for them.
//! With an OTLP endpoint, a tracer provider exports the check spans (`service::trace`).

use std::sync::{Arc, Weak};

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
use opentelemetry_sdk::runtime;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use prometheus::{Encoder as _, TextEncoder};

use crate::config::{OtlpProtocol, TelemetryConfig};
use crate::metrics::Metrics;
use crate::service::Service;
use crate::service::trace::Traces;

/// How long one OTLP export may take before it is abandoned (the next one carries the
/// cumulative values anyway).
const OTLP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The OTLP exporter `$kind` (`MetricExporter`, `SpanExporter`, `LogExporter`: three builder
/// types with the same methods) for `$signal`, over the configured protocol.
macro_rules! otlp_exporter {
    ($kind:ident, $cfg:expr, $endpoint:expr, $signal:literal) => {
        match $cfg.otlp_protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::$kind::builder()
                .with_tonic()
                .with_endpoint($endpoint.to_owned())
                .with_timeout(OTLP_TIMEOUT)
                .build(),
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::$kind::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(signal_url($endpoint, $signal))
                .with_timeout(OTLP_TIMEOUT)
                .build(),
        }
        .with_context(|| format!("telemetry.otlp_endpoint `{}` ({})", $endpoint, $signal))
    };
}

/// The meter provider of one running server, its instruments and its Prometheus registry;
/// and its tracer provider when spans are exported.
pub struct Telemetry {
    provider: SdkMeterProvider,
    tracing: Option<(SdkTracerProvider, Traces)>,
    /// The audit log's tap of the decision-log export, when configured.
    decision_logs: Option<(
        Arc<super::decision_logs::Tap>,
        super::decision_logs::Shipper,
    )>,
    meter: Meter,
    metrics: Metrics,
    /// `None` when `telemetry.metrics` is off (`/metrics` is then a 404).
    registry: Option<prometheus::Registry>,
    otlp: Option<String>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("prometheus", &self.registry.is_some())
            .field("otlp", &self.otlp)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// The provider with the readers `cfg` asks for. Must run inside the Tokio runtime (the
    /// OTLP reader exports from a task of it).
    pub fn new(cfg: &TelemetryConfig) -> anyhow::Result<Self> {
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let mut builder = SdkMeterProvider::builder().with_resource(resource.clone());
        let registry = if cfg.metrics {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .scope_info_enabled(false)
                .build()
                .context("telemetry: the Prometheus exporter")?;
            builder = builder.with_reader(exporter);
            Some(registry)
        } else {
            None
        };
        if let Some(endpoint) = &cfg.otlp_endpoint {
            let exporter = otlp_exporter!(MetricExporter, cfg, endpoint, "metrics")?;
            let reader = PeriodicReader::builder(exporter, runtime::Tokio)
                .with_interval(cfg.otlp_interval)
                .build();
            builder = builder.with_reader(reader);
        }
        let provider = builder.build();
        let meter = provider.meter("mandate");
        let tracing = match &cfg.otlp_endpoint {
            Some(endpoint) if cfg.traces => Some(tracer(cfg, endpoint, resource.clone())?),
            _ => None,
        };
        let metrics = Metrics::new(&meter);
        let decision_logs = match &cfg.otlp_endpoint {
            Some(endpoint) if cfg.decision_logs => Some(super::decision_logs::start(
                otlp_exporter!(LogExporter, cfg, endpoint, "logs")?,
                &resource,
                cfg.decision_log_queue,
                metrics.clone(),
            )),
            _ => None,
        };
        Ok(Self {
            decision_logs,
            metrics,
            meter,
            provider,
            tracing,
            registry,
            otlp: cfg.otlp_endpoint.clone(),
        })
    }

    /// The tracer of the check spans, when spans are exported.
    pub fn traces(&self) -> Option<Traces> {
        self.tracing.as_ref().map(|(_, t)| t.clone())
    }

    /// The instruments the service records into.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Observe `service`'s own state at every collection. The callbacks hold it weakly: a
    /// collection after the service is gone observes nothing.
    pub fn observe(&self, service: &Arc<Service>) {
        if let Some((tap, _)) = &self.decision_logs {
            service.audit.tap_records(tap.clone());
        }
        let m = &self.meter;
        let s = Arc::downgrade(service);
        m.u64_observable_gauge("mandate.policy.info")
            .with_description("The active policy bundle: always 1, with its name and version")
            .with_callback(observed(&s, |s, o| {
                let b = s.engine.bundle();
                o.observe(
                    1,
                    &[
                        KeyValue::new("name", b.name().to_owned()),
                        KeyValue::new("version", b.version().to_string()),
                    ],
                );
            }))
            .build();
        m.u64_observable_gauge("mandate.policy.policies")
            .with_unit("{policy}")
            .with_description("Policies in the active bundle")
            .with_callback(observed(&s, |s, o| {
                o.observe(s.engine.bundle().policy_count() as u64, &[]);
            }))
            .build();
        m.u64_observable_counter("mandate.audit.records")
            .with_unit("{record}")
            .with_description("Audit records written by this process (decisions and events)")
            .with_callback(observed(&s, |s, o| {
                o.observe(s.audit.records_written(), &[])
            }))
            .build();
        m.u64_observable_counter("mandate.audit.write_failures")
            .with_unit("{failure}")
            .with_description(
                "Audit appends and syncs that failed (each failed decision is answered deny)",
            )
            .with_callback(observed(&s, |s, o| {
                o.observe(s.audit.write_failures(), &[])
            }))
            .build();
        m.u64_observable_gauge("mandate.audit.disk.free")
            .with_unit("By")
            .with_description("Free bytes on the audit log's filesystem (as last checked)")
            .with_callback(observed(&s, |s, o| {
                if let Ok(d) = s.audit_disk.read() {
                    o.observe(d.free_bytes, &[]);
                }
            }))
            .build();
        m.u64_observable_counter("mandate.jwks.fetches")
            .with_unit("{fetch}")
            .with_description("JWKS fetches, by issuer and result (`ok` or `error`)")
            .with_callback(observed(&s, |s, o| {
                for (issuer, fetches, failures) in s.verifier.fetch_counts() {
                    let ok = fetches.saturating_sub(failures);
                    o.observe(
                        ok,
                        &[
                            KeyValue::new("issuer", issuer.clone()),
                            KeyValue::new("result", "ok"),
                        ],
                    );
                    o.observe(
                        failures,
                        &[
                            KeyValue::new("issuer", issuer),
                            KeyValue::new("result", "error"),
                        ],
                    );
                }
            }))
            .build();
        m.u64_observable_counter(crate::metrics::names::CACHE_LOOKUPS)
            .with_unit("{lookup}")
            .with_description("Token and decision cache lookups, by cache and hit or miss")
            .with_callback(observed(&s, |s, o| {
                for (cache, (hits, misses)) in [
                    ("token", s.verifier.cache_counts()),
                    ("decision", s.decision_lookups.counts()),
                ] {
                    for (result, n) in [("hit", hits), ("miss", misses)] {
                        o.observe(
                            n,
                            &[
                                KeyValue::new("cache", cache),
                                KeyValue::new("result", result),
                            ],
                        );
                    }
                }
            }))
            .build();
        m.u64_observable_gauge("mandate.approval.pending")
            .with_unit("{request}")
            .with_description(
                "Approval requests pending, by approver group they wait on (as of the last sweep)",
            )
            .with_callback(observed(&s, |s, o| {
                let counts = s.store_counts();
                for (group, n) in &counts.pending_by_group {
                    o.observe(*n, &[KeyValue::new("group", group.clone())]);
                }
            }))
            .build();
        m.u64_observable_gauge("mandate.grants.active")
            .with_unit("{grant}")
            .with_description("Grants not yet expired or revoked (as of the last sweep)")
            .with_callback(observed(&s, |s, o| {
                o.observe(s.store_counts().active_grants, &[]);
            }))
            .build();
    }

    /// The Prometheus text exposition of every instrument; `None` when `/metrics` is off.
    pub fn prometheus_text(&self) -> Option<Result<Vec<u8>, String>> {
        let registry = self.registry.as_ref()?;
        let mut out = Vec::with_capacity(16 * 1024);
        Some(
            TextEncoder::new()
                .encode(&registry.gather(), &mut out)
                .map(|()| out)
                .map_err(|e| e.to_string()),
        )
    }

    /// Push what is left to the collector and stop the readers. The SDK blocks until its
    /// reader's task (on this runtime) is done, so it waits on a blocking thread.
    pub async fn shutdown(&self) {
        if let Some((_, shipper)) = &self.decision_logs {
            shipper.finish(OTLP_TIMEOUT).await;
        }
        let provider = self.provider.clone();
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done
            && self.otlp.is_some()
        {
            tracing::warn!(error = %e, "telemetry: the last metrics export failed");
        }
        if let Some((provider, _)) = &self.tracing {
            let provider = provider.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || provider.shutdown()).await {
                tracing::warn!(error = %e, "telemetry: the last span export failed");
            }
        }
    }
}

/// The tracer provider exporting check spans to `endpoint`, batched.
fn tracer(
    cfg: &TelemetryConfig,
    endpoint: &str,
    resource: Resource,
) -> anyhow::Result<(SdkTracerProvider, Traces)> {
    let exporter = otlp_exporter!(SpanExporter, cfg, endpoint, "traces")?;
    let processor = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        // Sampling is decided before a span is made (`Traces::sampled`): every span made
        // is exported.
        .with_sampler(Sampler::AlwaysOn)
        .with_span_processor(processor)
        .build();
    let traces = Traces::new(
        provider.tracer("mandate"),
        cfg.trace_sample_ratio,
        cfg.trace_details,
    );
    Ok((provider, traces))
}

/// `{endpoint}/v1/{signal}`: the OTLP/HTTP path of one signal under a collector's base URL.
fn signal_url(endpoint: &str, signal: &str) -> String {
    format!("{}/v1/{signal}", endpoint.trim_end_matches('/'))
}

/// A callback observing `f` of the service while it lives.
fn observed<T>(
    service: &Weak<Service>,
    f: impl Fn(&Service, &dyn opentelemetry::metrics::AsyncInstrument<T>) + Send + Sync + 'static,
) -> impl Fn(&dyn opentelemetry::metrics::AsyncInstrument<T>) + Send + Sync + 'static {
    let service = service.clone();
    move |o| {
        if let Some(s) = service.upgrade() {
            f(&s, o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::signal_url;

    #[test]
    fn the_http_signal_path_goes_under_the_base_url() {
        assert_eq!(
            signal_url("http://127.0.0.1:4318", "metrics"),
            "http://127.0.0.1:4318/v1/metrics"
        );
        assert_eq!(
            signal_url("http://collector:4318/", "logs"),
            "http://collector:4318/v1/logs"
        );
    }
}
