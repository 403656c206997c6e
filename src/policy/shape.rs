//! The context an action's schema declares, checked against each request's context before a
//! policy reads it.
//!
//! Strict validation proves that policies use `context.arguments.amount` as a `Long`; it
//! cannot prove that a caller sends one. Without this check a string `"1000"` makes the
//! policy that reads it fail to evaluate (a deny), and a field no satisfied policy reads goes
//! through unchecked to whatever acts on the request (an MCP tool, an upstream). With it, a
//! context that does not fit the declared types is refused before evaluation, and the
//! refusal names the field: `context.arguments.amount: expected Long, got the string "1000"`.
//!
//! What is checked: every declared field that is present has its declared type (recursively
//! through records and sets), and every required field is present (`null` counts as absent,
//! as everywhere in Mandate's JSON). What is not: fields the schema does not declare (no
//! strictly validated policy can read them; a JSON Schema, which MCP tools declare their
//! arguments with, leaves objects open by default), and values of entity or extension types
//! (a JSON context cannot hold them; a policy that reads one fails to evaluate, a deny).
//! `context.mandate` is Mandate's own and is skipped.

use cedar_policy::{EntityUid, Schema};
use cedar_policy_core::validator::types::Type;
use serde_json::{Map, Value};

use super::values::ValueError;
use crate::vocabulary::RESERVED_CONTEXT_KEY;

/// Deepest nesting followed (the schema's own; a deeper value is refused by the conversion).
const MAX_DEPTH: usize = 32;

/// A declared type, as far as a JSON value can be checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    Long,
    String,
    Bool,
    Set(Box<Shape>),
    Record(Vec<Field>),
    /// An entity or extension type, or a set of unknown elements: not checked.
    Any,
}

/// One declared attribute of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub required: bool,
    pub shape: Shape,
}

impl Shape {
    /// The declared context of `action`, without `mandate`; `None` when the schema declares
    /// nothing else (the common case, which then costs nothing per request).
    pub fn context(schema: &Schema, action: &EntityUid) -> Option<Shape> {
        let validator: &cedar_policy_core::validator::ValidatorSchema = schema.as_ref();
        let declared = validator.context_type(action.as_ref())?;
        match Shape::of(declared, 0) {
            Shape::Record(fields) => {
                let fields: Vec<Field> = fields
                    .into_iter()
                    .filter(|f| f.name != RESERVED_CONTEXT_KEY)
                    .collect();
                (!fields.is_empty()).then_some(Shape::Record(fields))
            }
            _ => None,
        }
    }

    fn of(t: &Type, depth: usize) -> Shape {
        if depth > MAX_DEPTH {
            return Shape::Any;
        }
        match t {
            Type::Long => Shape::Long,
            Type::String => Shape::String,
            Type::Bool(_) => Shape::Bool,
            Type::Set { element_type } => match element_type {
                Some(e) => Shape::Set(Box::new(Shape::of(e, depth + 1))),
                None => Shape::Set(Box::new(Shape::Any)),
            },
            Type::Record { attrs, .. } => Shape::Record(
                attrs
                    .iter()
                    .map(|(name, a)| Field {
                        name: name.to_string(),
                        required: a.is_required,
                        shape: Shape::of(&a.attr_type, depth + 1),
                    })
                    .collect(),
            ),
            _ => Shape::Any,
        }
    }

    /// The name of the type, as the schema writes it.
    fn name(&self) -> String {
        match self {
            Shape::Long => "Long".into(),
            Shape::String => "String".into(),
            Shape::Bool => "Bool".into(),
            Shape::Set(e) => format!("Set<{}>", e.name()),
            Shape::Record(_) => "a record".into(),
            Shape::Any => "any value".into(),
        }
    }

    /// Check a request's context (this shape being the action's declared context).
    pub fn check_context(&self, context: &Map<String, Value>) -> Result<(), ValueError> {
        let Shape::Record(fields) = self else {
            return Ok(());
        };
        record(fields, context).map_err(|m| m.into_error("context"))
    }

    fn check(&self, v: &Value) -> Result<(), Mismatch> {
        let ok = match (self, v) {
            (Shape::Any, _) => true,
            (Shape::Long, Value::Number(n)) => n.as_i64().is_some(),
            (Shape::String, Value::String(_)) => true,
            (Shape::Bool, Value::Bool(_)) => true,
            (Shape::Set(e), Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    e.check(item).map_err(|m| m.under(format!("[{i}]")))?;
                }
                true
            }
            (Shape::Record(fields), Value::Object(map)) => {
                record(fields, map)?;
                true
            }
            _ => false,
        };
        if ok {
            return Ok(());
        }
        Err(Mismatch::new(format!(
            "expected {}, got {}",
            self.name(),
            describe(v)
        )))
    }
}

fn record(fields: &[Field], map: &Map<String, Value>) -> Result<(), Mismatch> {
    for f in fields {
        match map.get(&f.name) {
            None | Some(Value::Null) if f.required => {
                return Err(Mismatch::new(format!("is required ({})", f.shape.name()))
                    .under(format!(".{}", f.name)));
            }
            None | Some(Value::Null) => {}
            Some(v) => f
                .shape
                .check(v)
                .map_err(|m| m.under(format!(".{}", f.name)))?,
        }
    }
    Ok(())
}

/// A value, as an error names it: its kind and (short) its text.
fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => return "null".into(),
        Value::Bool(_) => "the boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "the integer",
        Value::Number(_) => "the number",
        Value::String(_) => "the string",
        Value::Array(_) => return "an array".into(),
        Value::Object(_) => return "an object".into(),
    };
    let mut text = v.to_string();
    if text.len() > 40 {
        let mut cut = 37;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    format!("{kind} {text}")
}

/// A value that does not fit, with the path to it (innermost segment first).
struct Mismatch {
    segments: Vec<String>,
    message: String,
}

impl Mismatch {
    fn new(message: String) -> Self {
        Self {
            segments: Vec::new(),
            message,
        }
    }
    fn under(mut self, segment: String) -> Self {
        self.segments.push(segment);
        self
    }
    fn into_error(self, root: &str) -> ValueError {
        let mut path = root.to_owned();
        for s in self.segments.iter().rev() {
            path.push_str(s);
        }
        ValueError {
            path,
            message: self.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::str::FromStr;

    fn shape_of(schema: &str, action: &str) -> Option<Shape> {
        let (schema, _) = Schema::from_cedarschema_str(schema).unwrap();
        Shape::context(&schema, &EntityUid::from_str(action).unwrap())
    }

    const SCHEMA: &str = r#"
        type Mandate = { now: Long };
        entity Agent; entity Tool;
        type Line = { sku: String, qty: Long };
        action "pay" appliesTo { principal: [Agent], resource: [Tool], context: {
            arguments: { account: String, amount: Long, memo?: String, urgent?: Bool,
                         tags?: Set<String>, lines?: Set<Line>, owner?: Agent },
            mandate: Mandate,
        }};
        action "plain" appliesTo { principal: [Agent], resource: [Tool], context: { mandate: Mandate } };
        action "none" appliesTo { principal: [Agent], resource: [Tool] };
    "#;

    fn check(v: Value) -> Result<(), String> {
        let shape = shape_of(SCHEMA, r#"Action::"pay""#).unwrap();
        let Value::Object(m) = v else { panic!() };
        shape.check_context(&m).map_err(|e| e.to_string())
    }

    #[test]
    fn a_context_of_only_mandate_or_nothing_has_no_shape() {
        assert_eq!(shape_of(SCHEMA, r#"Action::"plain""#), None);
        assert_eq!(shape_of(SCHEMA, r#"Action::"none""#), None);
        assert_eq!(shape_of(SCHEMA, r#"Action::"unknown""#), None);
    }

    #[test]
    fn fitting_arguments_pass_and_undeclared_fields_are_not_checked() {
        check(json!({"arguments": {"account": "a", "amount": 5}})).unwrap();
        check(
            json!({"arguments": {"account": "a", "amount": -5, "memo": null,
            "urgent": true, "tags": ["x"], "lines": [{"sku": "s", "qty": 1}],
            "undeclared": 2.5, "owner": {"anything": 1}}}),
        )
        .unwrap();
    }

    #[test]
    fn a_mistyped_or_missing_argument_is_named_by_its_path() {
        assert_eq!(
            check(json!({"arguments": {"account": "a", "amount": "1000"}})),
            Err(r#"`context.arguments.amount`: expected Long, got the string "1000""#.into())
        );
        assert_eq!(
            check(json!({"arguments": {"account": "a", "amount": 2.5}})),
            Err("`context.arguments.amount`: expected Long, got the number 2.5".into())
        );
        assert_eq!(
            check(json!({"arguments": {"account": "a"}})),
            Err("`context.arguments.amount`: is required (Long)".into())
        );
        assert_eq!(
            check(json!({"arguments": {"account": "a", "amount": null}})),
            Err("`context.arguments.amount`: is required (Long)".into())
        );
        assert_eq!(
            check(json!({})),
            Err("`context.arguments`: is required (a record)".into())
        );
        assert_eq!(
            check(json!({"arguments": "x"})),
            Err(r#"`context.arguments`: expected a record, got the string "x""#.into())
        );
        assert_eq!(
            check(json!({"arguments": {"account": "a", "amount": 1, "tags": ["x", 7]}})),
            Err("`context.arguments.tags[1]`: expected String, got the integer 7".into())
        );
        assert_eq!(
            check(json!({"arguments": {"account": "a", "amount": 1,
                "lines": [{"sku": "s", "qty": true}]}})),
            Err("`context.arguments.lines[0].qty`: expected Long, got the boolean true".into())
        );
        assert_eq!(
            check(json!({"arguments": {"account": "a", "amount": 1, "urgent": "yes"}})),
            Err(r#"`context.arguments.urgent`: expected Bool, got the string "yes""#.into())
        );
        // u64 beyond i64 is not a Long.
        assert_eq!(
            check(json!({"arguments": {"account": "a", "amount": u64::MAX}})),
            Err(
                "`context.arguments.amount`: expected Long, got the integer 18446744073709551615"
                    .into()
            )
        );
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let long = "x".repeat(100);
        let e = check(json!({"arguments": {"account": 1, "amount": 1, "memo": long}})).unwrap_err();
        assert_eq!(
            e,
            "`context.arguments.account`: expected String, got the integer 1"
        );
        let e = check(json!({"arguments": {"account": "a", "amount": long}})).unwrap_err();
        assert!(e.ends_with('…') && e.len() < 120, "{e}");
    }
}
