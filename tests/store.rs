//! The approval store suite: written once, run against every backend (SQLite in a temporary
//! directory; PostgreSQL from `MANDATE_TEST_POSTGRES_URL`, each test in a fresh schema) by the
//! `store_suite!` macro, as limitador runs one suite per storage. Test names carry the
//! docs/security.md case they cover.
//!
//! The PostgreSQL tests are `#[ignore]`d, so a plain `cargo test` counts them as ignored
//! rather than passing them unrun; every one has `postgres` in its name, and
//! `cargo test --tests -- --ignored postgres` runs exactly them (scripts/test does, when a
//! server answers). Run that way without `MANDATE_TEST_POSTGRES_URL`, or with no server
//! behind it, they fail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

use std::sync::Arc;
use std::time::Duration;

use mandate::approval::{
    ApprovalRequest, ApprovalStore, EscalationLimits, ListFilter, NewRequest, PrincipalSnapshot,
    RateLimit, ResourceSnapshot, Review, Status, StoreCounts, StoreError, Verdict,
};
use mandate::vocabulary::{Fallback, GrantScope};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// The time every test starts at; requests stay pending for an hour.
const T0: i64 = 1_700_000_000;
const PENDING_TTL: i64 = 3600;
const GRANT_TTL: u64 = 600;

/// One backend, opened for one test.
struct Harness {
    store: Arc<dyn ApprovalStore>,
    url: String,
    /// Keeps the SQLite directory alive for the test.
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL schema to drop at the end, with the base URL to drop it through.
    pg_schema: Option<(String, String)>,
}

impl Harness {
    async fn sqlite() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("approvals.db").display());
        let store = mandate::store::connect(&url).await.unwrap();
        Harness {
            store,
            url,
            _dir: Some(dir),
            pg_schema: None,
        }
    }

    /// A fresh schema on `MANDATE_TEST_POSTGRES_URL`; fails the test when it is not set.
    async fn postgres() -> Harness {
        let base = postgres_url();
        let schema = format!("mandate_t_{}", Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&base).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options[search_path]={schema}");
        let store = mandate::store::connect(&url).await.unwrap();
        Harness {
            store,
            url,
            _dir: None,
            pg_schema: Some((base, schema)),
        }
    }

    /// Drop the store and open it again from its URL.
    async fn reopen(&mut self) {
        self.store = mandate::store::connect(&self.url).await.unwrap();
    }

    async fn finish(self) {
        drop(self.store);
        if let Some((base, schema)) = self.pg_schema {
            let admin = sqlx::PgPool::connect(&base).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
        }
    }
}

/// The PostgreSQL server of the `postgres` tests. They are `#[ignore]`d, so they run only when
/// asked for (`--ignored postgres`): then a missing URL is a failure, never a skip.
fn postgres_url() -> String {
    std::env::var("MANDATE_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "MANDATE_TEST_POSTGRES_URL is not set: the PostgreSQL tests need a server \
             (e.g. postgres://postgres@127.0.0.1:5432/test)"
        )
    })
}

macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let mut h = super::Harness::sqlite().await;
                    super::cases::$case(&mut h).await;
                    h.finish().await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL: set MANDATE_TEST_POSTGRES_URL (scripts/test does when one answers on 127.0.0.1:5432)"]
                async fn $case() {
                    let mut h = super::Harness::postgres().await;
                    super::cases::$case(&mut h).await;
                    h.finish().await;
                }
            )*
        }
    };
}

store_suite!(
    create_dedupes_by_binding_hash,
    a16_concurrent_identical_creates_make_one_request,
    get_unknown_is_none,
    a13_quorum_two_needs_two_distinct_approvers,
    a13_parallel_approvals_by_one_approver_stay_pending,
    a14_deny_wins,
    a14_racing_approvers_on_quorum_one_make_exactly_one_grant,
    a11_review_after_expiry_is_refused,
    expire_due_moves_pending_to_expired_once,
    fallback_due_moves_current_groups_once,
    a06_a12_active_grant_is_exact_and_time_bound,
    cancel_pending_request,
    list_filters_and_paginates,
    r03c_data_survives_reopening,
    get_grant_and_get_many_read_by_id,
    a16_pending_limit_per_principal,
    a16_hourly_limit_per_principal,
    a16_concurrent_creates_respect_the_pending_limit,
    au04_checkpoints_are_kept_per_log_once_each,
    a08_a_tool_scoped_request_keeps_its_scope_and_covers_other_arguments,
    counts_pending_by_group_and_active_grants,
);

/// Limits no test of the other cases reaches: they create many requests for one principal.
const NO_LIMITS: EscalationLimits = EscalationLimits {
    max_pending: 1000,
    max_per_hour: 1000,
};

/// A policy text with what must survive the round trip: newlines, quotes, non-ASCII.
const POLICY_TEXT: &str = "@id(\"payments-approval\")\n@approval(\"finance-approvers\")\n\
    permit (principal, action == Action::\"payments:transfer\", resource)\n\
    when { context.amount > 100 }; // \u{20ac} \\ \"quoted\"";

fn request(amount: i64, quorum: u32, fallback: Option<Fallback>) -> NewRequest {
    let context: Map<String, Value> = match json!({"amount": amount, "currency": "EUR"}) {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    NewRequest {
        principal: PrincipalSnapshot {
            kind: "Agent".into(),
            id: "agent-1".into(),
            issuer: "dev".into(),
            attributes: Map::new(),
            owner: Some("bob".into()),
            actors: vec!["orchestrator".into()],
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
        policy_text: [("payments-approval".to_owned(), POLICY_TEXT.to_owned())].into(),
        groups: vec!["finance-approvers".into()],
        quorum,
        evidence: vec!["ticket".into()],
        grant_ttl: Duration::from_secs(GRANT_TTL),
        grant_scope: Default::default(),
        fallback,
        created_at: T0,
        expires_at: T0 + PENDING_TTL,
        limits: NO_LIMITS,
    }
}

/// `request(amount, 1, None)` made at `at` under `limits`.
fn limited(amount: i64, at: i64, limits: EscalationLimits) -> NewRequest {
    let mut r = request(amount, 1, None);
    r.created_at = at;
    r.expires_at = at + PENDING_TTL;
    r.limits = limits;
    r
}

/// The limit a create was refused for.
fn rate_limited(r: Result<(ApprovalRequest, bool), StoreError>) -> (RateLimit, u32) {
    match r {
        Err(StoreError::RateLimited {
            limit,
            max,
            principal,
        }) => {
            assert_eq!(principal, "agent-1");
            (limit, max)
        }
        other => panic!("expected escalation_rate_limited, got {other:?}"),
    }
}

fn review(req: &ApprovalRequest, approver: &str, verdict: Verdict, at: i64) -> Review {
    let evidence = match json!({"ticket": "FIN-1"}) {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    Review {
        request_id: req.id,
        approver_id: approver.into(),
        approver_issuer: "corp-oidc".into(),
        verdict,
        rationale: format!("{approver} checked the invoice"),
        evidence,
        at,
    }
}

async fn create(store: &dyn ApprovalStore, new: NewRequest) -> ApprovalRequest {
    let (req, created) = store.create_or_get_pending(new).await.unwrap();
    assert!(created, "a new binding hash creates a new request");
    req
}

fn code<T: std::fmt::Debug>(r: Result<T, mandate::approval::StoreError>) -> &'static str {
    r.expect_err("the store must refuse this").code()
}

mod cases {
    use super::*;

    /// The requests in `status` (at most 100: more than any case makes).
    async fn with_status(s: &dyn ApprovalStore, status: Status) -> Vec<ApprovalRequest> {
        s.list(ListFilter {
            status: Some(status),
            limit: 100,
            ..ListFilter::default()
        })
        .await
        .unwrap()
    }

    pub async fn create_dedupes_by_binding_hash(h: &mut Harness) {
        let s = h.store.as_ref();
        let (first, created) = s
            .create_or_get_pending(request(250, 1, None))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(first.status, Status::Pending);
        assert_eq!(first.id.get_version_num(), 4);
        assert_eq!(first.current_groups, first.groups);
        assert_eq!(s.get(first.id).await.unwrap().as_ref(), Some(&first));

        let (again, created) = s
            .create_or_get_pending(request(250, 1, None))
            .await
            .unwrap();
        assert!(
            !created,
            "an identical pending request is returned, not duplicated"
        );
        assert_eq!(again, first);

        let (other, created) = s
            .create_or_get_pending(request(251, 1, None))
            .await
            .unwrap();
        assert!(created, "a different binding hash is a new request");
        assert_ne!(other.id, first.id);
        assert_ne!(other.binding_hash, first.binding_hash);
    }

    pub async fn a08_a_tool_scoped_request_keeps_its_scope_and_covers_other_arguments(
        h: &mut Harness,
    ) {
        let s = h.store.as_ref();
        let tool = |amount| NewRequest {
            grant_scope: GrantScope::Tool,
            ..request(amount, 1, None)
        };
        let first = create(s, tool(250)).await;
        assert_eq!(first.grant_scope, GrantScope::Tool);
        assert_eq!(s.get(first.id).await.unwrap().as_ref(), Some(&first));
        // Another amount is the same tool-scoped request (what its grant would cover)...
        let (again, created) = s.create_or_get_pending(tool(9_000)).await.unwrap();
        assert!(!created);
        assert_eq!(again.id, first.id);
        // ...and never the call-scoped request of the same call.
        let call = create(s, request(250, 1, None)).await;
        assert_eq!(call.grant_scope, GrantScope::Call);
        assert_ne!(call.binding_hash, first.binding_hash);
    }

    pub async fn a16_concurrent_identical_creates_make_one_request(h: &mut Harness) {
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let store = h.store.clone();
                tokio::spawn(
                    async move { store.create_or_get_pending(request(250, 1, None)).await },
                )
            })
            .collect();
        let mut ids = Vec::new();
        let mut created = 0;
        for t in tasks {
            let (req, c) = t.await.unwrap().unwrap();
            ids.push(req.id);
            created += usize::from(c);
        }
        assert_eq!(created, 1, "exactly one create wins");
        ids.dedup();
        assert_eq!(ids.len(), 1, "every caller gets the same request");
        let pending = with_status(h.store.as_ref(), Status::Pending).await;
        assert_eq!(pending.len(), 1);
    }

    pub async fn au04_checkpoints_are_kept_per_log_once_each(h: &mut Harness) {
        let s = h.store.as_ref();
        let cp = |seq: u64, hash: &str| mandate::audit::Checkpoint {
            seq,
            hash: hash.into(),
            at: T0,
            key_id: "k".into(),
            signature: "c2ln".into(),
        };
        s.put_checkpoint("log-a", &cp(8, "h8")).await.unwrap();
        s.put_checkpoint("log-a", &cp(4, "h4")).await.unwrap();
        s.put_checkpoint("log-b", &cp(4, "other")).await.unwrap();
        // A checkpoint kept already is not replaced (nor an error: shutdown may repeat one).
        s.put_checkpoint("log-a", &cp(8, "forged")).await.unwrap();
        assert_eq!(
            s.checkpoints("log-a").await.unwrap(),
            vec![cp(4, "h4"), cp(8, "h8")]
        );
        assert_eq!(s.checkpoints("log-b").await.unwrap(), vec![cp(4, "other")]);
        assert!(s.checkpoints("log-c").await.unwrap().is_empty());
    }

    pub async fn get_unknown_is_none(h: &mut Harness) {
        let s = h.store.as_ref();
        assert_eq!(s.get(Uuid::new_v4()).await.unwrap(), None);
        assert!(s.reviews(Uuid::new_v4()).await.unwrap().is_empty());
        let fake = request(1, 1, None).into_pending();
        assert_eq!(
            code(
                s.review(review(&fake, "alice", Verdict::Approve, T0), T0)
                    .await
            ),
            "not_found"
        );
        assert_eq!(code(s.cancel(Uuid::new_v4(), T0).await), "not_found");
        assert_eq!(code(s.revoke_grant(Uuid::new_v4(), T0).await), "not_found");
    }

    pub async fn a13_quorum_two_needs_two_distinct_approvers(h: &mut Harness) {
        let s = h.store.as_ref();
        let req = create(s, request(250, 2, None)).await;

        let out = s
            .review(review(&req, "alice", Verdict::Approve, T0 + 1), T0 + 1)
            .await
            .unwrap();
        assert_eq!(out.request.status, Status::Pending);
        assert!(out.grant.is_none());
        assert_eq!(out.request.version, req.version + 1);

        let twice = s
            .review(review(&req, "alice", Verdict::Approve, T0 + 2), T0 + 2)
            .await;
        assert_eq!(code(twice), "already_reviewed");
        assert_eq!(
            s.reviews(req.id).await.unwrap().len(),
            1,
            "the second review is not stored"
        );
        assert_eq!(
            s.get(req.id).await.unwrap().unwrap().status,
            Status::Pending
        );

        let out = s
            .review(review(&req, "carol", Verdict::Approve, T0 + 3), T0 + 3)
            .await
            .unwrap();
        assert_eq!(out.request.status, Status::Approved);
        assert_eq!(out.request.decided_at, Some(T0 + 3));
        let grant = out.grant.expect("the quorum creates a grant");
        assert_eq!(grant.request_id, req.id);
        assert_eq!(grant.binding_hash, req.binding_hash);
        assert_eq!(grant.policy_version, req.policy_version);
        assert_eq!(grant.expires_at, T0 + 3 + GRANT_TTL as i64);

        let reviews = s.reviews(req.id).await.unwrap();
        let approvers: Vec<&str> = reviews.iter().map(|r| r.approver_id.as_str()).collect();
        assert_eq!(approvers, ["alice", "carol"]);
        assert_eq!(reviews[0].rationale, "alice checked the invoice");
        assert_eq!(reviews[0].evidence.get("ticket"), Some(&json!("FIN-1")));
        assert_eq!(reviews[0].approver_issuer, "corp-oidc");
    }

    pub async fn a13_parallel_approvals_by_one_approver_stay_pending(h: &mut Harness) {
        let req = create(h.store.as_ref(), request(250, 2, None)).await;
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let store = h.store.clone();
                let r = review(&req, "alice", Verdict::Approve, T0 + i);
                tokio::spawn(async move { store.review(r, T0 + 10).await })
            })
            .collect();
        let mut accepted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(out) => {
                    accepted += 1;
                    assert_eq!(out.request.status, Status::Pending);
                }
                Err(e) => assert_eq!(e.code(), "already_reviewed", "{e}"),
            }
        }
        assert_eq!(accepted, 1, "one approver counts once");
        let s = h.store.as_ref();
        assert_eq!(
            s.get(req.id).await.unwrap().unwrap().status,
            Status::Pending
        );
        assert_eq!(s.reviews(req.id).await.unwrap().len(), 1);
        assert!(
            s.active_grant(&req.binding_hash, T0 + 10)
                .await
                .unwrap()
                .is_none()
        );

        let out = s
            .review(review(&req, "bob", Verdict::Approve, T0 + 11), T0 + 11)
            .await
            .unwrap();
        assert_eq!(out.request.status, Status::Approved);
        assert_eq!(s.grants(false, T0 + 11).await.unwrap().len(), 1);
    }

    pub async fn a14_deny_wins(h: &mut Harness) {
        let s = h.store.as_ref();
        let req = create(s, request(250, 2, None)).await;
        s.review(review(&req, "alice", Verdict::Approve, T0 + 1), T0 + 1)
            .await
            .unwrap();
        let out = s
            .review(review(&req, "bob", Verdict::Deny, T0 + 2), T0 + 2)
            .await
            .unwrap();
        assert_eq!(out.request.status, Status::Denied);
        assert_eq!(out.request.decided_at, Some(T0 + 2));
        assert!(out.grant.is_none());

        let late = s
            .review(review(&req, "carol", Verdict::Approve, T0 + 3), T0 + 3)
            .await;
        assert_eq!(code(late), "not_pending");
        assert!(
            s.active_grant(&req.binding_hash, T0 + 3)
                .await
                .unwrap()
                .is_none()
        );
        assert!(s.grants(false, T0 + 3).await.unwrap().is_empty());
    }

    pub async fn a14_racing_approvers_on_quorum_one_make_exactly_one_grant(h: &mut Harness) {
        for round in 0..20 {
            let req = create(h.store.as_ref(), request(1000 + round, 1, None)).await;
            let tasks: Vec<_> = ["alice", "bob"]
                .into_iter()
                .map(|who| {
                    let store = h.store.clone();
                    let r = review(&req, who, Verdict::Approve, T0 + 5);
                    tokio::spawn(async move { store.review(r, T0 + 5).await })
                })
                .collect();
            let mut grants = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(out) => {
                        assert_eq!(out.request.status, Status::Approved);
                        grants += usize::from(out.grant.is_some());
                    }
                    Err(e) => assert_eq!(e.code(), "not_pending", "round {round}: {e}"),
                }
            }
            assert_eq!(grants, 1, "round {round}: exactly one approver wins");
            let stored = h.store.grants(false, T0 + 5).await.unwrap();
            assert_eq!(stored.iter().filter(|g| g.request_id == req.id).count(), 1);
            assert_eq!(h.store.reviews(req.id).await.unwrap().len(), 1);
        }
    }

    pub async fn a11_review_after_expiry_is_refused(h: &mut Harness) {
        let s = h.store.as_ref();
        let req = create(s, request(250, 1, None)).await;
        let at = req.expires_at;
        let out = s
            .review(review(&req, "alice", Verdict::Approve, at), at)
            .await;
        assert_eq!(code(out), "request_expired");
        assert!(s.reviews(req.id).await.unwrap().is_empty());
        assert_eq!(
            s.get(req.id).await.unwrap().unwrap().status,
            Status::Pending
        );

        let expired = s.expire_due(at).await.unwrap();
        assert_eq!(expired.len(), 1);
        // Even a review timestamped inside the window cannot revive an expired request.
        let out = s
            .review(review(&req, "alice", Verdict::Approve, T0 + 1), T0 + 1)
            .await;
        assert_eq!(code(out), "request_expired");
        let stored = s.get(req.id).await.unwrap().unwrap();
        assert_eq!(stored.status, Status::Expired);
        assert!(s.grants(false, at).await.unwrap().is_empty());
    }

    pub async fn expire_due_moves_pending_to_expired_once(h: &mut Harness) {
        let s = h.store.as_ref();
        let soon = create(s, request(1, 1, None)).await;
        let mut later_req = request(2, 1, None);
        later_req.expires_at = T0 + 2 * PENDING_TTL;
        let later = create(s, later_req).await;
        let approved = create(s, request(3, 1, None)).await;
        s.review(review(&approved, "alice", Verdict::Approve, T0 + 1), T0 + 1)
            .await
            .unwrap();

        assert!(s.expire_due(soon.expires_at - 1).await.unwrap().is_empty());
        let expired = s.expire_due(soon.expires_at).await.unwrap();
        assert_eq!(expired.iter().map(|r| r.id).collect::<Vec<_>>(), [soon.id]);
        assert_eq!(expired[0].status, Status::Expired);
        assert_eq!(expired[0].decided_at, Some(soon.expires_at));
        assert!(
            s.expire_due(soon.expires_at).await.unwrap().is_empty(),
            "only once"
        );
        assert_eq!(
            s.get(later.id).await.unwrap().unwrap().status,
            Status::Pending
        );
        assert_eq!(
            s.get(approved.id).await.unwrap().unwrap().status,
            Status::Approved
        );

        // The same request asked again after expiry is a fresh pending request.
        let (fresh, created) = s.create_or_get_pending(request(1, 1, None)).await.unwrap();
        assert!(created);
        assert_ne!(fresh.id, soon.id);
    }

    pub async fn fallback_due_moves_current_groups_once(h: &mut Harness) {
        let s = h.store.as_ref();
        let fallback = Fallback {
            group: "finance-leads".into(),
            after: Duration::from_secs(1800),
        };
        let req = create(s, request(250, 1, Some(fallback.clone()))).await;
        let plain = create(s, request(251, 1, None)).await;
        assert_eq!(req.fallback_at, Some(T0 + 1800));
        assert_eq!(req.fallback.as_ref(), Some(&fallback));
        assert_eq!(plain.fallback_at, None);

        assert!(s.fallback_due(T0 + 1799).await.unwrap().is_empty());
        let moved = s.fallback_due(T0 + 1800).await.unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].id, req.id);
        assert_eq!(moved[0].current_groups, ["finance-leads"]);
        assert_eq!(moved[0].groups, ["finance-approvers"]);
        assert_eq!(moved[0].fell_back_at, Some(T0 + 1800));
        assert_eq!(moved[0].status, Status::Pending);
        assert!(
            s.fallback_due(T0 + 1900).await.unwrap().is_empty(),
            "only once"
        );

        let by_group = |g: &str| ListFilter {
            group: Some(g.into()),
            limit: 100,
            ..ListFilter::default()
        };
        let leads = s.list(by_group("finance-leads")).await.unwrap();
        assert_eq!(leads.iter().map(|r| r.id).collect::<Vec<_>>(), [req.id]);
        let approvers = s.list(by_group("finance-approvers")).await.unwrap();
        assert_eq!(
            approvers.iter().map(|r| r.id).collect::<Vec<_>>(),
            [plain.id]
        );
    }

    /// The gauges of `/metrics` (issue 15): unexpired pending requests by the group they
    /// wait on now (a fallen-back request counts for its fallback group), and active grants.
    pub async fn counts_pending_by_group_and_active_grants(h: &mut Harness) {
        let s = h.store.as_ref();
        assert_eq!(s.counts(T0).await.unwrap(), StoreCounts::default());
        let fallback = Fallback {
            group: "finance-leads".into(),
            after: Duration::from_secs(1800),
        };
        create(s, request(250, 1, Some(fallback))).await;
        create(s, request(251, 1, None)).await;
        let approved = create(s, request(252, 1, None)).await;
        let denied = create(s, request(253, 1, None)).await;
        s.review(
            review(&approved, "alice", Verdict::Approve, T0 + 10),
            T0 + 10,
        )
        .await
        .unwrap();
        s.review(review(&denied, "alice", Verdict::Deny, T0 + 10), T0 + 10)
            .await
            .unwrap();
        assert_eq!(
            s.counts(T0 + 20).await.unwrap(),
            StoreCounts {
                pending_by_group: vec![("finance-approvers".into(), 2)],
                active_grants: 1,
            }
        );
        s.fallback_due(T0 + 1800).await.unwrap();
        assert_eq!(
            s.counts(T0 + 1800).await.unwrap(),
            StoreCounts {
                pending_by_group: vec![
                    ("finance-approvers".into(), 1),
                    ("finance-leads".into(), 1)
                ],
                // The grant (600 s) has run out.
                active_grants: 0,
            }
        );
        // Past their expiry, pending requests count no more, swept or not.
        assert_eq!(
            s.counts(T0 + PENDING_TTL).await.unwrap(),
            StoreCounts::default()
        );
    }

    pub async fn a06_a12_active_grant_is_exact_and_time_bound(h: &mut Harness) {
        let s = h.store.as_ref();
        let req = create(s, request(250, 1, None)).await;
        let other = request(2500, 1, None).binding_hash();
        let grant = s
            .review(review(&req, "alice", Verdict::Approve, T0 + 10), T0 + 10)
            .await
            .unwrap()
            .grant
            .unwrap();

        assert_eq!(
            s.active_grant(&req.binding_hash, T0 + 10).await.unwrap(),
            Some(grant.clone())
        );
        assert_eq!(
            s.active_grant(&other, T0 + 10).await.unwrap(),
            None,
            "another amount"
        );
        let last = grant.expires_at - 1;
        assert!(
            s.active_grant(&req.binding_hash, last)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            s.active_grant(&req.binding_hash, grant.expires_at)
                .await
                .unwrap(),
            None
        );
        assert!(s.grants(true, grant.expires_at).await.unwrap().is_empty());
        assert_eq!(
            s.grants(true, last).await.unwrap(),
            std::slice::from_ref(&grant)
        );

        let revoked = s.revoke_grant(grant.id, T0 + 20).await.unwrap();
        assert_eq!(revoked.revoked_at, Some(T0 + 20));
        assert_eq!(
            s.active_grant(&req.binding_hash, T0 + 21).await.unwrap(),
            None
        );
        assert!(s.grants(true, T0 + 21).await.unwrap().is_empty());
        assert_eq!(
            s.grants(false, T0 + 21).await.unwrap(),
            std::slice::from_ref(&revoked)
        );
        let again = s.revoke_grant(grant.id, T0 + 30).await.unwrap();
        assert_eq!(
            again.revoked_at,
            Some(T0 + 20),
            "revoking twice keeps the first time"
        );
    }

    pub async fn get_grant_and_get_many_read_by_id(h: &mut Harness) {
        let s = h.store.as_ref();
        let first = create(s, request(250, 1, None)).await;
        let second = create(s, request(260, 1, None)).await;
        let grant = s
            .review(review(&first, "alice", Verdict::Approve, T0 + 1), T0 + 1)
            .await
            .unwrap()
            .grant
            .unwrap();
        assert_eq!(s.get_grant(grant.id).await.unwrap(), Some(grant.clone()));
        assert_eq!(s.get_grant(Uuid::new_v4()).await.unwrap(), None);
        let revoked = s.revoke_grant(grant.id, T0 + 2).await.unwrap();
        assert_eq!(
            s.get_grant(grant.id).await.unwrap(),
            Some(revoked),
            "a revoked grant is still found by id"
        );

        let mut got: Vec<Uuid> = s
            .get_many(&[second.id, Uuid::new_v4(), first.id, first.id])
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        got.sort_unstable();
        let mut want = vec![first.id, second.id];
        want.sort_unstable();
        assert_eq!(got, want, "each known id once, unknown ones left out");
        assert!(s.get_many(&[]).await.unwrap().is_empty());
        let one = s.get_many(&[second.id]).await.unwrap();
        assert_eq!(one, vec![s.get(second.id).await.unwrap().unwrap()]);
    }

    pub async fn cancel_pending_request(h: &mut Harness) {
        let s = h.store.as_ref();
        let req = create(s, request(250, 1, None)).await;
        let cancelled = s.cancel(req.id, T0 + 5).await.unwrap();
        assert_eq!(cancelled.status, Status::Cancelled);
        assert_eq!(cancelled.decided_at, Some(T0 + 5));
        assert_eq!(cancelled.version, req.version + 1);
        assert_eq!(code(s.cancel(req.id, T0 + 6).await), "not_pending");
        let out = s
            .review(review(&req, "alice", Verdict::Approve, T0 + 7), T0 + 7)
            .await;
        assert_eq!(code(out), "not_pending");
        assert!(s.expire_due(req.expires_at).await.unwrap().is_empty());

        let (again, created) = s
            .create_or_get_pending(request(250, 1, None))
            .await
            .unwrap();
        assert!(created, "a cancelled request does not block asking again");
        assert_ne!(again.id, req.id);
    }

    pub async fn list_filters_and_paginates(h: &mut Harness) {
        let s = h.store.as_ref();
        let mut ids = Vec::new();
        for amount in 1..=3 {
            ids.push(create(s, request(amount, 1, None)).await.id);
        }
        s.cancel(ids[1], T0 + 1).await.unwrap();

        let all = |after, limit| ListFilter {
            after,
            limit,
            ..ListFilter::default()
        };
        let page = s.list(all(None, 2)).await.unwrap();
        assert_eq!(page.iter().map(|r| r.id).collect::<Vec<_>>(), &ids[..2]);
        let next = s.list(all(Some(ids[1]), 2)).await.unwrap();
        assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), &ids[2..]);
        assert!(
            s.list(all(Some(Uuid::new_v4()), 2))
                .await
                .unwrap()
                .is_empty()
        );

        let pending = with_status(s, Status::Pending).await;
        assert_eq!(
            pending.iter().map(|r| r.id).collect::<Vec<_>>(),
            [ids[0], ids[2]]
        );
        let cancelled = with_status(s, Status::Cancelled).await;
        assert_eq!(cancelled.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[1]]);
    }

    pub async fn r03c_data_survives_reopening(h: &mut Harness) {
        let mut new = request(
            250,
            2,
            Some(Fallback {
                group: "finance-leads".into(),
                after: Duration::from_secs(60),
            }),
        );
        new.action_properties = Some(match json!({"method": "POST", "n": [1, 2.5, null]}) {
            Value::Object(m) => m,
            _ => unreachable!(),
        });
        let req = create(h.store.as_ref(), new.clone()).await;
        let approved = create(h.store.as_ref(), request(99, 1, None)).await;
        h.store
            .review(review(&req, "alice", Verdict::Approve, T0 + 1), T0 + 1)
            .await
            .unwrap();
        let out = h
            .store
            .review(review(&approved, "bob", Verdict::Approve, T0 + 2), T0 + 2)
            .await
            .unwrap();
        let req = h.store.get(req.id).await.unwrap().unwrap();
        let reviews = h.store.reviews(req.id).await.unwrap();
        let grants = h.store.grants(false, T0 + 2).await.unwrap();
        assert_eq!(grants, [out.grant.unwrap()]);

        h.reopen().await;
        let s = h.store.as_ref();
        assert_eq!(
            s.get(req.id).await.unwrap(),
            Some(req.clone()),
            "every field round-trips"
        );
        assert_eq!(
            s.get(approved.id).await.unwrap().unwrap().status,
            Status::Approved
        );
        assert_eq!(s.reviews(req.id).await.unwrap(), reviews);
        assert_eq!(s.grants(false, T0 + 2).await.unwrap(), grants);
        let (same, created) = s.create_or_get_pending(new).await.unwrap();
        assert!(
            !created,
            "the pending request still dedupes after reopening"
        );
        assert_eq!(same.id, req.id);
        assert_eq!(
            same.policy_text["payments-approval"], POLICY_TEXT,
            "the policy text round-trips byte for byte"
        );
    }

    /// SECURITY A-16: at most `max_pending` unexpired pending requests per principal; a
    /// repeat of a pending one is returned, not refused; other principals are not affected; a
    /// decided or expired request frees its place.
    pub async fn a16_pending_limit_per_principal(h: &mut Harness) {
        let s = h.store.as_ref();
        let limits = EscalationLimits {
            max_pending: 2,
            max_per_hour: 100,
        };
        let first = create(s, limited(101, T0, limits)).await;
        create(s, limited(102, T0 + 1, limits)).await;
        let refused = s.create_or_get_pending(limited(103, T0 + 2, limits)).await;
        assert_eq!(rate_limited(refused), (RateLimit::Pending, 2));
        let refused = s.create_or_get_pending(limited(103, T0 + 2, limits)).await;
        assert_eq!(
            code(refused),
            "escalation_rate_limited",
            "a refused request was not stored"
        );
        let (again, created) = s
            .create_or_get_pending(limited(101, T0 + 3, limits))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(again.id, first.id, "a repeat is the existing request");
        // Another principal (same id, another issuer) has its own count.
        let mut other = limited(103, T0 + 3, limits);
        other.principal.issuer = "other-issuer".into();
        create(s, other).await;
        // Denying one frees a place.
        s.review(review(&first, "alice", Verdict::Deny, T0 + 4), T0 + 4)
            .await
            .unwrap();
        create(s, limited(103, T0 + 5, limits)).await;
        let refused = s.create_or_get_pending(limited(104, T0 + 6, limits)).await;
        assert_eq!(rate_limited(refused), (RateLimit::Pending, 2));
        // Pending but past their expiry: they count no more.
        let later = T0 + 5 + PENDING_TTL;
        create(s, limited(104, later, limits)).await;
        let pending = with_status(s, Status::Pending).await;
        assert_eq!(pending.len(), 4, "{pending:?}");
    }

    /// SECURITY A-16: at most `max_per_hour` new requests per principal in any hour, whatever
    /// became of them (cancelling does not give the place back).
    pub async fn a16_hourly_limit_per_principal(h: &mut Harness) {
        let s = h.store.as_ref();
        let limits = EscalationLimits {
            max_pending: 100,
            max_per_hour: 3,
        };
        for (i, amount) in [201, 202, 203].into_iter().enumerate() {
            let req = create(s, limited(amount, T0 + 10 * i as i64, limits)).await;
            s.cancel(req.id, T0 + 10 * i as i64 + 1).await.unwrap();
        }
        let refused = s.create_or_get_pending(limited(204, T0 + 30, limits)).await;
        assert_eq!(rate_limited(refused), (RateLimit::PerHour, 3));
        let refused = s
            .create_or_get_pending(limited(204, T0 + 3599, limits))
            .await;
        assert_eq!(
            rate_limited(refused),
            (RateLimit::PerHour, 3),
            "the first request still counts a second before the hour is over"
        );
        // An hour after the first, it has left the window.
        create(s, limited(204, T0 + 3600, limits)).await;
        let refused = s
            .create_or_get_pending(limited(205, T0 + 3601, limits))
            .await;
        assert_eq!(rate_limited(refused), (RateLimit::PerHour, 3));
    }

    /// SECURITY A-16: 20 different escalations of one principal at once make exactly
    /// `max_pending` requests; the count and the insert are one transaction. Several rounds,
    /// each for another principal, so later rounds run on a pool of open connections.
    pub async fn a16_concurrent_creates_respect_the_pending_limit(h: &mut Harness) {
        let limits = EscalationLimits {
            max_pending: 5,
            max_per_hour: 30,
        };
        for round in 0..4 {
            // All start together, so their transactions overlap as much as they can.
            let start = Arc::new(tokio::sync::Barrier::new(20));
            let tasks: Vec<_> = (0..20)
                .map(|i| {
                    let store = h.store.clone();
                    let start = start.clone();
                    tokio::spawn(async move {
                        let mut new = limited(300 + i, T0, limits);
                        new.principal.issuer = format!("issuer-{round}");
                        start.wait().await;
                        store.create_or_get_pending(new).await
                    })
                })
                .collect();
            let (mut created, mut limited_n) = (0, 0);
            for t in tasks {
                match t.await.unwrap() {
                    Ok((_, true)) => created += 1,
                    Err(StoreError::RateLimited { .. }) => limited_n += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!((created, limited_n), (5, 15), "round {round}");
        }
        let pending = with_status(h.store.as_ref(), Status::Pending).await;
        assert_eq!(pending.len(), 20);
    }
}

/// SECURITY R-03c: the approval database commits with `synchronous=FULL` (2) in WAL mode, with
/// foreign keys enforced, on every pooled connection.
#[tokio::test]
async fn sqlite_r03c_synchronous_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested-missing-file.db");
    let store = mandate::store::SqliteStore::connect(path.to_str().unwrap())
        .await
        .unwrap();
    assert!(path.exists(), "a plain path is created when missing");
    for _ in 0..3 {
        let mut conn = store.pool().acquire().await.unwrap();
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(sync, 2, "synchronous must be FULL");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(fk, 1);
    }
    store.close().await;
}

/// PostgreSQL announces grant changes to every sidecar's cache: the transaction that creates a
/// grant, and the one that revokes it, each send its binding hash on `mandate_grants`
/// (SECURITY A-12: a revocation must reach every sidecar).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set MANDATE_TEST_POSTGRES_URL (scripts/test does when one answers on 127.0.0.1:5432)"]
async fn a12_postgres_announces_grant_creation_and_revocation() {
    let h = Harness::postgres().await;
    let mut listener = sqlx::postgres::PgListener::connect(&h.url).await.unwrap();
    listener
        .listen(mandate::store::GRANT_CHANNEL)
        .await
        .unwrap();
    let s = h.store.as_ref();
    // An amount no other test uses: the channel is shared by every schema of the database.
    let req = create(s, request(987_654, 1, None)).await;
    // The approval that creates the grant is announced once it commits ...
    let grant = s
        .review(review(&req, "alice", Verdict::Approve, T0 + 1), T0 + 1)
        .await
        .unwrap()
        .grant
        .unwrap();
    announced(&mut listener, &req.binding_hash).await;
    // ... and so is its revocation.
    s.revoke_grant(grant.id, T0 + 2).await.unwrap();
    announced(&mut listener, &req.binding_hash).await;
    drop(listener);
    h.finish().await;
}

/// Wait (at most 5 s) for a notification carrying `hash`.
async fn announced(listener: &mut sqlx::postgres::PgListener, hash: &str) {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if listener.recv().await.unwrap().payload() == hash {
                return;
            }
        }
    })
    .await
    .expect("notification within 5 s");
}
