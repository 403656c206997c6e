//! `mandate mcp schema --server NAME`: a Cedar schema fragment with one action per tool of
//! an MCP server (`mcp:<server>/<tool>`), its `context.arguments` typed from the tool's JSON
//! Schema `inputSchema`, so policies can say `context.arguments.amount > 100` and be validated
//! strictly. Once the fragment is in the bundle, a call whose arguments do not fit is denied
//! naming the field ([`crate::policy::shape`]).
//!
//! Attributes keep the order the tool declares them in. JSON Schema → Cedar: `string` (and string `enum`/`const`) → `String`, `integer` → `Long`,
//! `boolean` → `Bool`, `array` → `Set<…>` of its `items`, `object` → a record of its
//! `properties` (those in `required` required, the others `?`), a type that admits `null`
//! → optional, local `$ref`s (`#/$defs/…`, `#/definitions/…`) followed. What Cedar cannot
//! type (`number`: Cedar has no fractions; unions; open maps) is left undeclared, with a
//! comment saying why: no policy can then read it.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::config::{Config, McpServer};

/// Deepest nesting followed in an `inputSchema` (and `$ref` chains).
const MAX_DEPTH: usize = 16;
/// Pages of `tools/list` read.
const MAX_PAGES: usize = 64;
/// The protocol version Mandate asks for in `initialize`.
const PROTOCOL_VERSION: &str = "2025-11-25";

#[derive(Debug)]
pub struct SchemaArgs<'a> {
    /// The `[[mcp.servers]]` name: the action names' `<server>` part.
    pub server: &'a str,
    /// A saved `tools/list` result (`{"tools": […]}` or the array) instead of asking the
    /// configured upstream (for a stdio server, or offline).
    pub tools: Option<&'a Path>,
    /// The principal entity type of the actions.
    pub principal_type: &'a str,
}

/// `mandate mcp schema`: print the fragment; exit 0.
pub fn schema(cfg: Option<&Config>, args: &SchemaArgs<'_>) -> anyhow::Result<u8> {
    let (tools, source) = match args.tools {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--tools: cannot read `{}`", path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("--tools: `{}` is not JSON", path.display()))?;
            let tools = match v {
                Value::Array(t) => t,
                Value::Object(mut m) => match m.remove("tools") {
                    Some(Value::Array(t)) => t,
                    _ => bail!(
                        "--tools: `{}` has no `tools` array (a tools/list result)",
                        path.display()
                    ),
                },
                _ => bail!("--tools: `{}` is not a tools/list result", path.display()),
            };
            (tools, format!("`{}`", path.display()))
        }
        None => {
            let Some(cfg) = cfg else {
                bail!("--server without --tools needs the configuration");
            };
            let Some(server) = cfg.mcp.servers.iter().find(|s| s.name == args.server) else {
                let known: Vec<&str> = cfg.mcp.servers.iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "--server: no MCP server `{}` in the configuration's [[mcp.servers]] \
                     (configured: {}); for a server that is not configured, pass --tools FILE",
                    args.server,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                );
            };
            crate::app::install_crypto()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let tools = runtime.block_on(list_tools(server, cfg.mcp.upstream_timeout))?;
            (tools, format!("the tools/list of {}", server.url))
        }
    };
    print!(
        "{}",
        fragment(args.server, args.principal_type, &source, &tools)
    );
    Ok(0)
}

/// Ask the upstream for its tools: `initialize`, `notifications/initialized`, every page of
/// `tools/list`, then end the session.
async fn list_tools(server: &McpServer, timeout: Duration) -> anyhow::Result<Vec<Value>> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()?;
    let url = server.url.as_str();
    let mut session: Option<String> = None;
    let post = |body: Value, session: Option<String>| {
        let mut req = client
            .post(url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_string());
        for (k, v) in &server.headers {
            req = req.header(k, v);
        }
        if let Some(s) = session {
            req = req
                .header("mcp-session-id", s)
                .header("mcp-protocol-version", PROTOCOL_VERSION);
        }
        async move {
            let resp = req
                .send()
                .await
                .with_context(|| format!("MCP server `{}` at {url}", server.name))?;
            let status = resp.status();
            let sid = resp
                .headers()
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp.bytes().await?;
            if !status.is_success() {
                bail!(
                    "MCP server `{}` at {url} answered {status}: {}",
                    server.name,
                    String::from_utf8_lossy(&body)
                );
            }
            anyhow::Ok((sid, body))
        }
    };
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
        "clientInfo": {"name": "mandate-mcp-schema", "version": env!("CARGO_PKG_VERSION")}}});
    let (sid, body) = post(init, None).await?;
    result_of(&body, 0, "initialize", &server.name)?;
    session = sid.or(session);
    post(
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        session.clone(),
    )
    .await?;
    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 1..=MAX_PAGES {
        let mut params = Map::new();
        if let Some(c) = &cursor {
            params.insert("cursor".into(), Value::String(c.clone()));
        }
        let ask = json!({"jsonrpc": "2.0", "id": page, "method": "tools/list", "params": params});
        let (_, body) = post(ask, session.clone()).await?;
        let result = result_of(&body, page, "tools/list", &server.name)?;
        if let Some(Value::Array(t)) = result.get("tools") {
            tools.extend(t.iter().cloned());
        }
        cursor = result
            .get("nextCursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    if let Some(s) = session {
        // Ending the session is a courtesy; its failure changes nothing printed.
        let mut req = client.delete(url).header("mcp-session-id", s);
        for (k, v) in &server.headers {
            req = req.header(k, v);
        }
        let _ = req.send().await;
    }
    Ok(tools)
}

/// The `result` of the answer to request `id`, or the error it carries.
fn result_of(body: &Bytes, id: usize, method: &str, server: &str) -> anyhow::Result<Value> {
    for msg in crate::api::mcp::messages(body) {
        if msg.get("id") != Some(&json!(id)) {
            continue;
        }
        if let Some(e) = msg.get("error") {
            bail!("MCP server `{server}` refused {method}: {e}");
        }
        if let Some(r) = msg.get("result") {
            return Ok(r.clone());
        }
    }
    bail!("MCP server `{server}` did not answer {method}")
}

/// The schema fragment for `tools` of `server`.
pub fn fragment(server: &str, principal_type: &str, source: &str, tools: &[Value]) -> String {
    let mut out = format!(
        "// Generated by `mandate mcp schema --server {server}` from {source}.\n\
         // One action per tool (`mcp:{server}/<tool>`), its arguments typed from the tool's\n\
         // inputSchema. Add it to the bundle's schema.cedarschema, which must declare the\n\
         // `McpTool` entity and the `Mandate` type (the example bundle's schema does). A call\n\
         // whose arguments do not fit these types is denied, naming the field.\n"
    );
    let mut names: Vec<(&str, &Value)> = tools
        .iter()
        .filter_map(|t| Some((t.get("name")?.as_str()?, t)))
        .collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    for (name, tool) in names {
        out.push('\n');
        let hints: Vec<&str> = [
            "readOnlyHint",
            "destructiveHint",
            "idempotentHint",
            "openWorldHint",
        ]
        .into_iter()
        .filter(|h| tool.pointer(&format!("/annotations/{h}")) == Some(&Value::Bool(true)))
        .collect();
        let description = tool
            .get("description")
            .and_then(Value::as_str)
            .map(|d| d.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let mut head = format!("// {name}");
        if !description.is_empty() {
            head.push_str(": ");
            head.push_str(&truncate(&description, 90));
        }
        if !hints.is_empty() {
            let _ = write!(head, " ({})", hints.join(", "));
        }
        out.push_str(&head);
        out.push('\n');
        let input = tool.get("inputSchema").cloned().unwrap_or(Value::Null);
        let mut notes = Vec::new();
        let arguments = match object(&input, &input, "arguments", 0, &mut notes) {
            Some(record) => record,
            None => {
                notes.push(
                    "its inputSchema is not an object schema: `arguments` is declared empty"
                        .to_owned(),
                );
                Record::default()
            }
        };
        for n in &notes {
            let _ = writeln!(out, "//   {n}");
        }
        let _ = writeln!(
            out,
            "action {} appliesTo {{\n  principal: [{principal_type}],\n  resource: [McpTool],\n  context: {{\n    arguments: {},\n    mandate: Mandate,\n  }},\n}};",
            quote(&format!("mcp:{server}/{name}")),
            arguments.render(2),
        );
    }
    out
}

/// A record type: attributes in declaration order.
#[derive(Debug, Default)]
struct Record(Vec<(String, bool, Ty)>);

#[derive(Debug)]
enum Ty {
    Long,
    String,
    Bool,
    Set(Box<Ty>),
    Record(Record),
}

impl Record {
    fn render(&self, indent: usize) -> String {
        if self.0.is_empty() {
            return "{}".into();
        }
        let pad = "  ".repeat(indent + 1);
        let mut s = String::from("{\n");
        for (name, required, ty) in &self.0 {
            let key = if is_identifier(name) {
                name.clone()
            } else {
                quote(name)
            };
            let q = if *required { "" } else { "?" };
            let _ = writeln!(s, "{pad}{key}{q}: {},", ty.render(indent + 1));
        }
        s.push_str(&"  ".repeat(indent));
        s.push('}');
        s
    }
}

impl Ty {
    fn render(&self, indent: usize) -> String {
        match self {
            Ty::Long => "Long".into(),
            Ty::String => "String".into(),
            Ty::Bool => "Bool".into(),
            Ty::Set(e) => format!("Set<{}>", e.render(indent)),
            Ty::Record(r) => r.render(indent),
        }
    }
}

/// `schema` with its local `$ref` followed.
fn resolve<'a>(root: &'a Value, schema: &'a Value, depth: usize) -> Option<&'a Value> {
    let Some(r) = schema.get("$ref").and_then(Value::as_str) else {
        return Some(schema);
    };
    if depth > MAX_DEPTH {
        return None;
    }
    let target = root.pointer(r.strip_prefix('#')?)?;
    resolve(root, target, depth + 1)
}

/// The JSON Schema `type`s of `schema` (a string or an array), with whether `null` is one.
fn types(schema: &Value) -> (Vec<&str>, bool) {
    let mut out: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    // `enum`/`const` without `type`: the type of their values.
    if out.is_empty() {
        let values: Vec<&Value> = match (schema.get("enum"), schema.get("const")) {
            (Some(Value::Array(v)), _) => v.iter().collect(),
            (_, Some(c)) => vec![c],
            _ => Vec::new(),
        };
        for v in values {
            out.push(match v {
                Value::String(_) => "string",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_i64() => "integer",
                Value::Number(_) => "number",
                Value::Null => "null",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            });
        }
    }
    // `anyOf`/`oneOf` of one type and `null` (how pydantic writes `Optional[X]`).
    if out.is_empty()
        && let Some(Value::Array(alts)) = schema.get("anyOf").or_else(|| schema.get("oneOf"))
    {
        for alt in alts {
            let (t, null) = types(alt);
            out.extend(t);
            if null {
                out.push("null");
            }
        }
    }
    let null = out.contains(&"null");
    out.retain(|t| *t != "null");
    out.sort_unstable();
    out.dedup();
    (out, null)
}

/// The record type of an object schema; `None` when `schema` is not one.
fn object(
    root: &Value,
    schema: &Value,
    path: &str,
    depth: usize,
    notes: &mut Vec<String>,
) -> Option<Record> {
    let schema = resolve(root, schema, depth)?;
    let (t, _) = types(schema);
    if t != ["object"] && schema.get("properties").is_none() {
        return None;
    }
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut record = Record::default();
    if let Some(Value::Object(props)) = schema.get("properties") {
        for (name, prop) in props {
            let at = format!("{path}.{name}");
            let Some(prop) = resolve(root, prop, depth + 1) else {
                notes.push(format!("`{at}`: its $ref cannot be followed; not declared"));
                continue;
            };
            let (_, nullable) = types(prop);
            if let Some(t) = ty(root, prop, &at, depth + 1, notes) {
                record.0.push((
                    name.clone(),
                    required.contains(&name.as_str()) && !nullable,
                    t,
                ));
            }
        }
    }
    Some(record)
}

/// The Cedar type of a property schema; `None` (with a note why) when it has none.
fn ty(
    root: &Value,
    schema: &Value,
    path: &str,
    depth: usize,
    notes: &mut Vec<String>,
) -> Option<Ty> {
    if depth > MAX_DEPTH {
        notes.push(format!("`{path}`: nested too deep; not declared"));
        return None;
    }
    let schema = resolve(root, schema, depth)?;
    let (t, _) = types(schema);
    // `anyOf` alternatives that are schemas of their own (not only a type) are followed
    // only through `types`; one object alternative is read as the object.
    let single = match t.as_slice() {
        [one] => *one,
        [] => {
            notes.push(format!("`{path}`: no single JSON type; not declared"));
            return None;
        }
        many => {
            notes.push(format!(
                "`{path}`: one of {}; Cedar has no unions, not declared",
                many.join(", ")
            ));
            return None;
        }
    };
    match single {
        "string" => Some(Ty::String),
        "integer" => Some(Ty::Long),
        "boolean" => Some(Ty::Bool),
        "number" => {
            notes.push(format!(
                "`{path}`: number; Cedar has no fractions, not declared (a fractional value is refused)"
            ));
            None
        }
        "array" => {
            let Some(items) = schema.get("items") else {
                notes.push(format!("`{path}`: an array without `items`; not declared"));
                return None;
            };
            ty(root, items, &format!("{path}[]"), depth + 1, notes).map(|e| Ty::Set(Box::new(e)))
        }
        "object" => {
            let inner = match schema.get("anyOf").or_else(|| schema.get("oneOf")) {
                Some(Value::Array(alts)) => alts
                    .iter()
                    .filter_map(|a| resolve(root, a, depth + 1))
                    .find(|a| types(a).0 == ["object"])
                    .unwrap_or(schema),
                _ => schema,
            };
            if inner.get("properties").is_none() {
                notes.push(format!(
                    "`{path}`: an object without `properties` (a map); declared as an empty record"
                ));
            }
            object(root, inner, path, depth + 1, notes).map(Ty::Record)
        }
        other => {
            notes.push(format!("`{path}`: JSON type `{other}`; not declared"));
            None
        }
    }
}

fn is_identifier(s: &str) -> bool {
    const RESERVED: [&str; 16] = [
        "true",
        "false",
        "if",
        "then",
        "else",
        "in",
        "is",
        "like",
        "has",
        "principal",
        "action",
        "resource",
        "context",
        "type",
        "entity",
        "namespace",
    ];
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !RESERVED.contains(&s)
}

/// A Cedar string literal.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(max - 1).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_schema_without(action: &str) -> String {
        // The example bundle's schema, minus the hand-written action the fragment redeclares.
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/policies/schema.cedarschema"
        ))
        .unwrap();
        let start = text.find(&format!("action \"{action}\"")).unwrap();
        let end = start + text[start..].find("};").unwrap() + 2;
        format!("{}{}", &text[..start], &text[end..])
    }

    fn tools() -> Vec<Value> {
        vec![
            json!({"name": "transfer", "description": "Move money\nbetween accounts.",
                "annotations": {"destructiveHint": true},
                "inputSchema": {"type": "object", "required": ["account", "amount"], "properties": {
                    "account": {"type": "string"},
                    "amount": {"type": "integer"},
                    "memo": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null},
                    "urgent": {"type": "boolean"},
                    "rate": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}},
                    "currency": {"enum": ["EUR", "USD"]},
                    "meta": {"type": "object", "additionalProperties": {"type": "string"}},
                    "either": {"type": ["string", "integer"]},
                    "odd-name": {"type": "string"}
                },
                "$defs": {"Line": {"type": "object", "required": ["sku"], "properties": {
                    "sku": {"type": "string"}, "qty": {"type": "integer"}}}}}}),
            json!({"name": "ping", "inputSchema": {"type": "object", "properties": {}}}),
        ]
    }

    #[test]
    fn json_schema_types_become_cedar_types_and_the_rest_is_explained() {
        let text = fragment("pay", "Agent", "a test", &tools());
        let expected = r#"// transfer: Move money between accounts. (destructiveHint)
//   `arguments.rate`: number; Cedar has no fractions, not declared (a fractional value is refused)
//   `arguments.meta`: an object without `properties` (a map); declared as an empty record
//   `arguments.either`: one of integer, string; Cedar has no unions, not declared
action "mcp:pay/transfer" appliesTo {
  principal: [Agent],
  resource: [McpTool],
  context: {
    arguments: {
      account: String,
      amount: Long,
      memo?: String,
      urgent?: Bool,
      tags?: Set<String>,
      lines?: Set<{
        sku: String,
        qty?: Long,
      }>,
      currency?: String,
      meta?: {},
      "odd-name"?: String,
    },
    mandate: Mandate,
  },
};"#;
        assert!(text.contains(expected), "{text}");
        assert!(text.contains("action \"mcp:pay/ping\" appliesTo {\n  principal: [Agent],\n  resource: [McpTool],\n  context: {\n    arguments: {},"), "{text}");
    }

    #[test]
    fn the_fragment_is_a_valid_schema_with_the_example_bundles() {
        let text = fragment("tools", "Agent", "a test", &tools());
        let full = format!("{}\n{text}", example_schema_without("mcp:tools/transfer"));
        let (schema, _) = cedar_policy::Schema::from_cedarschema_str(&full)
            .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        // And its typed arguments are what the decision path checks.
        let uid: cedar_policy::EntityUid = r#"Action::"mcp:tools/transfer""#.parse().unwrap();
        let shape = crate::policy::shape::Shape::context(&schema, &uid).unwrap();
        let Value::Object(ctx) = json!({"arguments": {"account": "a", "amount": "9"}}) else {
            unreachable!()
        };
        assert_eq!(
            shape.check_context(&ctx).unwrap_err().to_string(),
            r#"`context.arguments.amount`: expected Long, got the string "9""#
        );
    }

    #[test]
    fn names_are_quoted_as_cedar_strings() {
        assert_eq!(quote("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
        assert!(is_identifier("amount_2"));
        assert!(!is_identifier("2x") && !is_identifier("in") && !is_identifier("a-b"));
    }
}
