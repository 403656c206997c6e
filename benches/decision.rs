//! The decision path's cost (`Engine::decide`) as the bundle grows: with per-action slices it
//! must stay flat from 10 to 1,000 policies (docs/design.md §8).
//!
//! Each bundle is generated into a temporary directory: the real `payments:transfer` shape
//! (an autonomous permit, an approval permit, a forbid) plus filler policies spread over
//! ~100 other actions, some forbids and approval permits among them, or (the per-agent case)
//! one per agent on `payments:transfer` itself. The principal is built
//! once, as the verified-token cache does.
//!
//! The `audit` group prices the audit record on the hot path (SECURITY AU-06): `decide` alone
//! versus `decide` plus building the record and appending it to a log in a temporary
//! directory (one `write` per record; the group commit syncs in the background).
//!
//! The `body` group prices reading a typical `/v1/check` body (about 150 bytes) in the typed
//! quick pass, which refuses duplicate keys at every depth (the SECURITY J-22 rule applied to
//! request bodies: a duplicate must not let its last value win).

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mandate::audit::{AuditLog, AuditSettings, DecisionRecord};
use mandate::clock::SystemClock;
use mandate::decision::Engine;
use mandate::policy::Bundle;
use mandate::vocabulary::Principal;
use mandate::vocabulary::{CheckRequest, Outcome, Resource};
use serde_json::{Map, Value, json};

const FILLER_ACTIONS: usize = 100;

/// How the filler policies are spread: over ~100 other actions, or all on the checked action,
/// one per agent (`principal == Agent::"filler-N"`: per-agent bounded authority, the shape a
/// fleet produces, which the slice's scope index keeps flat; issue 14 item 1).
#[derive(Clone, Copy, PartialEq)]
enum Spread {
    OtherActions,
    PerAgent,
}

fn write_bundle(dir: &Path, policies: usize, spread: Spread) {
    let mut schema = String::from(
        "type Mandate = { now: Long };\n\
         entity Agent = { owner?: String, team?: String, groups?: Set<String> };\n\
         entity Account = { owner?: String };\n\
         action \"payments:transfer\" appliesTo { principal: [Agent], resource: [Account], \
         context: { amount: Long, mandate: Mandate } };\n",
    );
    for a in 0..FILLER_ACTIONS {
        let _ = writeln!(
            schema,
            "action \"svc{a}:op\" appliesTo {{ principal: [Agent], resource: [Account], \
             context: {{ amount: Long, mandate: Mandate }} }};"
        );
    }
    let mut cedar = String::from(
        r#"@id("payments-autonomous")
permit (principal is Agent, action == Action::"payments:transfer", resource is Account)
when { context.amount > 0 && context.amount <= 100 };
@id("payments-approval") @approval("finance-approvers") @evidence("ticket") @grant_ttl("1h")
permit (principal is Agent, action == Action::"payments:transfer", resource is Account)
when { context.amount > 100 && context.amount <= 10000 };
@id("payments-forbid-large")
forbid (principal, action == Action::"payments:transfer", resource)
when { context.amount > 10000 };
"#,
    );
    for i in 0..policies.saturating_sub(3) {
        if spread == Spread::PerAgent {
            let scope = format!(
                "(principal == Agent::\"filler-{i}\", action == Action::\"payments:transfer\", resource)"
            );
            let _ = match i % 4 {
                0 => writeln!(
                    cedar,
                    "@id(\"f{i}\") forbid {scope} when {{ context.amount > {} }};",
                    100 + i
                ),
                1 => writeln!(
                    cedar,
                    "@id(\"f{i}\") @approval(\"team{i}\") permit {scope} when {{ context.amount > {i} }};"
                ),
                _ => writeln!(
                    cedar,
                    "@id(\"f{i}\") permit {scope} when {{ context.amount <= {i} }};"
                ),
            };
            continue;
        }
        let action = i % FILLER_ACTIONS;
        let scope = format!("(principal, action == Action::\"svc{action}:op\", resource)");
        let _ = match i % 4 {
            0 => writeln!(
                cedar,
                "@id(\"f{i}\") forbid {scope} when {{ context.amount > {} }};",
                10_000 + i
            ),
            1 => writeln!(
                cedar,
                "@id(\"f{i}\") @approval(\"team{i}\") permit {scope} when {{ context.amount > {i} }};"
            ),
            _ => writeln!(
                cedar,
                "@id(\"f{i}\") permit {scope} when {{ principal has team && principal.team == \"t{i}\" && context.amount <= {i} }};"
            ),
        };
    }
    let write = |name: &str, text: &str| {
        if let Err(e) = std::fs::write(dir.join(name), text) {
            eprintln!("cannot write {name}: {e}");
            std::process::exit(1);
        }
    };
    write("schema.cedarschema", &schema);
    write("policies.cedar", &cedar);
    write("manifest.toml", "name = \"bench\"\nrevision = \"1\"\n");
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn bench_request() -> CheckRequest {
    let principal = match Principal::from_parts(
        "Agent",
        "agent-1",
        "bench",
        obj(json!({"owner": "bob", "team": "payments", "groups": ["payments-agents"]})),
    ) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("principal: {e}");
            std::process::exit(1);
        }
    };
    CheckRequest {
        principal,
        action: "payments:transfer".to_owned(),
        action_properties: None,
        resource: Resource {
            kind: "Account".to_owned(),
            id: "acct-1".to_owned(),
            properties: obj(json!({"owner": "bob"})),
        },
        context: obj(json!({"amount": 50})),
    }
}

fn decide(c: &mut Criterion) {
    let request = bench_request();
    let mut group = c.benchmark_group("decide");
    for (policies, spread) in [
        (10usize, Spread::OtherActions),
        (1_000, Spread::OtherActions),
        (1_000, Spread::PerAgent),
    ] {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("tempdir: {e}");
                std::process::exit(1);
            }
        };
        write_bundle(dir.path(), policies, spread);
        let bundle = match Bundle::load(dir.path()) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                eprintln!("bundle of {policies} policies:\n{e}");
                std::process::exit(1);
            }
        };
        let engine = Engine::new(bundle, Arc::new(SystemClock));
        let d = engine.decide(&request);
        if d.outcome != Outcome::Allow {
            eprintln!("expected allow, got {d:?}");
            std::process::exit(1);
        }
        let name = match spread {
            Spread::OtherActions => format!("{policies}_policies"),
            Spread::PerAgent => format!("{policies}_per_agent_policies_same_action"),
        };
        group.bench_with_input(BenchmarkId::from_parameter(&name), &request, |b, req| {
            b.iter(|| black_box(engine.decide(black_box(req))))
        });
        // The shape of most agent calls: the resource named by id, no properties.
        let mut by_id = request.clone();
        by_id.resource.properties = Map::new();
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{name}_resource_by_id")),
            &by_id,
            |b, req| b.iter(|| black_box(engine.decide(black_box(req)))),
        );
    }
    group.finish();
}

fn or_exit<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("{what}: {e}");
        std::process::exit(1);
    })
}

fn audit(c: &mut Criterion) {
    let request = bench_request();
    let dir = or_exit("tempdir", tempfile::tempdir());
    write_bundle(dir.path(), 10, Spread::OtherActions);
    let bundle = or_exit("bundle", Bundle::load(dir.path()));
    let engine = Engine::new(Arc::new(bundle), Arc::new(SystemClock));
    let log = or_exit(
        "audit log",
        AuditLog::open(&dir.path().join("audit.jsonl"), AuditSettings::default()),
    );
    let mut group = c.benchmark_group("audit");
    group.bench_function("decide", |b| {
        b.iter(|| black_box(engine.decide(black_box(&request))))
    });
    group.bench_function("decide_and_append", |b| {
        b.iter(|| {
            let started = Instant::now();
            let d = engine.decide(black_box(&request));
            let record = DecisionRecord::new(&request, &d, started.elapsed());
            black_box(log.append(&record.into()).is_ok());
            black_box(d)
        })
    });
    // The append alone, for the same record each time (chain fields still change).
    let d = engine.decide(&request);
    group.bench_function("append", |b| {
        b.iter(|| {
            let record = DecisionRecord::new(&request, &d, Duration::ZERO);
            black_box(log.append(&record.into()).is_ok())
        })
    });
    group.finish();
    if log.write_failures() > 0 {
        eprintln!("audit appends failed: {}", log.write_failures());
        std::process::exit(1);
    }
}

/// A typical native check body: action, resource with properties, a small context.
const CHECK_BODY: &[u8] = br#"{"action":"payments:transfer","resource":{"type":"Account","id":"acct-1","properties":{"owner":"bob"}},"context":{"amount":250,"currency":"EUR","ticket":"T-1"}}"#;

fn body(c: &mut Criterion) {
    if mandate::api::body::quick_check(CHECK_BODY).is_none() {
        eprintln!("the quick reader refused the bench body");
        std::process::exit(1);
    }
    let mut group = c.benchmark_group("body");
    group.bench_function(format!("quick_check_{}b", CHECK_BODY.len()), |b| {
        b.iter(|| black_box(mandate::api::body::quick_check(black_box(CHECK_BODY))))
    });
    group.finish();
}

criterion_group!(benches, decide, audit, body);
criterion_main!(benches);
