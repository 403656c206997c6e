//! JSON to Cedar values, shared by identity (principal entities, built once per token) and the
//! decision path (resource entities, context).
//!
//! Mapping: string -> String, integer -> Long, bool -> Bool, array -> Set, object -> Record.
//! `null` means absent (the key is dropped, so `has` is false). A number that is not a 64-bit
//! integer is refused: Cedar has no floats, and silently rounding an amount would change what
//! a policy decides. Every error names the offending field path.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use serde_json::{Map, Value};

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

/// Convert one JSON value; `None` for `null` (absent).
pub fn to_restricted(
    path: &str,
    value: &Value,
) -> Result<Option<RestrictedExpression>, ValueError> {
    to_restricted_at(path, value, 0)
}

fn to_restricted_at(
    path: &str,
    value: &Value,
    depth: usize,
) -> Result<Option<RestrictedExpression>, ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError::new(
            path,
            format!("nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Number(n) => match n.as_i64() {
            Some(i) => RestrictedExpression::new_long(i),
            None => {
                return Err(ValueError::new(
                    path,
                    format!("`{n}` is not a 64-bit integer (Cedar has no floating point numbers)"),
                ));
            }
        },
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                match to_restricted_at(&item_path, item, depth + 1)? {
                    Some(v) => out.push(v),
                    None => {
                        return Err(ValueError::new(&item_path, "null is not allowed in a set"));
                    }
                }
            }
            RestrictedExpression::new_set(out)
        }
        Value::Object(map) => {
            RestrictedExpression::new_record(record_fields(path, map, depth + 1)?)
                .map_err(|e| ValueError::new(path, e.to_string()))?
        }
    }))
}

fn record_fields(
    path: &str,
    map: &Map<String, Value>,
    depth: usize,
) -> Result<Vec<(String, RestrictedExpression)>, ValueError> {
    let mut fields = Vec::with_capacity(map.len());
    for (k, v) in map {
        let field_path = format!("{path}.{k}");
        if let Some(expr) = to_restricted_at(&field_path, v, depth)? {
            fields.push((k.clone(), expr));
        }
    }
    Ok(fields)
}

/// The fields of a JSON object as Cedar record fields (for `Context::from_pairs`).
pub fn record_pairs(
    path: &str,
    map: &Map<String, Value>,
) -> Result<Vec<(String, RestrictedExpression)>, ValueError> {
    record_fields(path, map, 0)
}

/// `Type::"id"` from a type name (namespaces allowed, `Ns::Type`) and an id.
pub fn entity_uid(path: &str, kind: &str, id: &str) -> Result<EntityUid, ValueError> {
    let type_name = EntityTypeName::from_str(kind).map_err(|_| {
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
    let attrs: HashMap<String, RestrictedExpression> =
        record_fields(path, attrs, 0)?.into_iter().collect();
    Entity::new(uid, attrs, parents).map_err(|e| ValueError::new(path, e.to_string()))
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

    #[test]
    fn float_is_refused_with_its_path() {
        let err = record_pairs("context", &obj(json!({"amount": 2.5}))).err();
        assert_eq!(
            err.map(|e| e.to_string()),
            Some("`context.amount`: `2.5` is not a 64-bit integer (Cedar has no floating point numbers)".into())
        );
    }

    #[test]
    fn null_in_set_is_refused() {
        let err = record_pairs("context", &obj(json!({"xs": [1, null]}))).err();
        assert_eq!(err.map(|e| e.path), Some("context.xs[1]".into()));
    }

    #[test]
    fn depth_is_bounded() {
        let mut v = json!(1);
        for _ in 0..40 {
            v = json!({ "a": v });
        }
        assert!(record_pairs("context", &obj(json!({"deep": v}))).is_err());
    }

    #[test]
    fn bad_type_name_is_refused() {
        let err = entity_uid("resource.type", "not a type", "x").err();
        assert_eq!(err.map(|e| e.path), Some("resource.type".into()));
    }
}
