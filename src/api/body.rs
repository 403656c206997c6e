//! Request bodies: content type, size and time limits (SECURITY H-02, H-03), strict JSON (a
//! duplicate key at any depth is refused, never "last one wins": the J-22 rule for tokens,
//! applied to bodies), and JSON field extraction whose every error names the field.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{HeaderMap, Request, StatusCode};
use serde_json::{Map, Value};

use super::ApiError;
use crate::config::ServerConfig;
use crate::strict_json::{self, ErrorKind, Rules, StrictJsonError, shown};

/// Request bodies: NUL is ordinary data here (the audit log escapes it), and no decision
/// input needs more than a few levels; 64 leaves room and bounds the parser's recursion.
pub const BODY_RULES: Rules = Rules {
    max_depth: 64,
    reject_nul: false,
};

/// What to answer when the content type is not JSON: the native API says 415; the AuthZEN
/// certification scenario requires 400 (c-2-4-3).
#[derive(Debug, Clone, Copy)]
pub enum WrongTypeStatus {
    UnsupportedMediaType,
    BadRequest,
}

pub fn is_json(headers: &HeaderMap) -> bool {
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
    let (parts, body) = req.into_parts();
    read_limited(&parts.headers, body, server).await
}

/// Read a request body of any type within the configured size and time limits.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Incoming,
    server: &ServerConfig,
) -> Result<Bytes, ApiError> {
    let limit = server.max_body_bytes;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let body = Limited::new(body, limit);
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

/// Parse bytes as a JSON object, strictly: a key repeated in any object of the body is a
/// `400` naming it and its path (`context.amount`), since a parser that keeps the last one
/// would decide (or show an approver) something other than what another reader sees.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::field("(body)", "the request body is empty"));
    }
    match strict_json::parse_with(bytes, BODY_RULES) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::field(
            "(body)",
            format!(
                "the request body must be a JSON object, not {}",
                kind(&other)
            ),
        )),
        Err(e) => Err(json_error(e)),
    }
}

/// Parse bytes as any JSON value, as strictly as [`parse_object`].
pub fn parse_value(bytes: &[u8]) -> Result<Value, ApiError> {
    strict_json::parse_with(bytes, BODY_RULES).map_err(json_error)
}

/// The `400` for a body the strict parser refused, naming where when it can.
fn json_error(e: StrictJsonError) -> ApiError {
    let at = |path: String| {
        if path.is_empty() {
            "(body)".to_owned()
        } else {
            path
        }
    };
    match e.kind {
        ErrorKind::DuplicateKey(key) => ApiError::field(
            e.path,
            format!(
                "duplicate key `{}`: each key may appear only once in an object",
                shown(&key)
            ),
        ),
        ErrorKind::TooDeep(max) => ApiError::field(
            at(e.path),
            format!("the request body is nested deeper than {max} levels"),
        ),
        ErrorKind::Nul => ApiError::field(at(e.path), "NUL character in a string"),
        ErrorKind::Syntax(message) => ApiError::field(
            "(body)",
            format!("the request body is not valid JSON: {message}"),
        ),
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
/// string, the reserved context key, a duplicate key at any depth): the field-by-field reader
/// then takes the body and names what is wrong. Wherever this answers, it answers what that
/// reader would.
///
/// Duplicates: serde's derive refuses a repeated field of `Body` and `Entity`; `context` and
/// `properties` are read by the strict parser's visitor (same depth accounting as
/// [`parse_object`]), whose duplicate check is the map insert it does anyway.
pub fn quick_check(bytes: &[u8]) -> Option<(String, EntityRef, Map<String, Value>)> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        action: String,
        resource: Entity,
        // The body is depth 1, so the context object is depth 2.
        #[serde(default, deserialize_with = "strict_object::<_, 1>")]
        context: Option<Map<String, Value>>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entity {
        #[serde(rename = "type")]
        kind: String,
        id: String,
        // The body is depth 1, the resource 2, so its properties are depth 3.
        #[serde(default, deserialize_with = "strict_object::<_, 2>")]
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

/// An optional object member read strictly, `ABOVE` levels below the top of the body; `null`
/// counts as absent, anything else that is not an object is refused.
fn strict_object<'de, D, const ABOVE: usize>(d: D) -> Result<Option<Map<String, Value>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    match strict_json::deserialize_nested(d, ABOVE, BODY_RULES)? {
        Value::Object(map) => Ok(Some(map)),
        Value::Null => Ok(None),
        other => Err(serde::de::Error::custom(format_args!(
            "must be an object, not {}",
            kind(&other)
        ))),
    }
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
    fn j22_duplicate_keys_are_refused_at_every_depth_naming_the_path() {
        let cases = [
            (
                r#"{"action":"tool:shell.exec","action":"payments:transfer","resource":{"type":"A","id":"a"}}"#,
                "action",
            ),
            (
                r#"{"action":"a","resource":{"type":"A","id":"a","id":"b"}}"#,
                "resource.id",
            ),
            (
                r#"{"action":"a","resource":{"type":"A","id":"a","properties":{"o":1,"o":2}}}"#,
                "resource.properties.o",
            ),
            (
                r#"{"action":"a","resource":{"type":"A","id":"a"},"context":{"amount":20000,"amount":250}}"#,
                "context.amount",
            ),
            (
                r#"{"action":"a","resource":{"type":"A","id":"a"},"context":{"t":{"u":{"v":1,"v":1}}}}"#,
                "context.t.u.v",
            ),
            (
                r#"{"action":"a","resource":{"type":"A","id":"a"},"context":{"items":[{"x":1},{"x":1,"x":2}]}}"#,
                "context.items[1].x",
            ),
        ];
        for (text, field) in cases {
            assert!(quick_check(text.as_bytes()).is_none(), "{text}");
            let e = parse_object(text.as_bytes()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.code, "invalid_request");
            assert_eq!(e.field.as_deref(), Some(field), "{text}");
            let key = field.rsplit('.').next().unwrap();
            assert_eq!(
                e.message,
                format!("duplicate key `{key}`: each key may appear only once in an object")
            );
        }
    }

    #[test]
    fn quick_reader_takes_the_usual_body_and_nul_in_context() {
        let text = r#"{"action":"a","resource":{"type":"A","id":"a","properties":null},"context":{"s":"x\u0000y","n":{"x":[{"x":1}]}}}"#;
        let (action, resource, context) = quick_check(text.as_bytes()).unwrap();
        assert_eq!(action, "a");
        assert!(resource.properties.is_empty());
        assert_eq!(context["s"], "x\0y");
        assert!(parse_object(text.as_bytes()).is_ok());
    }

    #[test]
    fn too_deep_bodies_are_refused_by_both_readers() {
        let deep = format!(
            r#"{{"action":"a","resource":{{"type":"A","id":"a"}},"context":{{"d":{}{}}}}}"#,
            "[".repeat(63),
            "]".repeat(63)
        );
        assert!(quick_check(deep.as_bytes()).is_none());
        let e = parse_object(deep.as_bytes()).unwrap_err();
        assert!(e.message.contains("nested deeper than 64"), "{}", e.message);
        let ok = deep.replacen('[', "", 1).replacen(']', "", 1);
        assert!(quick_check(ok.as_bytes()).is_some());
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
