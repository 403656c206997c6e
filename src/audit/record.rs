//! What one audit line holds: a decision, or an event (approval workflow, break-glass) chained
//! through the same log. Records borrow from the request and the decision, so building one on
//! the hot path copies nothing.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::ser::{Serialize, SerializeSeq, SerializeStruct, Serializer};
use serde_json::Value;

use super::canonical::{Canonical, context_digest};
use crate::decision::{CheckRequest, Decision, Outcome, Reason};

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

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
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

/// Reasons as their codes.
struct Codes<'a>(&'a [Reason]);

impl Serialize for Codes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for r in self.0 {
            seq.serialize_element(r.code)?;
        }
        seq.end()
    }
}

/// 32 bytes as 64 lowercase hex digits, without allocating.
pub(crate) struct Hex32<'a>(pub &'a [u8; 32]);

impl Serialize for Hex32<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        s.serialize_str(hex32(self.0, &mut buf))
    }
}

/// Hex-encode into `buf` and view it as text.
pub(crate) fn hex32<'b>(bytes: &[u8; 32], buf: &'b mut [u8; 64]) -> &'b str {
    // Both cannot fail: the sizes match and hex digits are ASCII.
    let _ = hex::encode_to_slice(bytes, buf);
    std::str::from_utf8(buf).unwrap_or_default()
}

impl Serialize for Sealed<'_, '_> {
    /// Invariant: fields are written in canonical (byte-sorted) key order, so this output is
    /// exactly the canonical JSON the verifier recomputes from the parsed line (checked by
    /// `tests::records_serialize_canonically`).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.record {
            Record::Decision(d) => {
                let mut st = s.serialize_struct("DecisionRecord", 23)?;
                st.serialize_field("action", d.action)?;
                st.serialize_field("actors", d.actors)?;
                st.serialize_field("approval_id", &d.approval_id)?;
                st.serialize_field("approvers", d.approvers)?;
                st.serialize_field("breakglass", &d.breakglass)?;
                st.serialize_field("context_digest", &Hex32(&d.context_digest))?;
                st.serialize_field("decision", &d.decision)?;
                st.serialize_field("decision_id", &d.decision_id)?;
                st.serialize_field("grant_id", &d.grant_id)?;
                st.serialize_field("issuer", d.issuer)?;
                st.serialize_field("kind", "decision")?;
                st.serialize_field("latency_us", &d.latency_us)?;
                st.serialize_field("multi_audience", &d.multi_audience)?;
                st.serialize_field("policy_ids", d.policy_ids)?;
                st.serialize_field("policy_version", d.policy_version)?;
                st.serialize_field("prev_hash", self.prev_hash)?;
                st.serialize_field("principal", &d.principal)?;
                st.serialize_field("reasons", &Codes(d.reasons))?;
                st.serialize_field("resource", &d.resource)?;
                st.serialize_field("seq", &self.seq)?;
                st.serialize_field("time", &d.time)?;
                st.serialize_field("token_id", &d.token_id)?;
                st.end()
            }
            Record::Event(e) => {
                let mut st = s.serialize_struct("EventRecord", 6)?;
                st.serialize_field("detail", &Canonical(e.detail))?;
                st.serialize_field("event", e.event)?;
                st.serialize_field("kind", "event")?;
                st.serialize_field("prev_hash", self.prev_hash)?;
                st.serialize_field("seq", &self.seq)?;
                st.serialize_field("time", &e.time)?;
                st.end()
            }
        }
    }
}
