//! `mandate audit verify`: re-derive the chain of a log file offline and name the first line
//! that breaks it (SECURITY AU-04).

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::canonical::write_canonical;
use super::record::hex32;

/// A log whose chain holds from its first line to its last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    /// `hash` of the last record (64 zeros for an empty log). Kept elsewhere, it also proves
    /// that no record was cut from the end, which the chain alone cannot show.
    pub last_hash: String,
}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("not valid JSON ({0})")]
    Json(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("`{0}` is missing or malformed")]
    Field(&'static str),
    #[error("`hash` does not match the record: the line was edited")]
    Hash,
    #[error("the line differs from its record's canonical form: the line was edited")]
    NotCanonical,
    #[error("`seq` is {found}, expected {expected}: a line is missing, repeated or moved")]
    Seq { expected: u64, found: u64 },
    #[error(
        "`prev_hash` does not match the previous record's `hash`: a line was deleted, inserted or moved"
    )]
    PrevHash,
    #[error("the last line has no newline: a torn write")]
    Torn,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read `{}`: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    /// `line` is 1-based.
    #[error("line {line}: {broken}")]
    Line { line: u64, broken: Broken },
}

/// What a sound line links: its own place in the chain.
pub(crate) struct Link {
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

fn decode32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Check one line (without its newline) on its own: it parses, its `hash` covers it, and it
/// is byte for byte what Mandate would have written (so duplicate keys, reordered keys or
/// added whitespace cannot make a line read differently from what was hashed).
pub(crate) fn check_line(line: &[u8]) -> Result<Link, Broken> {
    let mut value: Value = serde_json::from_slice(line).map_err(|e| Broken::Json(e.to_string()))?;
    let obj = value.as_object_mut().ok_or(Broken::NotObject)?;
    let hash = match obj.remove("hash") {
        Some(Value::String(h)) => decode32(&h).ok_or(Broken::Field("hash"))?,
        _ => return Err(Broken::Field("hash")),
    };
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or(Broken::Field("seq"))?;
    if !matches!(
        obj.get("kind").and_then(Value::as_str),
        Some("decision" | "event")
    ) {
        return Err(Broken::Field("kind"));
    }
    let prev_text = obj
        .get("prev_hash")
        .and_then(Value::as_str)
        .ok_or(Broken::Field("prev_hash"))?;
    let prev_hash = decode32(prev_text).ok_or(Broken::Field("prev_hash"))?;
    let mut canonical = Vec::with_capacity(line.len());
    write_canonical(&mut canonical, &value).map_err(|e| Broken::Json(e.to_string()))?;
    let mut prev_hex = [0u8; 64];
    let computed: [u8; 32] = Sha256::new()
        .chain_update(hex32(&prev_hash, &mut prev_hex).as_bytes())
        .chain_update(b"\n")
        .chain_update(&canonical)
        .finalize()
        .into();
    if computed != hash {
        return Err(Broken::Hash);
    }
    // The line as written: the canonical record with `hash` appended last.
    if canonical.pop() != Some(b'}') {
        return Err(Broken::NotObject);
    }
    let mut hex = [0u8; 64];
    canonical.extend_from_slice(b",\"hash\":\"");
    canonical.extend_from_slice(hex32(&hash, &mut hex).as_bytes());
    canonical.extend_from_slice(b"\"}");
    if canonical != line {
        return Err(Broken::NotCanonical);
    }
    Ok(Link {
        seq,
        prev_hash,
        hash,
    })
}

/// Verify the whole file at `path`; the error names the first broken line.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify_visiting(path, |_, _| {})
}

/// [`verify`], calling `visit(seq, hash)` for every sound record in order: how checkpoints
/// are checked against the log in the same pass.
pub fn verify_visiting(
    path: &Path,
    mut visit: impl FnMut(u64, &[u8; 32]),
) -> Result<VerifyReport, VerifyError> {
    let io_err = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
    let mut line = Vec::with_capacity(1024);
    let mut number = 0u64;
    let mut last_seq = 0u64;
    let mut last_hash = [0u8; 32];
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io_err)? == 0 {
            break;
        }
        number += 1;
        let at = |broken| VerifyError::Line {
            line: number,
            broken,
        };
        if line.pop() != Some(b'\n') {
            return Err(at(Broken::Torn));
        }
        let link = check_line(&line).map_err(at)?;
        if link.seq != last_seq + 1 {
            return Err(at(Broken::Seq {
                expected: last_seq + 1,
                found: link.seq,
            }));
        }
        if link.prev_hash != last_hash {
            return Err(at(Broken::PrevHash));
        }
        last_seq = link.seq;
        last_hash = link.hash;
        visit(link.seq, &link.hash);
    }
    let mut hex = [0u8; 64];
    Ok(VerifyReport {
        records: number,
        last_hash: hex32(&last_hash, &mut hex).to_owned(),
    })
}

/// The `hash` of the first record of the log at `path` (`None` for an empty log): the log's
/// name among the checkpoints of a fleet.
pub fn first_hash(path: &Path) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    BufReader::new(File::open(path)?).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Ok(None);
    }
    let value: Value =
        serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(value.get("hash").and_then(Value::as_str).map(str::to_owned))
}
