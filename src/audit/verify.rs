//! `mandate audit verify`: re-derive the chain of a log offline, across all its segments, and
//! name the first line that breaks it (SECURITY AU-04).

use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::canonical::write_canonical;
use super::log::{RETENTION_EVENT, SEGMENT_EVENT};
use super::record::hex32;
use super::segments::{self, Family};

/// A log whose chain holds from its first line to its last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    /// `seq` of the first record read (1 unless retention removed older segments, or one
    /// segment was verified on its own); 0 for an empty log.
    pub first_seq: u64,
    pub last_seq: u64,
    /// `hash` of the last record (64 zeros for an empty log). Kept elsewhere, it also proves
    /// that no record was cut from the end, which the chain alone cannot show.
    pub last_hash: String,
    /// The files read, in chain order.
    pub files: Vec<PathBuf>,
    /// The highest `seq` that an `audit.retention` record says was deleted.
    pub removed_through: Option<u64>,
    /// One segment verified on its own: its first record's link to the segment before was
    /// taken as given.
    pub standalone: bool,
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
    #[error("the first record of the log is seq 1 but its `prev_hash` is not 64 zeros")]
    Genesis,
    #[error(
        "`seq` is {0}, expected 1: the log's first records are missing (a later segment would start with its `audit.segment` record)"
    )]
    Start(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read `{}`: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    /// `line` is 1-based, counted in `file`.
    #[error("{}: line {line}: {broken}", .file.display())]
    Line {
        file: PathBuf,
        line: u64,
        broken: Broken,
    },
    /// Records before `first` are missing and no `audit.retention` record accounts for them.
    #[error(
        "the log starts at seq {first}, but {}: records were cut from the front of the log",
        match .removed_through {
            Some(t) => format!("its retention records account only for seq 1 to {t}"),
            None => "no retention record says earlier segments were deleted".to_owned(),
        }
    )]
    Front {
        first: u64,
        removed_through: Option<u64>,
    },
    #[error("`{}` holds no audit log: {reason}", .path.display())]
    NoLog { path: PathBuf, reason: String },
}

/// What a sound line links: its own place in the chain.
pub(crate) struct Link {
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    /// An `audit.retention` record: the last `seq` it deleted.
    pub removed_through: Option<u64>,
    /// An `audit.segment` record: the first of a segment.
    pub opens_segment: bool,
}

/// The log's id named by a record: a segment header's `log_id`, or the hash of record 1.
pub(crate) fn log_id_of(record: &Value) -> Option<[u8; 32]> {
    if record["event"] == SEGMENT_EVENT {
        return record["detail"]["log_id"].as_str().and_then(decode32);
    }
    if record["seq"] == 1 {
        return record["hash"].as_str().and_then(decode32);
    }
    None
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
    let event = obj.get("event").and_then(Value::as_str);
    let opens_segment = event == Some(SEGMENT_EVENT);
    let removed_through = (event == Some(RETENTION_EVENT))
        .then(|| {
            obj.get("detail")
                .and_then(|d| d.get("through"))
                .and_then(Value::as_u64)
        })
        .flatten();
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
        removed_through,
        opens_segment,
    })
}

/// The files of the log at `path`, in chain order, and whether `path` named one closed
/// segment to verify on its own. `path` is the log's active file (its closed segments beside
/// it are included), one segment, or a directory holding one log.
pub fn log_files(path: &Path) -> Result<(Vec<(PathBuf, bool)>, bool), VerifyError> {
    let io_err = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.is_dir() {
        let mut logs: Vec<PathBuf> = Vec::new();
        let mut plain: Vec<PathBuf> = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io_err)? {
            let p = entry.map_err(io_err)?.path();
            if let Some((family, _)) = Family::of_segment(&p) {
                if !logs.contains(&family.active) {
                    logs.push(family.active);
                }
            } else if p.extension().is_some_and(|e| e == "jsonl") && p.is_file() {
                plain.push(p);
            }
        }
        for p in plain {
            if !logs.contains(&p) {
                logs.push(p);
            }
        }
        logs.sort();
        return match &logs[..] {
            [one] => log_files(one),
            [] => Err(VerifyError::NoLog {
                path: path.to_path_buf(),
                reason: "no `*.jsonl` file or segment in it".into(),
            }),
            many => Err(VerifyError::NoLog {
                path: path.to_path_buf(),
                reason: format!(
                    "it holds {} logs ({}); name the one to verify",
                    many.len(),
                    many.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        };
    }
    if Family::of_segment(path).is_some() {
        let compressed = path.extension().is_some_and(|e| e == "zst");
        return Ok((vec![(path.to_path_buf(), compressed)], true));
    }
    let files = Family::of(path).files().map_err(io_err)?;
    if files.is_empty() {
        return Err(io_err(io::Error::new(
            io::ErrorKind::NotFound,
            "neither the file nor any segment of it exists",
        )));
    }
    Ok((files, false))
}

/// Verify the whole log at `path` (see [`log_files`]); the error names the first broken line.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify_visiting(path, |_, _| {})
}

/// [`verify`], calling `visit(seq, hash)` for every sound record in order: how checkpoints
/// are checked against the log in the same pass.
pub fn verify_visiting(
    path: &Path,
    mut visit: impl FnMut(u64, &[u8; 32]),
) -> Result<VerifyReport, VerifyError> {
    let (files, standalone) = log_files(path)?;
    let mut report = VerifyReport {
        records: 0,
        first_seq: 0,
        last_seq: 0,
        last_hash: String::new(),
        files: Vec::new(),
        removed_through: None,
        standalone,
    };
    let mut last_hash = [0u8; 32];
    let mut line = Vec::with_capacity(1024);
    for (file, compressed) in files {
        let io_err = |source| VerifyError::Io {
            path: file.clone(),
            source,
        };
        let open = if standalone {
            segments::open_lines
        } else {
            segments::open_listed
        };
        let mut reader = open(&file, compressed).map_err(io_err)?;
        let mut number = 0u64;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(io_err)? == 0 {
                break;
            }
            number += 1;
            let at = |broken| VerifyError::Line {
                file: file.clone(),
                line: number,
                broken,
            };
            if line.pop() != Some(b'\n') {
                return Err(at(Broken::Torn));
            }
            let link = check_line(&line).map_err(at)?;
            if report.records == 0 {
                // The first record read: record 1 links to nothing; a later one (older
                // segments deleted, or one segment on its own) is taken as it links.
                if link.seq == 1 && link.prev_hash != [0u8; 32] {
                    return Err(at(Broken::Genesis));
                }
                if link.seq > 1 && !link.opens_segment && !standalone {
                    return Err(at(Broken::Start(link.seq)));
                }
                report.first_seq = link.seq;
            } else {
                if link.seq != report.last_seq + 1 {
                    return Err(at(Broken::Seq {
                        expected: report.last_seq + 1,
                        found: link.seq,
                    }));
                }
                if link.prev_hash != last_hash {
                    return Err(at(Broken::PrevHash));
                }
            }
            if let Some(t) = link.removed_through {
                report.removed_through = Some(report.removed_through.unwrap_or(0).max(t));
            }
            report.records += 1;
            report.last_seq = link.seq;
            last_hash = link.hash;
            visit(link.seq, &link.hash);
        }
        report.files.push(file);
    }
    // Records before the first one may only be gone if the log says retention deleted them.
    if !standalone
        && report.first_seq > 1
        && report.removed_through.unwrap_or(0) < report.first_seq - 1
    {
        return Err(VerifyError::Front {
            first: report.first_seq,
            removed_through: report.removed_through,
        });
    }
    let mut hex = [0u8; 64];
    report.last_hash = hex32(&last_hash, &mut hex).to_owned();
    Ok(report)
}

/// The id of the log at `path` (see [`log_files`]): the `hash` of its record 1, also named
/// by every segment's header. `None` for an empty log. Checkpoints in a store are kept under
/// it, so a fleet's sidecars sharing one store each keep their own.
pub fn log_id(path: &Path) -> Result<Option<String>, VerifyError> {
    let (files, _) = log_files(path)?;
    let Some((file, compressed)) = files.into_iter().next() else {
        return Ok(None);
    };
    let io_err = |source| VerifyError::Io {
        path: file.clone(),
        source,
    };
    let Some(line) = segments::first_line(&file, compressed, 16 << 20).map_err(io_err)? else {
        return Ok(None);
    };
    let value: Value = serde_json::from_slice(&line)
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    Ok(log_id_of(&value).map(hex::encode))
}
