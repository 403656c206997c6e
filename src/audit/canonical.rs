//! Canonical JSON: object keys sorted (byte order) at every depth, no whitespace. The audit
//! chain hashes it, and the request context is recorded only as its digest.

use std::io;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A JSON value that serializes with its object keys sorted, whatever order the map keeps
/// (serde_json's `preserve_order` feature may be switched on by any crate in the build).
pub(crate) struct Canonical<'a>(pub &'a Value);

struct CanonicalMap<'a>(&'a Map<String, Value>);

impl Serialize for Canonical<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => CanonicalMap(m).serialize(s),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Canonical(item))?;
                }
                seq.end()
            }
            other => other.serialize(s),
        }
    }
}

impl Serialize for CanonicalMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut entries: Vec<(&String, &Value)> = self.0.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut map = s.serialize_map(Some(entries.len()))?;
        for (k, v) in entries {
            map.serialize_entry(k, &Canonical(v))?;
        }
        map.end()
    }
}

/// Append `s` as a JSON string, byte for byte as serde_json writes it: text with nothing to
/// escape (no control character, quote or backslash) is copied as it is.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    // No early exit: the whole scan vectorizes, and most texts are short and clean.
    let escape = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !escape {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Write the canonical JSON of `value` to `out`.
pub fn write_canonical<W: io::Write>(out: W, value: &Value) -> serde_json::Result<()> {
    serde_json::to_writer(out, &Canonical(value))
}

/// Feeds serialized bytes straight into the hash: the digest needs no intermediate buffer.
struct HashWriter<'a>(&'a mut Sha256);

impl io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// SHA-256 of the canonical JSON of a request context. Two contexts that differ only in key
/// order or whitespace have the same digest; any differing value changes it.
pub fn context_digest(context: &Map<String, Value>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    // Writing into a hasher cannot fail, and serializing a `Value` cannot either (its keys
    // are strings); were it ever to, the digest would differ and nothing would be hidden.
    let _ = serde_json::to_writer(HashWriter(&mut hasher), &CanonicalMap(context));
    hasher.finalize().into()
}
