//! Strict JSON for untrusted bytes (token headers and claims, key sets, request bodies):
//! duplicate keys rejected at every depth, nesting bounded, UTF-8 only, no BOM
//! (docs/security.md J-22, J-23, K-08; the same rule for the API's request bodies).
//!
//! `serde_json` alone keeps the last of duplicate keys, which lets `{"sub":"a","sub":"admin"}`
//! or `{"amount":20000,"amount":250}` mean different things to different parsers (and to the
//! approver who reads the request); this pass makes a duplicate an error instead, and says
//! where it is (`context.amount`).
//!
//! The check costs nothing on the happy path: each key is inserted through the map's entry
//! API, one lookup as a plain insert would do, and the path of an error is only assembled
//! while the error unwinds (each level adds its own key).

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};

/// Longest slice of caller-supplied text echoed back in an error message.
const SHOWN_CHARS: usize = 64;

/// Caller-controlled text made safe to echo: control and non-ASCII characters escaped (no log
/// injection, no homoglyph games in 4xx bodies) and long values truncated.
pub fn shown(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == SHOWN_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_ascii_graphic() || c == ' ' {
            if c == '`' {
                out.push_str("\\`");
            } else {
                out.push(c);
            }
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

/// What a document must satisfy beyond being JSON with unique keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Nesting at most this deep (an object or array at the top level is depth 1).
    pub max_depth: usize,
    /// Refuse an escaped NUL in strings and keys: it truncates in C-backed consumers and logs,
    /// and no token claim has a reason to carry one.
    pub reject_nul: bool,
}

impl Rules {
    /// Token headers, claims and key sets.
    pub const fn token(max_depth: usize) -> Self {
        Self {
            max_depth,
            reject_nul: true,
        }
    }
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictJsonError {
    pub kind: ErrorKind,
    /// Where: the member or item at fault, as `context.items[1].amount` (for a duplicate, the
    /// duplicated member itself). Empty when the document as a whole is at fault.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The key (raw, as sent) appears a second time in one object.
    DuplicateKey(String),
    /// Nesting deeper than the limit.
    TooDeep(usize),
    /// An escaped NUL in a string or key (only with [`Rules::reject_nul`]).
    Nul,
    /// Not JSON at all (syntax, encoding, trailing bytes), as the parser words it.
    Syntax(String),
}

impl std::error::Error for StrictJsonError {}

impl fmt::Display for StrictJsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::DuplicateKey(key) => write!(f, "duplicate key `{}`", shown(key))?,
            ErrorKind::TooDeep(max) => write!(f, "nesting deeper than {max}")?,
            ErrorKind::Nul => f.write_str("NUL character in a string")?,
            ErrorKind::Syntax(message) => return f.write_str(message),
        }
        // A top-level duplicate's path is its key: naming it twice says nothing more.
        let top_level_key =
            matches!(&self.kind, ErrorKind::DuplicateKey(k) if shown(k) == self.path);
        if !self.path.is_empty() && !top_level_key {
            write!(f, " at `{}`", self.path)?;
        }
        Ok(())
    }
}

impl StrictJsonError {
    fn syntax(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Syntax(message.into()),
            path: String::new(),
        }
    }
}

/// Parse `bytes` as one JSON value with token rules (NUL refused) and nesting at most
/// `max_depth`.
pub fn parse(bytes: &[u8], max_depth: usize) -> Result<Value, StrictJsonError> {
    parse_with(bytes, Rules::token(max_depth))
}

/// Parse `bytes` as one JSON value under `rules`.
pub fn parse_with(bytes: &[u8], rules: Rules) -> Result<Value, StrictJsonError> {
    if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Err(StrictJsonError::syntax("byte order mark is not allowed"));
    }
    // Validate UTF-8 up front so every string the visitor sees is already well-formed.
    if std::str::from_utf8(bytes).is_err() {
        return Err(StrictJsonError::syntax("not valid UTF-8"));
    }
    let trail = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Seed {
        depth: 0,
        rules,
        trail: &trail,
    }
    .deserialize(&mut de)
    .map_err(|e| match trail.take() {
        Some(Trail { kind, segments }) => StrictJsonError {
            kind,
            path: render(&segments),
        },
        None => StrictJsonError::syntax(e.to_string()),
    })?;
    de.end()
        .map_err(|_| StrictJsonError::syntax("trailing characters after the JSON value"))?;
    Ok(value)
}

/// Deserialize one value strictly from inside a typed serde pass (e.g. a `deserialize_with`
/// field), `depth` levels below the document's top. Errors carry no path: a caller that needs
/// one reads the document again with [`parse_with`].
pub fn deserialize_nested<'de, D: de::Deserializer<'de>>(
    d: D,
    depth: usize,
    rules: Rules,
) -> Result<Value, D::Error> {
    let trail = RefCell::new(None);
    Seed {
        depth,
        rules,
        trail: &trail,
    }
    .deserialize(d)
}

/// One step of a path: an object member or an array item.
enum Segment {
    Key(String),
    Index(usize),
}

fn render(segments: &[Segment]) -> String {
    let mut out = String::new();
    // Pushed while unwinding: innermost first.
    for s in segments.iter().rev() {
        match s {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&shown(k));
            }
            Segment::Index(i) => {
                out.push('[');
                out.push_str(itoa::Buffer::new().format(*i));
                out.push(']');
            }
        }
    }
    out
}

/// The refusal the visitor raised, and the path to it, built as the error unwinds. `None`
/// while parsing goes well and when the parser itself (not this visitor) refused the bytes.
struct Trail {
    kind: ErrorKind,
    segments: Vec<Segment>,
}

#[derive(Clone, Copy)]
struct Seed<'t> {
    depth: usize,
    rules: Rules,
    trail: &'t RefCell<Option<Trail>>,
}

impl Seed<'_> {
    /// Record a refusal at this point (the caller then returns the error).
    fn refuse<E: de::Error>(self, kind: ErrorKind, at: Option<Segment>) -> E {
        let message = match &kind {
            ErrorKind::DuplicateKey(k) => format!("duplicate key `{}`", shown(k)),
            ErrorKind::TooDeep(max) => format!("nesting deeper than {max}"),
            ErrorKind::Nul => "NUL character in a string".to_owned(),
            ErrorKind::Syntax(m) => m.clone(),
        };
        *self.trail.borrow_mut() = Some(Trail {
            kind,
            segments: at.into_iter().collect(),
        });
        E::custom(message)
    }

    /// An error from inside `at` is passing through: add `at` to its path.
    fn through(self, at: impl FnOnce() -> Segment) {
        if let Some(t) = self.trail.borrow_mut().as_mut() {
            t.segments.push(at());
        }
    }

    fn nested<E: de::Error>(self) -> Result<Self, E> {
        let depth = self.depth + 1;
        if depth > self.rules.max_depth {
            return Err(self.refuse(ErrorKind::TooDeep(self.rules.max_depth), None));
        }
        Ok(Self { depth, ..self })
    }

    fn check_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        if self.rules.reject_nul && s.contains('\0') {
            return Err(self.refuse(ErrorKind::Nul, None));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.check_str(v)?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.check_str(&v)?;
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut out = Vec::new();
        loop {
            match seq.next_element_seed(inner) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => break,
                Err(e) => {
                    let i = out.len();
                    self.through(|| Segment::Index(i));
                    return Err(e);
                }
            }
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // One lookup, as a plain insert would do: the duplicate check is free.
            match out.entry(key) {
                Entry::Occupied(o) => {
                    let key = o.key().clone();
                    return Err(self.refuse(
                        ErrorKind::DuplicateKey(key.clone()),
                        Some(Segment::Key(key)),
                    ));
                }
                Entry::Vacant(v) => {
                    if let Err(e) = self.check_str(v.key()) {
                        self.through(|| Segment::Key(v.key().clone()));
                        return Err(e);
                    }
                    match map.next_value_seed(inner) {
                        Ok(value) => {
                            v.insert(value);
                        }
                        Err(e) => {
                            self.through(|| Segment::Key(v.key().clone()));
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: Rules = Rules {
        max_depth: 64,
        reject_nul: false,
    };

    fn refused(bytes: &str, rules: Rules) -> StrictJsonError {
        match parse_with(bytes.as_bytes(), rules) {
            Ok(v) => panic!("accepted {bytes}: {v}"),
            Err(e) => e,
        }
    }

    #[test]
    fn shown_escapes_and_truncates() {
        assert_eq!(shown("a\nb`"), "a\\nb\\`");
        assert_eq!(shown(&"x".repeat(100)).len(), 67);
        assert_eq!(shown("é"), "\\u{e9}");
    }

    #[test]
    fn j22_duplicate_keys_rejected_at_any_level() {
        assert!(parse(br#"{"a":1,"a":2}"#, 8).is_err());
        assert!(parse(br#"{"x":{"a":1,"a":1}}"#, 8).is_err());
        assert!(parse(br#"[{"a":1},{"a":1}]"#, 8).is_ok());
    }

    #[test]
    fn j22_duplicate_key_errors_name_the_path() {
        let cases = [
            (r#"{"action":"a","action":"b"}"#, "action", "action"),
            (
                r#"{"context":{"amount":20000,"amount":250}}"#,
                "amount",
                "context.amount",
            ),
            (
                r#"{"resource":{"properties":{"o":{"p":1,"p":2}}}}"#,
                "p",
                "resource.properties.o.p",
            ),
            (
                r#"{"c":{"items":[{"x":1},{"x":1,"x":2}]}}"#,
                "x",
                "c.items[1].x",
            ),
            (r#"[[{"k":1,"k":1}]]"#, "k", "[0][0].k"),
            (r#"{"a\u0000b":1,"a\u0000b":2}"#, "a\0b", "a\\u{0}b"),
        ];
        for (doc, key, path) in cases {
            let e = refused(doc, BODY);
            assert_eq!(e.kind, ErrorKind::DuplicateKey(key.into()), "{doc}");
            assert_eq!(e.path, path, "{doc}");
        }
        let e = refused(r#"{"context":{"amount":1,"amount":2}}"#, BODY);
        assert_eq!(e.to_string(), "duplicate key `amount` at `context.amount`");
        let e = refused(r#"{"sub":"a","sub":"admin"}"#, Rules::token(8));
        assert_eq!(e.to_string(), "duplicate key `sub`");
    }

    #[test]
    fn equal_keys_in_sibling_objects_are_not_duplicates() {
        let doc = r#"{"a":{"x":1},"b":{"x":1},"c":[{"x":1},{"x":2}],"x":0}"#;
        assert!(parse_with(doc.as_bytes(), BODY).is_ok());
    }

    #[test]
    fn body_rules_accept_nul_and_deeper_nesting_than_tokens() {
        assert!(parse_with(br#"{"a":"x\u0000y"}"#, BODY).is_ok());
        let deep = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(parse_with(deep.as_bytes(), BODY).is_ok());
        let deeper = format!(r#"{{"a":{}{}}}"#, "[".repeat(64), "]".repeat(64));
        let e = refused(&deeper, BODY);
        assert_eq!(e.kind, ErrorKind::TooDeep(64));
        assert_eq!(e.path, format!("a{}", "[0]".repeat(63)));
    }

    #[test]
    fn j23_json_edge_cases_rejected() {
        let bad: &[&[u8]] = &[
            b"\xEF\xBB\xBF{}",
            b"{\"a\":\"\xff\"}",
            br#"{"a":"\ud800"}"#,
            br#"{"a":"x\u0000y"}"#,
            br#"{"a\u0000":1}"#,
            br#"{"a":NaN}"#,
            br#"{"a":Infinity}"#,
            br#"{"a":1} x"#,
            br#"{"a":1 /* c */}"#,
            br#"{"a":1,}"#,
        ];
        for b in bad {
            assert!(parse(b, 8).is_err(), "{}", String::from_utf8_lossy(b));
        }
        let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        assert!(parse(deep.as_bytes(), 8).is_err());
        let eight = format!("{}{}", "[".repeat(8), "]".repeat(8));
        assert!(parse(eight.as_bytes(), 8).is_ok());
        let nine = format!("{}{}", "[".repeat(9), "]".repeat(9));
        assert!(parse(nine.as_bytes(), 8).is_err());
    }
}
