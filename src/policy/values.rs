//! JSON to Cedar values, shared by identity (principal entities, built once per token) and the
//! decision path (resource entities, context).
//!
//! Mapping: string -> String, integer -> Long, bool -> Bool, array -> Set, object -> Record.
//! `null` means absent (the key is dropped, so `has` is false). A number that is not a 64-bit
//! integer is refused: Cedar has no floats, and silently rounding an amount would change what
//! a policy decides. Every error names the offending field path.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{Entities, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use serde_json::{Map, Value};

use crate::vocabulary::Principal;

/// Deepest nesting accepted in attribute values.
pub const MAX_DEPTH: usize = 16;

/// A JSON value Cedar cannot hold, or an invalid entity name; `path` names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{path}`: {message}")]
pub struct ValueError {
    pub path: String,
    pub message: String,
}

impl ValueError {
    fn new(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

/// Where a value sits in the request (`context.items[2].id`), rendered only for an error:
/// the decision path converts many fields and names almost none of them.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root(&'a str),
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Root(r) => f.write_str(r),
            Path::Key(parent, k) => write!(f, "{parent}.{k}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

impl ValueError {
    fn at(path: &Path<'_>, message: impl Into<String>) -> Self {
        Self {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// A JSON scalar, checked (integers only) on its way to either Cedar representation.
enum Scalar<'v> {
    Bool(bool),
    Long(i64),
    String(&'v str),
}

fn scalar<'v>(path: &Path<'_>, value: &'v Value) -> Result<Option<Scalar<'v>>, ValueError> {
    Ok(Some(match value {
        Value::Bool(b) => Scalar::Bool(*b),
        Value::String(s) => Scalar::String(s),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Scalar::Long(i),
            None => {
                return Err(ValueError::at(
                    path,
                    format!("`{n}` is not a 64-bit integer (Cedar has no floating point numbers)"),
                ));
            }
        },
        _ => return Ok(None),
    }))
}

/// The two Cedar representations JSON becomes: restricted expressions for entity attributes
/// (what `Entity::new` takes) and evaluated values for the request context (what Cedar's
/// evaluator reads, with no evaluation step in between). One walk, [`convert`], makes the
/// checks (depth, integers, no `null` in sets) for both.
trait Cedar: Sized {
    fn scalar(s: Scalar<'_>) -> Self;
    fn set(items: Vec<Self>) -> Self;
    fn record(path: &Path<'_>, fields: Vec<(&str, Self)>) -> Result<Self, ValueError>;
}

impl Cedar for RestrictedExpression {
    fn scalar(s: Scalar<'_>) -> Self {
        match s {
            Scalar::Bool(b) => Self::new_bool(b),
            Scalar::Long(i) => Self::new_long(i),
            Scalar::String(s) => Self::new_string(s.to_owned()),
        }
    }
    fn set(items: Vec<Self>) -> Self {
        Self::new_set(items)
    }
    fn record(path: &Path<'_>, fields: Vec<(&str, Self)>) -> Result<Self, ValueError> {
        Self::new_record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)))
            .map_err(|e| ValueError::at(path, e.to_string()))
    }
}

/// A Cedar value as the evaluator holds it (`cedar-policy-core`).
pub type CoreValue = cedar_policy_core::ast::Value;

impl Cedar for CoreValue {
    fn scalar(s: Scalar<'_>) -> Self {
        match s {
            Scalar::Bool(b) => Self::from(b),
            Scalar::Long(i) => Self::from(i),
            Scalar::String(s) => Self::from(s),
        }
    }
    fn set(items: Vec<Self>) -> Self {
        Self::set(items, None)
    }
    fn record(_: &Path<'_>, fields: Vec<(&str, Self)>) -> Result<Self, ValueError> {
        Ok(Self::record(fields, None))
    }
}

/// Convert one JSON value; `None` for `null` (absent).
fn convert<T: Cedar>(
    path: &Path<'_>,
    value: &Value,
    depth: usize,
) -> Result<Option<T>, ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError::at(
            path,
            format!("nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    if let Some(s) = scalar(path, value)? {
        return Ok(Some(T::scalar(s)));
    }
    Ok(Some(match value {
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let item_path = Path::Index(path, i);
                match convert(&item_path, item, depth + 1)? {
                    Some(v) => out.push(v),
                    None => {
                        return Err(ValueError::at(&item_path, "null is not allowed in a set"));
                    }
                }
            }
            T::set(out)
        }
        Value::Object(map) => T::record(path, fields(path, map, depth + 1)?)?,
        _ => return Ok(None),
    }))
}

/// The fields of a JSON object, `null` ones left out (absent).
fn fields<'v, T: Cedar>(
    path: &Path<'_>,
    map: &'v Map<String, Value>,
    depth: usize,
) -> Result<Vec<(&'v str, T)>, ValueError> {
    let mut out = Vec::with_capacity(map.len() + 1);
    for (k, v) in map {
        if let Some(value) = convert(&Path::Key(path, k), v, depth)? {
            out.push((k.as_str(), value));
        }
    }
    Ok(out)
}

/// The fields of a JSON object as an evaluated Cedar record (the request context is built
/// straight into these); `extra` fields are added as they are.
pub fn record_value(
    path: &str,
    map: &Map<String, Value>,
    extra: impl IntoIterator<Item = (&'static str, CoreValue)>,
) -> Result<CoreValue, ValueError> {
    let mut fields = fields(&Path::Root(path), map, 0)?;
    for (k, v) in extra {
        fields.push((k, v));
    }
    Ok(CoreValue::record(fields, None))
}

/// Type names parsed per thread: parsing one runs Cedar's grammar (~0.4 µs), and a sidecar
/// sees the same few types on every check. Bounded, so junk names cannot grow it.
const TYPE_NAME_CACHE: usize = 256;

thread_local! {
    static TYPE_NAMES: RefCell<HashMap<String, EntityTypeName>> = RefCell::new(HashMap::new());
}

fn type_name(kind: &str) -> Option<EntityTypeName> {
    if let Some(hit) = TYPE_NAMES.with(|c| c.borrow().get(kind).cloned()) {
        return Some(hit);
    }
    let parsed = EntityTypeName::from_str(kind).ok()?;
    TYPE_NAMES.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() < TYPE_NAME_CACHE {
            c.insert(kind.to_owned(), parsed.clone());
        }
    });
    Some(parsed)
}

/// `Type::"id"` from a type name (namespaces allowed, `Ns::Type`) and an id.
pub fn entity_uid(path: &str, kind: &str, id: &str) -> Result<EntityUid, ValueError> {
    let type_name = type_name(kind).ok_or_else(|| {
        ValueError::new(
            path,
            format!("`{kind}` is not a valid Cedar entity type name"),
        )
    })?;
    Ok(EntityUid::from_type_name_and_id(
        type_name,
        EntityId::new(id),
    ))
}

/// An entity store holding just `entity` (no parents to close over).
pub fn store_of(entity: &Entity) -> Result<Entities, ValueError> {
    store_without_hierarchy([entity])
}

/// A store of request entities. Cedar's public constructors always compute the transitive
/// closure of the hierarchy, ~2 µs even for two entities, a third of a decision; for
/// entities without parents there is nothing to close, so the core constructor is told the
/// closure is already computed. Entities with parents take the public path.
pub fn store_without_hierarchy<'a>(
    entities: impl IntoIterator<Item = &'a Entity> + Clone,
) -> Result<Entities, ValueError> {
    let err = |e: &dyn std::fmt::Display| ValueError::new("entities", e.to_string());
    let flat = entities.clone().into_iter().all(|e| {
        AsRef::<cedar_policy_core::ast::Entity>::as_ref(e)
            .ancestors()
            .next()
            .is_none()
    });
    if !flat {
        return Entities::from_entities(entities.into_iter().cloned(), None).map_err(|e| err(&e));
    }
    cedar_policy_core::entities::Entities::from_entities(
        entities
            .into_iter()
            .map(|e| AsRef::<cedar_policy_core::ast::Entity>::as_ref(e).clone()),
        None::<&cedar_policy_core::entities::NoEntitiesSchema>,
        cedar_policy_core::entities::TCComputation::AssumeAlreadyComputed,
        cedar_policy_core::extensions::Extensions::all_available(),
    )
    .map(Entities::from)
    .map_err(|e| err(&e))
}

/// Build an entity from its type, id and JSON attributes. `path` prefixes error field names
/// (e.g. `resource.properties`).
pub fn entity_from_json(
    path: &str,
    kind: &str,
    id: &str,
    attrs: &Map<String, Value>,
    parents: HashSet<EntityUid>,
) -> Result<Entity, ValueError> {
    let uid = entity_uid(path, kind, id)?;
    let attrs: HashMap<String, RestrictedExpression> = fields(&Path::Root(path), attrs, 0)?
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    Entity::new(uid, attrs, parents).map_err(|e| ValueError::new(path, e.to_string()))
}

/// Building a [`Principal`] from JSON attributes lives here, beside the conversion it needs;
/// the type itself is vocabulary.
impl Principal {
    /// A principal named by a trusted party instead of a token: an enforcement point passing
    /// an AuthZEN subject, or a policy test case. `issuer` says who vouched for it.
    pub fn from_parts(
        kind: &str,
        id: &str,
        issuer: &str,
        attributes: Map<String, Value>,
    ) -> Result<Self, ValueError> {
        let entity = entity_from_json(
            "subject.properties",
            kind,
            id,
            &attributes,
            Default::default(),
        )?;
        let owner = attributes
            .get("owner")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let groups = match attributes.get("groups") {
            Some(Value::String(g)) => vec![g.clone()],
            Some(Value::Array(gs)) => gs
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            kind: kind.to_owned(),
            id: id.to_owned(),
            issuer: issuer.to_owned(),
            token_id: None,
            expires_at: i64::MAX,
            attributes,
            actors: Vec::new(),
            owner,
            groups,
            multi_audience: false,
            credential_digest: None,
            entities: Arc::new(store_of(&entity)?),
            entity: Arc::new(entity),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn converts_nested_values() {
        let attrs = obj(
            json!({"owner":"bob","n":3,"ok":true,"groups":["a","b"],"meta":{"x":1},"gone":null}),
        );
        let e = entity_from_json("principal", "Agent", "agent-1", &attrs, HashSet::new());
        assert!(e.is_ok(), "{e:?}");
        let e = e.unwrap_or_else(|_| unreachable!());
        assert!(e.attr("owner").is_some());
        assert!(e.attr("gone").is_none());
    }

    /// The error of converting `map` as a request context and as entity attributes: the
    /// two representations are checked alike.
    fn refusal(map: &Map<String, Value>) -> Option<ValueError> {
        let as_context = record_value("context", map, []).err();
        let as_attributes = entity_from_json("context", "Agent", "a", map, HashSet::new()).err();
        assert_eq!(as_context, as_attributes);
        as_context
    }

    #[test]
    fn float_is_refused_with_its_path() {
        let err = refusal(&obj(json!({"amount": 2.5})));
        assert_eq!(
            err.map(|e| e.to_string()),
            Some("`context.amount`: `2.5` is not a 64-bit integer (Cedar has no floating point numbers)".into())
        );
    }

    #[test]
    fn null_in_set_is_refused() {
        let err = refusal(&obj(json!({"xs": [1, null]})));
        assert_eq!(err.map(|e| e.path), Some("context.xs[1]".into()));
    }

    #[test]
    fn depth_is_bounded() {
        let mut v = json!(1);
        for _ in 0..40 {
            v = json!({ "a": v });
        }
        assert!(refusal(&obj(json!({"deep": v}))).is_some());
    }

    #[test]
    fn request_stores_skip_the_closure_only_without_parents() {
        let a = entity_from_json(
            "p",
            "Agent",
            "a",
            &obj(json!({"team": "x"})),
            HashSet::new(),
        )
        .unwrap();
        let r = entity_from_json(
            "r",
            "Account",
            "1",
            &obj(json!({"owner": "a"})),
            HashSet::new(),
        )
        .unwrap();
        let store = store_without_hierarchy([&a, &r]).unwrap();
        assert!(store.get(&a.uid()).is_some() && store.get(&r.uid()).is_some());
        // With a hierarchy, the public constructor computes the closure: `in` holds through
        // a grandparent even though only the parent is listed.
        let top = entity_uid("g", "Group", "top").unwrap();
        let mid = entity_uid("g", "Group", "mid").unwrap();
        let g_mid = Entity::new(mid.clone(), HashMap::new(), HashSet::from([top.clone()])).unwrap();
        let g_top = Entity::new_no_attrs(top.clone(), HashSet::new());
        let child =
            entity_from_json("r", "Account", "2", &Map::new(), HashSet::from([mid])).unwrap();
        let store = store_without_hierarchy([&child, &g_mid, &g_top]).unwrap();
        let ancestors: Vec<_> = store.ancestors(&child.uid()).unwrap().cloned().collect();
        assert!(ancestors.contains(&top), "{ancestors:?}");
    }

    #[test]
    fn bad_type_name_is_refused() {
        let err = entity_uid("resource.type", "not a type", "x").err();
        assert_eq!(err.map(|e| e.path), Some("resource.type".into()));
    }
}
