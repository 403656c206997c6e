//! The writer: appends records to the chain under one lock, hands each line to the operating
//! system before returning, and syncs the file to disk in group commits.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::record::{Record, Sealed, hex32};
use super::verify;

/// How the log reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    /// Records written within this interval share one `fdatasync` (group commit).
    pub group_commit: Duration,
}

impl AuditSettings {
    pub const DEFAULT_GROUP_COMMIT: Duration = Duration::from_millis(5);
    /// A shorter interval would only burn a core on empty wake-ups.
    pub const MIN_GROUP_COMMIT: Duration = Duration::from_millis(1);
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            group_commit: Self::DEFAULT_GROUP_COMMIT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log `{}`: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot continue audit log `{}`: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write audit log `{}`: {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("audit log `{}` is not durable: the last sync to disk failed", .path.display())]
    NotDurable { path: PathBuf },
    #[error("audit log `{}` is unusable: a writer panicked while appending", .path.display())]
    Poisoned { path: PathBuf },
    #[error("cannot serialize an audit record: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// The chain's head: what the next record links to. Guarded by the lock that orders lines.
struct Head {
    /// `seq` of the last record written (0: none yet).
    seq: u64,
    /// `hash` of the last record written (all zeros: none yet).
    hash: [u8; 32],
    /// File length after the last complete line; a failed write is truncated back to it.
    len: u64,
    /// A failed write may have left part of a line that could not be truncated yet.
    needs_truncate: bool,
    /// Reused for every line: the hot path allocates nothing once it has grown.
    buf: Vec<u8>,
}

struct Inner {
    path: PathBuf,
    /// Outside the lock: the sync thread `fdatasync`s while appends continue.
    file: File,
    head: Mutex<Head>,
    /// Lines were written since the last sync.
    dirty: AtomicBool,
    /// The last sync failed: the disk may not hold what the OS acknowledged, so decisions
    /// deny until a sync succeeds again.
    sync_failed: AtomicBool,
    /// The last append failed (and none has succeeded since): readiness says so.
    last_failed: AtomicBool,
    write_failures: AtomicU64,
}

/// The hash-chained audit log. Cheap to clone; every clone appends to the same chain.
#[derive(Clone)]
pub struct AuditLog(Arc<Inner>);

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.0.path)
            .field("write_failures", &self.write_failures())
            .finish_non_exhaustive()
    }
}

/// Above this, the line buffer is given back after use: one huge event must not pin memory.
const MAX_KEPT_BUFFER: usize = 64 * 1024;

impl AuditLog {
    /// Open (or create) the log at `path` and continue its chain. A torn last line (a crash
    /// in the middle of a write) was never acknowledged and is truncated away; a last line
    /// that is complete but broken stops start-up, since no chain can continue from it.
    /// A path that is not a regular file (e.g. `/dev/full` in tests) starts a new chain.
    pub fn open(path: &Path, settings: AuditSettings) -> Result<Self, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let (seq, hash, len) = if meta.is_file() {
            recover(&file, path, meta.len())?
        } else {
            (0, [0u8; 32], 0)
        };
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            file,
            head: Mutex::new(Head {
                seq,
                hash,
                len,
                needs_truncate: false,
                buf: Vec::with_capacity(1024),
            }),
            dirty: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            last_failed: AtomicBool::new(false),
            write_failures: AtomicU64::new(0),
        });
        spawn_group_commit(
            Arc::downgrade(&inner),
            settings.group_commit.max(AuditSettings::MIN_GROUP_COMMIT),
        )
        .map_err(open_err)?;
        Ok(Self(inner))
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Appends that failed (write errors, failed syncs): each one turned a decision into a
    /// deny or failed an event. Exported as a metric.
    pub fn write_failures(&self) -> u64 {
        self.0.write_failures.load(Ordering::Relaxed)
    }

    /// `None` while records are being written and synced; else why the log is failing (the
    /// last sync failed, or the last append did and none has succeeded since). Every decision
    /// denies meanwhile, so readiness reports it.
    pub fn failing(&self) -> Option<&'static str> {
        if self.0.sync_failed.load(Ordering::Acquire) {
            Some("the last sync to disk failed")
        } else if self.0.last_failed.load(Ordering::Acquire) {
            Some("the last record could not be written")
        } else {
            None
        }
    }

    /// Records were written since the last sync to disk (the next group commit syncs them).
    pub fn unsynced(&self) -> bool {
        self.0.dirty.load(Ordering::Acquire)
    }

    /// `seq` and `hash` of the last record written: the head of the chain.
    pub fn head(&self) -> (u64, [u8; 32]) {
        self.0.head.lock().map_or((0, [0; 32]), |h| (h.seq, h.hash))
    }

    /// `seq` of the last record written.
    pub fn last_seq(&self) -> u64 {
        self.0.head.lock().map_or(0, |h| h.seq)
    }

    /// Append one record and return its `seq`. When this returns `Ok`, the line is with the
    /// operating system (it survives a crash of Mandate); it reaches the disk at the next
    /// group commit. On `Err` nothing of the record stays in the file.
    pub fn append(&self, record: &Record<'_>) -> Result<u64, AuditError> {
        let inner = &*self.0;
        if inner.sync_failed.load(Ordering::Acquire) {
            inner.write_failures.fetch_add(1, Ordering::Relaxed);
            return Err(AuditError::NotDurable {
                path: inner.path.clone(),
            });
        }
        let mut head = inner.head.lock().map_err(|_| {
            inner.write_failures.fetch_add(1, Ordering::Relaxed);
            AuditError::Poisoned {
                path: inner.path.clone(),
            }
        })?;
        let result = inner.append_locked(&mut head, record);
        if result.is_err() {
            inner.write_failures.fetch_add(1, Ordering::Relaxed);
        }
        inner.last_failed.store(result.is_err(), Ordering::Release);
        result
    }

    /// Append, then sync to disk before returning: for events that must be on disk before
    /// they are acknowledged (approvals, break-glass). Blocks for one `fdatasync`.
    pub fn append_durable(&self, record: &Record<'_>) -> Result<u64, AuditError> {
        let seq = self.append(record)?;
        self.sync()?;
        Ok(seq)
    }

    /// Sync everything written so far to disk now. Blocking.
    pub fn sync(&self) -> Result<(), AuditError> {
        self.0.dirty.store(false, Ordering::Release);
        self.0.sync()
    }
}

impl Inner {
    fn append_locked(&self, head: &mut Head, record: &Record<'_>) -> Result<u64, AuditError> {
        if head.needs_truncate {
            self.file.set_len(head.len).map_err(|e| self.write_err(e))?;
            head.needs_truncate = false;
        }
        let seq = head.seq + 1;
        let mut prev = [0u8; 64];
        let prev = hex32(&head.hash, &mut prev);
        head.buf.clear();
        Sealed {
            record,
            seq,
            prev_hash: prev,
        }
        .write_json(&mut head.buf)?;
        let hash: [u8; 32] = Sha256::new()
            .chain_update(prev.as_bytes())
            .chain_update(b"\n")
            .chain_update(&head.buf)
            .finalize()
            .into();
        // `{...}` becomes `{...,"hash":"..."}\n`: `hash` last, outside what it covers.
        if head.buf.pop() != Some(b'}') {
            return Err(AuditError::Corrupt {
                path: self.path.clone(),
                reason: "a record did not serialize as a JSON object".into(),
            });
        }
        let mut hex = [0u8; 64];
        head.buf.extend_from_slice(b",\"hash\":\"");
        head.buf
            .extend_from_slice(hex32(&hash, &mut hex).as_bytes());
        head.buf.extend_from_slice(b"\"}\n");

        let written = write_line(&self.file, &head.buf);
        let line_len = head.buf.len() as u64;
        if head.buf.capacity() > MAX_KEPT_BUFFER {
            head.buf = Vec::with_capacity(1024);
        }
        match written {
            Ok(()) => {
                head.seq = seq;
                head.hash = hash;
                head.len += line_len;
                self.dirty.store(true, Ordering::Release);
                Ok(seq)
            }
            Err((0, e)) => Err(self.write_err(e)),
            Err((_, e)) => {
                // Part of the line is in the file: cut it off, so the chain on disk stays
                // whole. If even that fails, the next append tries again before writing.
                if self.file.set_len(head.len).is_err() {
                    head.needs_truncate = true;
                }
                Err(self.write_err(e))
            }
        }
    }

    fn write_err(&self, source: io::Error) -> AuditError {
        AuditError::Write {
            path: self.path.clone(),
            source,
        }
    }

    fn sync(&self) -> Result<(), AuditError> {
        match self.file.sync_data() {
            Ok(()) => {
                self.sync_failed.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                if !self.sync_failed.swap(true, Ordering::AcqRel) {
                    tracing::error!(path = %self.path.display(), error = %e,
                        "audit log sync failed: decisions deny until a sync succeeds");
                }
                Err(self.write_err(e))
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.dirty.load(Ordering::Acquire) {
            let _ = self.file.sync_data();
        }
    }
}

/// One `write` per line in the normal case; a short write continues where it stopped. On
/// error, how many bytes of the line did reach the file.
fn write_line(mut file: &File, line: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < line.len() {
        match file.write(&line[done..]) {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// The group commit: a thread, not a tokio task, because `fdatasync` blocks for milliseconds
/// and would stall a runtime worker on a 2-core machine. It ends once the log is dropped.
fn spawn_group_commit(log: Weak<Inner>, every: Duration) -> io::Result<()> {
    std::thread::Builder::new()
        .name("mandate-audit-sync".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(inner) = log.upgrade() else { break };
                if inner.dirty.swap(false, Ordering::AcqRel) {
                    let _ = inner.sync();
                }
            }
        })
        .map(|_| ())
}

/// Find where the chain stops in an existing file: `(seq, hash, length)` of its last complete
/// line, after truncating a torn one.
fn recover(file: &File, path: &Path, len: u64) -> Result<(u64, [u8; 32], u64), AuditError> {
    let io_err = |source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    };
    if len == 0 {
        return Ok((0, [0u8; 32], 0));
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1).map_err(io_err)?;
    let mut end = len;
    if last[0] != b'\n' {
        end = rfind_newline(file, len)
            .map_err(io_err)?
            .map_or(0, |p| p + 1);
        tracing::warn!(
            path = %path.display(),
            bytes = len - end,
            "audit log ends in a torn line (a crash mid-write); it was never acknowledged and is removed"
        );
        file.set_len(end).map_err(io_err)?;
    }
    if end == 0 {
        return Ok((0, [0u8; 32], 0));
    }
    let start = rfind_newline(file, end - 1)
        .map_err(io_err)?
        .map_or(0, |p| p + 1);
    let size = usize::try_from(end - 1 - start).map_err(|_| AuditError::Corrupt {
        path: path.to_path_buf(),
        reason: "its last line is too long".into(),
    })?;
    let mut line = vec![0u8; size];
    file.read_exact_at(&mut line, start).map_err(io_err)?;
    let link = verify::check_line(&line).map_err(|broken| AuditError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("its last record (at byte {start}) is broken: {broken}"),
    })?;
    Ok((link.seq, link.hash, end))
}

/// Position of the last `\n` strictly before `before`, reading backwards in blocks.
fn rfind_newline(file: &File, before: u64) -> io::Result<Option<u64>> {
    const BLOCK: u64 = 8192;
    let mut buf = [0u8; BLOCK as usize];
    let mut end = before;
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}
