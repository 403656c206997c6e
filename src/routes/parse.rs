//! Compiling one `[[routes]]` entry as written into a [`Route`]: its path template, host
//! pattern, methods, resource id and context sources, each problem named by its key under
//! the rule (`path`, `context.amount`) so the configuration reader can report them all.

use super::{HostPattern, IdSource, Input, Route, Segment, Source, split_authority};
use crate::vocabulary::RESERVED_CONTEXT_KEY;

/// A `[[routes]]` entry as written (the configuration reader has checked the TOML types).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSpec {
    pub name: String,
    pub host: Option<String>,
    /// `["POST"]`, or `["*"]` for any method.
    pub methods: Vec<String>,
    /// `/accounts/{id}/transfers`.
    pub path: String,
    pub action: String,
    pub resource_type: String,
    /// `{param}` or a literal id.
    pub resource_id: String,
    /// Context key → source (`body:/amount`, `header:x-amount:number`), in the order written.
    pub context: Vec<(String, String)>,
}

/// One problem with a rule, at `key` under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub key: String,
    pub message: String,
}

impl Route {
    /// Compile `spec`, or every problem found in it.
    pub fn compile(spec: &RouteSpec) -> Result<Route, Vec<SpecProblem>> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, message: String| {
            problems.push(SpecProblem {
                key: key.to_owned(),
                message,
            })
        };
        for (key, value) in [
            ("name", &spec.name),
            ("action", &spec.action),
            ("resource.type", &spec.resource_type),
            ("resource.id", &spec.resource_id),
        ] {
            if value.trim().is_empty() {
                bad(key, "must not be empty".into());
            }
        }
        let segments = template(&spec.path).unwrap_or_else(|e| {
            bad("path", e);
            Vec::new()
        });
        let params: Vec<&str> = segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param(n) | Segment::Rest(n) => Some(n.as_str()),
                Segment::Literal(_) => None,
            })
            .collect();
        let host = spec
            .host
            .as_deref()
            .and_then(|h| host_pattern(h).map_err(|e| bad("host", e)).ok());
        let methods = methods(&spec.methods).unwrap_or_else(|(key, e)| {
            bad(&key, e);
            None
        });
        let resource_id = resource_id(&spec.resource_id, &params).unwrap_or_else(|e| {
            bad("resource.id", e);
            IdSource::Literal(String::new())
        });
        let mut context = Vec::with_capacity(spec.context.len());
        for (key, text) in &spec.context {
            let at = format!("context.{key}");
            if key == RESERVED_CONTEXT_KEY {
                bad(
                    &at,
                    format!("`{RESERVED_CONTEXT_KEY}` is reserved for what Mandate adds"),
                );
                continue;
            }
            match source(text, &params) {
                Ok(s) => context.push((key.clone(), s)),
                Err(e) => bad(&at, e),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Route {
            name: spec.name.clone(),
            host,
            methods,
            segments,
            action: spec.action.clone(),
            resource_type: spec.resource_type.clone(),
            resource_id,
            context,
        })
    }
}

/// A path template: `/` then segments, each a literal or a whole-segment parameter.
fn template(path: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("`{path}` must start with `/`"));
    };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let mut out: Vec<Segment> = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(format!(
                "`{path}` has an empty segment (a template has no `//` and no trailing `/`)"
            ));
        }
        let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) else {
            if part.contains(['{', '}', '%', '?', '#', '\\']) || part.chars().any(char::is_control)
            {
                return Err(format!(
                    "segment `{part}`: a literal has no `{{`, `}}`, `%`, `?`, `#`, `\\` or control \
                     character (a parameter is a whole segment: `{{id}}`)"
                ));
            }
            if *part == "." || *part == ".." {
                return Err(format!("segment `{part}`: no `.` or `..` segments"));
            }
            out.push(Segment::Literal((*part).to_owned()));
            continue;
        };
        let (name, rest) = match inner.strip_suffix('*') {
            Some(n) => (n, true),
            None => (inner, false),
        };
        if !is_identifier(name) {
            return Err(format!(
                "segment `{part}`: a parameter is `{{name}}` (or, last, `{{name*}}`) with a name of \
                 ASCII letters, digits and `_`"
            ));
        }
        if rest && i + 1 != parts.len() {
            return Err(format!(
                "segment `{part}`: `{{{name}*}}` must be the last segment"
            ));
        }
        let taken = out
            .iter()
            .any(|s| matches!(s, Segment::Param(n) | Segment::Rest(n) if n == name));
        if taken {
            return Err(format!("parameter `{name}` appears twice"));
        }
        out.push(if rest {
            Segment::Rest(name.to_owned())
        } else {
            Segment::Param(name.to_owned())
        });
    }
    Ok(out)
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `api.example.com`, `api.example.com:8443`, `[::1]:8181` or `*.example.com`.
fn host_pattern(text: &str) -> Result<HostPattern, String> {
    let lower = text.trim().to_ascii_lowercase();
    let hostname = |h: &str| {
        !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    if let Some(suffix) = lower.strip_prefix("*.") {
        if !hostname(suffix) {
            return Err(format!(
                "`{text}`: a wildcard is `*.` followed by a host name, e.g. `*.example.com`"
            ));
        }
        return Ok(HostPattern::Subdomain(format!(".{suffix}")));
    }
    let valid = |h: &str| hostname(h) || (h.starts_with('[') && h.ends_with(']'));
    match split_authority(&lower) {
        Some((host, port)) if valid(&host) => Ok(HostPattern::Exact { host, port }),
        _ => Err(format!(
            "`{text}` is not a host like `api.example.com`, `api.example.com:8443` or \
             `*.example.com`"
        )),
    }
}

/// `None`: any method.
fn methods(list: &[String]) -> Result<Option<Vec<String>>, (String, String)> {
    if list.is_empty() {
        return Err((
            "method".into(),
            "at least one method is required (`*` for any)".into(),
        ));
    }
    if list.iter().any(|m| m == "*") {
        if list.len() > 1 {
            return Err(("method".into(), "`*` (any method) stands alone".into()));
        }
        return Ok(None);
    }
    for (i, m) in list.iter().enumerate() {
        let token = !m.is_empty()
            && m.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !token {
            let key = if list.len() == 1 {
                "method".to_owned()
            } else {
                format!("method[{i}]")
            };
            return Err((
                key,
                format!("`{m}` is not a method like `POST` (methods are case-sensitive)"),
            ));
        }
    }
    Ok(Some(list.to_vec()))
}

fn resource_id(text: &str, params: &[&str]) -> Result<IdSource, String> {
    match text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        Some(name) if params.contains(&name) => Ok(IdSource::Param(name.to_owned())),
        Some(name) => Err(format!(
            "`{{{name}}}` is not a parameter of the path template (it has: {})",
            list(params)
        )),
        None if text.contains(['{', '}']) => Err(format!(
            "`{text}`: the id is a whole `{{param}}` of the path, or a literal"
        )),
        None => Ok(IdSource::Literal(text.to_owned())),
    }
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        return "none".into();
    }
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `path:NAME`, `header:NAME`, `query:NAME`, `ext:KEY` (each with an optional `:number`), or
/// `body:/json/pointer`.
fn source(text: &str, params: &[&str]) -> Result<Source, String> {
    const KINDS: &str = "`path:`, `header:`, `query:`, `body:` or `ext:`";
    let Some((kind, rest)) = text.split_once(':') else {
        return Err(format!("`{text}` is not a source: it starts with {KINDS}"));
    };
    if kind == "body" {
        return body_pointer(rest).map(|p| Source {
            from: Input::Body(p),
            number: false,
        });
    }
    let (name, number) = match rest.strip_suffix(":number") {
        Some(n) => (n, true),
        None => (rest, false),
    };
    if name.is_empty() {
        return Err(format!("`{text}` names no {kind}"));
    }
    let from = match kind {
        "path" if params.contains(&name) => Input::Path(name.to_owned()),
        "path" => {
            return Err(format!(
                "`{name}` is not a parameter of the path template (it has: {})",
                list(params)
            ));
        }
        "header" => {
            let token = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
            if !token {
                return Err(format!("`{name}` is not a header name"));
            }
            Input::Header(name.to_ascii_lowercase())
        }
        "query" => Input::Query(name.to_owned()),
        "ext" => Input::Ext(name.to_owned()),
        other => return Err(format!("`{other}:` is not a source: it is one of {KINDS}")),
    };
    Ok(Source { from, number })
}

/// An RFC 6901 JSON pointer: `/` then reference tokens, `~` only as `~0` or `~1`.
fn body_pointer(pointer: &str) -> Result<String, String> {
    if !pointer.starts_with('/') {
        return Err(format!(
            "`body:{pointer}`: the body is read by a JSON pointer, e.g. `body:/amount`"
        ));
    }
    if pointer.ends_with(":number") {
        return Err(format!(
            "`body:{pointer}`: body values keep their JSON type; drop `:number`"
        ));
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "`body:{pointer}`: `~` in a JSON pointer is only `~0` (for `~`) or `~1` (for `/`)"
            ));
        }
    }
    Ok(pointer.to_owned())
}
