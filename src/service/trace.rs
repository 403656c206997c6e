//! One span per sampled check, joining the caller's trace (W3C `traceparent`), exported over
//! OTLP by `telemetry`, with child spans for the caller's credential, policy evaluation, the
//! approval store and the audit record. Sampling is decided when the request arrives (the caller's decision when it
//! sent a trace, else `trace_sample_ratio`), so an unsampled check makes no span at all and
//! pays one random number. The trace id goes into the decision's audit record when the span
//! is exported or the caller sent a trace, so a decision and a trace find each other.

use std::time::{Instant, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, TraceContextExt as _, TraceId, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use super::check::Call;
use crate::vocabulary::{CheckRequest, Decision};

/// The tracer of a server whose telemetry exports traces.
#[derive(Debug, Clone)]
pub struct Traces {
    tracer: SdkTracer,
    /// Share of checks without a caller trace that are sampled.
    ratio: f64,
    /// Put the principal and the request context on sampled spans
    /// (`telemetry.trace_details`); off by default: they may be personal data.
    details: bool,
}

impl Traces {
    pub fn new(tracer: SdkTracer, ratio: f64, details: bool) -> Self {
        Self {
            tracer,
            ratio,
            details,
        }
    }

    /// Whether a check whose caller's trace is `parent` is sampled: the caller's decision,
    /// else a draw at `ratio`.
    pub fn sampled(&self, parent: Option<&SpanContext>) -> bool {
        match parent {
            Some(p) => p.is_sampled(),
            None if self.ratio >= 1.0 => true,
            None if self.ratio <= 0.0 => false,
            None => {
                // 53 of the 62 random bits of a v4 UUID's second half (its top two bits are
                // the fixed variant), as a share of 2^53.
                const BITS: u64 = (1 << 53) - 1;
                let draw = uuid::Uuid::new_v4().as_u64_pair().1 & BITS;
                (draw as f64) < self.ratio * (BITS + 1) as f64
            }
        }
    }

    /// The span of the check `call` began, started then, a child of the caller's trace.
    pub(super) fn start(&self, call: &Call) -> CheckSpan<'_> {
        let anchor = (SystemTime::now(), Instant::now());
        let parent = match &call.parent {
            Some(sc) => Context::new().with_remote_span_context(sc.clone()),
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder("mandate.check")
            .with_kind(SpanKind::Server)
            .with_start_time(at(anchor, call.started))
            .start_with_context(&self.tracer, &parent);
        CheckSpan {
            traces: self,
            span,
            anchor,
        }
    }
}

/// A check's span while the check runs.
pub(super) struct CheckSpan<'a> {
    traces: &'a Traces,
    span: Span,
    /// A wall-clock time and the monotonic instant it was read at: what converts the stages'
    /// instants into span times.
    anchor: (SystemTime, Instant),
}

/// Times one stage of a check for its child span, only when the check is sampled: an
/// unsampled check reads no clock.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stopwatch(Option<Instant>);

impl Stopwatch {
    pub(super) fn start(on: bool) -> Self {
        Self(on.then(Instant::now))
    }

    /// When the stage began and ended (`None` when not timed).
    pub(super) fn stop(self) -> Option<(Instant, Instant)> {
        self.0.map(|from| (from, Instant::now()))
    }
}

/// The stages of a check, as instants (for the child spans).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Stages {
    /// The caller's credential verified (where the adapter timed it).
    pub identified: Option<(Instant, Instant)>,
    pub evaluated: Option<(Instant, Instant)>,
    /// Settling an escalation against grants and the store (escalations only).
    pub store: Option<(Instant, Instant)>,
    pub audit: Option<(Instant, Instant)>,
}

impl CheckSpan<'_> {
    /// The trace id for the audit record.
    pub(super) fn trace_id(&self) -> TraceId {
        self.span.span_context().trace_id()
    }

    /// End the span with what was decided, and its stages as child spans (when sampled).
    pub(super) fn finish(mut self, call: &Call, req: &CheckRequest, d: &Decision, stages: Stages) {
        if !self.span.is_recording() {
            return;
        }
        let mut attributes = vec![
            KeyValue::new("mandate.api", call.api.as_str()),
            KeyValue::new("mandate.outcome", d.outcome.as_str()),
            KeyValue::new(
                "mandate.reason",
                d.reasons.first().map_or("none", |r| r.code),
            ),
            KeyValue::new("mandate.action", req.action.clone()),
            KeyValue::new("mandate.resource.type", req.resource.kind.clone()),
            KeyValue::new("mandate.policy.version", d.policy_version.to_string()),
            KeyValue::new("mandate.decision.id", d.id.to_string()),
        ];
        if self.traces.details {
            let p = &req.principal;
            attributes.push(KeyValue::new(
                "mandate.principal",
                format!("{}::\"{}\"", p.kind, p.id),
            ));
            attributes.push(KeyValue::new(
                "mandate.context",
                serde_json::Value::Object(req.context.clone()).to_string(),
            ));
        }
        self.span.set_attributes(attributes);
        let parent = Context::new().with_remote_span_context(self.span.span_context().clone());
        for (name, stage) in [
            ("mandate.identity", stages.identified),
            ("mandate.evaluate", stages.evaluated),
            ("mandate.store", stages.store),
            ("mandate.audit", stages.audit),
        ] {
            if let Some((from, to)) = stage {
                let tracer = &self.traces.tracer;
                let mut child = tracer
                    .span_builder(name)
                    .with_kind(SpanKind::Internal)
                    .with_start_time(at(self.anchor, from))
                    .start_with_context(tracer, &parent);
                child.end_with_timestamp(at(self.anchor, to));
            }
        }
        self.span
            .end_with_timestamp(at(self.anchor, Instant::now()));
    }
}

/// The wall-clock time of `instant`, from `anchor`.
fn at((wall, mono): (SystemTime, Instant), instant: Instant) -> SystemTime {
    match mono.checked_duration_since(instant) {
        Some(before) => wall - before,
        None => wall + instant.duration_since(mono),
    }
}

/// The remote span context of a W3C `traceparent` in `headers`, if valid.
pub fn parent_from(extractor: &dyn opentelemetry::propagation::Extractor) -> Option<SpanContext> {
    use opentelemetry::propagation::TextMapPropagator as _;
    extractor.get("traceparent")?;
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(extractor);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceState, TracerProvider as _};

    use super::*;

    fn traces(ratio: f64) -> Traces {
        let tracer = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .build()
            .tracer("test");
        Traces::new(tracer, ratio, false)
    }

    fn parent(sampled: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap_or(TraceId::INVALID),
            SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID),
            flags,
            true,
            TraceState::default(),
        )
    }

    #[test]
    fn a_callers_decision_wins_and_roots_are_drawn_at_the_ratio() {
        let t = traces(0.25);
        assert!(t.sampled(Some(&parent(true))));
        assert!(!t.sampled(Some(&parent(false))));
        assert!(!traces(0.0).sampled(None));
        assert!(traces(1.0).sampled(None));
        let n = 20_000;
        let hits = (0..n).filter(|_| t.sampled(None)).count();
        // 5,000 expected; the standard deviation is about 61.
        assert!((4_600..=5_400).contains(&hits), "{hits} of {n}");
    }

    #[test]
    fn a_traceparent_is_read_only_when_valid() {
        let headers =
            |v: &str| std::collections::HashMap::from([("traceparent".to_owned(), v.to_owned())]);
        let ok = parent_from(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .map(|sc| (sc.trace_id().to_string(), sc.is_sampled(), sc.is_remote()));
        assert_eq!(
            ok,
            Some(("4bf92f3577b34da6a3ce929d0e0e4736".to_owned(), true, true))
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(parent_from(&headers(bad)).is_none(), "{bad:?}");
        }
        assert!(parent_from(&std::collections::HashMap::<String, String>::new()).is_none());
    }
}
