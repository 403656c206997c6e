//! The fast path against Cedar's own evaluator: wherever the fast path answers, Cedar must
//! answer the same boolean (a differential property test over random conditions and inputs).

use std::sync::Arc;

use cedar_policy_core::ast::{self, EntityUIDEntry, ValueKind};
use cedar_policy_core::evaluator::Evaluator;
use cedar_policy_core::extensions::Extensions;
use proptest::prelude::*;
use serde_json::json;

use cedar_policy_core::ast::BinaryOp;

use super::{Fast, Input};
use crate::policy::values;

/// A long-valued expression (some ill-typed on purpose, some overflowing).
fn long_expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("0".to_owned()),
        Just("100".to_owned()),
        Just("-7".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("context.amount".to_owned()),
        Just("principal.level".to_owned()),
        Just("context.name".to_owned()),
        Just("context.missing".to_owned()),
    ];
    leaf.prop_recursive(3, 16, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} + {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} - {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} * {b})")),
            inner.prop_map(|a| format!("(-{a})")),
        ]
    })
}

/// Any value: longs, strings, entities, records, sets, booleans.
fn any_expr() -> impl Strategy<Value = String> {
    prop_oneof![
        long_expr(),
        Just(r#""ops""#.to_owned()),
        Just("context.name".to_owned()),
        Just("principal".to_owned()),
        Just("resource".to_owned()),
        Just("action".to_owned()),
        Just(r#"Team::"ops""#.to_owned()),
        Just(r#"Agent::"a1""#.to_owned()),
        Just("context.rec".to_owned()),
        Just("context.rec.x".to_owned()),
        Just("context.tags".to_owned()),
        Just("context.flag".to_owned()),
        Just("principal.team".to_owned()),
        Just("resource.owner".to_owned()),
        Just("true".to_owned()),
    ]
}

fn bool_expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("true".to_owned()),
        Just("false".to_owned()),
        Just("context.flag".to_owned()),
        Just("context has amount".to_owned()),
        Just("context has flag".to_owned()),
        Just("principal has team".to_owned()),
        Just("resource has owner".to_owned()),
        Just("context.rec has x".to_owned()),
        Just("context.amount has x".to_owned()),
        Just("principal is Agent".to_owned()),
        Just("resource is Account".to_owned()),
        Just("context.rec is Agent".to_owned()),
        Just(r#"principal in Team::"ops""#.to_owned()),
        Just(r#"resource in Folder::"f""#.to_owned()),
        Just(r#"resource in [Folder::"g", Folder::"f"]"#.to_owned()),
        Just(r#"principal in context.rec"#.to_owned()),
        Just(r#"principal in resource.owner"#.to_owned()),
        Just(r#"context.name like "pay*""#.to_owned()),
        Just(r#"principal.team like "*s""#.to_owned()),
        Just(r#"action == Action::"pay""#.to_owned()),
        Just("context.tags.contains(\"a\")".to_owned()),
        Just(r#"context.tags.containsAny(["z", "b"])"#.to_owned()),
        Just(r#"context.tags.containsAll(["a"])"#.to_owned()),
        Just(r#"["a", 1, Team::"ops"].contains(context.name)"#.to_owned()),
        Just(r#"[Team::"ops", Team::"dev"].containsAny(principal.groups)"#.to_owned()),
        Just(r#"principal.groups.contains(Team::"ops")"#.to_owned()),
        Just("context.tags.isEmpty()".to_owned()),
        Just("context.rec.isEmpty()".to_owned()),
        Just(r#"context.name.contains("a")"#.to_owned()),
        Just(r#"context.tags.containsAny(context.name)"#.to_owned()),
        Just(r#"context.tags == ["b", "a"]"#.to_owned()),
        Just(r#"context.sets.contains(["a"])"#.to_owned()),
        (long_expr(), long_expr()).prop_map(|(a, b)| format!("{a} < {b}")),
        (long_expr(), long_expr()).prop_map(|(a, b)| format!("{a} <= {b}")),
        (long_expr(), long_expr()).prop_map(|(a, b)| format!("{a} > {b}")),
        (long_expr(), long_expr()).prop_map(|(a, b)| format!("{a} >= {b}")),
        (any_expr(), any_expr()).prop_map(|(a, b)| format!("{a} == {b}")),
        (any_expr(), any_expr()).prop_map(|(a, b)| format!("{a} != {b}")),
        long_expr(),
    ];
    leaf.prop_recursive(4, 32, 3, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} && {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} || {b})")),
            inner.clone().prop_map(|a| format!("!({a})")),
            (inner.clone(), inner.clone(), inner)
                .prop_map(|(a, b, c)| format!("(if {a} then {b} else {c})")),
        ]
    })
}

fn scope() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("principal, action, resource".to_owned()),
        Just(r#"principal is Agent, action == Action::"pay", resource"#.to_owned()),
        Just(r#"principal in Team::"ops", action in [Action::"pay", Action::"read"], resource is Account"#.to_owned()),
        Just(r#"principal == Agent::"a1", action, resource in Folder::"f""#.to_owned()),
        Just(r#"principal is Agent in Team::"ops", action, resource is Folder"#.to_owned()),
    ]
}

/// A context: each field may be absent or of another type than a policy expects.
fn context() -> impl Strategy<Value = serde_json::Value> {
    let amount = prop_oneof![
        Just(None),
        any::<i64>().prop_map(|i| Some(json!(i))),
        (-200i64..200).prop_map(|i| Some(json!(i))),
        Just(Some(json!("100"))),
    ];
    let flag = prop_oneof![
        Just(None),
        any::<bool>().prop_map(|b| Some(json!(b))),
        Just(Some(json!(1)))
    ];
    let name = prop_oneof![
        Just(None),
        Just(Some(json!("payroll"))),
        Just(Some(json!("ops"))),
        Just(Some(json!(3)))
    ];
    let rec = prop_oneof![
        Just(None),
        Just(Some(json!({"x": 1}))),
        Just(Some(json!({"y": "z"}))),
        Just(Some(json!("not a record"))),
    ];
    let tags = prop_oneof![
        Just(None),
        Just(Some(json!(["a", "b"]))),
        Just(Some(json!([]))),
        Just(Some(json!(["a", 1, {"x": 1}]))),
        Just(Some(json!("a"))),
    ];
    (amount, flag, name, rec, tags).prop_map(|(amount, flag, name, rec, tags)| {
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("amount", amount),
            ("flag", flag),
            ("name", name),
            ("rec", rec),
            ("tags", tags),
        ] {
            if let Some(v) = v {
                m.insert(k.to_owned(), v);
            }
        }
        serde_json::Value::Object(m)
    })
}

/// The entity data: the principal may be known (with or without attributes and a team), the
/// resource may be known (in a folder, with an owner).
fn entities() -> impl Strategy<Value = serde_json::Value> {
    (any::<bool>(), any::<bool>(), any::<bool>(), 0i64..3, any::<bool>()).prop_map(
        |(principal_known, with_team, in_team, level, resource_known)| {
            let mut list = vec![json!({"uid": {"type": "Team", "id": "ops"}, "attrs": {}, "parents": []})];
            if principal_known {
                let mut attrs = serde_json::Map::new();
                if with_team {
                    attrs.insert("team".into(), json!("ops"));
                    attrs.insert("level".into(), json!(level));
                    attrs.insert("groups".into(), json!([{"__entity": {"type": "Team", "id": "ops"}}]));
                }
                let parents = if in_team { vec![json!({"type": "Team", "id": "ops"})] } else { vec![] };
                list.push(json!({"uid": {"type": "Agent", "id": "a1"}, "attrs": attrs, "parents": parents}));
            }
            if resource_known {
                list.push(json!({
                    "uid": {"type": "Account", "id": "r1"},
                    "attrs": {"owner": {"__entity": {"type": "Team", "id": "ops"}}},
                    "parents": [{"type": "Folder", "id": "f"}]
                }));
            }
            serde_json::Value::Array(list)
        },
    )
}

fn uid(s: &str) -> ast::EntityUID {
    s.parse().expect("entity uid")
}

/// Compare on one policy text and one input; counts whether the fast path answered.
fn differential(
    policy: &str,
    action: &str,
    context: &serde_json::Value,
    entities: &serde_json::Value,
    resource: &str,
) -> Result<bool, TestCaseError> {
    let policy: ast::Policy = match cedar_policy_core::parser::parse_policy(None, policy) {
        Ok(p) => p.into(),
        // The grammar makes some texts Cedar refuses to parse (e.g. `-9223372036854775808`
        // spelled as a negation): nothing to compare.
        Err(_) => return Ok(false),
    };
    let expr = policy.condition();
    let env = policy.env().clone();
    let store = cedar_policy::Entities::from_json_value(entities.clone(), None).expect("entities");
    let map = context.as_object().expect("object");
    let ValueKind::Record(fields) = values::record_value("context", map, [])
        .expect("context")
        .value
    else {
        unreachable!("a record")
    };
    let (principal, action, resource) = (uid(r#"Agent::"a1""#), uid(action), uid(resource));
    let request = ast::Request::new_unchecked(
        EntityUIDEntry::known(principal.clone(), None),
        EntityUIDEntry::known(action.clone(), None),
        EntityUIDEntry::known(resource.clone(), None),
        Some(ast::Context::Value(Arc::clone(&fields))),
    );
    let evaluator = Evaluator::new(request, store.as_ref(), Extensions::all_available());
    let cedar = evaluator.interpret(&expr, &env);
    let Some(fast) = Fast::compile(&expr, &env, &action) else {
        return Ok(false);
    };
    let input = Input {
        principal: &principal,
        resource: &resource,
        context: &fields,
        entities: store.as_ref(),
    };
    match fast.eval(&input) {
        None => Ok(false),
        Some(b) => {
            match &cedar {
                Ok(v) => prop_assert_eq!(v.value_kind(), &ValueKind::from(b), "condition {}", expr),
                Err(e) => prop_assert!(
                    false,
                    "fast path said {} where Cedar failed: {} (condition {})",
                    b,
                    e,
                    expr
                ),
            }
            Ok(true)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Wherever the fast path answers, Cedar's evaluator answers the same boolean; where
    /// Cedar errs, the fast path never answers.
    #[test]
    fn fast_path_agrees_with_cedar(
        scope in scope(),
        when in bool_expr(),
        unless in proptest::option::of(bool_expr()),
        context in context(),
        entities in entities(),
        resource in prop_oneof![Just(r#"Account::"r1""#), Just(r#"Folder::"f""#)],
        action in prop_oneof![Just(r#"Action::"pay""#), Just(r#"Action::"read""#), Just(r#"Action::"other""#)],
    ) {
        let unless = unless.map(|u| format!(" unless {{ {u} }}")).unwrap_or_default();
        let policy = format!("permit ({scope}) when {{ {when} }}{unless};");
        differential(&policy, action, &context, &entities, resource)?;
    }
}

/// The example bundle's conditions are all in the fast subset, and decided by it.
#[test]
fn example_policies_compile_and_answer() {
    let set: Result<cedar_policy::PolicySet, _> = std::str::FromStr::from_str(
        &std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config/policies"))
            .expect("bundle")
            .filter_map(|e| {
                let p = e.ok()?.path();
                (p.extension()? == "cedar").then(|| std::fs::read_to_string(p).ok())?
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let set = set.expect("example policies parse");
    let context = json!({"amount": 50});
    let entities = json!([]);
    let mut answered = 0;
    for policy in set.policies() {
        let ast: &ast::Policy = policy.as_ref();
        let text = ast.to_string();
        let action = uid(r#"Action::"payments:transfer""#);
        let fast = Fast::compile(&ast.condition(), ast.env(), &action);
        assert!(fast.is_some(), "{text}");
        if differential(
            &text,
            r#"Action::"payments:transfer""#,
            &context,
            &entities,
            r#"Account::"r1""#,
        )
        .expect("agrees")
        {
            answered += 1;
        }
    }
    assert!(
        answered >= 5,
        "the fast path answered only {answered} example policies"
    );
}

/// Conditions outside the subset (extension functions, sets and records built from
/// expressions, nested `has`) are left to Cedar at compile time.
#[test]
fn sets_and_extensions_are_left_to_cedar() {
    for text in [
        r#"permit (principal, action, resource) when { decimal("1.0").lessThan(decimal("2.0")) };"#,
        r#"permit (principal, action, resource) when { [context.amount] == [1] };"#,
        r#"permit (principal, action, resource) when { {a: 1} == {a: 1} };"#,
        r#"permit (principal, action, resource) when { context has a.b };"#,
    ] {
        let policy: ast::Policy = cedar_policy_core::parser::parse_policy(None, text)
            .expect("parses")
            .into();
        assert!(
            Fast::compile(&policy.condition(), policy.env(), &uid(r#"Action::"pay""#)).is_none(),
            "{text}"
        );
    }
}

/// Template slots are filled at compile time.
#[test]
fn template_slots_are_filled() {
    let template = cedar_policy_core::parser::parse_policy_or_template(
        None,
        r#"permit (principal == ?principal, action, resource in ?resource);"#,
    )
    .expect("template");
    let mut env = ast::SlotEnv::new();
    env.insert(ast::SlotId::principal(), uid(r#"Agent::"a1""#));
    let condition = template.condition();
    // An unfilled slot: Cedar reports it.
    let pay = uid(r#"Action::"pay""#);
    assert!(Fast::compile(&condition, &env, &pay).is_none());
    env.insert(ast::SlotId::resource(), uid(r#"Folder::"f""#));
    let fast = Fast::compile(&condition, &env, &pay).expect("compiles");
    let store = cedar_policy::Entities::from_json_value(
        json!([{"uid": {"type": "Account", "id": "r1"}, "attrs": {}, "parents": [{"type": "Folder", "id": "f"}]}]),
        None,
    )
    .expect("entities");
    let empty = std::collections::BTreeMap::new();
    let (a1, r1, a2) = (
        uid(r#"Agent::"a1""#),
        uid(r#"Account::"r1""#),
        uid(r#"Agent::"a2""#),
    );
    let input = |principal| Input {
        principal,
        resource: &r1,
        context: &empty,
        entities: store.as_ref(),
    };
    assert_eq!(fast.eval(&input(&a1)), Some(true));
    assert_eq!(fast.eval(&input(&a2)), Some(false));
}

/// What the scope decides at load is folded away; a `true &&` before a non-boolean stays, so
/// Cedar's type error stays too.
#[test]
fn scope_is_folded_without_losing_type_errors() {
    let compile = |text: &str| {
        let policy: ast::Policy = cedar_policy_core::parser::parse_policy(None, text)
            .expect("parses")
            .into();
        Fast::compile(&policy.condition(), policy.env(), &uid(r#"Action::"pay""#))
            .expect("compiles")
    };
    let f = compile(
        r#"forbid (principal, action == Action::"pay", resource) when { context.amount > 10 };"#,
    );
    // `a > b` is Cedar's `!(a <= b)`.
    assert!(
        matches!(&f, Fast::Not(arg) if matches!(**arg, Fast::Binary(BinaryOp::LessEq, ..))),
        "{f:?}"
    );
    let f = compile(
        r#"permit (principal, action == Action::"other", resource) when { context.amount > 10 };"#,
    );
    assert!(matches!(f, Fast::Bool(false)), "{f:?}");
    let f = compile(r#"permit (principal, action, resource) when { context.amount };"#);
    assert!(matches!(f, Fast::And(..)), "{f:?}");
}

/// Set operations are answered on the fast path where Cedar answers, and left to Cedar where
/// it errs (each case also compared with Cedar by `differential`).
#[test]
fn set_operations_are_answered_like_cedar() {
    let context = json!({"tags": ["a", "b"], "name": "a", "rec": {"x": 1}});
    let entities = json!([{
        "uid": {"type": "Agent", "id": "a1"},
        "attrs": {"groups": [{"__entity": {"type": "Team", "id": "ops"}}]},
        "parents": []
    }]);
    for (condition, answered) in [
        (r#"context.tags.contains("a")"#, true),
        (r#"!context.tags.contains("c")"#, true),
        (r#"context.tags.containsAny(["z", "b"])"#, true),
        (r#"context.tags.containsAll(["a", "b"])"#, true),
        (r#"["a", 1, Team::"ops"].contains(context.name)"#, true),
        (r#"principal.groups.contains(Team::"ops")"#, true),
        (
            r#"[Team::"ops", Team::"dev"].containsAny(principal.groups)"#,
            true,
        ),
        (r#"!context.tags.isEmpty()"#, true),
        (r#"context.tags == ["b", "a"]"#, true),
        (r#"context.rec.isEmpty()"#, false),
        (r#"context.name.contains("a")"#, false),
        (r#"context.tags.containsAny(context.name)"#, false),
    ] {
        let policy = format!("permit (principal, action, resource) when {{ {condition} }};");
        let fast = differential(
            &policy,
            r#"Action::"pay""#,
            &context,
            &entities,
            r#"Account::"r1""#,
        )
        .unwrap_or_else(|e| panic!("{condition}: {e}"));
        assert_eq!(fast, answered, "{condition}");
        if answered {
            // Every answered case here is true: the fast path said what Cedar says.
            let p: ast::Policy = cedar_policy_core::parser::parse_policy(None, &policy)
                .expect("parses")
                .into();
            let f =
                Fast::compile(&p.condition(), p.env(), &uid(r#"Action::"pay""#)).expect("compiles");
            let store =
                cedar_policy::Entities::from_json_value(entities.clone(), None).expect("entities");
            let ValueKind::Record(fields) =
                values::record_value("context", context.as_object().expect("object"), [])
                    .expect("context")
                    .value
            else {
                unreachable!("a record")
            };
            let (a1, r1) = (uid(r#"Agent::"a1""#), uid(r#"Account::"r1""#));
            let input = Input {
                principal: &a1,
                resource: &r1,
                context: &fields,
                entities: store.as_ref(),
            };
            assert_eq!(f.eval(&input), Some(true), "{condition}");
        }
    }
}
