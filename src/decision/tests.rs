//! Engine tests: outcomes, fail-closed cases, and a reference-model property test.

use std::path::Path;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::clock::ManualClock;
use crate::vocabulary::{Fallback, Principal, Resource};

const SCHEMA: &str = r#"
    type Mandate = { now: Long, "action"?: { dry_run?: Bool } };
    entity Agent = { owner?: String };
    entity Account = { frozen?: Bool };
    action "payments:transfer" appliesTo {
      principal: [Agent], resource: [Account], context: { amount: Long, mandate: Mandate }
    };
    action "crm:read" appliesTo {
      principal: [Agent], resource: [Account], context: { mandate: Mandate }
    };
"#;

/// 2026-06-01T00:00:00Z
const JUNE_2026: i64 = 1_780_272_000;

fn bundle(policies: &str) -> Arc<Bundle> {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), policies);
    Arc::new(Bundle::load(dir.path()).unwrap_or_else(|e| panic!("{e}")))
}

fn write_bundle(dir: &Path, policies: &str) {
    std::fs::write(dir.join("schema.cedarschema"), SCHEMA).unwrap();
    std::fs::write(
        dir.join("manifest.toml"),
        "name = \"t\"\nrevision = \"1\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("p.cedar"), policies).unwrap();
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn request(action: &str, context: Value) -> CheckRequest {
    let principal =
        Principal::from_parts("Agent", "agent-1", "test", obj(json!({"owner": "bob"}))).unwrap();
    CheckRequest {
        principal: Arc::new(principal),
        action: action.to_owned(),
        action_properties: None,
        resource: Resource {
            kind: "Account".into(),
            id: "acct-1".into(),
            properties: Map::new(),
        },
        context: obj(context),
    }
}

fn transfer(amount: i64) -> CheckRequest {
    request("payments:transfer", json!({ "amount": amount }))
}

const PAYMENTS: &str = r#"
    @id("small") permit (principal, action == Action::"payments:transfer", resource)
    when { context.amount <= 100 };
    @id("medium") @approval("finance") @evidence("ticket") @grant_ttl("1h")
    @fallback("leads") @fallback_after("30m")
    permit (principal, action == Action::"payments:transfer", resource)
    when { context.amount > 100 && context.amount <= 10000 };
    @id("large") forbid (principal, action == Action::"payments:transfer", resource)
    when { context.amount > 10000 };
"#;

fn engine(policies: &str) -> Engine {
    Engine::new(bundle(policies), ManualClock::new(JUNE_2026))
}

fn codes(d: &Decision) -> Vec<&'static str> {
    d.reasons.iter().map(|r| r.code).collect()
}

#[test]
fn autonomous_permit_allows() {
    let d = engine(PAYMENTS).decide(&transfer(100));
    assert_eq!(d.outcome, Outcome::Allow);
    assert_eq!(d.policy_ids, vec!["small"]);
    assert_eq!(codes(&d), vec!["permitted"]);
    assert!(d.approval.is_none());
    assert!(d.policy_version.starts_with("1+"));
}

#[test]
fn approval_permit_escalates_with_its_requirement() {
    let d = engine(PAYMENTS).decide(&transfer(101));
    assert_eq!(d.outcome, Outcome::Escalate);
    assert_eq!(codes(&d), vec!["approval_required"]);
    let a = d.approval.unwrap();
    assert_eq!(a.policy_id, "medium");
    assert_eq!(a.groups, vec!["finance"]);
    assert_eq!(a.quorum, 1);
    assert_eq!(a.evidence, vec!["ticket"]);
    assert_eq!(a.grant_ttl, Duration::from_secs(3600));
    assert_eq!(
        a.fallback,
        Some(Fallback {
            group: "leads".into(),
            after: Duration::from_secs(1800)
        })
    );
}

#[test]
fn forbid_denies() {
    let d = engine(PAYMENTS).decide(&transfer(10_001));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.policy_ids, vec!["large"]);
    assert_eq!(codes(&d), vec!["forbidden"]);
}

#[test]
fn forbid_overrides_permit_and_approval() {
    let e = engine(
        r#"
        @id("p") permit (principal, action, resource);
        @id("a") @approval("x") permit (principal, action, resource);
        @id("f") forbid (principal, action == Action::"payments:transfer", resource)
        when { context.amount > 5 };
        "#,
    );
    assert_eq!(e.decide(&transfer(5)).outcome, Outcome::Allow);
    let d = e.decide(&transfer(6));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.policy_ids, vec!["f"]);
}

#[test]
fn autonomous_permit_wins_over_approval_permit() {
    let e = engine(
        r#"
        @id("a") @approval("x") permit (principal, action, resource);
        @id("p") permit (principal, action, resource);
        "#,
    );
    let d = e.decide(&transfer(1));
    assert_eq!(d.outcome, Outcome::Allow);
    assert_eq!(d.policy_ids, vec!["p"]);
}

#[test]
fn nothing_matching_is_default_deny() {
    let d = engine(PAYMENTS).decide(&request("crm:read", json!({})));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(codes(&d), vec!["no_matching_policy"]);
    assert!(d.policy_ids.is_empty());
}

#[test]
fn strictest_approval_wins_ties_to_smallest_id() {
    let e = engine(
        r#"
        @id("c") @approval("c") @quorum("2") permit (principal, action, resource);
        @id("b") @approval("b") @quorum("2") permit (principal, action, resource);
        @id("a") @approval("a") permit (principal, action, resource);
        "#,
    );
    let d = e.decide(&transfer(1));
    assert_eq!(d.outcome, Outcome::Escalate);
    assert_eq!(d.policy_ids, vec!["a", "b", "c"]);
    let a = d.approval.unwrap();
    assert_eq!((a.policy_id.as_str(), a.quorum), ("b", 2));
}

#[test]
fn recertify_date_degrades_to_owner_approval() {
    let clock = ManualClock::new(JUNE_2026);
    let e = Engine::new(
        bundle(
            r#"
            @id("reads") @owner("crm-team") @recertify_by("2026-06-30")
            permit (principal, action == Action::"crm:read", resource);
            "#,
        ),
        clock.clone(),
    );
    let req = request("crm:read", json!({}));
    assert_eq!(e.decide(&req).outcome, Outcome::Allow);
    // Last second of the named day: still allowed.
    clock.set(1_782_863_999);
    assert_eq!(e.decide(&req).outcome, Outcome::Allow);
    clock.set(1_782_864_000);
    let d = e.decide(&req);
    assert_eq!(d.outcome, Outcome::Escalate);
    assert_eq!(codes(&d), vec!["recertification_due"]);
    let a = d.approval.unwrap();
    assert_eq!(a.groups, vec!["crm-team"]);
    assert_eq!(a.quorum, 1);
    assert_eq!(a.grant_ttl, crate::policy::annotations::DEFAULT_GRANT_TTL);
    assert_eq!(a.recertify_by.as_deref(), Some("2026-06-30"));
}

#[test]
fn unknown_action_is_denied() {
    let d = engine(PAYMENTS).decide(&request("payments:refund", json!({})));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(codes(&d), vec!["unknown_action"]);
    assert!(d.reasons[0].message.contains("`payments:refund`"));
}

#[test]
fn policy_error_is_denied_naming_the_policy() {
    // An overflow is an evaluation error; the policy that erred may have been the forbid
    // that mattered, so the answer is deny.
    const OVERFLOW: &str = r#"@id("overflow") permit (principal, action == Action::"payments:transfer", resource)
        when { context.amount + 1 > 0 };"#;
    let d = engine(OVERFLOW).decide(&transfer(i64::MAX));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(codes(&d), vec!["policy_error"], "{d:?}");
    assert_eq!(d.policy_ids, vec!["overflow"]);
    assert!(d.reasons[0].message.contains("policy `overflow`"), "{d:?}");
    assert!(d.reasons[0].message.contains("overflow"), "{d:?}");
}

#[test]
fn a_context_that_does_not_fit_the_declared_types_is_refused_naming_the_field() {
    // Before any policy reads it: no `policy_error`, no policy id, the field named.
    for (context, message) in [
        (json!({}), "`context.amount`: is required (Long)"),
        (
            json!({"amount": null}),
            "`context.amount`: is required (Long)",
        ),
        (
            json!({"amount": "5000"}),
            r#"`context.amount`: expected Long, got the string "5000""#,
        ),
        (
            json!({"amount": true}),
            "`context.amount`: expected Long, got the boolean true",
        ),
    ] {
        let d = engine(PAYMENTS).decide(&request("payments:transfer", context));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(codes(&d), vec!["invalid_request"], "{d:?}");
        assert_eq!(d.reasons[0].message, message);
        assert!(d.policy_ids.is_empty(), "{d:?}");
    }
    // Undeclared fields are not checked (no policy can read them).
    let d = engine(PAYMENTS).decide(&request(
        "payments:transfer",
        json!({"amount": 50, "note": [1, "x"]}),
    ));
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
}

#[test]
fn float_in_context_is_denied_naming_the_field() {
    let d = engine(PAYMENTS).decide(&request("payments:transfer", json!({"amount": 50.5})));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(codes(&d), vec!["invalid_request"]);
    assert!(d.reasons[0].message.contains("`context.amount`"), "{d:?}");
}

#[test]
fn reserved_context_key_is_refused() {
    let d = engine(PAYMENTS).decide(&request(
        "payments:transfer",
        json!({"amount": 1, "mandate": {"now": 0}}),
    ));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(codes(&d), vec!["invalid_request"]);
}

#[test]
fn mandate_context_carries_now_and_action_properties() {
    let e = engine(
        r#"
        @id("dry") permit (principal, action == Action::"crm:read", resource)
        when { context.mandate has "action" && context.mandate["action"] has dry_run &&
               context.mandate["action"].dry_run };
        @id("late") forbid (principal, action == Action::"crm:read", resource)
        when { context.mandate.now >= 1780272001 };
        "#,
    );
    let mut req = request("crm:read", json!({}));
    assert_eq!(e.decide(&req).outcome, Outcome::Deny);
    req.action_properties = Some(obj(json!({"dry_run": true})));
    assert_eq!(e.decide(&req).outcome, Outcome::Allow);
    req.action_properties = Some(obj(json!({"dry_run": 1.5})));
    let d = e.decide(&req);
    assert_eq!(codes(&d), vec!["invalid_request"]);
    assert!(
        d.reasons[0].message.contains("`action.properties.dry_run`"),
        "{d:?}"
    );
}

#[test]
fn resource_properties_and_bundle_entities() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(
        dir.path(),
        r#"@id("open") permit (principal, action == Action::"crm:read", resource)
           when { !(resource has frozen && resource.frozen) };"#,
    );
    std::fs::write(
        dir.path().join("entities.json"),
        r#"[{"uid": {"type": "Account", "id": "acct-1"}, "attrs": {"frozen": true}, "parents": []}]"#,
    )
    .unwrap();
    let e = Engine::new(
        Arc::new(Bundle::load(dir.path()).unwrap()),
        ManualClock::new(JUNE_2026),
    );
    let mut req = request("crm:read", json!({}));
    // Known resource, no properties: the bundle's data (frozen) holds.
    assert_eq!(e.decide(&req).outcome, Outcome::Deny);
    // Properties given: they win.
    req.resource.properties = obj(json!({"frozen": false}));
    assert_eq!(e.decide(&req).outcome, Outcome::Allow);
    // Unknown resource: no attributes.
    req.resource = Resource {
        kind: "Account".into(),
        id: "acct-2".into(),
        properties: Map::new(),
    };
    assert_eq!(e.decide(&req).outcome, Outcome::Allow);
}

#[test]
fn swap_changes_the_version_of_later_decisions() {
    let e = engine(PAYMENTS);
    let v1 = e.decide(&transfer(1)).policy_version;
    let next = bundle(&format!("{PAYMENTS}\n// edited\n"));
    e.swap(Arc::clone(&next));
    let d = e.decide(&transfer(1));
    assert_ne!(d.policy_version, v1);
    assert_eq!(d.policy_version, next.version());
    assert_eq!(e.bundle().version(), next.version());
}

#[test]
fn decision_ids_are_unique() {
    let e = engine(PAYMENTS);
    assert_ne!(e.decide(&transfer(1)).id, e.decide(&transfer(1)).id);
}

#[test]
fn cached_decision_is_a_new_decision_with_the_same_verdict() {
    let cache = DecisionCache::new(16);
    let d = engine(PAYMENTS).decide(&transfer(250));
    let key = CacheKey::new().part(b"token").part(b"body").finish();
    assert!(cache.get(&key, 100).is_none());
    cache.insert(key, 100, transfer(250), d.clone());
    let hit = cache.get(&key, 100).unwrap().fresh();
    assert_ne!(hit.id, d.id);
    assert_eq!(
        (hit.outcome, &hit.policy_ids, &hit.approval),
        (d.outcome, &d.policy_ids, &d.approval)
    );
}

#[test]
fn r04c_cached_decisions_live_only_within_their_second_and_are_bounded() {
    let cache = DecisionCache::new(2);
    let d = engine(PAYMENTS).decide(&transfer(1));
    let key = |i: u8| CacheKey::new().part(&[i]).finish();
    cache.insert(key(1), 100, transfer(1), d.clone());
    assert!(cache.get(&key(1), 100).is_some());
    // The next second sees nothing of the previous one.
    assert!(cache.get(&key(1), 101).is_none());
    // A late insert for an older second does not replace the newer generation.
    cache.insert(key(2), 101, transfer(1), d.clone());
    cache.insert(key(3), 100, transfer(1), d.clone());
    assert!(cache.get(&key(3), 100).is_none());
    assert_eq!(cache.len(), 1);
    // Full: nothing more is taken until the next second.
    cache.insert(key(4), 101, transfer(1), d.clone());
    cache.insert(key(5), 101, transfer(1), d.clone());
    assert_eq!(cache.len(), 2);
    assert!(cache.get(&key(5), 101).is_none());
    cache.insert(key(5), 102, transfer(1), d);
    assert_eq!(cache.len(), 1);
}

proptest::proptest! {
    /// SECURITY R-04c: two checks that differ in any one input never share a cache entry;
    /// length prefixes keep shifted boundaries apart too.
    #[test]
    fn r04c_cache_keys_differ_when_any_input_differs(
        parts in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..8), 4),
        which in 0usize..4,
        flip in proptest::num::u8::ANY,
    ) {
        let key = |ps: &[Vec<u8>]| ps.iter().fold(CacheKey::new(), |k, p| k.part(p)).finish();
        let mut changed = parts.clone();
        changed[which].push(flip);
        proptest::prop_assert_ne!(key(&parts), key(&changed));
        // Moving a byte across a boundary changes the key as well.
        if !parts[0].is_empty() {
            let mut shifted = parts.clone();
            let b = shifted[0].pop().unwrap();
            shifted[1].insert(0, b);
            proptest::prop_assert_ne!(key(&parts), key(&shifted));
        }
    }
}

#[test]
fn resource_properties_cannot_rewrite_the_principal() {
    let e = engine(PAYMENTS);
    let mut req = transfer(50);
    req.resource.kind = "Agent".into();
    req.resource.id = req.principal.id.clone();
    req.resource.properties = obj(json!({"groups": ["admins"]}));
    let d = e.decide(&req);
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(codes(&d), vec!["invalid_request"]);
}

#[test]
fn engine_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
}

#[test]
fn namespaced_actions_are_found_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("schema.cedarschema"),
        r#"namespace Pay {
             entity Agent; entity Account;
             action "transfer" appliesTo { principal: [Agent], resource: [Account] };
           }"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("manifest.toml"),
        "name = \"t\"\nrevision = \"1\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p.cedar"),
        r#"permit (principal, action == Pay::Action::"transfer", resource);"#,
    )
    .unwrap();
    let e = Engine::new(
        Arc::new(Bundle::load(dir.path()).unwrap_or_else(|e| panic!("{e}"))),
        ManualClock::new(JUNE_2026),
    );
    let mut req = request("transfer", json!({}));
    req.principal = Arc::new(Principal::from_parts("Pay::Agent", "a", "test", Map::new()).unwrap());
    req.resource.kind = "Pay::Account".into();
    assert_eq!(e.decide(&req).outcome, Outcome::Allow);

    // The same name in two namespaces is ambiguous: refused at load.
    std::fs::write(
        dir.path().join("schema.cedarschema"),
        r#"namespace A { entity E; action "x" appliesTo { principal: [E], resource: [E] }; }
           namespace B { entity E; action "x" appliesTo { principal: [E], resource: [E] }; }"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("p.cedar"), "").unwrap();
    let err = Bundle::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("action `x` is declared twice"), "{err}");
}

/// One generated policy: effect/kind and a threshold its condition compares the amount to.
#[derive(Debug, Clone)]
enum Gen {
    Permit(i64),
    Approval(i64, u32),
    Forbid(i64),
}

impl Gen {
    fn text(&self, i: usize) -> String {
        let scope = "(principal, action == Action::\"payments:transfer\", resource)";
        match self {
            Gen::Permit(t) => {
                format!("@id(\"g{i}\") permit {scope} when {{ context.amount > {t} }};\n")
            }
            Gen::Approval(t, q) => format!(
                "@id(\"g{i}\") @approval(\"grp{i}\") @quorum(\"{q}\") permit {scope} when {{ context.amount > {t} }};\n"
            ),
            Gen::Forbid(t) => {
                format!("@id(\"g{i}\") forbid {scope} when {{ context.amount > {t} }};\n")
            }
        }
    }
    fn satisfied(&self, amount: i64) -> bool {
        match self {
            Gen::Permit(t) | Gen::Approval(t, _) | Gen::Forbid(t) => amount > *t,
        }
    }
}

/// The reference model of docs/design.md §1.
fn model(policies: &[Gen], amount: i64) -> Outcome {
    let hit = |f: fn(&Gen) -> bool| policies.iter().any(|p| p.satisfied(amount) && f(p));
    if hit(|p| matches!(p, Gen::Forbid(_))) {
        Outcome::Deny
    } else if hit(|p| matches!(p, Gen::Permit(_))) {
        Outcome::Allow
    } else if hit(|p| matches!(p, Gen::Approval(..))) {
        Outcome::Escalate
    } else {
        Outcome::Deny
    }
}

fn gen_policy() -> impl Strategy<Value = Gen> {
    prop_oneof![
        (0i64..20).prop_map(Gen::Permit),
        ((0i64..20), (1u32..=10)).prop_map(|(t, q)| Gen::Approval(t, q)),
        (0i64..20).prop_map(Gen::Forbid),
    ]
}

fn render(policies: &[Gen]) -> String {
    policies
        .iter()
        .enumerate()
        .map(|(i, p)| p.text(i))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// PB-01: the engine agrees with the reference model; escalate is never allow; a
    /// satisfied forbid always denies; policy order does not matter.
    #[test]
    fn pb01_engine_matches_reference_model(
        policies in proptest::collection::vec(gen_policy(), 0..6),
        amount in 0i64..25,
    ) {
        let e = engine(&render(&policies));
        let d = e.decide(&transfer(amount));
        let want = model(&policies, amount);
        prop_assert_eq!(d.outcome, want);
        prop_assert_eq!(d.approval.is_some(), d.outcome == Outcome::Escalate);
        if d.outcome == Outcome::Escalate {
            let max_q = policies
                .iter()
                .filter_map(|p| match p {
                    Gen::Approval(t, q) if amount > *t => Some(*q),
                    _ => None,
                })
                .max();
            prop_assert_eq!(d.approval.as_ref().map(|a| a.quorum), max_q);
        }

        // Same policies, reverse file order, same ids: same answer.
        let reversed: String = policies
            .iter()
            .enumerate()
            .rev()
            .map(|(i, p)| p.text(i))
            .collect();
        let r = engine(&reversed).decide(&transfer(amount));
        prop_assert_eq!(r.outcome, d.outcome);
        prop_assert_eq!(&r.policy_ids, &d.policy_ids);

        // Adding a satisfied forbid always yields deny.
        let mut with_forbid = policies.clone();
        with_forbid.push(Gen::Forbid(amount - 1));
        let f = engine(&render(&with_forbid)).decide(&transfer(amount));
        prop_assert_eq!(f.outcome, Outcome::Deny);
        let forbid_id = format!("g{}", policies.len());
        prop_assert!(f.policy_ids.contains(&forbid_id));
    }
}
