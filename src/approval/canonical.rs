//! The binding hash: SHA-256 over a canonical JSON of the request, so a grant allows exactly
//! the request that was approved and nothing that differs in one byte of a value (SECURITY
//! A-06), while key order and whitespace, which carry no meaning, never change it.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{PrincipalSnapshot, ResourceSnapshot};
use crate::vocabulary::GrantScope;

/// `value` as canonical JSON (the audit log's: [`crate::audit::write_canonical_value`]).
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::new();
    crate::audit::write_canonical_value(&mut out, value);
    // Built from `&str`s and serde_json's own output: always UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}

/// Hex SHA-256 of the canonical JSON of
/// `{"principal": {type, id, issuer, owner, actors, attributes}, "action",
///   "resource": {type, id, properties}, "context"}`,
/// plus `"action_properties"` when the request has them (AuthZEN: policies see them).
///
/// The principal is the whole requesting identity the approver was shown: its owner, its
/// RFC 8693 delegation chain and every attribute policies read, not only its id. So the same
/// agent acting for someone else, or under another owner, is a different request: it
/// escalates again and separation of duties applies to its own requester set (SECURITY
///
pub fn binding_hash(
    principal: &PrincipalSnapshot,
    action: &str,
    action_properties: Option<&Map<String, Value>>,
    resource: &ResourceSnapshot,
    context: &Map<String, Value>,
) -> String {
    let mut doc = json!({
        "principal": principal_doc(principal),
        "action": action,
        "resource": resource_doc(resource),
        "context": context,
    });
    if let (Some(props), Value::Object(map)) = (action_properties, &mut doc) {
        map.insert("action_properties".into(), Value::Object(props.clone()));
    }
    hex::encode(Sha256::digest(canonical_json(&doc).as_bytes()))
}

/// The whole requesting identity, as every binding hash holds it.
fn principal_doc(principal: &PrincipalSnapshot) -> Value {
    json!({
        "type": principal.kind,
        "id": principal.id,
        "issuer": principal.issuer,
        "owner": principal.owner,
        "actors": principal.actors,
        "attributes": principal.attributes,
    })
}

/// The resource, as every binding hash holds it.
fn resource_doc(resource: &ResourceSnapshot) -> Value {
    json!({"type": resource.kind, "id": resource.id, "properties": resource.properties})
}

/// The binding hash for a grant of `scope` (`@grant_scope`): for [`GrantScope::Call`],
/// [`binding_hash`] itself (so grants stored before scopes existed still match); wider, a
/// hash of what the scope keeps plus the scope and the sorted ids of the approval policies
/// that asked, so no call-scoped hash and no other policies' request can ever equal it:
/// `tool` keeps the principal, the action (and its properties) and the resource; `resource`
/// keeps the principal and the resource.
pub fn scoped_binding_hash(
    scope: GrantScope,
    principal: &PrincipalSnapshot,
    action: &str,
    action_properties: Option<&Map<String, Value>>,
    resource: &ResourceSnapshot,
    context: &Map<String, Value>,
    policy_ids: &[String],
) -> String {
    if scope == GrantScope::Call {
        return binding_hash(principal, action, action_properties, resource, context);
    }
    let mut policies: Vec<&str> = policy_ids.iter().map(String::as_str).collect();
    policies.sort_unstable();
    policies.dedup();
    let mut doc = json!({
        "scope": scope.as_str(),
        "policies": policies,
        "principal": principal_doc(principal),
        "resource": resource_doc(resource),
    });
    if let (GrantScope::Tool, Value::Object(map)) = (scope, &mut doc) {
        map.insert("action".into(), Value::String(action.to_owned()));
        if let Some(props) = action_properties {
            map.insert("action_properties".into(), Value::Object(props.clone()));
        }
    }
    hex::encode(Sha256::digest(canonical_json(&doc).as_bytes()))
}
