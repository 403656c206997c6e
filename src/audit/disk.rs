//! Free space where the audit log is written (issue 14 item 4): when that disk fills, every
//! record fails and so every check is denied (fail closed, SECURITY §0 item 2). That must
//! never be the first an operator hears of it, so `/readyz` and the log say so while there is
//! still room: below `audit.min_free_disk` the log reports a warning, and again when space
//! comes back. The answer stays ready (the sidecar still works); the warning is the alarm.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// `audit.min_free_disk`: an amount of bytes, or a share of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    Bytes(u64),
    /// Percent of the filesystem's size, 0..=100.
    Percent(u8),
}

impl MinFree {
    /// 1 GiB: at ~300–800 bytes a record, minutes to hours of full load on a busy sidecar.
    pub const DEFAULT: MinFree = MinFree::Bytes(1 << 30);

    /// `"1GiB"`, `"500 MB"`, `"1048576"` (bytes), `"5%"`. Units: B, KB/MB/GB/TB (powers of
    /// 1000), KiB/MiB/GiB/TiB (powers of 1024), case-insensitive.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(n) if n <= 100 => Ok(MinFree::Percent(n)),
                _ => Err(format!(
                    "`{s}`: a percentage is a whole number from 0 to 100"
                )),
            };
        }
        parse_size(s)
            .map(MinFree::Bytes)
            .map_err(|e| format!("{e}, or a share like `5%`"))
    }

    /// The threshold in bytes on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => total / 100 * u64::from(p),
        }
    }
}

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinFree::Bytes(b) => write!(f, "{}", human(*b)),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What the disk holding the audit log has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DiskSpace {
    /// Bytes an unprivileged writer may still use.
    pub free_bytes: u64,
    pub total_bytes: u64,
    /// The configured threshold, in bytes on this filesystem.
    pub min_free_bytes: u64,
    /// `free_bytes` is under `min_free_bytes`.
    pub low: bool,
}

/// Watches the free space of the audit log's filesystem against `audit.min_free_disk`.
#[derive(Debug)]
pub struct DiskWatch {
    dir: PathBuf,
    min_free: MinFree,
    /// The last reading was low: the log speaks only when this changes.
    low: AtomicBool,
}

impl DiskWatch {
    /// A watch of the filesystem holding `log` (its directory).
    pub fn new(log: &Path, min_free: MinFree) -> Self {
        let dir = log
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Self {
            dir,
            min_free,
            low: AtomicBool::new(false),
        }
    }

    /// The space now (one `statvfs`), or why it cannot be read.
    pub fn read(&self) -> Result<DiskSpace, String> {
        let s = rustix::fs::statvfs(&self.dir).map_err(|e| {
            format!(
                "cannot read the free space of `{}`: {e}",
                self.dir.display()
            )
        })?;
        let total_bytes = s.f_blocks.saturating_mul(s.f_frsize);
        let free_bytes = s.f_bavail.saturating_mul(s.f_frsize);
        let min_free_bytes = self.min_free.bytes(total_bytes);
        Ok(DiskSpace {
            free_bytes,
            total_bytes,
            min_free_bytes,
            low: free_bytes < min_free_bytes,
        })
    }

    /// Read the space and log when it crosses the threshold, either way: a `WARN` when it
    /// goes low, an `INFO` when it is back. A failed reading is a `WARN` each time.
    pub fn check(&self) -> Result<DiskSpace, String> {
        let space = self.read();
        match &space {
            Ok(s) => {
                let was = self.low.swap(s.low, Ordering::Relaxed);
                if s.low && !was {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        free = %human(s.free_bytes),
                        total = %human(s.total_bytes),
                        min_free = %self.min_free,
                        "audit log disk is low: when it fills, every check is denied; \
                         free space or move `audit.path`"
                    );
                } else if !s.low && was {
                    tracing::info!(
                        dir = %self.dir.display(),
                        free = %human(s.free_bytes),
                        "audit log disk has room again"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "audit log disk space unknown"),
        }
        space
    }
}

/// A size: `"1GiB"`, `"500 MB"`, `"1048576"` (bytes). Units: B, KB/MB/GB/TB (powers of
/// 1000), KiB/MiB/GiB/TiB (powers of 1024), case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{s}`: expected a size like `1GiB` or `500MB`"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Bytes for people: `1.5 GiB`.
fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_shares_parse_and_bad_ones_say_why() {
        assert_eq!(MinFree::parse("1GiB"), Ok(MinFree::Bytes(1 << 30)));
        assert_eq!(MinFree::parse("500 MB"), Ok(MinFree::Bytes(500_000_000)));
        assert_eq!(MinFree::parse("4096"), Ok(MinFree::Bytes(4096)));
        assert_eq!(MinFree::parse(" 5% "), Ok(MinFree::Percent(5)));
        assert_eq!(MinFree::parse("0"), Ok(MinFree::Bytes(0)));
        for (bad, says) in [
            ("101%", "from 0 to 100"),
            ("-1GiB", "expected a size"),
            ("1.5GiB", "unknown unit `.5gib`"),
            ("1 parsec", "unknown unit `parsec`"),
            ("99999999999TiB", "too large"),
            ("", "expected a size"),
        ] {
            let e = MinFree::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(MinFree::Percent(10).bytes(1000), 100);
        assert_eq!(MinFree::Bytes(7).bytes(1000), 7);
    }

    #[test]
    fn au_disk_a_threshold_above_the_free_space_is_low_and_zero_never_is() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        let never = DiskWatch::new(&log, MinFree::Bytes(0)).check().unwrap();
        assert!(!never.low && never.total_bytes > 0 && never.free_bytes <= never.total_bytes);
        let always = DiskWatch::new(&log, MinFree::Percent(100));
        let s = always.check().unwrap();
        assert!(s.low, "{s:?}");
        assert_eq!(s.min_free_bytes, s.total_bytes / 100 * 100);
        // The watch remembers it went low (the log spoke once) and hears it come back.
        assert!(always.low.load(Ordering::Relaxed));
        let missing = DiskWatch::new(&dir.path().join("gone/audit.jsonl"), MinFree::DEFAULT);
        assert!(missing.read().unwrap_err().contains("gone"));
    }
}
