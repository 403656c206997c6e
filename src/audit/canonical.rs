//! Canonical JSON: object keys sorted (byte order) at every depth, no whitespace. The audit
//! chain hashes it, and the request context is recorded only as its digest.

use std::io;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Append the canonical JSON of `value`: object keys sorted (by their UTF-8 bytes) at every
/// depth, whatever order the map keeps (serde_json's `preserve_order` may be on in the
/// build), no whitespace, strings escaped and numbers printed as serde_json does.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        // Writing a number into a `Vec` cannot fail.
        Value::Number(n) => {
            let _ = serde_json::to_writer(&mut *out, n);
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_map(out, map),
    }
}

fn write_map(out: &mut Vec<u8>, map: &Map<String, Value>) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.push(b'{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        write_value(out, v);
    }
    out.push(b'}');
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
pub fn write_canonical<W: io::Write>(mut out: W, value: &Value) -> io::Result<()> {
    let mut buf = Vec::new();
    write_value(&mut buf, value);
    out.write_all(&buf)
}

/// SHA-256 of the canonical JSON of a request context. Two contexts that differ only in key
/// order or whitespace have the same digest; any differing value changes it.
pub fn context_digest(context: &Map<String, Value>) -> [u8; 32] {
    let mut buf = Vec::with_capacity(128);
    write_map(&mut buf, context);
    Sha256::digest(&buf).into()
}
