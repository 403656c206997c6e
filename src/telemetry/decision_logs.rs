//! Decision-log export: every audit record, as written (hash included), shipped as an OTLP
//! log record, so a fleet's decisions land in one place. The audit file stays the record of
//! truth; this is a copy. The check path pays one copy of the line into a bounded queue; a
//! task batches the queue and exports. Nothing is lost silently: a record the full queue
//! cannot take, or a batch the collector refuses, is counted
//! (`mandate_decision_logs_dropped_total{reason}`) and logged at `WARN` (at most once every 10
//! seconds, with the count since).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::InstrumentationScope;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_otlp::LogExporter as OtlpLogExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::{LogBatch, LogExporter as _, SdkLogRecord, SdkLoggerProvider};
use tokio::sync::mpsc;

use crate::audit::RecordTap;
use crate::metrics::Metrics;

/// Records exported in one OTLP request at most.
const BATCH: usize = 512;
/// How long a record may wait in the queue for its batch to fill.
const LINGER: Duration = Duration::from_secs(1);
/// How often a continuing loss is logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The audit log's tap: the check path's end of the queue.
#[derive(Debug)]
pub struct Tap {
    tx: mpsc::Sender<Vec<u8>>,
    loss: Arc<Loss>,
}

impl RecordTap for Tap {
    fn offer(&self, line: &[u8]) {
        // The line is copied only into a place the queue has: a full queue costs no copy.
        match self.tx.try_reserve() {
            Ok(place) => place.send(line.to_vec()),
            Err(_) => self.loss.lost("queue_full", 1),
        }
    }
}

/// Records lost, counted and reported.
#[derive(Debug)]
struct Loss {
    metrics: Metrics,
    since_warned: AtomicU64,
    warned: std::sync::Mutex<Option<Instant>>,
}

impl Loss {
    fn lost(&self, reason: &'static str, n: u64) {
        self.metrics.decision_logs_dropped(reason, n);
        let count = self.since_warned.fetch_add(n, Ordering::Relaxed) + n;
        let Ok(mut warned) = self.warned.try_lock() else {
            return;
        };
        if warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = Some(Instant::now());
        self.since_warned.fetch_sub(count, Ordering::Relaxed);
        tracing::warn!(
            lost = count,
            reason,
            "decision-log export lost records (the audit file still holds them)"
        );
    }
}

/// The export task, for a shutdown that lets it finish.
#[derive(Debug)]
pub struct Shipper {
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Shipper {
    /// Take no more records, export those queued, and wait for that (at most `limit`).
    pub async fn finish(&self, limit: Duration) {
        let _ = self.stop.send(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task
            && tokio::time::timeout(limit, task).await.is_err()
        {
            tracing::warn!("decision-log export still running at shutdown; abandoned");
        }
    }
}

/// Start exporting to `exporter` what the returned tap is given, until [`Shipper::finish`].
pub fn start(
    exporter: OtlpLogExporter,
    resource: &Resource,
    queue: usize,
    metrics: Metrics,
) -> (Arc<Tap>, Shipper) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let loss = Arc::new(Loss {
        metrics,
        since_warned: AtomicU64::new(0),
        warned: std::sync::Mutex::new(None),
    });
    let mut exporter = exporter;
    exporter.set_resource(resource);
    for reason in ["queue_full", "export_failed"] {
        loss.metrics.decision_logs_dropped(reason, 0);
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(ship(exporter, rx, Arc::clone(&loss), stopped));
    let shipper = Shipper {
        stop,
        task: std::sync::Mutex::new(Some(task)),
    };
    (Arc::new(Tap { tx, loss }), shipper)
}

async fn ship(
    exporter: OtlpLogExporter,
    mut rx: mpsc::Receiver<Vec<u8>>,
    loss: Arc<Loss>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Records are made by the SDK's logger (there is no other way to make one); nothing is
    // emitted through it: batches go straight to the exporter.
    let maker = SdkLoggerProvider::builder().build().logger("mandate");
    let scope = InstrumentationScope::builder("mandate").build();
    let mut lines = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            line = rx.recv() => line,
            // At shutdown: no more records are taken (an offer then counts as lost); those
            // queued are exported, then `recv` ends the loop.
            _ = stop.changed() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else {
            break;
        };
        lines.push(first);
        let until = tokio::time::Instant::now() + LINGER;
        while lines.len() < BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(line)) => lines.push(line),
                Ok(None) | Err(_) => break,
            }
        }
        let records: Vec<SdkLogRecord> =
            lines.drain(..).map(|line| record(&maker, &line)).collect();
        let pairs: Vec<(&SdkLogRecord, &InstrumentationScope)> =
            records.iter().map(|r| (r, &scope)).collect();
        if let Err(e) = exporter.export(LogBatch::new(&pairs)).await {
            tracing::debug!(error = %e, "decision-log export failed");
            loss.lost("export_failed", records.len() as u64);
        } else {
            loss.metrics.decision_logs_exported(records.len() as u64);
        }
    }
}

/// The OTLP log record of one audit line: the line as its body, its kind, outcome, decision
/// id and sequence number as attributes, and the trace it names.
fn record(maker: &opentelemetry_sdk::logs::SdkLogger, line: &[u8]) -> SdkLogRecord {
    let text = String::from_utf8_lossy(line).trim_end().to_owned();
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let mut r = maker.create_log_record();
    let now = SystemTime::now();
    r.set_timestamp(now);
    r.set_observed_timestamp(now);
    r.set_severity_number(Severity::Info);
    r.set_severity_text("INFO");
    let kind = parsed["kind"].as_str().unwrap_or("unknown");
    r.set_event_name(if kind == "decision" {
        "mandate.decision"
    } else {
        "mandate.audit_event"
    });
    r.add_attribute("mandate.audit.kind", AnyValue::from(kind.to_owned()));
    if let Some(seq) = parsed["seq"].as_i64() {
        r.add_attribute("mandate.audit.seq", AnyValue::from(seq));
    }
    for (key, field) in [
        ("mandate.outcome", "decision"),
        ("mandate.decision.id", "decision_id"),
        ("mandate.audit.event", "event"),
    ] {
        if let Some(v) = parsed[field].as_str() {
            r.add_attribute(key, AnyValue::from(v.to_owned()));
        }
    }
    if let Some(id) = parsed["trace_id"]
        .as_str()
        .and_then(|t| TraceId::from_hex(t).ok())
    {
        r.set_trace_context(id, SpanId::INVALID, None);
    }
    r.set_body(AnyValue::String(text.into()));
    r
}
