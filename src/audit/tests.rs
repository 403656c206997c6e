//! Unit tests of the audit chain: writing, reopening, failing, and the verifier's aim.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::*;
use crate::vocabulary::Principal;
use crate::vocabulary::{CheckRequest, Decision, Outcome, Reason, Resource};

fn request(amount: i64) -> CheckRequest {
    let principal =
        Principal::from_parts("Agent", "agent-1", "dev", Map::new()).expect("principal");
    CheckRequest {
        principal: Arc::new(principal),
        action: "payments:transfer".into(),
        action_properties: None,
        resource: Resource {
            kind: "Account".into(),
            id: "acct-1".into(),
            properties: Map::new(),
        },
        context: json!({"amount": amount, "memo": "x"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    }
}

fn decision() -> Decision {
    Decision {
        id: uuid::Uuid::now_v7(),
        outcome: Outcome::Allow,
        policy_version: "1+0123456789abcdef".into(),
        policy_ids: vec!["payments-autonomous".into()],
        reasons: vec![Reason {
            code: "permitted",
            policy_id: Some("payments-autonomous".into()),
            message: "permitted".into(),
        }],
        approval: None,
    }
}

pub(super) fn append_decisions(log: &AuditLog, n: usize) {
    let req = request(50);
    for _ in 0..n {
        let d = decision();
        log.append(&DecisionRecord::new(&req, &d, Duration::from_micros(7)).into())
            .expect("append");
    }
}

fn new_log(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&path, AuditSettings::default()).expect("open");
    append_decisions(&log, n);
    path
}

pub(super) fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).expect("write");
}

fn broken_at(path: &Path) -> (u64, Broken) {
    match verify(path) {
        Err(VerifyError::Line { line, broken, .. }) => (line, broken),
        other => panic!("expected a broken line, got {other:?}"),
    }
}

/// Every line of `path` is exactly the canonical JSON of its own content plus `hash`.
fn assert_canonical_lines(path: &Path) {
    for line in lines(path) {
        let mut v: Value = serde_json::from_str(&line).unwrap();
        let hash = v.as_object_mut().unwrap().remove("hash").unwrap();
        let mut canonical = Vec::new();
        write_canonical(&mut canonical, &v).unwrap();
        let canonical = String::from_utf8(canonical).unwrap();
        let expected = format!("{},\"hash\":{hash}}}", canonical.strip_suffix('}').unwrap());
        assert_eq!(line, expected);
    }
}

proptest::proptest! {
    /// The hand-written decision line escapes every text from outside Mandate exactly as
    /// the verifier's canonical JSON does: quotes, backslashes, control characters, non-ASCII.
    #[test]
    fn decision_records_with_any_text_serialize_canonically(
        texts in proptest::collection::vec(proptest::string::string_regex("(?s).{0,12}").unwrap(), 9),
        latency in proptest::num::u64::ANY,
        flags in proptest::num::u8::ANY,
        millis in 0i64..253_402_300_799_999,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, AuditSettings::default()).unwrap();
        let mut req = request(1);
        req.action = texts[0].clone();
        req.resource.kind = texts[1].clone();
        req.resource.id = texts[2].clone();
        let mut d = decision();
        d.policy_ids = vec![texts[3].clone(), texts[4].clone()];
        d.policy_version = texts[5].as_str().into();
        let approvers = vec![Approver { id: texts[6].clone(), rationale: texts[7].clone() }];
        let mut record = DecisionRecord::new(&req, &d, Duration::from_micros(latency));
        record.latency_us = latency;
        record.issuer = &texts[8];
        record.token_id = (flags & 1 == 1).then_some(texts[0].as_str());
        record.grant_id = (flags & 2 == 2).then_some(texts[1].as_str());
        record.approval_id = (flags & 4 == 4).then_some(texts[2].as_str());
        record.breakglass = flags & 8 == 8;
        record.multi_audience = flags & 16 == 16;
        record.approvers = &approvers;
        record.time = Timestamp::from_unix_millis(millis);
        log.append(&record.into()).unwrap();
        assert_canonical_lines(&path);
        let line: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        proptest::prop_assert_eq!(&line["action"], &json!(texts[0]));
        proptest::prop_assert_eq!(&line["approvers"][0]["rationale"], &json!(texts[7]));
        proptest::prop_assert_eq!(line["latency_us"].as_u64(), Some(latency));
        // The time is the instant itself, to the millisecond, whatever the date.
        let time = time::OffsetDateTime::parse(
            line["time"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        ).unwrap();
        proptest::prop_assert_eq!(i64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap(), millis);
    }
}

#[test]
fn records_serialize_canonically() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 1);
    let log = AuditLog::open(&path, AuditSettings::default()).unwrap();
    let detail = json!({"z": 1, "a": {"y": [true, null, 1.5], "b": "é\"\n"}});
    log.append(&EventRecord::new("approval.created", &detail).into())
        .unwrap();
    assert_canonical_lines(&path);
    let all = lines(&path);
    let first: Value = serde_json::from_str(&all[0]).unwrap();
    assert_eq!(first["kind"], "decision");
    assert_eq!(first["prev_hash"], GENESIS_HASH);
    assert_eq!(
        first["principal"],
        json!({"type": "Agent", "id": "agent-1"})
    );
    assert_eq!(first["reasons"], json!(["permitted"]));
    assert_eq!(first["approvers"], json!([]));
    assert_eq!(first["grant_id"], Value::Null);
    assert_eq!(first["breakglass"], false);
    assert_eq!(first["latency_us"], 7);
    let time = first["time"].as_str().unwrap();
    assert!(time.len() == 24 && time.ends_with('Z'), "{time}");
    let digest = hex::encode(context_digest(&request(50).context));
    assert_eq!(first["context_digest"], digest.as_str());
    let second: Value = serde_json::from_str(&all[1]).unwrap();
    assert_eq!(second["kind"], "event");
    assert_eq!(second["seq"], 2);
    assert_eq!(second["prev_hash"], first["hash"]);
}

#[test]
fn context_digest_ignores_key_order_only() {
    let a = json!({"b": 1, "a": {"y": 2, "x": [1, 2]}});
    let b = json!({"a": {"x": [1, 2], "y": 2}, "b": 1});
    let c = json!({"a": {"x": [2, 1], "y": 2}, "b": 1});
    let d = |v: &Value| context_digest(v.as_object().unwrap());
    assert_eq!(d(&a), d(&b));
    assert_ne!(d(&a), d(&c));
    let mut out = Vec::new();
    write_canonical(&mut out, &a).unwrap();
    assert_eq!(out, br#"{"a":{"x":[1,2],"y":2},"b":1}"#);
}

#[test]
fn timestamp_is_rfc3339_with_milliseconds() {
    assert_eq!(
        Timestamp::from_unix_millis(1_748_779_200_123).to_string(),
        "2025-06-01T12:00:00.123Z"
    );
    assert_eq!(
        Timestamp::from_unix_millis(0).to_string(),
        "1970-01-01T00:00:00.000Z"
    );
}

#[test]
fn chain_of_1000_records_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 1000);
    let report = verify(&path).unwrap();
    assert_eq!(report.records, 1000);
    let last: Value = serde_json::from_str(lines(&path).last().unwrap()).unwrap();
    assert_eq!(last["hash"], report.last_hash.as_str());
    assert_eq!(last["seq"], 1000);
}

#[test]
fn empty_log_verifies_with_the_genesis_hash() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 0);
    assert_eq!(
        verify(&path).unwrap(),
        VerifyReport {
            records: 0,
            first_seq: 0,
            last_seq: 0,
            last_hash: GENESIS_HASH.into(),
            files: vec![path.clone()],
            removed_through: None,
            standalone: false,
        }
    );
}

#[test]
fn au04_editing_one_byte_of_a_middle_line_is_reported_at_that_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 10);
    let mut all = lines(&path);
    all[4] = all[4].replacen("\"allow\"", "\"alloW\"", 1);
    write_lines(&path, &all);
    assert_eq!(broken_at(&path), (5, Broken::Hash));
}

#[test]
fn au04_a_duplicate_key_or_whitespace_is_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 3);
    let original = lines(&path);
    let mut all = original.clone();
    // A reader grepping for `"decision":"deny"` would see it; the hash still matches `allow`.
    all[1] = all[1].replacen("{", "{\"decision\":\"deny\",", 1);
    write_lines(&path, &all);
    assert_eq!(broken_at(&path), (2, Broken::NotCanonical));
    let mut all = original;
    all[1] = all[1].replacen(",", ", ", 1);
    write_lines(&path, &all);
    assert_eq!(broken_at(&path), (2, Broken::NotCanonical));
}

#[test]
fn au04_deleting_a_line_is_reported_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 10);
    let mut all = lines(&path);
    all.remove(3);
    write_lines(&path, &all);
    assert_eq!(
        broken_at(&path),
        (
            4,
            Broken::Seq {
                expected: 4,
                found: 5
            }
        )
    );
    // The first line too: the chain starts from the genesis hash at seq 1.
    let mut all = lines(&path);
    all.remove(0);
    write_lines(&path, &all);
    assert_eq!(broken_at(&path).0, 1);
}

#[test]
fn au04_swapping_two_lines_is_reported_at_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 10);
    let mut all = lines(&path);
    all.swap(2, 6);
    write_lines(&path, &all);
    assert_eq!(broken_at(&path).0, 3);
}

#[test]
fn au04_a_line_with_a_forged_seq_and_prev_hash_still_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 5);
    let mut all = lines(&path);
    // Move line 5 to position 3 and fix its seq: its own hash no longer matches.
    let moved = all.remove(4).replace("\"seq\":5", "\"seq\":3");
    all.insert(2, moved);
    write_lines(&path, &all);
    assert_eq!(broken_at(&path), (3, Broken::Hash));
}

#[test]
fn au04_truncating_the_last_line_is_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 10);
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 20]).unwrap();
    assert_eq!(broken_at(&path), (10, Broken::Torn));
}

#[test]
fn au04_one_thousand_random_mutations_are_all_detected_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 20);
    let original = lines(&path);
    // A small deterministic generator: the test is reproducible without a seed to record.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    for round in 0..1000 {
        let mut all = original.clone();
        let (expected_line, what) = match round % 3 {
            0 => {
                let i = next(all.len());
                let mut bytes = all[i].clone().into_bytes();
                let j = next(bytes.len());
                bytes[j] ^= 1 + next(255) as u8;
                let text = String::from_utf8_lossy(&bytes).into_owned();
                // A flipped byte that becomes a newline splits the line: still line i + 1.
                all[i] = text;
                (i + 1, "edit")
            }
            1 => {
                // Not the last line: cutting whole records off the end is what `last_hash`
                // (kept elsewhere) detects, not the chain.
                let i = next(all.len() - 1);
                all.remove(i);
                (i + 1, "delete")
            }
            _ => {
                let i = next(all.len() - 1);
                let j = i + 1 + next(all.len() - i - 1);
                all.swap(i, j);
                (i + 1, "swap")
            }
        };
        write_lines(&path, &all);
        match verify(&path) {
            Err(VerifyError::Line { line, .. }) => {
                assert_eq!(line, expected_line as u64, "round {round}: {what}")
            }
            other => panic!("round {round}: {what} not detected: {other:?}"),
        }
    }
}

#[test]
fn reopening_continues_seq_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 5);
    let log = AuditLog::open(&path, AuditSettings::default()).unwrap();
    assert_eq!(log.last_seq(), 5);
    append_decisions(&log, 5);
    drop(log);
    assert_eq!(verify(&path).unwrap().records, 10);
}

#[test]
fn reopening_after_a_torn_write_drops_the_torn_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 5);
    let mut text = std::fs::read(&path).unwrap();
    text.extend_from_slice(br#"{"action":"payments:tra"#);
    std::fs::write(&path, &text).unwrap();
    assert_eq!(broken_at(&path), (6, Broken::Torn));
    let log = AuditLog::open(&path, AuditSettings::default()).unwrap();
    assert_eq!(log.last_seq(), 5);
    append_decisions(&log, 1);
    assert_eq!(verify(&path).unwrap().records, 6);
}

#[test]
fn a_broken_last_record_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_log(dir.path(), 3);
    let mut all = lines(&path);
    all[2] = all[2].replacen("\"allow\"", "\"deny\"", 1);
    write_lines(&path, &all);
    let e = AuditLog::open(&path, AuditSettings::default()).unwrap_err();
    assert!(
        matches!(e, AuditError::Corrupt { .. }) && e.to_string().contains("audit.jsonl"),
        "{e}"
    );
}

#[test]
fn open_creates_parent_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/audit.jsonl");
    let log = AuditLog::open(&path, AuditSettings::default()).unwrap();
    append_decisions(&log, 1);
    assert_eq!(verify(&path).unwrap().records, 1);
}

#[test]
fn au02_disk_full_fails_the_append_and_counts_it() {
    let log = AuditLog::open(Path::new("/dev/full"), AuditSettings::default()).unwrap();
    let req = request(50);
    let d = decision();
    for n in 1..=3 {
        let e = log
            .append(&DecisionRecord::new(&req, &d, Duration::ZERO).into())
            .unwrap_err();
        assert!(matches!(e, AuditError::Write { .. }), "{e}");
        assert!(e.to_string().contains("/dev/full"), "{e}");
        assert_eq!(log.write_failures(), n);
    }
    assert_eq!(log.last_seq(), 0);
}

#[test]
fn durable_append_and_group_commit_sync_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(
        &path,
        AuditSettings {
            group_commit: Duration::from_millis(1),
            ..AuditSettings::default()
        },
    )
    .unwrap();
    let detail = json!({"approval_id": "a-1"});
    assert_eq!(
        log.append_durable(&EventRecord::new("approval.approved", &detail).into())
            .unwrap(),
        1
    );
    append_decisions(&log, 3);
    std::thread::sleep(Duration::from_millis(20));
    assert!(!log.unsynced());
    assert_eq!(log.write_failures(), 0);
    assert_eq!(verify(&path).unwrap().records, 4);
}

#[test]
fn eight_threads_appending_keep_seq_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, AuditSettings::default()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let log = log.clone();
            std::thread::spawn(move || append_decisions(&log, 500))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(verify(&path).unwrap().records, 4000);
    let seqs: Vec<u64> = lines(&path)
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=4000).collect::<Vec<_>>());
}

/// The reference: serde_json writing maps whose keys a `BTreeMap` keeps in byte order.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Sorted<'a> {
    Leaf(&'a Value),
    Array(Vec<Sorted<'a>>),
    Object(std::collections::BTreeMap<&'a str, Sorted<'a>>),
}

fn sorted(v: &Value) -> Sorted<'_> {
    match v {
        Value::Array(items) => Sorted::Array(items.iter().map(sorted).collect()),
        Value::Object(m) => {
            Sorted::Object(m.iter().map(|(k, v)| (k.as_str(), sorted(v))).collect())
        }
        leaf => Sorted::Leaf(leaf),
    }
}

fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[a-z\"\\\\\u{0}-\u{1f}\u{7f}é😀]{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((any::<String>(), inner.clone()), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            proptest::collection::vec(("[a-cé😀A-C]{0,2}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest::proptest! {
    /// The canonical writer (audit records, context digests, approval binding hashes) writes
    /// exactly what serde_json writes for the same value with its keys in byte order.
    #[test]
    fn canonical_json_is_serde_json_with_sorted_keys(v in any_json()) {
        let mut out = Vec::new();
        write_canonical(&mut out, &v).unwrap();
        let reference = serde_json::to_string(&sorted(&v)).unwrap();
        proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), reference);
    }
}
