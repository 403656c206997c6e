//! What one audit line holds: a decision, or an event (approval workflow, break-glass) chained
//! through the same log. Records borrow from the request and the decision, so building one on
//! the hot path copies nothing.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::Value;

use super::canonical::{context_digest, write_str, write_value};
use crate::vocabulary::{CheckRequest, Decision, Outcome, Reason};

/// A UTC instant with millisecond precision, written as RFC 3339 (`2025-06-01T12:00:00.123Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(i64);

impl Timestamp {
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self(ms)
    }

    pub fn from_unix_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub fn unix_millis(self) -> i64 {
        self.0
    }
}

impl Timestamp {
    /// RFC 3339 with milliseconds, always 24 ASCII bytes. Written by hand: this runs for every
    /// decision, and the general formatter was a tenth of the cost of a record.
    pub fn rfc3339(self) -> [u8; 24] {
        let secs = self.0.div_euclid(1000);
        let ms = self.0.rem_euclid(1000);
        let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        // Years outside 0..=9999 do not fit the format; clamp rather than write garbage.
        let y = y.clamp(0, 9999);
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, value: i64, width: usize| {
            let mut v = value;
            for i in (0..width).rev() {
                out[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, y, 4);
        put(5, m, 2);
        put(8, d, 2);
        put(11, sod / 3600, 2);
        put(14, sod % 3600 / 60, 2);
        put(17, sod % 60, 2);
        put(20, ms, 3);
        out
    }
}

/// (year, month, day) of a count of days since 1970-01-01 in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.rfc3339();
        f.write_str(std::str::from_utf8(&text).unwrap_or_default())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A Cedar entity by type and id, written `{"id": ..., "type": ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityName<'a> {
    pub kind: &'a str,
    pub id: &'a str,
}

impl Serialize for EntityName<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Keys in canonical (sorted) order.
        let mut st = s.serialize_struct("EntityName", 2)?;
        st.serialize_field("id", self.id)?;
        st.serialize_field("type", self.kind)?;
        st.end()
    }
}

/// One approver of the approval a decision relied on, with the reason they gave.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Approver {
    // Declared in canonical (sorted) key order.
    pub id: String,
    pub rationale: String,
}

/// The audit record of one decision (DESIGN §5).
#[derive(Debug, Clone)]
pub struct DecisionRecord<'a> {
    pub time: Timestamp,
    pub decision_id: uuid::Uuid,
    pub principal: EntityName<'a>,
    /// The configured issuer name, or `pep:<name>` when an enforcement point named the subject.
    pub issuer: &'a str,
    /// The token's `jti`: the token itself is never recorded (AU-05).
    pub token_id: Option<&'a str>,
    /// The RFC 8693 `act` chain, current actor first.
    pub actors: &'a [String],
    /// The token named several audiences (SVID §6.2 replay risk).
    pub multi_audience: bool,
    pub action: &'a str,
    pub resource: EntityName<'a>,
    /// SHA-256 of the canonical JSON of the request context.
    pub context_digest: [u8; 32],
    pub decision: Outcome,
    /// Recorded as their codes.
    pub reasons: &'a [Reason],
    pub policy_ids: &'a [String],
    pub policy_version: &'a str,
    /// The grant that allowed this request, when one did.
    pub grant_id: Option<&'a str>,
    /// The approval behind that grant.
    pub approval_id: Option<&'a str>,
    pub approvers: &'a [Approver],
    pub breakglass: bool,
    /// From the start of the request handler to the decision.
    pub latency_us: u64,
    /// The trace of the check's span (W3C trace id), when it was exported or the caller sent
    /// one; the key is absent otherwise.
    pub trace_id: Option<opentelemetry::trace::TraceId>,
}

impl<'a> DecisionRecord<'a> {
    /// The record of `decision`, made for `req`, `latency` after the request arrived.
    pub fn new(req: &'a CheckRequest, decision: &'a Decision, latency: Duration) -> Self {
        let p = &*req.principal;
        Self {
            time: Timestamp::now(),
            decision_id: decision.id,
            principal: EntityName {
                kind: &p.kind,
                id: &p.id,
            },
            issuer: &p.issuer,
            token_id: p.token_id.as_deref(),
            actors: &p.actors,
            multi_audience: p.multi_audience,
            action: &req.action,
            resource: EntityName {
                kind: &req.resource.kind,
                id: &req.resource.id,
            },
            context_digest: context_digest(&req.context),
            decision: decision.outcome,
            reasons: &decision.reasons,
            policy_ids: &decision.policy_ids,
            policy_version: &decision.policy_version,
            grant_id: None,
            approval_id: None,
            approvers: &[],
            breakglass: false,
            latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            trace_id: None,
        }
    }
}

/// Something that happened outside a decision (an approval created or answered, a grant
/// revoked, a break-glass use), chained through the same log.
#[derive(Debug, Clone)]
pub struct EventRecord<'a> {
    pub time: Timestamp,
    /// Dotted name, e.g. `approval.approved`.
    pub event: &'a str,
    /// Free-form; written in canonical form.
    pub detail: &'a Value,
}

impl<'a> EventRecord<'a> {
    pub fn new(event: &'a str, detail: &'a Value) -> Self {
        Self {
            time: Timestamp::now(),
            event,
            detail,
        }
    }
}

/// One line of the log: `"kind": "decision"` or `"kind": "event"`.
#[derive(Debug, Clone)]
#[expect(
    clippy::large_enum_variant,
    reason = "a record lives on the stack for one append; boxing it would allocate on the hot path"
)]
pub enum Record<'a> {
    Decision(DecisionRecord<'a>),
    Event(EventRecord<'a>),
}

impl<'a> From<DecisionRecord<'a>> for Record<'a> {
    fn from(r: DecisionRecord<'a>) -> Self {
        Record::Decision(r)
    }
}

impl<'a> From<EventRecord<'a>> for Record<'a> {
    fn from(r: EventRecord<'a>) -> Self {
        Record::Event(r)
    }
}

/// A record with its place in the chain: what is hashed (everything but `hash`).
pub(crate) struct Sealed<'r, 'a> {
    pub record: &'r Record<'a>,
    pub seq: u64,
    pub prev_hash: &'r str,
}

/// Hex-encode into `buf` and view it as text.
pub(crate) fn hex32<'b>(bytes: &[u8; 32], buf: &'b mut [u8; 64]) -> &'b str {
    // Both cannot fail: the sizes match and hex digits are ASCII.
    let _ = hex::encode_to_slice(bytes, buf);
    std::str::from_utf8(buf).unwrap_or_default()
}

impl Sealed<'_, '_> {
    /// Append the record as one JSON object to `out`.
    ///
    /// Invariant: fields are written in canonical (byte-sorted) key order with serde_json's
    /// string escaping, so this output is exactly the canonical JSON the verifier recomputes
    /// from the parsed line (checked by `tests::records_serialize_canonically` and
    /// `tests::decision_records_with_any_text_serialize_canonically`). A decision record is
    /// written field by field: values Mandate makes itself (digests, ids, codes, times,
    /// numbers) are plain ASCII and need no escaping; every text from a caller, a token or a
    /// policy goes through serde_json.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut num = itoa::Buffer::new();
        let d = match self.record {
            Record::Decision(d) => d,
            // Keys in canonical (byte-sorted) order, like a decision's below.
            Record::Event(e) => {
                out.extend_from_slice(b"{\"detail\":");
                write_value(out, e.detail);
                out.extend_from_slice(b",\"event\":");
                write_str(out, e.event);
                out.extend_from_slice(b",\"kind\":\"event\",\"prev_hash\":");
                write_str(out, self.prev_hash);
                out.extend_from_slice(b",\"seq\":");
                out.extend_from_slice(num.format(self.seq).as_bytes());
                out.extend_from_slice(b",\"time\":\"");
                out.extend_from_slice(&e.time.rfc3339());
                out.extend_from_slice(b"\"}");
                return Ok(());
            }
        };
        let text = |out: &mut Vec<u8>, s: &str| {
            write_str(out, s);
            Ok::<_, serde_json::Error>(())
        };
        let texts = |out: &mut Vec<u8>, items: &mut dyn Iterator<Item = &str>| {
            out.push(b'[');
            for (i, s) in items.enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, s);
            }
            out.push(b']');
            Ok::<_, serde_json::Error>(())
        };
        let optional = |out: &mut Vec<u8>, s: Option<&str>| {
            match s {
                Some(s) => write_str(out, s),
                None => out.extend_from_slice(b"null"),
            }
            Ok::<_, serde_json::Error>(())
        };
        let entity = |out: &mut Vec<u8>, e: &EntityName<'_>| {
            out.extend_from_slice(b"{\"id\":");
            text(out, e.id)?;
            out.extend_from_slice(b",\"type\":");
            text(out, e.kind)?;
            out.push(b'}');
            Ok::<_, serde_json::Error>(())
        };
        let mut hex = [0u8; 64];
        let mut uuid = uuid::Uuid::encode_buffer();

        out.extend_from_slice(b"{\"action\":");
        text(out, d.action)?;
        out.extend_from_slice(b",\"actors\":");
        texts(out, &mut d.actors.iter().map(String::as_str))?;
        out.extend_from_slice(b",\"approval_id\":");
        optional(out, d.approval_id)?;
        out.extend_from_slice(b",\"approvers\":");
        serde_json::to_writer(&mut *out, d.approvers)?;
        out.extend_from_slice(if d.breakglass {
            b",\"breakglass\":true".as_slice()
        } else {
            b",\"breakglass\":false".as_slice()
        });
        out.extend_from_slice(b",\"context_digest\":\"");
        out.extend_from_slice(hex32(&d.context_digest, &mut hex).as_bytes());
        out.extend_from_slice(b"\",\"decision\":\"");
        out.extend_from_slice(d.decision.as_str().as_bytes());
        out.extend_from_slice(b"\",\"decision_id\":\"");
        out.extend_from_slice(
            d.decision_id
                .hyphenated()
                .encode_lower(&mut uuid)
                .as_bytes(),
        );
        out.extend_from_slice(b"\",\"grant_id\":");
        optional(out, d.grant_id)?;
        out.extend_from_slice(b",\"issuer\":");
        text(out, d.issuer)?;
        out.extend_from_slice(b",\"kind\":\"decision\",\"latency_us\":");
        out.extend_from_slice(num.format(d.latency_us).as_bytes());
        out.extend_from_slice(if d.multi_audience {
            b",\"multi_audience\":true".as_slice()
        } else {
            b",\"multi_audience\":false".as_slice()
        });
        out.extend_from_slice(b",\"policy_ids\":");
        texts(out, &mut d.policy_ids.iter().map(String::as_str))?;
        out.extend_from_slice(b",\"policy_version\":");
        text(out, d.policy_version)?;
        out.extend_from_slice(b",\"prev_hash\":");
        text(out, self.prev_hash)?;
        out.extend_from_slice(b",\"principal\":");
        entity(out, &d.principal)?;
        // Reason codes are Mandate's own snake_case constants.
        out.extend_from_slice(b",\"reasons\":");
        texts(out, &mut d.reasons.iter().map(|r| r.code))?;
        out.extend_from_slice(b",\"resource\":");
        entity(out, &d.resource)?;
        out.extend_from_slice(b",\"seq\":");
        out.extend_from_slice(num.format(self.seq).as_bytes());
        out.extend_from_slice(b",\"time\":\"");
        out.extend_from_slice(&d.time.rfc3339());
        out.extend_from_slice(b"\",\"token_id\":");
        optional(out, d.token_id)?;
        if let Some(id) = d.trace_id {
            // 32 lowercase hex digits, as in `traceparent`.
            out.extend_from_slice(b",\"trace_id\":\"");
            out.extend_from_slice(id.to_string().as_bytes());
            out.push(b'"');
        }
        out.push(b'}');
        Ok(())
    }
}
