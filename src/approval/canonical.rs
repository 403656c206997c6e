//! The binding hash: SHA-256 over a canonical JSON of the request, so a grant allows exactly
//! the request that was approved and nothing that differs in one byte of a value (SECURITY
//! A-06), while key order and whitespace, which carry no meaning, never change it.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{PrincipalSnapshot, ResourceSnapshot};

/// `value` as canonical JSON: object keys sorted (by their UTF-8 bytes) at every depth, no
/// whitespace, strings escaped as serde_json escapes them, numbers as serde_json prints them.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Sorted here rather than trusting the map's order: serde_json keeps insertion
            // order when any crate in the build enables `preserve_order`.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    // Serializing a `&str` cannot fail; the fallback keeps the function total without a panic
    // and still distinguishes strings.
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str(&format!("{s:?}")),
    }
}

/// Hex SHA-256 of the canonical JSON of
/// `{"principal": {type, id, issuer}, "action", "resource": {type, id, properties}, "context"}`,
/// plus `"action_properties"` when the request has them (AuthZEN: policies see them).
pub fn binding_hash(
    principal: &PrincipalSnapshot,
    action: &str,
    action_properties: Option<&Map<String, Value>>,
    resource: &ResourceSnapshot,
    context: &Map<String, Value>,
) -> String {
    let mut doc = json!({
        "principal": {"type": principal.kind, "id": principal.id, "issuer": principal.issuer},
        "action": action,
        "resource": {"type": resource.kind, "id": resource.id, "properties": resource.properties},
        "context": context,
    });
    if let (Some(props), Value::Object(map)) = (action_properties, &mut doc) {
        map.insert("action_properties".into(), Value::Object(props.clone()));
    }
    hex::encode(Sha256::digest(canonical_json(&doc).as_bytes()))
}
