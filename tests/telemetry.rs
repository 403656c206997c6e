//! Telemetry with peers nobody here wrote (issue 15): `/metrics` read by Prometheus's own
//! text parser (Python `prometheus_client`, tests/peers/prom_parse.py), and OTLP metrics
//! received by a collector made of the OpenTelemetry protos and grpcio
//! (tests/peers/otlp_receiver.py). Both installed by scripts/test from tests/requirements.txt.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    TestServer, example_config, finance_approve, first_pending, payments_agent_token,
    python_script, repo, transfer,
};
use serde_json::{Value, json};

/// One sample as prometheus_client parsed it.
#[derive(Debug)]
struct Sample {
    family: String,
    kind: String,
    name: String,
    labels: serde_json::Map<String, Value>,
    value: f64,
}

/// Scrape `/metrics` and parse it with prometheus_client; panics on a parse error.
async fn scrape(s: &TestServer) -> Vec<Sample> {
    let r = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text().await.unwrap();
    let out = tokio::task::spawn_blocking(move || {
        python_script("tests/peers/prom_parse.py", &[], &[], text.as_bytes())
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition (scripts/test installs tests/requirements.txt):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Sample {
                family: v["family"].as_str().unwrap().to_owned(),
                kind: v["type"].as_str().unwrap().to_owned(),
                name: v["name"].as_str().unwrap().to_owned(),
                labels: v["labels"].as_object().unwrap().clone(),
                value: v["value"].as_f64().unwrap(),
            }
        })
        .collect()
}

/// Scrape until `ok` holds (at most 10 s); the last scrape.
async fn scrape_until(s: &TestServer, ok: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(s).await;
        if ok(&m) {
            return m;
        }
        assert!(Instant::now() < until, "the scrape never got there: {m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sum of the samples named `name` whose labels include every pair of `want`.
fn total(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k) == Some(&json!(v)))
        })
        .map(|s| s.value)
        .sum()
}

fn kind_of<'a>(samples: &'a [Sample], family: &str) -> &'a str {
    samples
        .iter()
        .find(|s| s.family == family)
        .map(|s| s.kind.as_str())
        .unwrap_or_else(|| panic!("no family `{family}` in the scrape"))
}

#[tokio::test]
async fn prometheus_parses_metrics_that_move_with_checks() {
    let s = TestServer::start(&example_config(&[])).await;
    let t = payments_agent_token("agent-1");
    let before = scrape(&s).await;
    // The families an operator's dashboard reads are there before any check.
    assert_eq!(kind_of(&before, "mandate_policy_info"), "gauge");
    assert_eq!(
        total(&before, "mandate_policy_info", &[("name", "example")]),
        1.0,
        "{before:?}"
    );
    assert_eq!(kind_of(&before, "mandate_audit_records"), "counter");

    let (_, a) = s.post("/v1/check", Some(&t), &transfer(50)).await;
    assert_eq!(a["decision"], "allow");
    let (_, a) = s.post("/v1/check", Some(&t), &transfer(51)).await;
    assert_eq!(a["decision"], "allow");
    let (_, d) = s.post("/v1/check", Some(&t), &transfer(10_001)).await;
    assert_eq!(d["decision"], "deny");
    let (_, e) = s.post("/v1/check", Some(&t), &transfer(250)).await;
    assert_eq!(e["decision"], "escalate");
    let (st, _) = s.post("/v1/check", Some("a.b"), &transfer(50)).await;
    assert_eq!(st, 401);
    // The same check again within the second: a decision cache hit.
    s.post("/v1/check", Some(&t), &transfer(50)).await;
    // The pending gauge follows the store (as of the last sweep, every second here).
    let pending = [("group", "finance-approvers")];
    scrape_until(&s, |m| {
        total(m, "mandate_approval_pending", &pending) == 1.0
    })
    .await;
    let id = first_pending(&s).await;
    let (st, _) = finance_approve(&s, &id, "INC-1").await;
    assert_eq!(st, 200);
    let settled = scrape_until(&s, |m| total(m, "mandate_grants_active", &[]) == 1.0).await;
    assert_eq!(total(&settled, "mandate_approval_pending", &pending), 0.0);

    let after = scrape(&s).await;
    let moved =
        |name: &str, want: &[(&str, &str)]| total(&after, name, want) - total(&before, name, want);
    assert_eq!(kind_of(&after, "mandate_decisions"), "counter");
    let native_allow = [("api", "native"), ("outcome", "allow")];
    assert_eq!(
        moved("mandate_decisions_total", &native_allow),
        3.0,
        "{after:?}"
    );
    assert_eq!(
        moved(
            "mandate_decisions_total",
            &[("outcome", "deny"), ("reason", "forbidden")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "mandate_decisions_total",
            &[("outcome", "escalate"), ("reason", "approval_required")]
        ),
        1.0
    );
    // The latency histogram counts every decision, in buckets fine enough for microseconds.
    assert_eq!(
        kind_of(&after, "mandate_decision_duration_seconds"),
        "histogram"
    );
    assert_eq!(
        moved("mandate_decision_duration_seconds_count", &native_allow),
        3.0
    );
    assert!(
        total(
            &after,
            "mandate_decision_duration_seconds_sum",
            &native_allow
        ) > 0.0
    );
    let buckets: Vec<f64> = after
        .iter()
        .filter(|s| s.name == "mandate_decision_duration_seconds_bucket")
        .filter_map(|s| s.labels["le"].as_str()?.parse().ok())
        .collect();
    assert!(buckets.contains(&0.00001), "{buckets:?}");
    assert_eq!(
        moved(
            "mandate_decision_duration_seconds_bucket",
            &[("api", "native"), ("outcome", "allow"), ("le", "+Inf")]
        ),
        3.0
    );
    // Full verifications of the agent's and the approver's tokens (the approver's may be
    // minted twice, in two seconds), then the cache; one refusal before any issuer was found.
    let verified = moved(
        "mandate_token_verifications_total",
        &[("issuer", "dev"), ("result", "ok")],
    );
    assert!((2.0..=3.0).contains(&verified), "{verified}: {after:?}");
    assert_eq!(
        moved(
            "mandate_token_verifications_total",
            &[("issuer", "none"), ("result", "token_malformed")]
        ),
        1.0
    );
    assert!(
        moved(
            "mandate_cache_lookups_total",
            &[("cache", "token"), ("result", "hit")]
        ) >= 4.0
    );
    assert_eq!(
        moved(
            "mandate_cache_lookups_total",
            &[("cache", "decision"), ("result", "hit")]
        ),
        1.0
    );
    for event in ["created", "approved"] {
        assert_eq!(
            moved(
                "mandate_approval_events_total",
                &[("event", event), ("group", "finance-approvers")]
            ),
            1.0,
            "{event}"
        );
    }
    // Six decisions, the request's creation... every record counted, none failed.
    assert!(moved("mandate_audit_records_total", &[]) >= 6.0);
    assert_eq!(
        total(&after, "mandate_audit_write_failures_total", &[]),
        0.0
    );

    // Labels never carry a principal, a resource or a token.
    for sample in &after {
        for v in sample.labels.values() {
            let v = v.as_str().unwrap_or_default();
            assert!(
                !v.contains("agent-1") && !v.contains("acct-1") && !v.contains(&t),
                "{sample:?}"
            );
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn metrics_can_be_turned_off_and_say_so() {
    let s = TestServer::start(&example_config(&[("MANDATE_TELEMETRY__METRICS", "false")])).await;
    let (st, v) = s.get("/metrics", None).await;
    assert_eq!((st, v["error"].clone()), (404, json!("not_found")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("telemetry.metrics"));
    let (st, _) = s.post("/metrics", None, &json!({})).await;
    assert_eq!(st, 405);
    s.shutdown().await;
}

/// The OTLP receiver, killed when dropped.
struct Receiver {
    child: std::process::Child,
    port: u16,
    file: tempfile::NamedTempFile,
}

impl Receiver {
    fn start() -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new("python3")
            .arg(repo().join("tests/peers/otlp_receiver.py"))
            .arg(file.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the receiver did not start: {line:?}"));
        Self { child, port, file }
    }

    fn points(&self) -> Vec<Value> {
        std::fs::read_to_string(self.file.path())
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait (at most `limit`) until `ok` holds for what was received.
    async fn wait_for(&self, limit: Duration, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let until = Instant::now() + limit;
        loop {
            let points = self.points();
            if ok(&points) || Instant::now() > until {
                return points;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The newest value of `name` with `attrs` among what the receiver got.
fn latest<'a>(points: &'a [Value], name: &str, attrs: &Value) -> Option<&'a Value> {
    points
        .iter()
        .rev()
        .find(|p| p["name"] == name && attrs_match(&p["attributes"], attrs))
        .map(|p| &p["value"])
}

fn attrs_match(have: &Value, want: &Value) -> bool {
    want.as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| have.get(k) == Some(v))
}

#[tokio::test]
async fn otlp_metrics_reach_a_collector_over_grpc() {
    let receiver = tokio::task::spawn_blocking(Receiver::start).await.unwrap();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let s = TestServer::start(&example_config(&[
        ("MANDATE_TELEMETRY__OTLP_ENDPOINT", &endpoint),
        ("MANDATE_TELEMETRY__OTLP_INTERVAL", "200ms"),
        ("MANDATE_TELEMETRY__SERVICE_NAME", "mandate-otlp-test"),
    ]))
    .await;
    let t = payments_agent_token("agent-2");
    for amount in [50, 60, 70] {
        let (_, v) = s.post("/v1/check", Some(&t), &transfer(amount)).await;
        assert_eq!(v["decision"], "allow");
    }
    let allow = json!({"api": "native", "outcome": "allow", "reason": "permitted"});
    let points = receiver
        .wait_for(Duration::from_secs(20), |p| {
            latest(p, "mandate.decisions", &allow).and_then(Value::as_i64) == Some(3)
        })
        .await;
    let got = latest(&points, "mandate.decisions", &allow);
    assert_eq!(got.and_then(Value::as_i64), Some(3), "{points:?}");
    let p = points
        .iter()
        .rev()
        .find(|p| p["name"] == "mandate.decisions")
        .unwrap();
    assert_eq!(p["kind"], "sum");
    assert_eq!(p["resource"]["service.name"], "mandate-otlp-test");
    assert_eq!(p["scope"], "mandate");
    // The histogram arrives with its unit and the microsecond buckets.
    let h = latest(
        &points,
        "mandate.decision.duration",
        &json!({"api": "native", "outcome": "allow"}),
    )
    .expect("the decision duration histogram");
    assert_eq!(h["count"], 3);
    assert!(
        h["bounds"].as_array().unwrap().contains(&json!(0.00001)),
        "{h}"
    );
    let unit = points
        .iter()
        .find(|p| p["name"] == "mandate.decision.duration")
        .unwrap();
    assert_eq!(unit["unit"], "s");
    // Observed values travel too: the active bundle and the audit records written.
    assert!(latest(&points, "mandate.policy.info", &json!({"name": "example"})).is_some());
    assert!(
        latest(&points, "mandate.audit.records", &json!({}))
            .and_then(Value::as_i64)
            .is_some_and(|n| n >= 3)
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_bad_telemetry_section_is_refused_naming_the_key() {
    let bad = [
        (
            "MANDATE_TELEMETRY__OTLP_ENDPOINT",
            "127.0.0.1:4317",
            "telemetry.otlp_endpoint",
        ),
        (
            "MANDATE_TELEMETRY__OTLP_PROTOCOL",
            "thrift",
            "telemetry.otlp_protocol",
        ),
        (
            "MANDATE_TELEMETRY__OTLP_INTERVAL",
            "1ms",
            "telemetry.otlp_interval",
        ),
        ("MANDATE_TELEMETRY__COLOUR", "blue", "telemetry.colour"),
        (
            "MANDATE_TELEMETRY__OTLP_ENDPOINT",
            "https://collector.example:4317",
            "otlp_protocol = \"http/protobuf\"",
        ),
    ];
    for (var, value, key) in bad {
        let path = repo().join("config/mandate.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let vars = [(var.to_owned(), value.to_owned())];
        let err = mandate::config::Config::parse(&text, &path, &vars)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{var}={value}: {err}");
    }
}

/// POST a check with a `traceparent` header (if any); the answer.
async fn traced_check(
    s: &TestServer,
    path: &str,
    token: &str,
    body: &Value,
    parent: Option<&str>,
) -> Value {
    let mut req = s
        .client
        .post(s.url(path))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(p) = parent {
        req = req.header("traceparent", p);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

#[tokio::test]
async fn a_checks_span_joins_the_callers_trace_and_its_audit_record_names_the_trace() {
    let receiver = tokio::task::spawn_blocking(Receiver::start).await.unwrap();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let config = example_config(&[
        ("MANDATE_TELEMETRY__OTLP_ENDPOINT", &endpoint),
        // Only the callers' sampled traces are exported.
        ("MANDATE_TELEMETRY__TRACE_SAMPLE_RATIO", "0.0"),
    ]);
    let audit = config.audit.path.clone();
    let s = TestServer::start(&config).await;
    let t = payments_agent_token("agent-3");
    let (sampled, unsampled, authzen) = (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "0af7651916cd43dd8448eb211c80319c",
        "5f2c0d3a9e8b47c1a6d2e4f8b0c1d2e3",
    );
    let caller_span = "00f067aa0ba902b7";
    let allowed = traced_check(
        &s,
        "/v1/check",
        &t,
        &transfer(50),
        Some(&format!("00-{sampled}-{caller_span}-01")),
    )
    .await;
    assert_eq!(allowed["decision"], "allow");
    let quiet = traced_check(
        &s,
        "/v1/check",
        &t,
        &transfer(51),
        Some(&format!("00-{unsampled}-{caller_span}-00")),
    )
    .await;
    let plain = traced_check(&s, "/v1/check", &t, &transfer(52), None).await;
    let evaluation = json!({
        "subject": {"type": "Agent", "id": "agent-3"},
        "action": {"name": "payments:transfer"},
        "resource": {"type": "Account", "id": "acct-1"},
        "context": {"amount": 10_001}
    });
    let denied = traced_check(
        &s,
        "/access/v1/evaluation",
        &t,
        &evaluation,
        Some(&format!("00-{authzen}-{caller_span}-01")),
    )
    .await;
    assert_eq!(denied["decision"], false, "{denied}");

    let spans = receiver
        .wait_for(Duration::from_secs(20), |p| {
            [sampled, authzen].iter().all(|t| {
                p.iter()
                    .any(|x| x["name"] == "mandate.check" && x["trace_id"] == *t)
            })
        })
        .await;
    let span = |trace: &str, name: &str| {
        spans
            .iter()
            .find(|x| x["signal"] == "traces" && x["trace_id"] == trace && x["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` span in trace {trace}: {spans:?}"))
    };
    let check = span(sampled, "mandate.check");
    assert_eq!(
        check["parent_span_id"], caller_span,
        "a child of the caller's span"
    );
    assert_eq!(check["kind"], 2, "SPAN_KIND_SERVER");
    let a = &check["attributes"];
    assert_eq!(a["mandate.outcome"], "allow");
    assert_eq!(a["mandate.api"], "native");
    assert_eq!(a["mandate.action"], "payments:transfer");
    assert_eq!(a["mandate.resource.type"], "Account");
    assert_eq!(a["mandate.decision.id"], allowed["decision_id"]);
    assert_eq!(a["mandate.policy.version"], allowed["policy_version"]);
    assert!(
        a.get("mandate.principal").is_none(),
        "details are off by default"
    );
    assert!(check["end_ns"].as_u64() >= check["start_ns"].as_u64());
    for stage in ["mandate.identity", "mandate.evaluate", "mandate.audit"] {
        assert_eq!(
            span(sampled, stage)["parent_span_id"],
            check["span_id"],
            "{stage}"
        );
    }
    let other = span(authzen, "mandate.check");
    assert_eq!(
        span(authzen, "mandate.identity")["parent_span_id"],
        other["span_id"]
    );
    assert_eq!(other["attributes"]["mandate.api"], "authzen");
    assert_eq!(other["attributes"]["mandate.outcome"], "deny");
    assert!(
        !spans.iter().any(|x| x["trace_id"] == unsampled),
        "an unsampled caller's check is not exported"
    );
    assert_eq!(
        spans
            .iter()
            .filter(|x| x["name"] == "mandate.check")
            .count(),
        2,
        "ratio 0: a check without a sampled caller trace is not exported"
    );

    // The audit record names the trace when it was exported or the caller sent one.
    let records: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let trace_of = |answer: &Value| {
        let r = records
            .iter()
            .find(|r| r["decision_id"] == answer["decision_id"])
            .unwrap_or_else(|| panic!("no record of {answer}"));
        r.get("trace_id").cloned()
    };
    assert_eq!(trace_of(&allowed), Some(json!(sampled)));
    assert_eq!(trace_of(&quiet), Some(json!(unsampled)));
    assert_eq!(trace_of(&plain), None);
    s.shutdown().await;
    // The whole log still verifies with the new key in it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mandate"))
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 15 item 5: every metric the Grafana dashboard (deploy/grafana/mandate.json) queries
/// is in a scrape of a server that has done what the dashboard shows.
#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/mandate.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push(q.to_owned());
        }
    }
    let mut queried: Vec<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("mandate_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    queried.sort();
    queried.dedup();
    assert!(queried.len() >= 15, "{queried:?}");

    // A URL issuer nobody answers for (JWKS fetches), and a limit of one pending request
    // (an escalation refused).
    let remote = r#"
[[issuers]]
name = "remote"
issuer = "https://idp.remote.test"
audiences = ["mandate"]
algorithms = ["ES256"]
jwks_url = "http://127.0.0.1:9/jwks"
"#;
    let s = TestServer::start(&common::example_config_plus(
        remote,
        &[("MANDATE_STORE__MAX_PENDING_PER_PRINCIPAL", "1")],
    ))
    .await;
    let t = payments_agent_token("agent-4");
    for (amount, want) in [
        (50, "allow"),
        (10_001, "deny"),
        (250, "escalate"),
        (260, "deny"),
    ] {
        let (_, v) = s.post("/v1/check", Some(&t), &transfer(amount)).await;
        assert_eq!(v["decision"], want, "{amount}: {v}");
    }
    s.post("/v1/check", Some("a.b"), &transfer(50)).await;
    let samples = scrape_until(&s, |m| {
        total(m, "mandate_approval_pending", &[]) == 1.0
            && m.iter()
                .any(|x| x.name == "mandate_audit_sync_duration_seconds_count")
    })
    .await;
    let exported: std::collections::HashSet<&str> =
        samples.iter().map(|x| x.name.as_str()).collect();
    let missing: Vec<&String> = queried
        .iter()
        .filter(|q| !exported.contains(q.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\n{exported:?}"
    );
    s.shutdown().await;
}

/// Issue 15 item 4: every audit record, as written, reaches the collector as an OTLP log
/// record; what the export loses is counted, never silent.
#[tokio::test]
async fn audit_records_are_exported_as_otlp_logs() {
    let receiver = tokio::task::spawn_blocking(Receiver::start).await.unwrap();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let config = example_config(&[
        ("MANDATE_TELEMETRY__OTLP_ENDPOINT", &endpoint),
        ("MANDATE_TELEMETRY__DECISION_LOGS", "true"),
        ("MANDATE_TELEMETRY__TRACES", "false"),
    ]);
    let audit = config.audit.path.clone();
    let s = TestServer::start(&config).await;
    let t = payments_agent_token("agent-5");
    let mut ids = Vec::new();
    for amount in [50, 10_001, 250] {
        let (_, v) = s.post("/v1/check", Some(&t), &transfer(amount)).await;
        ids.push(v["decision_id"].as_str().unwrap().to_owned());
    }
    // Shutting down exports what is queued (here: the whole batch, still lingering).
    s.shutdown().await;
    let logs = receiver
        .wait_for(Duration::from_secs(5), |p| {
            ids.iter().all(|id| {
                p.iter()
                    .any(|x| x["attributes"]["mandate.decision.id"] == id.as_str())
            })
        })
        .await;
    let lines: Vec<String> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    for (id, outcome) in ids.iter().zip(["allow", "deny", "escalate"]) {
        let log = logs
            .iter()
            .find(|x| {
                x["signal"] == "logs" && x["attributes"]["mandate.decision.id"] == id.as_str()
            })
            .unwrap_or_else(|| panic!("decision {id} not exported: {logs:?}"));
        assert_eq!(log["event_name"], "mandate.decision");
        assert_eq!(log["attributes"]["mandate.outcome"], outcome);
        assert_eq!(log["attributes"]["mandate.audit.kind"], "decision");
        assert_eq!(log["resource"]["service.name"], "mandate");
        // The body is the audit line itself, hash included: it verifies like the file.
        let body = log["body"].as_str().unwrap();
        assert!(lines.iter().any(|l| l == body), "{body}");
        let record: Value = serde_json::from_str(body).unwrap();
        assert_eq!(log["attributes"]["mandate.audit.seq"], record["seq"]);
        assert_eq!(log["trace_id"], "", "no trace: {record}");
    }
}

#[tokio::test]
async fn a_decision_log_export_that_cannot_keep_up_counts_what_it_loses() {
    // A collector that takes the connection and never answers (the export waits out its
    // timeout), and a queue of one record.
    let tarpit = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", tarpit.local_addr().unwrap());
    let s = TestServer::start(&example_config(&[
        ("MANDATE_TELEMETRY__OTLP_ENDPOINT", &endpoint),
        ("MANDATE_TELEMETRY__DECISION_LOGS", "true"),
        ("MANDATE_TELEMETRY__DECISION_LOG_QUEUE", "1"),
        ("MANDATE_TELEMETRY__TRACES", "false"),
    ]))
    .await;
    let t = payments_agent_token("agent-6");
    let checks = |from: i64| {
        let (s, t) = (&s, &t);
        async move {
            for amount in from..from + 40 {
                let (_, v) = s.post("/v1/check", Some(t), &transfer(amount)).await;
                // The export's trouble is never the check's.
                assert_eq!(v["decision"], "allow");
            }
        }
    };
    // The first records make a batch (within a second), whose export then hangs...
    checks(1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ...so of the next 40, the queue takes one.
    checks(41).await;
    let full = [("reason", "queue_full")];
    let m = scrape(&s).await;
    assert_eq!(
        total(&m, "mandate_decision_logs_dropped_total", &full),
        39.0,
        "40 records into a queue of one, while the first batch waits"
    );
    // The batch in flight is lost too, once its export times out (10 s): counted.
    let failed = [("reason", "export_failed")];
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let m = scrape(&s).await;
        if total(&m, "mandate_decision_logs_dropped_total", &failed) >= 1.0 {
            assert_eq!(total(&m, "mandate_decision_logs_exported_total", &[]), 0.0);
            break;
        }
        assert!(
            Instant::now() < until,
            "the failed export was never counted"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(tarpit);
    s.shutdown().await;
}

/// The principal and the request context go on a span only with `telemetry.trace_details`.
#[tokio::test]
async fn trace_details_put_the_principal_and_context_on_spans_when_configured() {
    let receiver = tokio::task::spawn_blocking(Receiver::start).await.unwrap();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let s = TestServer::start(&example_config(&[
        ("MANDATE_TELEMETRY__OTLP_ENDPOINT", &endpoint),
        ("MANDATE_TELEMETRY__TRACE_SAMPLE_RATIO", "1.0"),
        ("MANDATE_TELEMETRY__TRACE_DETAILS", "true"),
    ]))
    .await;
    let t = payments_agent_token("agent-7");
    let (_, v) = s.post("/v1/check", Some(&t), &transfer(42)).await;
    let id = v["decision_id"].as_str().unwrap().to_owned();
    let spans = receiver
        .wait_for(Duration::from_secs(20), |p| {
            p.iter()
                .any(|x| x["attributes"]["mandate.decision.id"] == id.as_str())
        })
        .await;
    let check = spans
        .iter()
        .find(|x| x["attributes"]["mandate.decision.id"] == id.as_str())
        .unwrap_or_else(|| panic!("no span of {id}: {spans:?}"));
    // Sampled without a caller trace: a root span of its own.
    assert_eq!(check["parent_span_id"], "");
    let a = &check["attributes"];
    assert_eq!(a["mandate.principal"], "Agent::\"agent-7\"");
    let context: Value = serde_json::from_str(a["mandate.context"].as_str().unwrap()).unwrap();
    assert_eq!(context["amount"], 42);
    s.shutdown().await;
}
