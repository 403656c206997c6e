//! Unit tests of the log's segments (issue 14 item 4): rotation by size and age, the chain
//! across segments, compression, retention recorded before it deletes, restarts at every
//! step, and what the verifier makes of segments removed by someone else (AU-04).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::tests::{append_decisions, lines};
use super::*;

fn settings(rotate_size: u64, compress: bool, retention: Retention) -> AuditSettings {
    AuditSettings {
        group_commit: AuditSettings::DEFAULT_GROUP_COMMIT,
        segments: SegmentSettings {
            rotate_size,
            compress,
            retention,
            ..SegmentSettings::default()
        },
    }
}

fn closed(path: &Path) -> Vec<segments::Segment> {
    segments::Family::of(path).closed().unwrap()
}

fn first_record(seg: &segments::Segment) -> Value {
    let line = segments::first_line(&seg.path, seg.compressed, 1 << 20)
        .unwrap()
        .unwrap();
    serde_json::from_slice(&line).unwrap()
}

fn log_in(dir: &Path) -> PathBuf {
    dir.join("audit.jsonl")
}

#[test]
fn au_seg01_rotation_by_size_keeps_one_chain_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_in(dir.path());
    let log = AuditLog::open(&path, settings(4096, false, Retention::default())).unwrap();
    append_decisions(&log, 40);
    let segs = closed(&path);
    // ~770 bytes a record: a segment closes after 6 of them.
    assert!(segs.len() >= 5, "{segs:?}");
    assert_eq!(segs[0].first_seq, 1);
    assert_eq!(
        segs[0].path.file_name().unwrap(),
        "audit-000000000001.jsonl",
        "named after its first record"
    );
    let log_id = log.log_id().unwrap();
    for seg in &segs[1..] {
        let first = first_record(seg);
        assert_eq!(first["event"], "audit.segment", "{first}");
        assert_eq!(first["seq"], seg.first_seq, "{first}");
        assert_eq!(first["detail"]["log_id"], hex::encode(log_id), "{first}");
        assert!(seg.size >= 4096 - 800, "{seg:?}");
    }
    // The active file opens with a header too, and the chain runs through all of them.
    let active: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(active["event"], "audit.segment");
    let report = verify(&path).unwrap();
    let headers = segs.len() as u64;
    assert_eq!(report.records, 40 + headers);
    assert_eq!((report.first_seq, report.last_seq), (1, 40 + headers));
    assert_eq!(report.files.len(), segs.len() + 1);
    // The directory names the same log.
    assert_eq!(verify(dir.path()).unwrap(), report);
    assert_eq!(
        verify::log_id(&path).unwrap(),
        Some(hex::encode(log_id)),
        "record 1's hash"
    );
    // One segment on its own: its chain inside holds; where it starts is taken as given.
    let alone = verify(&segs[2].path).unwrap();
    assert!(
        alone.standalone && alone.first_seq == segs[2].first_seq,
        "{alone:?}"
    );
}

#[test]
fn au_seg02_compressed_segments_verify_and_a_reopened_log_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_in(dir.path());
    let s = settings(4096, true, Retention::default());
    let log = AuditLog::open(&path, s).unwrap();
    append_decisions(&log, 30);
    log.maintain().unwrap();
    let segs = closed(&path);
    assert!(
        segs.len() >= 4 && segs.iter().all(|s| s.compressed),
        "{segs:?}"
    );
    // JSON lines of one shape compress well.
    assert!(segs[1].size * 4 < 4096, "{:?}", segs[1]);
    let before = verify(&path).unwrap();
    let (seq, hash) = log.head();
    drop(log);
    let log = AuditLog::open(&path, s).unwrap();
    assert_eq!(log.head(), (seq, hash));
    assert_eq!(
        log.log_id(),
        Some(
            <[u8; 32]>::try_from(hex::decode(verify::log_id(&path).unwrap().unwrap()).unwrap())
                .unwrap()
        )
    );
    append_decisions(&log, 10);
    let after = verify(&path).unwrap();
    assert!(after.records > before.records + 10 - 1, "{after:?}");
}

#[test]
fn au_seg03_a_crash_between_rotation_and_header_continues_from_the_closed_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_in(dir.path());
    let s = settings(1 << 20, false, Retention::default());
    let log = AuditLog::open(&path, s).unwrap();
    append_decisions(&log, 5);
    log.rotate().unwrap();
    let (seq, _) = log.head();
    assert_eq!(seq, 6, "five records and the new segment's header");
    drop(log);
    // The crash: the rename happened, the header never reached the new file.
    std::fs::write(&path, b"").unwrap();
    let log = AuditLog::open(&path, s).unwrap();
    assert_eq!(log.last_seq(), 5);
    append_decisions(&log, 2);
    let all = lines(&path);
    assert!(all[0].contains("\"event\":\"audit.segment\""), "{}", all[0]);
    assert_eq!(verify(&path).unwrap().records, 8);
    // And a crash before the new active file was created at all.
    log.rotate().unwrap();
    drop(log);
    std::fs::remove_file(&path).unwrap();
    let log = AuditLog::open(&path, s).unwrap();
    assert_eq!(log.last_seq(), 8);
    append_decisions(&log, 1);
    assert_eq!(verify(&path).unwrap().records, 10);
    // An empty segment is never made: rotating a log that holds only its header does nothing.
    let n = closed(&path).len();
    log.rotate().unwrap();
    log.rotate().unwrap();
    assert_eq!(closed(&path).len(), n + 1);
}

#[test]
fn au_seg04_retention_records_what_it_deletes_and_the_verifier_accepts_only_that() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_in(dir.path());
    let keep_two = Retention {
        keep_segments: Some(2),
        ..Retention::default()
    };
    let log = AuditLog::open(&path, settings(4096, true, keep_two)).unwrap();
    append_decisions(&log, 60);
    // The retention record may itself fill the active segment and close it: run until the
    // log is at rest (the segment thread would do the same after that rotation).
    let mut segs = Vec::new();
    for _ in 0..5 {
        log.maintain().unwrap();
        segs = closed(&path);
        if segs.len() == 2 && segs.iter().all(|s| s.compressed) {
            break;
        }
    }
    assert_eq!(segs.len(), 2, "{segs:?}");
    let report = verify(&path).unwrap();
    assert!(report.first_seq > 1, "{report:?}");
    assert_eq!(report.removed_through, Some(segs[0].first_seq - 1));
    // Each deletion is in the log, synced before the files went (the segment thread may
    // have run retention before this test's own call did).
    let text = std::fs::read_to_string(&path).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["event"] == "audit.retention")
        .collect();
    assert!(!events.is_empty(), "no retention record");
    assert_eq!(events[0]["detail"]["deleted"][0]["first_seq"], 1);
    let last = events.last().unwrap();
    assert_eq!(last["detail"]["through"], segs[0].first_seq - 1);
    for event in &events {
        assert_eq!(event["detail"]["rule"], "keep_segments");
        assert!(
            event["detail"]["deleted"][0]["file"]
                .as_str()
                .unwrap()
                .ends_with(".jsonl.zst"),
            "{event}"
        );
    }
    // The log keeps its name after record 1 is gone.
    assert_eq!(
        verify::log_id(&path).unwrap(),
        log.log_id().map(hex::encode)
    );
    drop(log);

    // AU-04: someone else deletes the oldest kept segment. The next one opens with its
    // header, but no retention record accounts for the records that went with it.
    std::fs::remove_file(&segs[0].path).unwrap();
    match verify(&path) {
        Err(VerifyError::Front {
            first,
            removed_through,
        }) => {
            assert_eq!(first, segs[1].first_seq);
            assert_eq!(removed_through, Some(segs[0].first_seq - 1));
        }
        other => panic!("front cut not detected: {other:?}"),
    }
    // Deleting a middle segment breaks the chain where the next one starts.
    let dir2 = tempfile::tempdir().unwrap();
    let path2 = log_in(dir2.path());
    let log = AuditLog::open(&path2, settings(4096, false, Retention::default())).unwrap();
    append_decisions(&log, 30);
    drop(log);
    let segs = closed(&path2);
    std::fs::remove_file(&segs[2].path).unwrap();
    match verify(&path2) {
        Err(VerifyError::Line {
            file,
            line: 1,
            broken: Broken::Seq { .. },
        }) => assert_eq!(file, segs[3].path),
        other => panic!("missing middle segment not detected: {other:?}"),
    }
}

#[test]
fn au_seg05_size_retention_keeps_the_total_under_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_in(dir.path());
    let bound = 64 << 10;
    let log = AuditLog::open(
        &path,
        settings(
            8192,
            false,
            Retention {
                keep_size: Some(bound),
                ..Retention::default()
            },
        ),
    )
    .unwrap();
    for _ in 0..10 {
        append_decisions(&log, 50);
        log.maintain().unwrap();
        let total: u64 = closed(&path).iter().map(|s| s.size).sum::<u64>()
            + std::fs::metadata(&path).unwrap().len();
        assert!(total <= bound, "{total} > {bound}");
    }
    let report = verify(&path).unwrap();
    assert!(report.first_seq > 100, "{report:?}");
}

#[test]
fn au_seg06_age_closes_a_segment_that_holds_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_in(dir.path());
    let mut s = settings(1 << 20, false, Retention::default());
    s.segments.rotate_age = Duration::from_secs(1);
    let log = AuditLog::open(&path, s).unwrap();
    append_decisions(&log, 3);
    // The sync thread looks once a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while closed(&path).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no segment closed by age"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Only the header is in the new segment: it stays open however long it idles.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(closed(&path).len(), 1);
    assert_eq!(verify(&path).unwrap().records, 4);
}

#[test]
fn a_directory_with_two_logs_asks_which() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.jsonl", "b.jsonl"] {
        let log = AuditLog::open(&dir.path().join(name), AuditSettings::default()).unwrap();
        append_decisions(&log, 1);
    }
    match verify(dir.path()) {
        Err(e @ VerifyError::NoLog { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("a.jsonl") && text.contains("b.jsonl"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn au_seg07_a_segment_that_cannot_be_closed_does_not_refuse_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_in(dir.path());
    let log = AuditLog::open(&path, settings(4096, false, Retention::default())).unwrap();
    // Something else holds the name the first segment would get.
    std::fs::write(dir.path().join("audit-000000000001.jsonl"), b"not ours\n").unwrap();
    append_decisions(&log, 20);
    assert_eq!(log.write_failures(), 0);
    assert!(log.failing().is_none());
    assert_eq!(log.last_seq(), 20);
    assert!(log.rotate().is_err(), "the name is still in the way");
    std::fs::remove_file(dir.path().join("audit-000000000001.jsonl")).unwrap();
    log.rotate().unwrap();
    append_decisions(&log, 1);
    assert_eq!(verify(&path).unwrap().records, 22);
}
