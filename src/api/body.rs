//! Request bodies: content type, size and time limits (SECURITY H-02, H-03), and JSON field
//! extraction whose every error names the field.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{HeaderMap, Request, StatusCode};
use serde_json::{Map, Value};

use super::ApiError;
use crate::config::ServerConfig;

/// What to answer when the content type is not JSON: the native API says 415; the AuthZEN
/// certification scenario requires 400 (c-2-4-3).
#[derive(Debug, Clone, Copy)]
pub enum WrongTypeStatus {
    UnsupportedMediaType,
    BadRequest,
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false)
}

/// Read the body of `req` as one JSON object, within the configured limits.
pub async fn read_json_object(
    req: Request<Incoming>,
    server: &ServerConfig,
    wrong_type: WrongTypeStatus,
) -> Result<Map<String, Value>, ApiError> {
    parse_object(&read_json_bytes(req, server, wrong_type).await?)
}

/// Read the raw bytes of a JSON body, within the configured limits (not parsed yet).
pub async fn read_json_bytes(
    req: Request<Incoming>,
    server: &ServerConfig,
    wrong_type: WrongTypeStatus,
) -> Result<Bytes, ApiError> {
    if !is_json(req.headers()) {
        let status = match wrong_type {
            WrongTypeStatus::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            WrongTypeStatus::BadRequest => StatusCode::BAD_REQUEST,
        };
        return Err(ApiError::new(
            status,
            "unsupported_media_type",
            "the request body must be `application/json`",
        ));
    }
    let limit = server.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let body = Limited::new(req.into_body(), limit);
    let collected = tokio::time::timeout(server.body_read_timeout, body.collect()).await;
    let bytes = match collected {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(server.body_read_timeout)
                ),
            ));
        }
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(too_large(limit));
            }
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("cannot read the request body: {e}"),
            ));
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    Ok(bytes)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is larger than {limit} bytes"),
    )
}

/// Parse bytes as a JSON object.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::field("(body)", "the request body is empty"));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::field(
            "(body)",
            format!(
                "the request body must be a JSON object, not {}",
                kind(&other)
            ),
        )),
        Err(e) => Err(ApiError::field(
            "(body)",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// A required JSON object member.
pub fn object<'a>(
    map: &'a Map<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<&'a Map<String, Value>, ApiError> {
    match map.get(key) {
        Some(Value::Object(o)) => Ok(o),
        Some(other) => Err(ApiError::field(
            path(prefix, key),
            format!("must be an object, not {}", kind(other)),
        )),
        None => Err(ApiError::field(path(prefix, key), "is required")),
    }
}

/// An optional JSON object member (`null` counts as absent).
pub fn opt_object<'a>(
    map: &'a Map<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(ApiError::field(
            path(prefix, key),
            format!("must be an object, not {}", kind(other)),
        )),
    }
}

/// A required, non-empty string member.
pub fn string<'a>(
    map: &'a Map<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<&'a str, ApiError> {
    match map.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(ApiError::field(path(prefix, key), "must not be empty")),
        Some(other) => Err(ApiError::field(
            path(prefix, key),
            format!("must be a string, not {}", kind(other)),
        )),
        None => Err(ApiError::field(path(prefix, key), "is required")),
    }
}

/// Refuse members outside `allowed` (the native API is strict: a typo such as `contxt` must
/// not silently drop the context a policy depends on).
pub fn only_known(
    map: &Map<String, Value>,
    prefix: &str,
    allowed: &[&str],
) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::field(
            path(prefix, k),
            format!("unknown field (expected one of: {})", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

/// An entity reference `{type, id, properties?}` as used by both APIs.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityRef {
    pub kind: String,
    pub id: String,
    pub properties: Map<String, Value>,
}

pub fn entity_ref(
    map: &Map<String, Value>,
    key: &str,
    strict: bool,
) -> Result<EntityRef, ApiError> {
    let obj = object(map, "", key)?;
    if strict {
        only_known(obj, key, &["type", "id", "properties"])?;
    }
    Ok(EntityRef {
        kind: string(obj, key, "type")?.to_owned(),
        id: string(obj, key, "id")?.to_owned(),
        properties: opt_object(obj, key, "properties")?
            .cloned()
            .unwrap_or_default(),
    })
}

/// The usual native check body, `{"action", "resource", "context"?}`, read in one typed
/// pass. `None` for anything else (a `subject`, an unknown field, a wrong type, an empty
/// string, the reserved context key, a duplicate field): the field-by-field reader then takes
/// the body and names what is wrong. Wherever this answers, it answers what that reader would.
pub fn quick_check(bytes: &[u8]) -> Option<(String, EntityRef, Map<String, Value>)> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        action: String,
        resource: Entity,
        context: Option<Map<String, Value>>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entity {
        #[serde(rename = "type")]
        kind: String,
        id: String,
        properties: Option<Map<String, Value>>,
    }
    let body: Body = serde_json::from_slice(bytes).ok()?;
    let context = body.context.unwrap_or_default();
    let r = body.resource;
    if body.action.is_empty()
        || r.kind.is_empty()
        || r.id.is_empty()
        || context.contains_key("mandate")
    {
        return None;
    }
    let resource = EntityRef {
        kind: r.kind,
        id: r.id,
        properties: r.properties.unwrap_or_default(),
    };
    Some((body.action, resource, context))
}

/// The caller's context; the key `mandate` is reserved for what Mandate adds itself.
pub fn context(map: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let ctx = opt_object(map, "", "context")?.cloned().unwrap_or_default();
    if ctx.contains_key("mandate") {
        return Err(ApiError::field(
            "context.mandate",
            "is reserved: Mandate sets it (current time, action properties)",
        ));
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn empty_and_non_object_bodies_are_refused() {
        assert_eq!(
            parse_object(b"  ").unwrap_err().message,
            "the request body is empty"
        );
        assert!(
            parse_object(b"[1]")
                .unwrap_err()
                .message
                .contains("an array")
        );
        assert!(
            parse_object(b"{")
                .unwrap_err()
                .message
                .contains("not valid JSON")
        );
    }

    #[test]
    fn entity_errors_name_the_field() {
        let m = obj(json!({"resource": {"type": "Account"}}));
        assert_eq!(
            entity_ref(&m, "resource", true)
                .unwrap_err()
                .field
                .as_deref(),
            Some("resource.id")
        );
        let m = obj(json!({"resource": {"type": 1, "id": "a"}}));
        let e = entity_ref(&m, "resource", true).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("resource.type"));
        assert_eq!(e.message, "must be a string, not a number");
        let m = obj(json!({"resource": {"type": "A", "id": "a", "propertes": {}}}));
        assert_eq!(
            entity_ref(&m, "resource", true)
                .unwrap_err()
                .field
                .as_deref(),
            Some("resource.propertes")
        );
        assert!(entity_ref(&m, "resource", false).is_ok());
    }

    #[test]
    fn reserved_context_key_is_refused() {
        let m = obj(json!({"context": {"mandate": {"now": 0}}}));
        assert_eq!(
            context(&m).unwrap_err().field.as_deref(),
            Some("context.mandate")
        );
    }
}
