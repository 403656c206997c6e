//! The vocabulary every part of Mandate speaks: who asks (a verified [`Principal`]), what it
//! asks ([`CheckRequest`]: action, [`Resource`], context), and what it gets ([`Decision`]:
//! an [`Outcome`] with [`Reason`]s and, for an escalation, the [`ApprovalRequirement`]).
//!
//! A leaf: it imports no other module of the crate, so `identity`, `policy`, `decision`,
//! `approval`, `store`, `audit` and `service` can all use it without an import cycle.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

/// A verified caller, ready for policy evaluation. Built once per verified token and cached
/// with it, so the hot path never rebuilds it.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Cedar entity type, from the issuer's `principal_type` (e.g. `Agent`).
    pub kind: String,
    /// Cedar entity id: the token's `sub` (a SPIFFE ID for JWT-SVIDs).
    pub id: String,
    /// The configured name of the issuer that vouched for this principal (or `pep:<name>`
    /// when a trusted enforcement point named the subject).
    pub issuer: String,
    /// `jti`, when the token has one.
    pub token_id: Option<String>,
    /// `exp` (unix seconds); the cache never keeps the principal past it.
    pub expires_at: i64,
    /// The principal's Cedar attributes (mapped claims plus profile attributes), as JSON.
    pub attributes: Map<String, Value>,
    /// RFC 8693 `act` chain: the current actor first, then prior actors.
    pub actors: Vec<String>,
    /// The owner (claim mapped to `owner`), used by approvals for separation of duties.
    pub owner: Option<String>,
    /// Groups (claim mapped to `groups`), used by approver checks.
    pub groups: Vec<String>,
    /// True when `aud` held more than one audience (SVID §6.2 replay risk: flagged in audit).
    pub multi_audience: bool,
    /// SHA-256 of the token this principal was verified from, when it came through the
    /// token cache: it stands for the whole credential in decision-cache keys, so the token
    /// is hashed once per request, not twice.
    pub credential_digest: Option<[u8; 32]>,
    /// The Cedar entity, built once.
    pub entity: Arc<cedar_policy::Entity>,
    /// An entity store holding only this principal, built once: a check whose resource
    /// needs no entity of its own evaluates against it without building a store.
    pub entities: Arc<cedar_policy::Entities>,
}

/// The three outcomes of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allow,
    Deny,
    Escalate,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Escalate => "escalate",
        }
    }
}

/// The resource a check is about. `properties` become the Cedar entity's attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub kind: String,
    pub id: String,
    pub properties: Map<String, Value>,
}

/// One check, already parsed and authenticated by an adapter.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    /// Who asks: from a verified token, or named by a trusted enforcement point.
    pub principal: Arc<Principal>,
    /// The action name, e.g. `payments:transfer`; the Cedar action is `Action::"<name>"`.
    pub action: String,
    /// AuthZEN `action.properties`; exposed to policies as `context.mandate.action`.
    pub action_properties: Option<Map<String, Value>>,
    pub resource: Resource,
    /// The caller's context object. The key `mandate` is reserved for what Mandate adds.
    pub context: Map<String, Value>,
}

/// Why a decision came out as it did: a machine-readable code plus a human sentence.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reason {
    /// Stable, snake_case: `permitted`, `forbidden`, `approval_required`, `no_matching_policy`,
    /// `recertification_due`, `policy_error`, `unknown_action`, `invalid_request`, ...
    pub code: &'static str,
    /// The policy that caused this reason, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
    pub message: String,
}

/// The fallback part of an approval requirement: who is asked when nobody answers in time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Fallback {
    pub group: String,
    #[serde(with = "crate::vocabulary::duration_str")]
    pub after: Duration,
}

/// What the grant of an approval allows (`@grant_scope`), from narrowest to widest. Every
/// scope is for the same whole principal (owner and delegation chain included), under the
/// same policy version, and, wider than a call, only while the same approval policies are
/// the ones asking: a request another policy escalates (a larger amount, a stricter quorum)
/// is never covered by a grant its approver did not give.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantScope {
    /// Exactly the approved request: action, resource and context (the default).
    #[default]
    Call,
    /// The same action on the same resource, with any context (an MCP tool with any
    /// arguments).
    Tool,
    /// Any action on the same resource, with any context.
    Resource,
}

impl GrantScope {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantScope::Call => "call",
            GrantScope::Tool => "tool",
            GrantScope::Resource => "resource",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "call" => Some(GrantScope::Call),
            "tool" => Some(GrantScope::Tool),
            "resource" => Some(GrantScope::Resource),
            _ => None,
        }
    }
    pub fn is_call(&self) -> bool {
        *self == GrantScope::Call
    }
    /// What a grant of this scope allows, in words, for approvers and agents.
    pub fn covers(self) -> &'static str {
        match self {
            GrantScope::Call => "exactly this request",
            GrantScope::Tool => "this action on this resource, with any context (arguments)",
            GrantScope::Resource => "any action on this resource, with any context",
        }
    }
}

/// What an escalation needs before the same request can be allowed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApprovalRequirement {
    /// The policy whose `@approval` annotation asked for this.
    pub policy_id: String,
    /// Approver groups (`@approval`, comma separated in the annotation).
    pub groups: Vec<String>,
    /// Distinct approvers needed (`@quorum`, default 1).
    pub quorum: u32,
    /// Evidence an approver must supply (`@evidence`), e.g. `ticket`.
    pub evidence: Vec<String>,
    /// How long the resulting grant lasts (`@grant_ttl`).
    #[serde(with = "crate::vocabulary::duration_str")]
    pub grant_ttl: Duration,
    /// What the grant allows (`@grant_scope`); shown only when wider than the call.
    #[serde(skip_serializing_if = "GrantScope::is_call")]
    pub grant_scope: GrantScope,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// Set when this requirement comes from an autonomous permit past its `@recertify_by`
    /// date: the permit degraded to an escalation to its `@owner`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recertify_by: Option<String>,
}

/// The answer to one check. Serialized with the HTTP API's keys (`decision`, `decision_id`,
/// ...), so `mandate check` prints what `POST /v1/check` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    #[serde(rename = "decision")]
    pub outcome: Outcome,
    /// Random, time-ordered (UUID v7): the key of the audit record.
    #[serde(rename = "decision_id")]
    pub id: uuid::Uuid,
    /// `<manifest revision>+<first 16 hex of the bundle's SHA-256>`.
    pub policy_version: Arc<str>,
    /// The policies that determined the outcome (forbids for a deny, permits otherwise).
    pub policy_ids: Vec<String>,
    pub reasons: Vec<Reason>,
    /// Present exactly when `outcome` is `Escalate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRequirement>,
}

/// Serialize a [`Duration`] as a humantime string (`"1h"`, `"30m"`).
pub mod duration_str {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// Context key Mandate fills itself (`context.mandate.now`, `context.mandate.action`).
pub const RESERVED_CONTEXT_KEY: &str = "mandate";
