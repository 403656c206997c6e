//! One writer per data file: an exclusive lock on `<file>.lock` (which holds the holder's
//! pid), taken at start-up and held for the process lifetime.
//!
//! Two servers appending to one audit log each continue the chain from what they read at
//! start, so the file ends up with two records claiming the same place and `audit verify`
//! reports a gap; two servers on one SQLite store each trust their own grant cache, which
//! assumes no other writer. Both must be refused at start, not discovered later.
//!
//! The lock is `flock`-style (std's `File::try_lock`): the kernel releases it when the
//! process exits however it exits, so a crash leaves no stale lock behind; the pid written
//! into the file only serves the error message of the next process.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataLock {
    path: PathBuf,
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "`{}` is in use by another process (pid {holder}, which holds the lock `{}`): stop it, or give this server its own files",
        .data.display(),
        .lock.display()
    )]
    Held {
        data: PathBuf,
        lock: PathBuf,
        /// The pid recorded by the holder, or `unknown` if it had not written it yet.
        holder: String,
    },
    #[error("cannot lock `{}`: {source}", .lock.display())]
    Io { lock: PathBuf, source: io::Error },
}

impl DataLock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file beside `data`: `audit.jsonl` is locked through `audit.jsonl.lock`.
pub fn lock_path(data: &Path) -> PathBuf {
    let mut name = data.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    data.with_file_name(name)
}

/// Lock `data` for this process. `Ok(None)` when `data` exists and is not a regular file (a
/// device such as `/dev/full` in tests, a pipe): there is no file to protect, and no place
/// beside it to put a lock file.
pub fn acquire(data: &Path) -> Result<Option<DataLock>, LockError> {
    if std::fs::metadata(data).is_ok_and(|m| !m.is_file()) {
        return Ok(None);
    }
    let lock = lock_path(data);
    let io_err = |source| LockError::Io {
        lock: lock.clone(),
        source,
    };
    if let Some(dir) = lock.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    // Not truncated on open: while another process holds it, its pid must stay readable.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "unknown".to_owned(),
                pid => crate::strict_json::shown(pid),
            };
            return Err(LockError::Held {
                data: data.to_path_buf(),
                lock,
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
    }
    file.set_len(0).map_err(io_err)?;
    writeln!(file, "{}", std::process::id()).map_err(io_err)?;
    Ok(Some(DataLock {
        path: lock,
        _file: file,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_sits_beside_the_data_file() {
        assert_eq!(
            lock_path(Path::new("/srv/data/audit.jsonl")),
            Path::new("/srv/data/audit.jsonl.lock")
        );
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("sub/audit.jsonl");
        let first = acquire(&data).unwrap().unwrap();
        let text = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to an open file, so a second open in this process conflicts
        // just as another process would.
        let e = acquire(&data).unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("audit.jsonl.lock"), "{message}");
        assert!(!data.exists(), "locking never creates the data file");
        drop(first);
        assert!(acquire(&data).unwrap().is_some());
    }

    #[test]
    fn devices_are_not_locked() {
        assert!(acquire(Path::new("/dev/null")).unwrap().is_none());
    }
}
