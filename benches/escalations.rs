//! What a new escalation costs the approval store (issue 10 point 9): `clients` concurrent
//! tasks create `total` distinct pending requests (each its own principal, so no limit
//! refuses one) through the real store, and the latency of each create is reported as p50,
//! p99 and max, with the rate, on a SQLite store in a temporary directory (the embedded
//! default, whose one writer at a time is where escalations queue).
//!
//! `cargo bench --bench escalations` runs 960 creates from 16 clients; in test mode
//! (`cargo test --bench escalations`) a 64-create smoke run checks the harness works.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark harness: a failed setup must stop it loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mandate::approval::{
    ApprovalStore, EscalationLimits, NewRequest, PrincipalSnapshot, ResourceSnapshot,
};
use serde_json::{Map, json};

fn request(n: usize) -> NewRequest {
    let Some(context) = json!({"amount": 250 + n, "currency": "EUR"})
        .as_object()
        .cloned()
    else {
        panic!("context is an object");
    };
    let mut principal_attrs = Map::new();
    principal_attrs.insert("team".into(), json!("payments"));
    NewRequest {
        principal: PrincipalSnapshot {
            kind: "Agent".into(),
            id: format!("agent-{n}"),
            issuer: "dev".into(),
            attributes: principal_attrs,
            owner: Some("bob".into()),
            actors: vec![],
        },
        action: "payments:transfer".into(),
        action_properties: None,
        resource: ResourceSnapshot {
            kind: "Account".into(),
            id: "acct-1".into(),
            properties: Map::new(),
        },
        context,
        policy_version: "1+43d884fc6f24857e".into(),
        policy_ids: vec!["payments-approval".into()],
        policy_text: [("payments-approval".to_owned(), "permit (...);".to_owned())].into(),
        groups: vec!["finance-approvers".into()],
        quorum: 1,
        evidence: vec!["ticket".into()],
        grant_ttl: Duration::from_secs(3600),
        grant_scope: Default::default(),
        fallback: None,
        created_at: 1_780_000_000,
        expires_at: 1_780_003_600,
        limits: EscalationLimits::default(),
    }
}

async fn run(name: &str, store: Arc<dyn ApprovalStore>, total: usize, clients: usize) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for n in (c..total).step_by(clients) {
                let t = Instant::now();
                let (_, created) = store.create_or_get_pending(request(n)).await.unwrap();
                assert!(created);
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = started.elapsed();
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    println!(
        "escalations/{name}: {total} creates from {clients} clients in {:.2} s ({:.0}/s): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        wall.as_secs_f64(),
        total as f64 / wall.as_secs_f64(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        all[all.len() - 1].as_secs_f64() * 1e3,
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (total, clients) = if bench { (960, 16) } else { (64, 16) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("mandate.db").display().to_string();
        let store = mandate::store::connect(&db).await.unwrap();
        let name = if bench {
            "sqlite"
        } else {
            "sqlite (smoke run in test mode: `cargo bench --bench escalations` measures)"
        };
        run(name, store, total, clients).await;
    });
}
