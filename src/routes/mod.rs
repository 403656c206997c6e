//! Request → action routes: how an HTTP request a proxy asks about (its method, host, path,
//! headers, query string, JSON body, Envoy `context_extensions`) becomes a check: an action,
//! a resource and a context. Pure, and wire-agnostic: the forward-auth adapters (and the
//! gRPC `ext_authz` one to come) hand in a view of the request and get the check out; the
//! service decides it.
//!
//! Rules come from `[[routes]]` in the configuration, compiled at load (templates split into
//! segments, sources parsed), and are tried in the order written: the first whose method,
//! host and path template match wins. An unmatched request takes the configured default
//! action, or none: the adapter then denies it (`no_route`).
//!
//! Fail closed on any doubt about what the upstream will see. The path is split on `/` and
//! each segment percent-decoded before it is compared, so `/acc%6Funts` is `/accounts`; a
//! path whose reading could differ between Mandate and the upstream is refused whole: an
//! empty segment (`//`), a `.` or `..` segment (encoded or not), an encoded `/` or a
//! backslash, a control character, or bad percent-encoding. One trailing slash names the
//! same resource as none (many frameworks route them alike). A header or query parameter a
//! rule reads that comes twice is refused rather than picking one (the upstream may pick the
//! other).

mod parse;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::policy::Bundle;
use crate::vocabulary::Resource;

pub use parse::{RouteSpec, SpecProblem};

/// Reason code of the deny given to a request that no route maps to an action.
pub const NO_ROUTE: &str = "no_route";

/// Resource type under which an unrouted request is recorded (its id is the path).
pub const UNROUTED_RESOURCE_TYPE: &str = "HttpPath";

/// A compiled `[[routes]]` rule.
#[derive(Debug, Clone)]
pub struct Route {
    name: String,
    host: Option<HostPattern>,
    /// `None`: any method (`*`).
    methods: Option<Vec<String>>,
    segments: Vec<Segment>,
    action: String,
    resource_type: String,
    resource_id: IdSource,
    context: Vec<(String, Source)>,
}

impl Route {
    /// The rule's `name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether any context value comes from the JSON body (the adapter reads it only then).
    pub fn reads_body(&self) -> bool {
        self.context
            .iter()
            .any(|(_, s)| matches!(s.from, Input::Body(_)))
    }

    fn matches(&self, method: &str, host: Option<&str>, path: &[String]) -> Option<Params> {
        if let Some(methods) = &self.methods
            && !methods.iter().any(|m| m == method)
        {
            return None;
        }
        if let Some(pattern) = &self.host
            && !host.is_some_and(|h| pattern.matches(h))
        {
            return None;
        }
        let mut params = Params::new();
        let mut rest = path;
        for segment in &self.segments {
            match segment {
                Segment::Literal(l) => match rest.split_first() {
                    Some((first, tail)) if first == l => rest = tail,
                    _ => return None,
                },
                Segment::Param(name) => {
                    let (first, tail) = rest.split_first()?;
                    params.push((name.clone(), first.clone()));
                    rest = tail;
                }
                Segment::Rest(name) => {
                    if rest.is_empty() {
                        return None;
                    }
                    params.push((name.clone(), rest.join("/")));
                    rest = &[];
                }
            }
        }
        rest.is_empty().then_some(params)
    }
}

/// The check for requests no rule matches, when configured
/// (`forward_auth.default_action`, `forward_auth.default_resource_type`): the resource id
/// is the request's path (decoded, as matched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultRoute {
    pub action: String,
    pub resource_type: String,
}

/// One path segment of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{name}`: one segment.
    Param(String),
    /// `{name*}`, last only: one or more segments, joined with `/`.
    Rest(String),
}

/// Where a resource id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IdSource {
    Literal(String),
    Param(String),
}

/// `host`: exact (`api.example.com`, any port; `api.example.com:8443`, that port only) or
/// any subdomain (`*.example.com`). Compared without case.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact { host: String, port: Option<u16> },
    Subdomain(String),
}

impl HostPattern {
    fn matches(&self, authority: &str) -> bool {
        let Some((host, port)) = split_authority(authority) else {
            return false;
        };
        match self {
            HostPattern::Exact { host: h, port: p } => {
                *h == host && p.is_none_or(|p| Some(p) == port)
            }
            // `.example.com` after at least one label.
            HostPattern::Subdomain(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }
}

/// `host[:port]` or `[v6]:port`, lowercased, without a trailing dot.
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let a = authority.trim();
    let (host, port) = if let Some(v6) = a.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        (format!("[{h}]"), port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p.parse().ok()?)),
            None => (a.to_owned(), None),
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some((host, port))
}

/// A context value's source, as written `kind:name[:number]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    from: Input,
    /// `:number`: the text must be an integer (a Cedar `Long`), given as a JSON number.
    number: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Input {
    Path(String),
    /// Lowercase.
    Header(String),
    Query(String),
    /// A JSON pointer (RFC 6901) into the body.
    Body(String),
    /// An Envoy `context_extensions` key.
    Ext(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, name) = match &self.from {
            Input::Path(n) => ("path", n),
            Input::Header(n) => ("header", n),
            Input::Query(n) => ("query", n),
            Input::Body(n) => ("body", n),
            Input::Ext(n) => ("ext", n),
        };
        write!(f, "{kind}:{name}")?;
        if self.number {
            f.write_str(":number")?;
        }
        Ok(())
    }
}

type Params = Vec<(String, String)>;

/// One header lookup, as the request's headers answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    Absent,
    One(&'a str),
    /// Sent more than once.
    Repeated,
    /// Not visible ASCII.
    NotText,
}

/// A request's headers, by lowercase name: each adapter implements it over its own type.
pub trait Headers {
    fn lookup(&self, name: &str) -> Lookup<'_>;
}

/// Headers as `(name, value)` pairs (the CLI, tests), names compared without case.
impl Headers for Vec<(String, String)> {
    fn lookup(&self, name: &str) -> Lookup<'_> {
        let mut found = self.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
        match (found.next(), found.next()) {
            (None, _) => Lookup::Absent,
            (Some(_), Some(_)) => Lookup::Repeated,
            (Some((_, v)), None) => Lookup::One(v),
        }
    }
}

/// What a rule's context may read besides the path.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub headers: &'a (dyn Headers + Sync),
    /// The raw query string (after `?`), if any.
    pub query: Option<&'a str>,
    /// The JSON body, when the rule reads it and one was sent.
    pub body: Option<&'a Value>,
    /// Envoy `context_extensions` (the gRPC adapter); `None` over HTTP.
    pub extensions: Option<&'a HashMap<String, String>>,
}

impl std::fmt::Debug for Inputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("query", &self.query)
            .field("body", &self.body.is_some())
            .finish_non_exhaustive()
    }
}

/// A request that cannot be routed without doubt: the adapter refuses it (a `400` naming
/// [`RouteError::field`]), never guesses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("the path `{path}` is refused: {why}")]
    Path { path: String, why: &'static str },
    #[error("header `{0}` is sent more than once: which one the upstream reads is unknown")]
    RepeatedHeader(String),
    #[error("header `{0}` is not visible ASCII")]
    HeaderNotText(String),
    #[error(
        "query parameter `{0}` is given more than once: which one the upstream reads is unknown"
    )]
    RepeatedQuery(String),
    #[error("the query string is not valid percent-encoded UTF-8")]
    QueryEncoding,
    #[error("`{value}` (from `{from}`) is not an integer")]
    NotANumber {
        key: String,
        from: String,
        value: String,
    },
}

impl RouteError {
    /// The request field at fault: `path`, `header x-amount`, `query amount`, `context.amount`.
    pub fn field(&self) -> String {
        match self {
            RouteError::Path { .. } => "path".into(),
            RouteError::RepeatedHeader(h) | RouteError::HeaderNotText(h) => format!("header {h}"),
            RouteError::RepeatedQuery(q) => format!("query {q}"),
            RouteError::QueryEncoding => "query".into(),
            RouteError::NotANumber { key, .. } => format!("context.{key}"),
        }
    }
}

/// Which rule a request matched.
#[derive(Debug, Clone, Copy)]
pub enum Matched<'r> {
    /// `routes[index]`.
    Rule { index: usize, route: &'r Route },
    /// No rule: the configured default action.
    Default(&'r DefaultRoute),
    /// No rule and no default: the request is denied (`no_route`).
    None,
}

/// A request matched against the rules: which rule, and its path parameters.
#[derive(Debug, Clone)]
pub struct Match<'r> {
    pub matched: Matched<'r>,
    method: String,
    /// `/` and the decoded segments: the path as matched.
    path: String,
    params: Params,
}

/// The check a request maps to (for an unrouted one, what its deny is recorded under).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Routed {
    pub action: String,
    pub resource: RoutedResource,
    pub context: Map<String, Value>,
}

/// A resource as printed by `mandate route test` (`{"type", "id"}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoutedResource {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

impl Routed {
    /// The resource as the core speaks of it.
    pub fn resource(&self) -> Resource {
        Resource {
            kind: self.resource.kind.clone(),
            id: self.resource.id.clone(),
            properties: Map::new(),
        }
    }
}

impl Match<'_> {
    /// Whether the matched rule reads the JSON body.
    pub fn reads_body(&self) -> bool {
        matches!(self.matched, Matched::Rule { route, .. } if route.reads_body())
    }

    /// The path as matched: decoded segments joined by `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The check: for a rule, its action, resource and context read from `inputs`; for the
    /// default, its action on `default_resource_type::"<path>"` with the method as context;
    /// unrouted, `http:<METHOD>` on `HttpPath::"<path>"`, for the record of its deny.
    pub fn resolve(&self, inputs: &Inputs<'_>) -> Result<Routed, RouteError> {
        let path_resource = |kind: &str| RoutedResource {
            kind: kind.to_owned(),
            id: self.path.clone(),
        };
        let method_context = || {
            let mut m = Map::new();
            m.insert("method".into(), Value::String(self.method.clone()));
            m
        };
        let route = match self.matched {
            Matched::Rule { route, .. } => route,
            Matched::Default(d) => {
                return Ok(Routed {
                    action: d.action.clone(),
                    resource: path_resource(&d.resource_type),
                    context: method_context(),
                });
            }
            Matched::None => {
                return Ok(Routed {
                    action: format!("http:{}", self.method),
                    resource: path_resource(UNROUTED_RESOURCE_TYPE),
                    context: Map::new(),
                });
            }
        };
        let id = match &route.resource_id {
            IdSource::Literal(l) => l.clone(),
            IdSource::Param(p) => self.param(p).unwrap_or_default().to_owned(),
        };
        let mut context = Map::new();
        for (key, source) in &route.context {
            if let Some(value) = self.value(key, source, inputs)? {
                context.insert(key.clone(), value);
            }
        }
        Ok(Routed {
            action: route.action.clone(),
            resource: RoutedResource {
                kind: route.resource_type.clone(),
                id,
            },
            context,
        })
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `source` for context key `key`; `None` when the request does not carry
    /// it (the key is then left out, and a policy that needs it errors: a deny).
    fn value(
        &self,
        key: &str,
        source: &Source,
        inputs: &Inputs<'_>,
    ) -> Result<Option<Value>, RouteError> {
        let text = match &source.from {
            Input::Path(p) => self.param(p).map(str::to_owned),
            Input::Header(h) => match inputs.headers.lookup(h) {
                Lookup::Absent => None,
                Lookup::One(v) => Some(v.to_owned()),
                Lookup::Repeated => return Err(RouteError::RepeatedHeader(h.clone())),
                Lookup::NotText => return Err(RouteError::HeaderNotText(h.clone())),
            },
            Input::Query(q) => query_value(inputs.query, q)?,
            Input::Ext(k) => inputs.extensions.and_then(|e| e.get(k)).cloned(),
            Input::Body(pointer) => {
                return Ok(inputs.body.and_then(|b| b.pointer(pointer)).cloned());
            }
        };
        let Some(text) = text else {
            return Ok(None);
        };
        if !source.number {
            return Ok(Some(Value::String(text)));
        }
        match text.parse::<i64>() {
            Ok(n) => Ok(Some(Value::from(n))),
            Err(_) => Err(RouteError::NotANumber {
                key: key.to_owned(),
                from: source.to_string(),
                value: text,
            }),
        }
    }
}

/// The one value of query parameter `name` (keys and values form-decoded: `+` is a space).
/// Any pair that cannot be decoded refuses the whole query: its key might be `name`.
fn query_value(query: Option<&str>, name: &str) -> Result<Option<String>, RouteError> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut found = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = form_decode(k).ok_or(RouteError::QueryEncoding)?;
        if k != name {
            continue;
        }
        if found.is_some() {
            return Err(RouteError::RepeatedQuery(name.to_owned()));
        }
        found = Some(form_decode(v).ok_or(RouteError::QueryEncoding)?);
    }
    Ok(found)
}

fn form_decode(s: &str) -> Option<String> {
    let bytes = percent_decode(&s.replace('+', " "))?;
    String::from_utf8(bytes).ok()
}

/// `%XX` escapes decoded; `None` for a `%` not followed by two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The decoded segments of a request path, or why it is refused (see the module docs).
fn segments(path: &str) -> Result<Vec<String>, &'static str> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("it does not start with `/`");
    };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    rest.split('/').map(segment).collect()
}

fn segment(raw: &str) -> Result<String, &'static str> {
    if raw.is_empty() {
        return Err("it has an empty segment (`//`)");
    }
    if raw.contains('\\') {
        return Err("it has a backslash");
    }
    let bytes = percent_decode(raw).ok_or("it has a `%` not followed by two hex digits")?;
    let decoded = String::from_utf8(bytes).map_err(|_| "it is not UTF-8 once decoded")?;
    if decoded.contains(['/', '\\']) {
        return Err("it has an encoded `/` or `\\` inside a segment");
    }
    if decoded == "." || decoded == ".." {
        return Err("it has a `.` or `..` segment");
    }
    if decoded.chars().any(char::is_control) {
        return Err("it has a control character");
    }
    Ok(decoded)
}

/// The compiled rules, in order, and the default for unmatched requests.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    rules: Vec<Route>,
    default: Option<DefaultRoute>,
}

/// A rule (or the default) that does not fit the bundle's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    /// `Some(i)`: `routes[i]`; `None`: the default (`forward_auth.default_*`).
    pub rule: Option<usize>,
    /// `action` or `resource.type` (`default_action`, `default_resource_type` for the default).
    pub key: &'static str,
    pub message: String,
}

impl Routes {
    pub fn new(rules: Vec<Route>, default: Option<DefaultRoute>) -> Self {
        Self { rules, default }
    }

    pub fn rules(&self) -> &[Route] {
        &self.rules
    }

    pub fn default_route(&self) -> Option<&DefaultRoute> {
        self.default.as_ref()
    }

    /// The first rule matching `method`, `host` (`Host` as sent, port included) and the raw
    /// `path` (no query string), else the default, else none. A path that cannot be read
    /// without doubt is an error whatever the rules.
    pub fn find(
        &self,
        method: &str,
        host: Option<&str>,
        path: &str,
    ) -> Result<Match<'_>, RouteError> {
        let segs = segments(path).map_err(|why| RouteError::Path {
            path: path.to_owned(),
            why,
        })?;
        let normalized = format!("/{}", segs.join("/"));
        let hit =
            self.rules.iter().enumerate().find_map(|(index, route)| {
                Some((index, route, route.matches(method, host, &segs)?))
            });
        let (matched, params) = match (hit, &self.default) {
            (Some((index, route, params)), _) => (Matched::Rule { index, route }, params),
            (None, Some(d)) => (Matched::Default(d), Params::new()),
            (None, None) => (Matched::None, Params::new()),
        };
        Ok(Match {
            matched,
            method: method.to_owned(),
            path: normalized,
            params,
        })
    }

    /// Every rule (and the default) whose action the bundle's schema does not declare, or
    /// whose resource type it does not declare or the action does not apply to.
    pub fn check_schema(&self, bundle: &Bundle) -> Vec<SchemaProblem> {
        let mut out = Vec::new();
        let types: Vec<String> = bundle
            .schema()
            .entity_types()
            .map(ToString::to_string)
            .collect();
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (Some(i), &r.action, &r.resource_type));
        let default = self
            .default
            .iter()
            .map(|d| (None, &d.action, &d.resource_type));
        for (rule, action, kind) in rules.chain(default) {
            let (action_key, type_key) = match rule {
                Some(_) => ("action", "resource.type"),
                None => ("default_action", "default_resource_type"),
            };
            if !types.iter().any(|t| t == kind) {
                out.push(SchemaProblem {
                    rule,
                    key: type_key,
                    message: format!(
                        "entity type `{kind}` is not declared in the bundle's schema (it declares: {})",
                        types.join(", ")
                    ),
                });
            }
            let Some(slice) = bundle.slice(action) else {
                out.push(SchemaProblem {
                    rule,
                    key: action_key,
                    message: format!(
                        "action `{action}` is not declared in the bundle's schema (it declares: {})",
                        bundle.actions().collect::<Vec<_>>().join(", ")
                    ),
                });
                continue;
            };
            let applies: Vec<String> = bundle
                .schema()
                .resources_for_action(slice.uid())
                .map(|it| it.map(ToString::to_string).collect())
                .unwrap_or_default();
            if types.iter().any(|t| t == kind) && !applies.iter().any(|t| t == kind) {
                out.push(SchemaProblem {
                    rule,
                    key: type_key,
                    message: format!(
                        "action `{action}` does not apply to `{kind}` resources (it applies to: {})",
                        applies.join(", ")
                    ),
                });
            }
        }
        out
    }
}
