//! Signed checkpoints of the audit chain (docs/design.md §5). A chain proves order, not
//! origin: whoever can write the log can recompute every hash after an edit, or cut records
//! off the end. So every `every` records or `interval` (and at shutdown) the head of the chain
//! (its `seq` and `hash`) is signed with an Ed25519 key the log's writer need not hold in the
//! same place, and kept outside the log: in a checkpoint file and, when configured, in the
//! approval store. [`verify_checkpoints`] then checks the log against them: an edited record
//! no longer matches the hash a checkpoint signed, a cut-off end no longer reaches the last
//! checkpoint, and a forged checkpoint does not verify.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuditLog;
use super::record::hex32;

/// What a checkpoint signs, as bytes: a fixed label, then `seq`, `hash` and `at`.
fn message(seq: u64, hash: &str, at: i64) -> Vec<u8> {
    format!("mandate audit checkpoint v1\n{seq}\n{hash}\n{at}").into_bytes()
}

/// One signed head of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// `seq` of the record the checkpoint covers (every record up to it).
    pub seq: u64,
    /// That record's `hash` (hex).
    pub hash: String,
    /// When it was signed (unix seconds).
    pub at: i64,
    /// First 8 bytes (hex) of the SHA-256 of the signing key's public key.
    pub key_id: String,
    /// Ed25519 signature (base64) over the checkpoint's label, `seq`, `hash` and `at`.
    pub signature: String,
}

/// Why checkpoints could not be made, read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint key `{what}`: {message}")]
    Key { what: String, message: String },
    #[error("cannot write checkpoints to `{}`: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read checkpoints from `{}`: {message}", .path.display())]
    Read { path: PathBuf, message: String },
}

/// The Ed25519 key checkpoints are signed with.
pub struct CheckpointKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

impl CheckpointKey {
    /// A PKCS#8 Ed25519 private key, PEM (`PRIVATE KEY`) or DER; `what` names where it came
    /// from in errors.
    pub fn from_pkcs8(bytes: &[u8], what: &str) -> Result<Self, CheckpointError> {
        let bad = |message: String| CheckpointError::Key {
            what: what.to_owned(),
            message,
        };
        let der = match std::str::from_utf8(bytes) {
            Ok(text) if text.contains("-----BEGIN") => pem_body(text, "PRIVATE KEY")
                .ok_or_else(|| bad("no `PRIVATE KEY` PEM block".into()))?,
            _ => bytes.to_vec(),
        };
        let pair = Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|e| bad(format!("not a PKCS#8 Ed25519 private key ({e})")))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    /// A new random key: its PKCS#8 PEM.
    pub fn generate_pem() -> Result<String, CheckpointError> {
        let doc =
            Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).map_err(|e| {
                CheckpointError::Key {
                    what: "new key".into(),
                    message: e.to_string(),
                }
            })?;
        Ok(pem("PRIVATE KEY", doc.as_ref()))
    }

    /// The public key, hex: what `mandate audit verify --key` takes.
    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Sign the head `seq`/`hash` at time `at`.
    pub fn sign(&self, seq: u64, hash: &str, at: i64) -> Checkpoint {
        let sig = self.pair.sign(&message(seq, hash, at));
        Checkpoint {
            seq,
            hash: hash.to_owned(),
            at,
            key_id: self.key_id.clone(),
            signature: B64.encode(sig.as_ref()),
        }
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let b64: String = text[start..stop].split_whitespace().collect();
    B64.decode(b64).ok()
}

/// Where checkpoints are kept besides the log. Each `put` is durable before it returns.
/// `log_id` names the log: the hash of its first record.
#[async_trait::async_trait]
pub trait CheckpointSink: Send + Sync + std::fmt::Debug {
    async fn put(&self, log_id: &str, checkpoint: &Checkpoint) -> Result<(), String>;
}

/// The approval store as a sink: in a fleet it is PostgreSQL, out of the log writer's reach.
#[async_trait::async_trait]
impl<S: crate::approval::ApprovalStore + ?Sized> CheckpointSink for S {
    async fn put(&self, log_id: &str, checkpoint: &Checkpoint) -> Result<(), String> {
        self.put_checkpoint(log_id, checkpoint)
            .await
            .map_err(|e| format!("approval store: {e}"))
    }
}

/// A JSON-lines file of checkpoints, appended and synced.
#[derive(Debug)]
pub struct CheckpointFile {
    path: PathBuf,
}

impl CheckpointFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
}

#[async_trait::async_trait]
impl CheckpointSink for CheckpointFile {
    async fn put(&self, _log_id: &str, checkpoint: &Checkpoint) -> Result<(), String> {
        let mut line = serde_json::to_vec(checkpoint).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let path = self.path.clone();
        // Blocking I/O (an append and an fdatasync): off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("`{}`: {e}", path.display()))?;
            file.write_all(&line)
                .and_then(|()| file.sync_data())
                .map_err(|e| format!("`{}`: {e}", path.display()))
        })
        .await
        .map_err(|e| format!("checkpoint task failed: {e}"))?
    }
}

/// The least time between two checkpoints, whatever `every` says.
const MIN_SPACING: Duration = Duration::from_secs(1);

/// When checkpoints are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointSchedule {
    /// After this many records since the last checkpoint (at most one checkpoint a second).
    pub every: u64,
    /// And at least this often while records arrive.
    pub interval: Duration,
}

/// Signs the log's head on schedule and hands each checkpoint to every sink.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    log: AuditLog,
    key: Arc<CheckpointKey>,
    sinks: Vec<Arc<dyn CheckpointSink>>,
    clock: Arc<dyn crate::clock::Clock>,
}

impl Checkpointer {
    pub fn new(
        log: AuditLog,
        key: Arc<CheckpointKey>,
        sinks: Vec<Arc<dyn CheckpointSink>>,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Self {
        Self {
            log,
            key,
            sinks,
            clock,
        }
    }

    /// Checkpoint the head now, unless it is at `after` (already checkpointed). The records
    /// are synced to disk first, so no checkpoint ever covers a record a power loss could
    /// take back. Returns the `seq` covered; a sink that fails is reported after the others
    /// have been given the checkpoint.
    pub async fn checkpoint(&self, after: u64) -> Result<u64, String> {
        let (seq, hash) = self.log.head();
        if seq == 0 || seq == after {
            return Ok(after);
        }
        // The sync and the read are blocking I/O: off the runtime's threads, so a checkpoint
        // never stalls the checks being answered.
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || log.sync().map_err(|e| e.to_string()))
            .await
            .map_err(|e| format!("checkpoint task failed: {e}"))??;
        let log_id = self
            .log
            .log_id()
            .map(hex::encode)
            .ok_or_else(|| "the log has no first record".to_owned())?;
        let mut hex = [0u8; 64];
        let cp = self
            .key
            .sign(seq, hex32(&hash, &mut hex), self.clock.now_unix());
        let mut failed = Vec::new();
        for sink in &self.sinks {
            if let Err(e) = sink.put(&log_id, &cp).await {
                failed.push(e);
            }
        }
        if failed.is_empty() {
            Ok(seq)
        } else {
            Err(failed.join("; "))
        }
    }

    /// Run until `stop`: checkpoint every `schedule.every` records or `schedule.interval`,
    /// and once more on the way out.
    pub async fn run(
        self,
        schedule: CheckpointSchedule,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut last = 0u64;
        let mut since = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(200).min(schedule.interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let seq = self.log.last_seq();
                    // At most one checkpoint a second however fast records come: each costs
                    // two syncs and a store write.
                    let due = (seq.saturating_sub(last) >= schedule.every
                        && since.elapsed() >= MIN_SPACING)
                        || (seq != last && since.elapsed() >= schedule.interval);
                    if due {
                        last = self.logged(last).await;
                        since = tokio::time::Instant::now();
                    }
                }
                () = &mut stop => break,
            }
        }
        self.logged(last).await;
    }

    /// [`Self::checkpoint`], with a failure logged (the next tick tries again).
    async fn logged(&self, last: u64) -> u64 {
        match self.checkpoint(last).await {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(error = %e, "audit checkpoint not written");
                last
            }
        }
    }
}

/// Read a checkpoint file (JSON lines).
pub fn read_checkpoints(path: &Path) -> Result<Vec<Checkpoint>, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|e| CheckpointError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| CheckpointError::Read {
                path: path.to_owned(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// What checking a log against its checkpoints found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReport {
    /// Checkpoints whose signature verified and whose record matched.
    pub verified: usize,
    /// The last position the checkpoints vouch for (0: none).
    pub last_verified_seq: u64,
    /// Records after it: in the chain, but not yet covered by a signed checkpoint.
    pub uncovered: u64,
    /// Checkpoints of records that retention has since deleted: their signatures verify, but
    /// there is no record left to compare them with.
    pub before_first: usize,
}

/// Why a log does not match its checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointMismatch {
    #[error("the public key is not 32 bytes of hex or base64")]
    BadKey,
    #[error(
        "checkpoint at seq {seq}: the signature does not verify with the given key (key id `{key_id}`)"
    )]
    Signature { seq: u64, key_id: String },
    #[error(
        "checkpoint at seq {seq} signed hash `{signed}`, the log's record {seq} has `{found}`: the log was rewritten"
    )]
    Hash {
        seq: u64,
        signed: String,
        found: String,
    },
    #[error(
        "the log ends at seq {last} but a checkpoint covers seq {seq}: records were cut from the end"
    )]
    Truncated { seq: u64, last: u64 },
}

/// A public key as `--key` takes it: 32 bytes, hex or base64.
pub fn parse_public_key(text: &str) -> Option<Vec<u8>> {
    let t = text.trim();
    let bytes = hex::decode(t).ok().or_else(|| B64.decode(t).ok())?;
    (bytes.len() == 32).then_some(bytes)
}

/// Check `checkpoints` against the hashes of the log (`hash_at(seq)`, `None` past its end;
/// `first` and `last` are the `seq` of its first and last records) with `public_key`.
pub fn verify_checkpoints(
    checkpoints: &[Checkpoint],
    public_key: &[u8],
    first: u64,
    last: u64,
    hash_at: impl Fn(u64) -> Option<String>,
) -> Result<CheckpointReport, CheckpointMismatch> {
    if public_key.len() != 32 {
        return Err(CheckpointMismatch::BadKey);
    }
    let key = UnparsedPublicKey::new(&signature::ED25519, public_key);
    let mut verified = 0;
    let mut last_verified_seq = 0;
    let mut before_first = 0;
    for cp in checkpoints {
        let sig = B64.decode(&cp.signature).unwrap_or_default();
        if key.verify(&message(cp.seq, &cp.hash, cp.at), &sig).is_err() {
            return Err(CheckpointMismatch::Signature {
                seq: cp.seq,
                key_id: cp.key_id.clone(),
            });
        }
        if cp.seq < first {
            before_first += 1;
            continue;
        }
        match hash_at(cp.seq) {
            None => {
                return Err(CheckpointMismatch::Truncated { seq: cp.seq, last });
            }
            Some(found) if found != cp.hash => {
                return Err(CheckpointMismatch::Hash {
                    seq: cp.seq,
                    signed: cp.hash.clone(),
                    found,
                });
            }
            Some(_) => {}
        }
        verified += 1;
        last_verified_seq = last_verified_seq.max(cp.seq);
    }
    Ok(CheckpointReport {
        verified,
        last_verified_seq,
        uncovered: last.saturating_sub(last_verified_seq.max(first.saturating_sub(1))),
        before_first,
    })
}
