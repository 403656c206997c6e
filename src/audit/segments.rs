//! The log as a series of segments (issue 14 item 4): an audit log that an operator can run
//! for a year. The configured `audit.path` (say `audit.jsonl`) is the active segment; when it
//! reaches `audit.rotate_size` or `audit.rotate_age` it is renamed to
//! `audit-<first seq, 12 digits>.jsonl` beside it and a new active file starts. The chain runs
//! on across segments: the first record of a new segment links to the last one of the segment
//! before, and is an `audit.segment` event carrying the log's id (the hash of its record 1), so
//! checkpoints keep one name for the log after record 1 is gone.
//!
//! Closed segments are compressed with zstd (`.jsonl.zst`) and deleted from the oldest by the
//! retention rules (`audit.keep_segments`, `keep_age`, `keep_size`). Before a deletion the log
//! records it: an `audit.retention` event, synced to disk first, names the files and the last
//! `seq` removed (`through`), so `mandate audit verify` can tell records removed by retention
//! from records cut off the front of the log.
//!
//! Every step is crash-safe: compression writes `….zst.tmp`, syncs it and renames it over, and
//! only then removes the plain segment; a start-up finishes or undoes whatever a crash
//! interrupted ([`Family::tidy`]).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How segments are cut, compressed and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSettings {
    /// The active segment is closed once it holds this many bytes.
    pub rotate_size: u64,
    /// … or once its first record is this old (and it holds a record besides its header).
    pub rotate_age: Duration,
    /// Closed segments are compressed with zstd.
    pub compress: bool,
    pub retention: Retention,
}

impl SegmentSettings {
    pub const DEFAULT_ROTATE_SIZE: u64 = 64 << 20;
    pub const DEFAULT_ROTATE_AGE: Duration = Duration::from_secs(24 * 3600);
    /// Smaller segments would only multiply files (and header records).
    pub const MIN_ROTATE_SIZE: u64 = 4 << 10;
    pub const MIN_ROTATE_AGE: Duration = Duration::from_secs(1);
}

impl Default for SegmentSettings {
    fn default() -> Self {
        Self {
            rotate_size: Self::DEFAULT_ROTATE_SIZE,
            rotate_age: Self::DEFAULT_ROTATE_AGE,
            compress: true,
            retention: Retention::default(),
        }
    }
}

/// Which closed segments are kept: all of them unless a rule is set. A segment is deleted
/// (oldest first, never the active one) while any set rule is exceeded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// At most this many closed segments.
    pub keep_segments: Option<u64>,
    /// No closed segment whose last record is older than this.
    pub keep_age: Option<Duration>,
    /// At most this many bytes in all, the active segment included.
    pub keep_size: Option<u64>,
}

impl Retention {
    pub fn is_set(&self) -> bool {
        self.keep_segments.is_some() || self.keep_age.is_some() || self.keep_size.is_some()
    }

    /// How many of `closed` (oldest first) to delete, and the rule that asked for the last
    /// of them.
    pub fn plan(
        &self,
        closed: &[Segment],
        active_size: u64,
        now: SystemTime,
    ) -> (usize, Option<&'static str>) {
        let mut total: u64 = active_size + closed.iter().map(|s| s.size).sum::<u64>();
        let mut remaining = closed.len() as u64;
        let mut rule = None;
        let mut n = 0;
        for seg in closed {
            let why = if self.keep_segments.is_some_and(|k| remaining > k) {
                "keep_segments"
            } else if self.keep_size.is_some_and(|k| total > k) {
                "keep_size"
            } else if self
                .keep_age
                .is_some_and(|k| now.duration_since(seg.modified).unwrap_or_default() > k)
            {
                "keep_age"
            } else {
                break;
            };
            rule = Some(why);
            total -= seg.size;
            remaining -= 1;
            n += 1;
        }
        (n, rule)
    }
}

/// One closed segment on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// `seq` of its first record (from its name).
    pub first_seq: u64,
    pub path: PathBuf,
    pub compressed: bool,
    pub size: u64,
    /// When its last record was written.
    pub modified: SystemTime,
}

impl Segment {
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// The lines of a log file, decompressed when `compressed`.
pub fn open_lines(path: &Path, compressed: bool) -> io::Result<Box<dyn BufRead>> {
    let file = File::open(path)?;
    Ok(if compressed {
        Box::new(BufReader::new(zstd::stream::read::Decoder::new(file)?))
    } else {
        Box::new(BufReader::with_capacity(64 << 10, file))
    })
}

/// [`open_lines`] for a file of a live log listed a moment ago: a plain closed segment that
/// the segment thread has compressed since is read from its `.zst` (the plain file goes only
/// once the compressed one is complete).
pub fn open_listed(path: &Path, compressed: bool) -> io::Result<Box<dyn BufRead>> {
    match open_lines(path, compressed) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && !compressed => {
            let mut zst = path.as_os_str().to_owned();
            zst.push(".zst");
            open_lines(Path::new(&zst), true).map_err(|_| e)
        }
        other => other,
    }
}

/// The files of one log: its active file and the closed segments named after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub active: PathBuf,
    dir: PathBuf,
    /// `audit` of `audit.jsonl`.
    stem: String,
    /// `.jsonl` of `audit.jsonl` (empty when the active file has no extension).
    ext: String,
}

/// What a file in the log's directory is to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Compressed,
    /// A compression that a crash interrupted.
    Partial,
}

impl Family {
    /// The family whose active file is `active`.
    pub fn of(active: &Path) -> Self {
        let dir = active
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let stem = active
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = active
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        Self {
            active: active.to_path_buf(),
            dir,
            stem,
            ext,
        }
    }

    /// The family of a closed segment's file name (`audit-000000000001.jsonl.zst` is of
    /// `audit.jsonl` in the same directory), if it is one.
    pub fn of_segment(path: &Path) -> Option<(Self, u64)> {
        let name = path.file_name()?.to_str()?;
        let name = name.strip_suffix(".zst").unwrap_or(name);
        let (stem_and_seq, ext) = match name.rfind('.') {
            Some(i) if i > 0 => (&name[..i], &name[i..]),
            _ => (name, ""),
        };
        let dash = stem_and_seq.rfind('-')?;
        let digits = &stem_and_seq[dash + 1..];
        if digits.len() < 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let first = digits.parse().ok()?;
        let active = path.with_file_name(format!("{}{ext}", &stem_and_seq[..dash]));
        Some((Self::of(&active), first))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the closed segment starting at `first_seq` goes.
    pub fn segment_path(&self, first_seq: u64, compressed: bool) -> PathBuf {
        let zst = if compressed { ".zst" } else { "" };
        self.dir
            .join(format!("{}-{first_seq:012}{}{zst}", self.stem, self.ext))
    }

    fn classify(&self, name: &str) -> Option<(u64, Kind)> {
        let rest = name.strip_prefix(&self.stem)?.strip_prefix('-')?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits < 12 {
            return None;
        }
        let first: u64 = rest[..digits].parse().ok()?;
        let kind = match rest[digits..].strip_prefix(self.ext.as_str())? {
            "" => Kind::Plain,
            ".zst" => Kind::Compressed,
            ".zst.tmp" => Kind::Partial,
            _ => return None,
        };
        Some((first, kind))
    }

    fn entries(&self) -> io::Result<Vec<(u64, Kind, PathBuf)>> {
        let mut out = Vec::new();
        let dir = match fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in dir {
            let entry = entry?;
            let name = entry.file_name();
            if let Some((first, kind)) = name.to_str().and_then(|n| self.classify(n)) {
                out.push((first, kind, entry.path()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0).then((a.1 as u8).cmp(&(b.1 as u8))));
        Ok(out)
    }

    /// The closed segments, oldest first. A segment present both plain and compressed (a
    /// crash between the rename and the removal) is listed once, compressed.
    pub fn closed(&self) -> io::Result<Vec<Segment>> {
        let mut out: Vec<Segment> = Vec::new();
        for (first, kind, path) in self.entries()? {
            if kind == Kind::Partial {
                continue;
            }
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                // Deleted since it was listed (retention running beside a verifier).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let seg = Segment {
                first_seq: first,
                path,
                compressed: kind == Kind::Compressed,
                size: meta.len(),
                modified: meta.modified()?,
            };
            match out.last_mut() {
                Some(last) if last.first_seq == first => {
                    if seg.compressed {
                        *last = seg;
                    }
                }
                _ => out.push(seg),
            }
        }
        Ok(out)
    }

    /// Finish or undo what a crash interrupted: a partial compression is removed, and a
    /// segment whose compressed copy is complete loses its plain copy.
    pub fn tidy(&self) -> io::Result<()> {
        let entries = self.entries()?;
        let mut changed = false;
        for (i, (first, kind, path)) in entries.iter().enumerate() {
            let compressed_too = entries[i + 1..]
                .iter()
                .take_while(|e| e.0 == *first)
                .any(|e| e.1 == Kind::Compressed);
            if *kind == Kind::Partial || (*kind == Kind::Plain && compressed_too) {
                fs::remove_file(path)?;
                changed = true;
            }
        }
        if changed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Every file of the log in chain order: closed segments oldest first, then the active
    /// file when it exists.
    pub fn files(&self) -> io::Result<Vec<(PathBuf, bool)>> {
        let mut out: Vec<(PathBuf, bool)> = self
            .closed()?
            .into_iter()
            .map(|s| (s.path, s.compressed))
            .collect();
        if self.active.is_file() {
            out.push((self.active.clone(), false));
        }
        Ok(out)
    }
}

/// Make a rename, creation or removal in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Compress the plain closed segment `seg` to `<name>.zst`: written to `.zst.tmp`, synced,
/// given the segment's time, renamed over, and only then the plain file removed. Returns the
/// compressed segment.
pub fn compress(family: &Family, seg: &Segment) -> io::Result<Segment> {
    let target = family.segment_path(seg.first_seq, true);
    let mut tmp = target.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut input = File::open(&seg.path)?;
        let out = File::create(&tmp)?;
        let mut encoder = zstd::stream::write::Encoder::new(out, 3)?;
        io::copy(&mut input, &mut encoder)?;
        let out = encoder.finish()?;
        out.set_modified(seg.modified)?;
        out.sync_all()?;
        fs::rename(&tmp, &target)?;
        sync_dir(family.dir())?;
        fs::remove_file(&seg.path)?;
        sync_dir(family.dir())?;
        Ok::<_, io::Error>(out.metadata()?.len())
    })();
    match result {
        Ok(size) => Ok(Segment {
            first_seq: seg.first_seq,
            path: target,
            compressed: true,
            size,
            modified: seg.modified,
        }),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The first and the last complete line of a file of the log (without their newlines).
pub fn first_and_last_line(
    path: &Path,
    compressed: bool,
) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut reader = open_lines(path, compressed)?;
    let mut first = Vec::new();
    if reader.read_until(b'\n', &mut first)? == 0 || first.pop() != Some(b'\n') {
        return Ok(None);
    }
    let mut last = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 || line.pop() != Some(b'\n') {
            break;
        }
        std::mem::swap(&mut last, &mut line);
    }
    if last.is_empty() {
        last = first.clone();
    }
    Ok(Some((first, last)))
}

/// Read at most `limit` bytes of the first line of `path` (without its newline).
pub fn first_line(path: &Path, compressed: bool, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    open_lines(path, compressed)?
        .take(limit)
        .read_until(b'\n', &mut line)?;
    Ok((line.pop() == Some(b'\n')).then_some(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first: u64, size: u64, age_s: u64, now: SystemTime) -> Segment {
        Segment {
            first_seq: first,
            path: PathBuf::from(format!("audit-{first:012}.jsonl.zst")),
            compressed: true,
            size,
            modified: now - Duration::from_secs(age_s),
        }
    }

    #[test]
    fn names_of_a_family_and_what_is_not_one_of_them() {
        let f = Family::of(Path::new("/var/log/mandate/audit.jsonl"));
        assert_eq!(
            f.segment_path(1, false),
            Path::new("/var/log/mandate/audit-000000000001.jsonl")
        );
        assert_eq!(
            f.segment_path(1_234_567_890_123, true),
            Path::new("/var/log/mandate/audit-1234567890123.jsonl.zst")
        );
        assert_eq!(
            f.classify("audit-000000000042.jsonl"),
            Some((42, Kind::Plain))
        );
        assert_eq!(
            f.classify("audit-000000000042.jsonl.zst"),
            Some((42, Kind::Compressed))
        );
        assert_eq!(
            f.classify("audit-000000000042.jsonl.zst.tmp"),
            Some((42, Kind::Partial))
        );
        for other in [
            "audit.jsonl",
            "audit.jsonl.lock",
            "audit.jsonl.checkpoints",
            "audit-42.jsonl",
            "audit-000000000042.json",
            "audit-000000000042.jsonl.gz",
            "other-000000000042.jsonl",
            "audit-x00000000042.jsonl",
        ] {
            assert_eq!(f.classify(other), None, "{other}");
        }
        let (of, first) = Family::of_segment(Path::new("/d/audit-000000000007.jsonl.zst")).unwrap();
        assert_eq!(
            (of.active.as_path(), first),
            (Path::new("/d/audit.jsonl"), 7)
        );
        assert_eq!(Family::of_segment(Path::new("/d/audit.jsonl")), None);
        // No extension: `audit` has segments `audit-<seq>`.
        let bare = Family::of(Path::new("audit"));
        assert_eq!(
            bare.segment_path(3, false),
            Path::new("./audit-000000000003")
        );
        assert_eq!(bare.classify("audit-000000000003"), Some((3, Kind::Plain)));
    }

    #[test]
    fn retention_deletes_from_the_oldest_while_a_rule_is_exceeded() {
        let now = SystemTime::now();
        let closed = [
            seg(1, 100, 500, now),
            seg(11, 100, 300, now),
            seg(21, 100, 100, now),
        ];
        let none = Retention::default();
        assert_eq!(none.plan(&closed, 50, now), (0, None));
        let count = Retention {
            keep_segments: Some(1),
            ..Retention::default()
        };
        assert_eq!(count.plan(&closed, 50, now), (2, Some("keep_segments")));
        // 350 bytes in all; at most 240: the oldest two go (the active one counts).
        let size = Retention {
            keep_size: Some(240),
            ..Retention::default()
        };
        assert_eq!(size.plan(&closed, 50, now), (2, Some("keep_size")));
        let age = Retention {
            keep_age: Some(Duration::from_secs(200)),
            ..Retention::default()
        };
        assert_eq!(age.plan(&closed, 50, now), (2, Some("keep_age")));
        // `keep_segments = 0`: every closed segment goes; the active one never does.
        let zero = Retention {
            keep_segments: Some(0),
            ..Retention::default()
        };
        assert_eq!(zero.plan(&closed, 50, now), (3, Some("keep_segments")));
        assert_eq!(zero.plan(&[], 50, now), (0, None));
    }

    #[test]
    fn compression_round_trips_and_tidy_finishes_what_a_crash_left() {
        let dir = tempfile::tempdir().unwrap();
        let f = Family::of(&dir.path().join("audit.jsonl"));
        let plain = f.segment_path(1, false);
        let text = "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n".repeat(100);
        fs::write(&plain, &text).unwrap();
        let segs = f.closed().unwrap();
        assert_eq!(segs.len(), 1);
        let z = compress(&f, &segs[0]).unwrap();
        assert!(z.compressed && z.size < text.len() as u64 && !plain.exists());
        assert_eq!(z.modified, segs[0].modified);
        let mut back = String::new();
        open_lines(&z.path, true)
            .unwrap()
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, text);
        let (first, last) = first_and_last_line(&z.path, true).unwrap().unwrap();
        assert_eq!(
            (&first[..], &last[..]),
            (&b"{\"a\":1}"[..], &b"{\"c\":3}"[..])
        );

        // A crash after the rename left the plain copy; one during compression, a .tmp.
        fs::write(&plain, &text).unwrap();
        let partial = dir.path().join("audit-000000000301.jsonl.zst.tmp");
        fs::write(&partial, b"half").unwrap();
        fs::write(f.segment_path(301, false), "{\"d\":4}\n").unwrap();
        let listed = f.closed().unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|s| (s.first_seq, s.compressed))
                .collect::<Vec<_>>(),
            [(1, true), (301, false)]
        );
        f.tidy().unwrap();
        assert!(!plain.exists() && !partial.exists());
        assert!(f.segment_path(1, true).exists() && f.segment_path(301, false).exists());
    }
}
