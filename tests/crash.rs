//! Crash consistency under load (docs/security.md R-03a, AU-03): the real `mandate serve`
//! process on SQLite takes a burst of checks, escalations, reviews and grant uses from
//! several concurrent clients and is killed with SIGKILL at a random moment, then started
//! again on the same files, several times over. Afterwards, offline:
//!
//! - every decision a client got an answer for has its record in the audit log, once (AU-03,
//!   AU-01), and `mandate audit verify` accepts the whole chain across all the restarts;
//! - every escalation a client was answered is a stored request; every review a client got a
//!   `200` for left its request in that state, and every acknowledged approval its grant;
//! - no request is in an impossible state: every grant belongs to an approved request and
//!   no request has two; `PRAGMA integrity_check` is `ok`.
//!
//! `MANDATE_CRASH_ITERATIONS` sets the number of kills (default 5); `MANDATE_CRASH_SEED`
//! replays a run's timing choices (the seed is printed).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use common::transfer;

use std::collections::{HashMap, HashSet, VecDeque};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mandate::approval::Status;
use serde_json::{Value, json};
use uuid::Uuid;

/// Agents the escalations are spread over, so the flood guard rarely steps in.
const AGENTS: usize = 200;
const AGENT_CLIENTS: usize = 4;
const APPROVER_CLIENTS: usize = 2;

/// xorshift64*, seeded per run and per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An escalation a client was told about: who asked, for what amount, and its request.
#[derive(Debug, Clone)]
struct Escalated {
    agent: usize,
    amount: i64,
    request: String,
}

/// What the clients were answered, across every run of the server.
#[derive(Debug, Default)]
struct Acked {
    decisions: Vec<String>,
    escalated: Vec<Escalated>,
    /// (request, grant) of every approval answered `200`.
    approved: Vec<(String, String)>,
    denied: Vec<String>,
    /// Escalations not reviewed yet, for the approvers.
    queue: VecDeque<Escalated>,
    /// Approved escalations, for the agents to use their grant.
    granted: Vec<Escalated>,
}

/// POST `body` as JSON; `None` when no answer came (the server is gone).
async fn post(
    client: &reqwest::Client,
    url: String,
    token: &str,
    body: &Value,
) -> Option<(u16, Value)> {
    let resp = client
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let text = resp.text().await.ok()?;
    Some((status, serde_json::from_str(&text).ok()?))
}

/// Checks as random agents: allowed, escalated and denied transfers, and uses of grants.
async fn agent_client(
    base: String,
    tokens: Arc<Vec<String>>,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
) {
    let client = reqwest::Client::new();
    while !stop.load(Ordering::Relaxed) {
        let reuse = (rng.below(4) == 0)
            .then(|| {
                let a = acked.lock().unwrap();
                let n = a.granted.len() as u64;
                (n > 0).then(|| a.granted[rng.below(n) as usize].clone())
            })
            .flatten();
        let (agent, amount) = match reuse {
            Some(e) => (e.agent, e.amount),
            None => {
                let amount = match rng.below(3) {
                    0 => 1 + rng.below(100) as i64,
                    1 => 101 + rng.below(9_900) as i64,
                    _ => 10_001 + rng.below(1_000) as i64,
                };
                (rng.below(AGENTS as u64) as usize, amount)
            }
        };
        let Some((status, answer)) = post(
            &client,
            format!("{base}/v1/check"),
            &tokens[agent],
            &transfer(amount),
        )
        .await
        else {
            break;
        };
        assert_eq!(status, 200, "a check answered {status}: {answer}");
        let id = answer["decision_id"].as_str().unwrap().to_owned();
        let mut a = acked.lock().unwrap();
        a.decisions.push(id);
        if answer["decision"] == "escalate"
            && let Some(request) = answer["approval_request"]["id"].as_str()
        {
            let e = Escalated {
                agent,
                amount,
                request: request.to_owned(),
            };
            a.escalated.push(e.clone());
            a.queue.push_back(e);
        }
    }
}

/// Reviews the escalations the agents were told about: most approved, some denied.
async fn approver_client(
    base: String,
    token: String,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
) {
    let client = reqwest::Client::new();
    while !stop.load(Ordering::Relaxed) {
        let next = acked.lock().unwrap().queue.pop_front();
        let Some(e) = next else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let approve = rng.below(4) != 0;
        let (verb, body) = if approve {
            (
                "approve",
                json!({"rationale": "crash test", "evidence": {"ticket": "FIN-1"}}),
            )
        } else {
            ("deny", json!({"rationale": "crash test"}))
        };
        let url = format!("{base}/v1/approvals/{}/{verb}", e.request);
        let Some((status, answer)) = post(&client, url, &token, &body).await else {
            break;
        };
        // Anything but a 200 (a request already decided by the other approver: 409) is
        // no acknowledgement and promises nothing.
        if status != 200 {
            continue;
        }
        let mut a = acked.lock().unwrap();
        if approve {
            let grant = answer["grant"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("an approval answered 200 without a grant: {answer}"));
            a.approved.push((e.request.clone(), grant.to_owned()));
            a.granted.push(e);
        } else {
            a.denied.push(e.request);
        }
    }
}

/// Wait (at most 60 s: the machine is shared) until `cond` holds of what was answered.
async fn wait_for(acked: &Mutex<Acked>, what: &str, cond: impl Fn(&Acked) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond(&acked.lock().unwrap()) {
        assert!(Instant::now() < deadline, "no {what} within 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r03a_au03_kill_9_under_load_loses_no_acknowledged_decision_or_review() {
    let iterations: usize = std::env::var("MANDATE_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("MANDATE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("MANDATE_CRASH_SEED={seed} MANDATE_CRASH_ITERATIONS={iterations}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let db = audit.with_file_name("mandate.db");
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..AGENTS)
            .map(|i| {
                common::dev_token(
                    &format!("agent-{i}"),
                    json!({"owner": "bob"}),
                    Duration::from_secs(3600),
                )
            })
            .collect(),
    );
    let alice = common::dev_token(
        "alice",
        json!({"groups": ["finance-approvers"]}),
        Duration::from_secs(3600),
    );
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut ready = Vec::new();
    let started = Instant::now();

    for round in 0..iterations {
        let t0 = Instant::now();
        // A hundred new requests an hour per agent: the flood guard is not under test here.
        let (mut child, addr) =
            common::spawn_serve_env(&audit, &[("MANDATE_STORE__MAX_REQUESTS_PER_HOUR", "1000")]);
        ready.push(t0.elapsed());
        let base = format!("http://{addr}");
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..AGENT_CLIENTS {
            clients.spawn(agent_client(
                base.clone(),
                Arc::clone(&tokens),
                Arc::clone(&acked),
                Arc::clone(&stop),
                Rng(rng.next() | 1),
            ));
        }
        for _ in 0..APPROVER_CLIENTS {
            clients.spawn(approver_client(
                base.clone(),
                alice.clone(),
                Arc::clone(&acked),
                Arc::clone(&stop),
                Rng(rng.next() | 1),
            ));
        }
        // Kill at a random moment in [50 ms, 2 s] of the burst (SECURITY R-03a), counted from
        // its first answer so that no kill falls in the start-up. Before the last kill, at
        // least one approval must have been answered, so the review invariants below always
        // have something to check.
        let before = acked.lock().unwrap().decisions.len();
        let last = round + 1 == iterations;
        wait_for(&acked, "a first answer", |a| a.decisions.len() > before).await;
        if last {
            wait_for(&acked, "an approval", |a| !a.approved.is_empty()).await;
        }
        let after = Duration::from_millis(50 + rng.below(1_950));
        tokio::time::sleep(after).await;
        child.kill().unwrap(); // SIGKILL: no shutdown path runs
        child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(r) = clients.join_next().await {
                r.unwrap();
            }
        })
        .await
        .expect("clients stop once the server is gone");
        let a = acked.lock().unwrap();
        eprintln!(
            "round {round}: killed after {after:?}; so far {} decisions, {} escalations, \
             {} approvals, {} denials acknowledged",
            a.decisions.len(),
            a.escalated.len(),
            a.approved.len(),
            a.denied.len()
        );
    }

    let a = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        a.decisions.len() >= iterations && !a.escalated.is_empty() && !a.approved.is_empty(),
        "the burst did too little to test anything: {} decisions, {} escalations, {} approvals",
        a.decisions.len(),
        a.escalated.len(),
        a.approved.len()
    );

    // AU-03, AU-01: every acknowledged decision has exactly one record.
    let text = std::fs::read_to_string(&audit).unwrap();
    let mut recorded: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line)
            && v["kind"] == "decision"
            && let Some(id) = v["decision_id"].as_str()
        {
            *recorded.entry(id.to_owned()).or_default() += 1;
        }
    }
    let missing: Vec<&String> = a
        .decisions
        .iter()
        .filter(|id| !recorded.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged decisions have no audit record, e.g. {:?}",
        missing.len(),
        a.decisions.len(),
        missing.first()
    );
    let twice: Vec<_> = recorded.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "decisions recorded twice: {twice:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mandate"))
        .args(["audit", "verify", audit.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the audit chain does not verify after {iterations} kills: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // R-03a: every acknowledged write is in the store with its exact state.
    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::from_str(&format!("sqlite://{}", db.display()))
            .unwrap(),
    )
    .await
    .unwrap();
    let integrity: (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(integrity.0, "ok");
    pool.close().await;
    let store = mandate::store::connect(db.to_str().unwrap()).await.unwrap();
    for e in &a.escalated {
        let id = Uuid::parse_str(&e.request).unwrap();
        assert!(
            store.get(id).await.unwrap().is_some(),
            "acknowledged escalation {} is not in the store",
            e.request
        );
    }
    for (request, grant) in &a.approved {
        let r = store
            .get(Uuid::parse_str(request).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            r.status,
            Status::Approved,
            "acknowledged approval {request}"
        );
        let g = store
            .get_grant(Uuid::parse_str(grant).unwrap())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("the grant {grant} of approval {request} is gone"));
        assert_eq!(g.request_id.to_string(), *request);
    }
    for request in &a.denied {
        let r = store
            .get(Uuid::parse_str(request).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status, Status::Denied, "acknowledged denial {request}");
    }
    // No impossible state: a grant only for an approved request, at most one per request.
    let mut granted = HashSet::new();
    for g in store.grants(false, 0).await.unwrap() {
        assert!(
            granted.insert(g.request_id),
            "two grants for {}",
            g.request_id
        );
        let r = store.get(g.request_id).await.unwrap().unwrap();
        assert_eq!(
            r.status,
            Status::Approved,
            "grant {} for a request that is {:?}",
            g.id,
            r.status
        );
    }
    let slowest = ready.iter().max().unwrap();
    eprintln!(
        "{iterations} kills in {:?}: {} decisions, {} escalations, {} approvals, {} denials \
         acknowledged and all found; slowest start to listening {slowest:?}",
        started.elapsed(),
        a.decisions.len(),
        a.escalated.len(),
        a.approved.len(),
        a.denied.len()
    );
    assert!(
        *slowest < Duration::from_secs(30),
        "a restart took {slowest:?}"
    );
}
