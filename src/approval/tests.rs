//! Unit tests of the approval core: canonical JSON and the binding hash (property tests,
//! SECURITY A-06), and the review state machine every backend shares.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::*;

fn principal() -> PrincipalSnapshot {
    PrincipalSnapshot {
        kind: "Agent".into(),
        id: "agent-1".into(),
        issuer: "dev".into(),
        attributes: Map::new(),
        owner: Some("bob".into()),
        actors: vec![],
    }
}

fn resource() -> ResourceSnapshot {
    ResourceSnapshot {
        kind: "Account".into(),
        id: "acct-1".into(),
        properties: Map::new(),
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn hash_of(context: &Map<String, Value>) -> String {
    binding_hash(
        &principal(),
        "payments:transfer",
        None,
        &resource(),
        context,
    )
}

#[test]
fn canonical_json_sorts_keys_and_drops_whitespace() {
    let v: Value = serde_json::from_str(r#"{ "b": [1, {"z": 1, "a": null}], "a": "x\"y" }"#)
        .unwrap_or(Value::Null);
    assert_eq!(
        canonical_json(&v),
        r#"{"a":"x\"y","b":[1,{"a":null,"z":1}]}"#
    );
}

#[test]
fn a06_a10_every_part_of_the_request_and_the_whole_identity_is_bound() {
    let ctx = obj(json!({"amount": 250}));
    let base = hash_of(&ctx);
    assert_eq!(base.len(), 64);
    assert_ne!(base, hash_of(&obj(json!({"amount": 2500}))));
    let mut p = principal();
    p.id = "agent-2".into();
    assert_ne!(
        base,
        binding_hash(&p, "payments:transfer", None, &resource(), &ctx)
    );
    let mut p = principal();
    p.issuer = "other".into();
    assert_ne!(
        base,
        binding_hash(&p, "payments:transfer", None, &resource(), &ctx)
    );
    assert_ne!(
        base,
        binding_hash(&principal(), "payments:refund", None, &resource(), &ctx)
    );
    let mut r = resource();
    r.id = "acct-2".into();
    assert_ne!(
        base,
        binding_hash(&principal(), "payments:transfer", None, &r, &ctx)
    );
    // The whole requesting identity (SECURITY A-01, A-03, A-10): owner, delegation chain,
    // attributes.
    let mut p = principal();
    p.owner = Some("alice".into());
    assert_ne!(
        base,
        binding_hash(&p, "payments:transfer", None, &resource(), &ctx)
    );
    let mut p = principal();
    p.owner = None;
    assert_ne!(
        base,
        binding_hash(&p, "payments:transfer", None, &resource(), &ctx)
    );
    let mut p = principal();
    p.actors = vec!["alice".into()];
    let acting = binding_hash(&p, "payments:transfer", None, &resource(), &ctx);
    assert_ne!(base, acting);
    p.actors = vec!["alice".into(), "carol".into()];
    assert_ne!(
        acting,
        binding_hash(&p, "payments:transfer", None, &resource(), &ctx)
    );
    let mut p = principal();
    p.attributes = obj(json!({"team": "payments"}));
    assert_ne!(
        base,
        binding_hash(&p, "payments:transfer", None, &resource(), &ctx)
    );
    let props = obj(json!({"k": 1}));
    assert_ne!(
        base,
        binding_hash(
            &principal(),
            "payments:transfer",
            Some(&props),
            &resource(),
            &ctx
        )
    );
}

#[test]
fn a06_a08_a_wider_grant_scope_drops_only_what_it_names() {
    let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let hash = |scope,
                p: &PrincipalSnapshot,
                action: &str,
                r: &ResourceSnapshot,
                amount,
                policies: &[&str]| {
        scoped_binding_hash(
            scope,
            p,
            action,
            None,
            r,
            &obj(json!({"amount": amount})),
            &ids(policies),
        )
    };
    let (p, r) = (principal(), resource());
    let (call, tool, res) = (GrantScope::Call, GrantScope::Tool, GrantScope::Resource);
    // `call` is the binding hash itself: grants made before scopes existed still match.
    assert_eq!(
        hash(call, &p, "payments:transfer", &r, 250, &["x"]),
        hash_of(&obj(json!({"amount": 250})))
    );
    let t = hash(tool, &p, "payments:transfer", &r, 250, &["x", "y"]);
    // Tool: any context, the same policies in any order...
    assert_eq!(
        t,
        hash(tool, &p, "payments:transfer", &r, 9, &["y", "x", "x"])
    );
    // ...and nothing else: another action, resource, principal or set of policies.
    assert_ne!(t, hash(tool, &p, "payments:refund", &r, 250, &["x", "y"]));
    let mut other = resource();
    other.id = "acct-2".into();
    assert_ne!(
        t,
        hash(tool, &p, "payments:transfer", &other, 250, &["x", "y"])
    );
    let mut q = principal();
    q.actors = vec!["alice".into()];
    assert_ne!(t, hash(tool, &q, "payments:transfer", &r, 250, &["x", "y"]));
    assert_ne!(t, hash(tool, &p, "payments:transfer", &r, 250, &["x"]));
    // Resource: any action too, still this resource, principal and policies.
    let rs = hash(res, &p, "payments:transfer", &r, 250, &["x"]);
    assert_eq!(rs, hash(res, &p, "payments:refund", &r, 1, &["x"]));
    assert_ne!(rs, hash(res, &p, "payments:transfer", &other, 250, &["x"]));
    assert_ne!(rs, hash(res, &q, "payments:transfer", &r, 250, &["x"]));
    // No scope's hash is another's, for the very same request.
    let all = [
        hash(call, &p, "payments:transfer", &r, 250, &["x"]),
        hash(tool, &p, "payments:transfer", &r, 250, &["x"]),
        rs,
    ];
    assert!(
        all[0] != all[1] && all[1] != all[2] && all[0] != all[2],
        "{all:?}"
    );
}

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[a-z\"\\\\ é]{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-d]{1,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `v` printed with its object keys in reverse order and with whitespace everywhere.
fn reordered_pretty(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            keys.reverse();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "\n  {} :\t{}",
                        serde_json::to_string(k).unwrap_or_default(),
                        reordered_pretty(&m[k])
                    )
                })
                .collect();
            format!("{{ {} }}", parts.join(" ,"))
        }
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(reordered_pretty).collect();
            format!("[ {} ]", parts.join(" , "))
        }
        other => other.to_string(),
    }
}

/// Every path to a scalar in `v`.
fn leaves(v: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                path.push(k.clone());
                leaves(child, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                path.push(i.to_string());
                leaves(child, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

fn leaf_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut cur = v;
    for p in path {
        cur = match cur {
            Value::Object(m) => m.get_mut(p)?,
            Value::Array(a) => a.get_mut(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A different scalar of the same kind (or a different kind).
fn mutate(v: &Value) -> Value {
    match v {
        Value::Null => json!(false),
        Value::Bool(b) => json!(!b),
        Value::Number(n) => json!(n.as_i64().map_or(0, |i| i.wrapping_add(1))),
        Value::String(s) => json!(format!("{s}x")),
        other => other.clone(),
    }
}

proptest! {
    #[test]
    fn a06_key_order_and_whitespace_never_change_the_hash(ctx in prop::collection::btree_map("[a-d]{1,2}", json_value(), 0..5)) {
        let ctx: Map<String, Value> = ctx.into_iter().collect();
        let reparsed: Value = serde_json::from_str(&reordered_pretty(&Value::Object(ctx.clone()))).unwrap();
        prop_assert_eq!(canonical_json(&reparsed), canonical_json(&Value::Object(ctx.clone())));
        prop_assert_eq!(hash_of(&obj(reparsed)), hash_of(&ctx));
    }

    #[test]
    fn a06_any_single_value_change_changes_the_hash(ctx in prop::collection::btree_map("[a-d]{1,2}", json_value(), 1..5), pick in any::<prop::sample::Index>()) {
        let original = Value::Object(ctx.into_iter().collect());
        let mut paths = Vec::new();
        leaves(&original, &mut Vec::new(), &mut paths);
        prop_assume!(!paths.is_empty());
        let path = pick.get(&paths);
        let mut changed = original.clone();
        if let Some(leaf) = leaf_mut(&mut changed, path) {
            *leaf = mutate(leaf);
        }
        prop_assert_ne!(hash_of(&obj(changed)), hash_of(&obj(original)));
    }
}

fn pending(quorum: u32) -> ApprovalRequest {
    NewRequest {
        principal: principal(),
        action: "payments:transfer".into(),
        action_properties: None,
        resource: resource(),
        context: obj(json!({"amount": 250})),
        policy_version: "1+abc".into(),
        policy_ids: vec!["payments-approval".into()],
        policy_text: Default::default(),
        groups: vec!["finance-approvers".into()],
        quorum,
        evidence: vec![],
        grant_ttl: Duration::from_secs(3600),
        grant_scope: Default::default(),
        fallback: None,
        created_at: 1000,
        expires_at: 2000,
        limits: Default::default(),
    }
    .into_pending()
}

fn review(req: &ApprovalRequest, who: &str, verdict: Verdict) -> Review {
    Review {
        request_id: req.id,
        approver_id: who.into(),
        approver_issuer: "dev".into(),
        verdict,
        rationale: "ok".into(),
        evidence: Map::new(),
        at: 1500,
    }
}

#[test]
fn a13_quorum_counts_distinct_approvers_only() {
    let req = pending(2);
    let first = review(&req, "alice", Verdict::Approve);
    let effect = apply_review(&req, &[], &first, 1500);
    assert_eq!(effect.map(|e| e.status), Ok(Status::Pending));
    let again = apply_review(&req, std::slice::from_ref(&first), &first, 1501);
    assert_eq!(again.map_err(|e| e.code()), Err("already_reviewed"));
    let bob = review(&req, "bob", Verdict::Approve);
    let effect = apply_review(&req, &[first], &bob, 1502);
    let effect = effect.unwrap();
    assert_eq!(effect.status, Status::Approved);
    let grant = effect.grant.unwrap();
    assert_eq!(grant.expires_at, 1502 + 3600);
    assert_eq!(grant.binding_hash, req.binding_hash);
}

#[test]
fn a14_deny_wins() {
    let req = pending(2);
    let first = review(&req, "alice", Verdict::Approve);
    let deny = review(&req, "bob", Verdict::Deny);
    let effect = apply_review(&req, &[first], &deny, 1500).unwrap();
    assert_eq!(effect.status, Status::Denied);
    assert!(effect.grant.is_none());
}

#[test]
fn a11_no_review_at_or_after_expiry() {
    let req = pending(1);
    let r = review(&req, "alice", Verdict::Approve);
    assert_eq!(
        apply_review(&req, &[], &r, 2000)
            .map_err(|e| e.code())
            .err(),
        Some("request_expired")
    );
    let mut expired = req.clone();
    expired.status = Status::Expired;
    assert_eq!(
        apply_review(&expired, &[], &r, 1500)
            .map_err(|e| e.code())
            .err(),
        Some("request_expired")
    );
    let mut cancelled = req;
    cancelled.status = Status::Cancelled;
    assert_eq!(
        apply_review(&cancelled, &[], &r, 1500)
            .map_err(|e| e.code())
            .err(),
        Some("not_pending")
    );
}

#[test]
fn a22_request_ids_are_random_v4() {
    let a = pending(1);
    let b = pending(1);
    assert_eq!(a.id.get_version_num(), 4);
    assert_ne!(a.id, b.id);
    assert_eq!(a.binding_hash, b.binding_hash);
    assert_ne!(a.id, Uuid::nil());
}

#[test]
fn a16_limits_refuse_at_the_limit_not_before() {
    let limits = EscalationLimits {
        max_pending: 2,
        max_per_hour: 3,
    };
    let p = principal();
    assert_eq!(limits.check(&p, 1, 2), Ok(()));
    let refused = limits.check(&p, 2, 0).unwrap_err();
    assert_eq!(refused.code(), "escalation_rate_limited");
    assert_eq!(
        refused.to_string(),
        "principal `agent-1` is at its limit of 2 pending approval requests (store.max_pending_per_principal)"
    );
    assert_eq!(
        limits.check(&p, 0, 3),
        Err(StoreError::RateLimited {
            principal: "agent-1".into(),
            limit: RateLimit::PerHour,
            max: 3,
        })
    );
    assert_eq!(
        EscalationLimits::default(),
        EscalationLimits {
            max_pending: 5,
            max_per_hour: 30
        }
    );
}
