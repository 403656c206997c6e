//! Admin endpoints: liveness, readiness and metrics.

use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde_json::json;

use super::{ApiError, AppState, Body, json_response};

/// The Prometheus text format's content type (version 0.0.4).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every instrument, as Prometheus text. Not authenticated, like any scrape target: no
/// value carries a principal, a resource, a token or evidence (`crate::metrics`). A `404`
/// naming the key when `telemetry.metrics` is off.
pub fn metrics(state: &AppState) -> Response<Body> {
    match state.telemetry.prometheus_text() {
        Some(Ok(text)) => Response::builder()
            .status(StatusCode::OK)
            .header(hyper::header::CONTENT_TYPE, PROMETHEUS_TEXT)
            .body(Body::new(Bytes::from(text)))
            .unwrap_or_else(|_| Response::new(Body::default())),
        Some(Err(e)) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics_unavailable",
            format!("the metrics could not be encoded: {e}"),
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "metrics are off (`telemetry.metrics = false`)",
        )
        .into_response(),
    }
}

/// Liveness: the process answers.
pub fn healthz() -> Response<Body> {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// What `/readyz` reports as degraded now (empty: ready): the same test for every listener's
/// health (the gRPC `grpc.health.v1` status follows it).
pub fn readiness(state: &AppState) -> Vec<&'static str> {
    let s = &state.service;
    degraded(
        s.verifier.ready(),
        s.audit.failing().is_some(),
        s.store.outage().is_some(),
    )
}

fn degraded(keys: bool, audit_failing: bool, store_out: bool) -> Vec<&'static str> {
    let mut degraded = Vec::new();
    if !keys {
        degraded.push("issuers");
    }
    if audit_failing {
        degraded.push("audit");
    }
    if store_out {
        degraded.push("store");
    }
    degraded
}

/// Readiness: a policy bundle is active, every trusted issuer has usable keys (SECURITY
/// K-03), the audit log takes records, and the approval store answers. Any of them failing is
/// a `503` naming it under `degraded`: checks are still answered meanwhile, but an audit
/// outage denies every one of them and a store outage denies every escalation, which is
/// what an orchestrator or an operator must hear about.
pub fn readyz(state: &AppState) -> Response<Body> {
    let state = &state.service;
    let bundle = state.engine.bundle();
    let keys = state.verifier.ready();
    // Why an issuer's keys are missing or getting stale: the URL and the cause (TLS, status,
    // timeout, bad document), so an operator need not dig through logs.
    let jwks_errors: serde_json::Map<String, serde_json::Value> = state
        .verifier
        .jwks_errors()
        .into_iter()
        .map(|(name, e)| (name, serde_json::Value::String(e)))
        .collect();
    let audit = state.audit.failing();
    let disk = state.audit_disk.read();
    let store = state.store.outage();
    let degraded = degraded(keys, audit.is_some(), store.is_some());
    let ready = degraded.is_empty();
    // Not a reason to take the sidecar out of service (it still answers), but the alarm
    // before the disk fills and every check is denied.
    let warnings: Vec<&str> = match &disk {
        Ok(d) if d.low => vec!["audit_disk_low"],
        Ok(_) => vec![],
        Err(_) => vec!["audit_disk_unknown"],
    };
    let disk = match disk {
        Ok(d) => json!(d),
        Err(e) => json!({"error": e}),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &json!({
            "ready": ready,
            "degraded": degraded,
            "warnings": warnings,
            "policy": {"name": bundle.name(), "version": &*bundle.version(), "policies": bundle.policy_count()},
            "issuers_ready": keys,
            "jwks_errors": jwks_errors,
            // Decisions denied and events refused because the log could not be written
            // (SECURITY §0 item 2): counted here, so an operator sees an audit outage.
            "audit": {"ok": audit.is_none(), "error": audit, "write_failures": state.audit.write_failures(), "disk": disk},
            "store": {"ok": store.is_none(), "error": store},
        }),
    )
}
