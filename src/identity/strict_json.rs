//! Strict JSON for untrusted token and key-set bytes: UTF-8 only, no BOM, duplicate keys
//! rejected, nesting bounded (shared/SECURITY.md J-22, J-23, K-08).
//!
//! `serde_json` alone keeps the last of duplicate keys, which lets `{"sub":"a","sub":"admin"}`
//! mean different things to different parsers; this pass makes a duplicate an error instead.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a document was refused; the message names the offending key in backticks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StrictJsonError(pub String);

/// Parse `bytes` as one JSON value with nesting at most `max_depth` (an object or array at
/// the top level is depth 1).
pub fn parse(bytes: &[u8], max_depth: usize) -> Result<Value, StrictJsonError> {
    if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Err(StrictJsonError("byte order mark is not allowed".into()));
    }
    // Validate UTF-8 up front so every string the visitor sees is already well-formed.
    if std::str::from_utf8(bytes).is_err() {
        return Err(StrictJsonError("not valid UTF-8".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Seed {
        depth: 0,
        max_depth,
    }
    .deserialize(&mut de)
    .map_err(|e| StrictJsonError(e.to_string()))?;
    de.end()
        .map_err(|_| StrictJsonError("trailing characters after the JSON value".into()))?;
    Ok(value)
}

#[derive(Clone, Copy)]
struct Seed {
    depth: usize,
    max_depth: usize,
}

impl Seed {
    fn nested<E: de::Error>(self) -> Result<Self, E> {
        let depth = self.depth + 1;
        if depth > self.max_depth {
            return Err(E::custom(format_args!(
                "nesting deeper than {}",
                self.max_depth
            )));
        }
        Ok(Self { depth, ..self })
    }
}

impl<'de> DeserializeSeed<'de> for Seed {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn check_str<E: de::Error>(s: &str) -> Result<(), E> {
    // An escaped NUL is valid JSON but truncates in C-backed consumers and logs.
    if s.contains('\0') {
        return Err(E::custom("NUL character in a string"));
    }
    Ok(())
}

impl<'de> Visitor<'de> for Seed {
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
        check_str(v)?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        check_str(&v)?;
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
        while let Some(v) = seq.next_element_seed(inner)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            check_str(&key)?;
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key `{}`",
                    super::error::shown(&key)
                )));
            }
            let value = map.next_value_seed(inner)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn j22_duplicate_keys_rejected_at_any_level() {
        assert!(parse(br#"{"a":1,"a":2}"#, 8).is_err());
        assert!(parse(br#"{"x":{"a":1,"a":1}}"#, 8).is_err());
        assert!(parse(br#"[{"a":1},{"a":1}]"#, 8).is_ok());
    }

    #[test]
    fn j23_json_edge_cases_rejected() {
        let bad: &[&[u8]] = &[
            b"\xEF\xBB\xBF{}",
            b"{\"a\":\"\xff\"}",
            br#"{"a":"\ud800"}"#,
            br#"{"a":"x\u0000y"}"#,
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
