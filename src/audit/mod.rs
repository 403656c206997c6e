//! The audit log of every decision (docs/design.md §5, SECURITY §0 item 2 and AU-01..AU-06):
//! a hash-chained JSON-lines file, one record per decision (allow included) and per approval
//! event, with an offline verifier.
//!
//! Each line is one record: its keys in canonical order (sorted, no whitespace) with `hash`
//! appended last. `hash` is the hex SHA-256 of `prev_hash` (hex) + `"\n"` + the canonical JSON
//! of the record without `hash`; the first record of a file has `prev_hash` = 64 zeros. So an
//! edited, deleted, inserted or reordered line breaks the chain at its position, and
//! [`verify()`] names that line.
//!
//! Durability, in two steps: [`AuditLog::append`] hands the line to the operating system in
//! one write before it returns (the record survives a `kill -9` of Mandate, so a decision is
//! answered only after that), and a background thread `fdatasync`s the file every
//! `group_commit` interval (the record survives a power loss within that window). Approval
//! events that must be on disk before they are acknowledged use [`AuditLog::append_durable`].
//!
//! The log is a series of segments ([`segments`]): the active file is closed by size or age,
//! compressed, and deleted by retention rules only after the log has recorded the deletion;
//! the chain runs on from segment to segment, and [`verify()`] reads them all in order.
//!
//! A chain alone proves order, not origin: [`checkpoint`] signs its head on a schedule and
//! keeps the signatures outside the log, so rewriting or cutting the log is detected too.
//!
//! Secrets never enter a record (AU-05): the token is represented by its `jti`, the request
//! context by a digest of its canonical JSON.

mod canonical;
pub mod checkpoint;
pub mod disk;
mod log;
mod record;
pub mod segments;
pub mod verify;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_segments;

pub use canonical::{
    context_digest, write_canonical, write_str, write_value as write_canonical_value,
};
pub use checkpoint::{Checkpoint, CheckpointKey, Checkpointer};
pub use disk::{DiskSpace, DiskWatch, MinFree};
pub use log::{AuditError, AuditLog, AuditSettings, RecordTap};
pub use record::{Approver, DecisionRecord, EntityName, EventRecord, Record, Timestamp};
pub use segments::{Retention, SegmentSettings};
pub use verify::{Broken, VerifyError, VerifyReport, verify, verify_visiting};

/// `prev_hash` of the first record of a file.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
