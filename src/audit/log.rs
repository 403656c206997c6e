//! The writer: appends records to the chain under one lock, hands each line to the operating
//! system before returning, syncs the file to disk in group commits, and closes the active
//! segment when it is full or old ([`super::segments`]).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};
use std::time::{Duration, SystemTime};

use serde_json::json;
use sha2::{Digest, Sha256};

use super::record::{EventRecord, Record, Sealed, hex32};
use super::segments::{self, Family, SegmentSettings};
use super::verify;

/// How the log reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    /// Records written within this interval share one `fdatasync` (group commit).
    pub group_commit: Duration,
    /// Rotation, compression and retention of segments.
    pub segments: SegmentSettings,
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
            segments: SegmentSettings::default(),
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
    /// The active segment. Shared, so the sync thread `fdatasync`s it outside the lock while
    /// appends continue.
    file: Arc<File>,
    /// `seq` of the active segment's first record (the next record's, while it is empty).
    segment_first: u64,
    /// When the active segment's first record was written.
    segment_started: SystemTime,
    /// The active segment holds a record besides its header: only then does age close it.
    segment_used: bool,
    /// The segment was just opened by a rotation and its header is not written yet.
    needs_header: bool,
    /// The log's name: the `hash` of its record 1, carried in every segment's header.
    log_id: Option<[u8; 32]>,
    /// A rotation failed: not tried again before this.
    rotate_retry: Option<std::time::Instant>,
}

/// How long after a failed rotation the next is tried.
const ROTATE_RETRY: Duration = Duration::from_secs(10);

struct Inner {
    path: PathBuf,
    family: Family,
    /// `None` for a path that is not a regular file (`/dev/full` in tests): never rotated.
    segments: Option<SegmentSettings>,
    head: Mutex<Head>,
    /// Closed segments whose last records may not be on disk yet: the next sync takes them.
    closing: Mutex<Vec<Arc<File>>>,
    /// Wakes the segment thread after a rotation (compression, retention).
    wake: mpsc::Sender<()>,
    /// One maintenance at a time (the segment thread, or a caller of `maintain`).
    maintaining: Mutex<()>,
    /// Lines were written since the last sync.
    dirty: AtomicBool,
    /// The last sync failed: the disk may not hold what the OS acknowledged, so decisions
    /// deny until a sync succeeds again.
    sync_failed: AtomicBool,
    /// The last append failed (and none has succeeded since): readiness says so.
    last_failed: AtomicBool,
    write_failures: AtomicU64,
    /// `seq` of the last record when this process opened the log: records written since are
    /// the chain's growth (for `/metrics`).
    opened_at: u64,
    /// Where each sync's duration is recorded, once telemetry is wired
    /// ([`AuditLog::record_syncs`]).
    sync_metrics: std::sync::OnceLock<crate::metrics::Metrics>,
    /// Given a copy of every line written ([`AuditLog::tap_records`]).
    tap: std::sync::OnceLock<Arc<dyn RecordTap>>,
}

/// Takes a copy of every record line as it is written, hash included (the decision-log
/// export). Called under the log's lock, on the check path: it must not block or fail.
pub trait RecordTap: Send + Sync {
    fn offer(&self, line: &[u8]);
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
    /// that is complete but broken stops start-up, since no chain can continue from it. An
    /// empty active file continues the chain of the newest closed segment beside it.
    /// A path that is not a regular file (e.g. `/dev/full` in tests) starts a new chain and
    /// is never rotated.
    pub fn open(path: &Path, settings: AuditSettings) -> Result<Self, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let family = Family::of(path);
        let file = open_active(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let regular = meta.is_file();
        let now = SystemTime::now();
        let mut head = Head {
            seq: 0,
            hash: [0u8; 32],
            len: 0,
            needs_truncate: false,
            buf: Vec::with_capacity(1024),
            file: Arc::new(file),
            segment_first: 1,
            segment_started: now,
            segment_used: false,
            needs_header: false,
            log_id: None,
            rotate_retry: None,
        };
        if regular {
            family.tidy().map_err(open_err)?;
            let (seq, hash, len) = recover(&head.file, path, meta.len())?;
            (head.seq, head.hash, head.len) = (seq, hash, len);
            if len > 0 {
                let first = first_link(path)?;
                head.segment_first = first.seq;
                head.segment_started = first.time.unwrap_or(now);
                head.segment_used = !first.is_header || seq > first.seq;
                head.log_id = first.log_id;
            } else if let Some(newest) = family.closed().map_err(open_err)?.pop() {
                // Rotated, then stopped before the new segment's header was written.
                let (first, last) = segment_ends(&newest.path, newest.compressed)?;
                head.seq = last.seq;
                head.hash = last.hash;
                head.segment_first = last.seq + 1;
                head.log_id = first.log_id;
                head.needs_header = true;
            }
        }
        let (wake, woken) = mpsc::channel();
        let opened_at = head.seq;
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            family,
            segments: regular.then_some(settings.segments),
            head: Mutex::new(head),
            closing: Mutex::new(Vec::new()),
            wake,
            maintaining: Mutex::new(()),
            dirty: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            last_failed: AtomicBool::new(false),
            write_failures: AtomicU64::new(0),
            opened_at,
            sync_metrics: std::sync::OnceLock::new(),
            tap: std::sync::OnceLock::new(),
        });
        spawn_group_commit(
            Arc::downgrade(&inner),
            settings.group_commit.max(AuditSettings::MIN_GROUP_COMMIT),
        )
        .map_err(open_err)?;
        if regular {
            spawn_segment_keeper(Arc::downgrade(&inner), woken).map_err(open_err)?;
        }
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

    /// Records this process wrote (decisions and events, segment headers included).
    pub fn records_written(&self) -> u64 {
        self.last_seq().saturating_sub(self.0.opened_at)
    }

    /// Hand a copy of every line written from now on to `tap` (the first call wins).
    pub fn tap_records(&self, tap: Arc<dyn RecordTap>) {
        let _ = self.0.tap.set(tap);
    }

    /// Record the duration of every sync from now on in `metrics` (the first call wins).
    pub fn record_syncs(&self, metrics: crate::metrics::Metrics) {
        let _ = self.0.sync_metrics.set(metrics);
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

    /// The log's name: the `hash` of its record 1 (`None` before it is written), the same in
    /// every segment's header however many segments retention has removed since.
    pub fn log_id(&self) -> Option<[u8; 32]> {
        self.0.head.lock().ok().and_then(|h| h.log_id)
    }

    /// Append one record and return its `seq`. When this returns `Ok`, the line is with the
    /// operating system (it survives a crash of Mandate); it reaches the disk at the next
    /// group commit. On `Err` nothing of the record stays in the file.
    pub fn append(&self, record: &Record<'_>) -> Result<u64, AuditError> {
        self.0.append(record)
    }

    /// Append, then sync to disk before returning: for events that must be on disk before
    /// they are acknowledged (approvals, break-glass). Blocks for one `fdatasync`.
    pub fn append_durable(&self, record: &Record<'_>) -> Result<u64, AuditError> {
        let seq = self.append(record)?;
        self.sync()?;
        Ok(seq)
    }

    /// Sync everything written so far to disk now (a segment closed meanwhile included).
    /// Blocking.
    pub fn sync(&self) -> Result<(), AuditError> {
        self.0.dirty.store(false, Ordering::Release);
        self.0.sync()
    }

    /// Close the active segment now if it holds records (as `audit.rotate_size` or
    /// `rotate_age` would), then let the segment thread compress and apply retention. For
    /// tests and operators' tools; the log rotates by itself.
    pub fn rotate(&self) -> Result<(), AuditError> {
        let inner = &*self.0;
        let mut head = inner.lock_head()?;
        if inner.segments.is_some() && head.segment_used {
            inner.rotate_locked(&mut head)?;
        }
        Ok(())
    }

    /// Compress closed segments and apply retention now, in this thread (the segment thread
    /// does it after every rotation and once a minute).
    pub fn maintain(&self) -> Result<(), AuditError> {
        self.0.maintain()
    }
}

/// The first line of an existing log file, read for what a writer continues with.
struct FirstLink {
    seq: u64,
    time: Option<SystemTime>,
    is_header: bool,
    log_id: Option<[u8; 32]>,
}

/// A segment header is the event that opens every segment after the first.
pub(crate) const SEGMENT_EVENT: &str = "audit.segment";
/// Written before retention deletes segments: what it deletes, up to which `seq`.
pub(crate) const RETENTION_EVENT: &str = "audit.retention";

fn corrupt(path: &Path, reason: String) -> AuditError {
    AuditError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

/// The first line of the active file at `path`.
fn first_link(path: &Path) -> Result<FirstLink, AuditError> {
    let line = segments::first_line(path, false, 16 << 20)
        .map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| corrupt(path, "its first line is incomplete".into()))?;
    first_link_of(path, &line)
}

fn first_link_of(path: &Path, line: &[u8]) -> Result<FirstLink, AuditError> {
    let link = verify::check_line(line)
        .map_err(|broken| corrupt(path, format!("its first record is broken: {broken}")))?;
    let value: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
    let time = value["time"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok());
    Ok(FirstLink {
        seq: link.seq,
        time,
        is_header: link.opens_segment,
        log_id: verify::log_id_of(&value),
    })
}

/// The first and last records of a closed segment: what an empty active file continues.
fn segment_ends(path: &Path, compressed: bool) -> Result<(FirstLink, verify::Link), AuditError> {
    let (first, last) = segments::first_and_last_line(path, compressed)
        .map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| corrupt(path, "it holds no complete record".into()))?;
    let last = verify::check_line(&last)
        .map_err(|broken| corrupt(path, format!("its last record is broken: {broken}")))?;
    Ok((first_link_of(path, &first)?, last))
}

fn open_active(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
}

impl Inner {
    fn lock_head(&self) -> Result<MutexGuard<'_, Head>, AuditError> {
        self.head.lock().map_err(|_| {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            AuditError::Poisoned {
                path: self.path.clone(),
            }
        })
    }

    fn append(&self, record: &Record<'_>) -> Result<u64, AuditError> {
        if self.sync_failed.load(Ordering::Acquire) {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            return Err(AuditError::NotDurable {
                path: self.path.clone(),
            });
        }
        let mut head = self.lock_head()?;
        let result = self.append_locked(&mut head, record);
        if result.is_err() {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
        }
        self.last_failed.store(result.is_err(), Ordering::Release);
        result
    }

    /// Cut off what a failed write left of a line, if that could not be done at the time.
    fn truncate_torn(&self, head: &mut Head) -> Result<(), AuditError> {
        if head.needs_truncate {
            head.file.set_len(head.len).map_err(|e| self.write_err(e))?;
            head.needs_truncate = false;
        }
        Ok(())
    }

    fn append_locked(&self, head: &mut Head, record: &Record<'_>) -> Result<u64, AuditError> {
        self.truncate_torn(head)?;
        if let Some(settings) = &self.segments
            && head.len >= settings.rotate_size
            && head.segment_used
            && head
                .rotate_retry
                .is_none_or(|at| std::time::Instant::now() >= at)
        {
            // A segment that cannot be closed (a name in the way, a permission) is no reason
            // to refuse the record, which the active file still takes: the log says why,
            // and rotation is tried again in a while.
            match self.rotate_locked(head) {
                Ok(()) => head.rotate_retry = None,
                Err(e) => {
                    head.rotate_retry = Some(std::time::Instant::now() + ROTATE_RETRY);
                    tracing::error!(error = %e,
                        "audit segment could not be closed; records go on in the active file");
                }
            }
        }
        if head.needs_header {
            self.write_header(head)?;
        }
        let seq = self.write_locked(head, record)?;
        head.segment_used = true;
        Ok(seq)
    }

    /// The record that opens a segment: the log's id, so the segment names its log alone.
    fn write_header(&self, head: &mut Head) -> Result<(), AuditError> {
        let mut hex = [0u8; 64];
        let detail = json!({
            "log_id": head.log_id.map(|id| hex32(&id, &mut hex).to_owned()),
        });
        self.write_locked(head, &EventRecord::new(SEGMENT_EVENT, &detail).into())?;
        head.needs_header = false;
        Ok(())
    }

    /// Close the active segment: rename it to its segment name, open a new active file and
    /// hand the old one to the next sync. The new segment's header is written by the next
    /// append (or right here), so a crash in between leaves an empty active file, which
    /// [`AuditLog::open`] continues from the segment before.
    fn rotate_locked(&self, head: &mut Head) -> Result<(), AuditError> {
        self.truncate_torn(head)?;
        let closed = self.family.segment_path(head.segment_first, false);
        if closed.exists() || self.family.segment_path(head.segment_first, true).exists() {
            return Err(AuditError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "cannot close the active segment: `{}` already exists",
                    closed.display()
                ),
            });
        }
        std::fs::rename(&self.path, &closed).map_err(|e| self.write_err(e))?;
        let file = match open_active(&self.path) {
            Ok(f) => f,
            Err(e) => {
                // Put it back: appends go on in the active file as if nothing happened.
                let _ = std::fs::rename(&closed, &self.path);
                return Err(self.write_err(e));
            }
        };
        let old = std::mem::replace(&mut head.file, Arc::new(file));
        if let Ok(mut closing) = self.closing.lock() {
            closing.push(old);
        }
        self.dirty.store(true, Ordering::Release);
        head.len = 0;
        head.segment_first = head.seq + 1;
        head.segment_started = SystemTime::now();
        head.segment_used = false;
        head.needs_header = true;
        tracing::info!(segment = %closed.display(), last_seq = head.seq, "audit segment closed");
        // A failed header is written by the next append.
        let _ = self.write_header(head);
        // No keeper listens for a log that never rotates: then the send fails, harmlessly.
        let _ = self.wake.send(());
        Ok(())
    }

    fn write_locked(&self, head: &mut Head, record: &Record<'_>) -> Result<u64, AuditError> {
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

        let written = write_line(&head.file, &head.buf);
        if written.is_ok()
            && let Some(tap) = self.tap.get()
        {
            tap.offer(&head.buf);
        }
        let line_len = head.buf.len() as u64;
        if head.buf.capacity() > MAX_KEPT_BUFFER {
            head.buf = Vec::with_capacity(1024);
        }
        match written {
            Ok(()) => {
                if head.len == 0 {
                    head.segment_first = seq;
                    head.segment_started = SystemTime::now();
                }
                head.seq = seq;
                head.hash = hash;
                head.len += line_len;
                if seq == 1 {
                    head.log_id = Some(hash);
                }
                self.dirty.store(true, Ordering::Release);
                Ok(seq)
            }
            Err((0, e)) => Err(self.write_err(e)),
            Err((_, e)) => {
                // Part of the line is in the file: cut it off, so the chain on disk stays
                // whole. If even that fails, the next append tries again before writing.
                if head.file.set_len(head.len).is_err() {
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

    /// Sync the segments closed since the last sync, then the active one.
    fn sync(&self) -> Result<(), AuditError> {
        let closing = self
            .closing
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        let active = self.head.lock().map(|h| Arc::clone(&h.file));
        let started = std::time::Instant::now();
        let result = closing
            .iter()
            .try_for_each(|f| f.sync_data())
            .and_then(|()| match &active {
                Ok(f) => f.sync_data(),
                Err(_) => Err(io::Error::other("a writer panicked while appending")),
            });
        if let Some(m) = self.sync_metrics.get() {
            m.audit_synced(started.elapsed());
        }
        match result {
            Ok(()) => {
                self.sync_failed.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                if let Ok(mut c) = self.closing.lock() {
                    c.extend(closing);
                }
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

    /// Close the active segment once its first record is `rotate_age` old.
    fn rotate_if_old(&self) {
        let Some(settings) = &self.segments else {
            return;
        };
        let Ok(mut head) = self.head.lock() else {
            return;
        };
        let age = SystemTime::now()
            .duration_since(head.segment_started)
            .unwrap_or_default();
        if head.segment_used
            && age >= settings.rotate_age
            && let Err(e) = self.rotate_locked(&mut head)
        {
            tracing::error!(error = %e, "audit segment could not be closed at its age limit");
        }
    }

    /// Compress the closed segments and delete those past retention, recording each
    /// deletion in the log (synced) before it is made.
    fn maintain(&self) -> Result<(), AuditError> {
        let Some(settings) = &self.segments else {
            return Ok(());
        };
        let io_err = |e| self.write_err(e);
        let _one = self.maintaining.lock().map_err(|_| AuditError::Poisoned {
            path: self.path.clone(),
        })?;
        self.sync()?;
        let mut closed = self.family.closed().map_err(io_err)?;
        // A segment that cannot be compressed (a full disk, say) stays plain; retention
        // still runs, since it may be what frees the disk.
        let mut compress_failed = None;
        if settings.compress {
            for seg in closed.iter_mut().filter(|s| !s.compressed) {
                match segments::compress(&self.family, seg) {
                    Ok(done) => *seg = done,
                    Err(e) => {
                        compress_failed = Some(io_err(e));
                        break;
                    }
                }
            }
        }
        self.apply_retention(settings, &closed)?;
        compress_failed.map_or(Ok(()), Err)
    }

    /// Delete the closed segments (oldest first) that `settings.retention` no longer keeps,
    /// after recording the deletion in the log and syncing it.
    fn apply_retention(
        &self,
        settings: &SegmentSettings,
        closed: &[segments::Segment],
    ) -> Result<(), AuditError> {
        let io_err = |e| self.write_err(e);
        if !settings.retention.is_set() {
            return Ok(());
        }
        let (active_size, active_first) = {
            let head = self.lock_head()?;
            (head.len, head.segment_first)
        };
        // Room for the retention record itself, which lands in the active segment after the
        // plan is made: a line of ~250 bytes plus ~100 per deleted file, at most all of them.
        let record_room = 256 + 128 * closed.len() as u64;
        let (n, rule) =
            settings
                .retention
                .plan(closed, active_size + record_room, SystemTime::now());
        if n == 0 {
            return Ok(());
        }
        let doomed = &closed[..n];
        let through = closed
            .get(n)
            .map_or(active_first, |next| next.first_seq)
            .saturating_sub(1);
        let detail = json!({
            "rule": rule,
            "through": through,
            "deleted": doomed.iter().map(|s| json!({
                "file": s.file_name(),
                "first_seq": s.first_seq,
                "bytes": s.size,
            })).collect::<Vec<_>>(),
        });
        self.append(&EventRecord::new(RETENTION_EVENT, &detail).into())?;
        self.sync()?;
        for seg in doomed {
            std::fs::remove_file(&seg.path).map_err(io_err)?;
        }
        segments::sync_dir(self.family.dir()).map_err(io_err)?;
        tracing::info!(
            segments = n,
            through,
            rule = rule.unwrap_or_default(),
            "audit segments deleted by retention"
        );
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.dirty.load(Ordering::Acquire) {
            let _ = self.sync();
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
/// and would stall a runtime worker on a 2-core machine. Once a second it also closes the
/// active segment if it is past `rotate_age`. It ends once the log is dropped.
fn spawn_group_commit(log: Weak<Inner>, every: Duration) -> io::Result<()> {
    std::thread::Builder::new()
        .name("mandate-audit-sync".into())
        .spawn(move || {
            let mut last_age_check = std::time::Instant::now();
            loop {
                std::thread::sleep(every);
                let Some(inner) = log.upgrade() else { break };
                if inner.dirty.swap(false, Ordering::AcqRel) {
                    let _ = inner.sync();
                }
                if last_age_check.elapsed() >= Duration::from_secs(1) {
                    last_age_check = std::time::Instant::now();
                    inner.rotate_if_old();
                }
            }
        })
        .map(|_| ())
}

/// The segment keeper: compresses closed segments and applies retention after every
/// rotation and once a minute (so `keep_age` is applied on an idle log too). Its own thread:
/// compressing a segment takes a fraction of a second that must not delay a group commit.
fn spawn_segment_keeper(log: Weak<Inner>, woken: mpsc::Receiver<()>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("mandate-audit-segments".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                if let Err(mpsc::RecvTimeoutError::Disconnected) =
                    woken.recv_timeout(Duration::from_secs(60))
                {
                    break;
                }
                let Some(inner) = log.upgrade() else { break };
                match inner.maintain() {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("audit segments are compressed and kept again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %e,
                            "audit segments could not be compressed or retention applied; \
                             retrying every minute");
                    }
                    Err(_) => {}
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
