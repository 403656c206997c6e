//! The decision: a verified principal, an action, a resource and a context in; exactly one of
//! allow, deny or escalate out (shared/DESIGN.md §1).
//!
//! Fail closed: any error on this path (a value Cedar cannot hold, a policy that errors while
//! evaluating, an unknown action) is a `deny` with a reason, never an `allow`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use cedar_policy::{Effect, Entities};
use cedar_policy_core::ast::{self, ValueKind};
use cedar_policy_core::evaluator::Evaluator;
use cedar_policy_core::extensions::Extensions;
use serde_json::{Map, Value};

use crate::clock::Clock;
use crate::identity::Principal;
use crate::policy::{Bundle, PolicyKind};
use crate::policy::{fast, values};

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
    #[serde(with = "crate::decision::duration_str")]
    pub after: Duration,
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
    #[serde(with = "crate::decision::duration_str")]
    pub grant_ttl: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// Set when this requirement comes from an autonomous permit past its `@recertify_by`
    /// date: the permit degraded to an escalation to its `@owner`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recertify_by: Option<String>,
}

/// The answer to one check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    /// Random, time-ordered (UUID v7): the key of the audit record.
    pub id: uuid::Uuid,
    pub outcome: Outcome,
    /// `<manifest revision>+<first 16 hex of the bundle's SHA-256>`.
    pub policy_version: Arc<str>,
    /// The policies that determined the outcome (forbids for a deny, permits otherwise).
    pub policy_ids: Vec<String>,
    pub reasons: Vec<Reason>,
    /// Present exactly when `outcome` is `Escalate`.
    pub approval: Option<ApprovalRequirement>,
}

/// Serialize a [`Duration`] as a humantime string (`"1h"`, `"30m"`).
pub mod duration_str {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// Recently made decisions, for a caller that repeats the exact same check (agents retry and
/// poll). SECURITY R-04c: an entry may be reused only when its key covers every input of the
/// decision, so the key is a SHA-256 over the caller's credential (which fixes the verified
/// principal and its attributes), the request body bytes (action, resource, context, subject),
/// the policy version, and the current second (which fixes `context.mandate.now` and every
/// date comparison). Entries live at most one second. A hit still gets its own decision id:
/// it is a new decision, made by the same rules from the same inputs. What the cache holds is
/// the policy's verdict only: grants are looked up again for every escalation, hit or not.
///
/// Since a key is only ever valid within its own second, the cache is one generation: the
/// entries of the current second, dropped whole when the clock moves on. That is cheaper
/// than a general cache's bookkeeping (the miss path runs on every new check), bounded by
/// `max_entries`, and an entry cannot outlive its second even if the key forgot to say so.
#[derive(Debug)]
pub struct DecisionCache {
    max_entries: usize,
    current: std::sync::Mutex<Generation>,
}

#[derive(Debug, Default)]
struct Generation {
    second: i64,
    entries: std::collections::HashMap<[u8; 32], Arc<CachedCheck>>,
}

/// A check and the decision it got: what a repeat of the same check reuses (the request
/// too, so its audit record is as complete as the first one's).
#[derive(Debug)]
pub struct CachedCheck {
    pub request: CheckRequest,
    pub decision: Decision,
}

impl CachedCheck {
    /// The reused verdict as a new decision, with its own id.
    pub fn fresh(&self) -> Decision {
        Decision {
            id: uuid::Uuid::now_v7(),
            ..self.decision.clone()
        }
    }
}

/// Length-prefixed parts of a [`DecisionCache`] key, so `("ab", "c")` and `("a", "bc")`
/// never collide.
#[derive(Debug, Default)]
pub struct CacheKey(sha2::Sha256);

impl CacheKey {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn part(mut self, bytes: &[u8]) -> Self {
        use sha2::Digest;
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }
    pub fn finish(self) -> [u8; 32] {
        use sha2::Digest;
        self.0.finalize().into()
    }
}

impl DecisionCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            max_entries,
            current: std::sync::Mutex::new(Generation::default()),
        }
    }

    /// The entry for `key` made during second `now`.
    pub fn get(&self, key: &[u8; 32], now: i64) -> Option<Arc<CachedCheck>> {
        let current = self.current.lock().ok()?;
        if current.second != now {
            return None;
        }
        current.entries.get(key).cloned()
    }

    /// Remember a decision made during second `now`; a full generation takes no more.
    pub fn insert(&self, key: [u8; 32], now: i64, request: CheckRequest, decision: Decision) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if current.second != now {
            // Older seconds' entries can never be hit again; newer ones are not replaced by
            // a decision that finished late.
            if current.second > now {
                return;
            }
            current.second = now;
            current.entries.clear();
        }
        if current.entries.len() < self.max_entries {
            current
                .entries
                .insert(key, Arc::new(CachedCheck { request, decision }));
        }
    }

    pub fn len(&self) -> usize {
        self.current.lock().map_or(0, |c| c.entries.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Context key Mandate fills itself (`context.mandate.now`, `context.mandate.action`).
pub const RESERVED_CONTEXT_KEY: &str = "mandate";

/// Decides checks against the current policy bundle. A reload swaps the bundle atomically:
/// a decision loads the bundle once, so it is made by exactly one policy version, and
/// decisions in flight finish on the bundle they started with.
#[derive(Debug)]
pub struct Engine {
    bundle: ArcSwap<Bundle>,
    clock: Arc<dyn Clock>,
}

impl Engine {
    pub fn new(bundle: Arc<Bundle>, clock: Arc<dyn Clock>) -> Self {
        Self {
            bundle: ArcSwap::new(bundle),
            clock,
        }
    }

    /// The engine's clock reading (unix seconds): what `context.mandate.now` would be.
    pub fn now(&self) -> i64 {
        self.clock.now_unix()
    }

    /// The bundle decisions are currently made with.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.load_full()
    }

    /// The Cedar source of each of `ids` in the bundle of policy version `version`: what an
    /// approval request keeps to show its approvers. `None` when the loaded bundle is no
    /// longer that version (a reload raced the decision) or lacks one of the ids: the caller
    /// cannot show the policy as it decided, and must not pretend to.
    pub fn policy_texts(
        &self,
        version: &str,
        ids: &[String],
    ) -> Option<std::collections::BTreeMap<String, String>> {
        let bundle = self.bundle.load();
        if *bundle.version() != *version {
            return None;
        }
        ids.iter()
            .map(|id| Some((id.clone(), bundle.policy_text(id)?.to_owned())))
            .collect()
    }

    /// Make `bundle` the active one for every later decision.
    pub fn swap(&self, bundle: Arc<Bundle>) {
        self.bundle.store(bundle);
    }

    /// Decide one check. Never fails: every error is a `deny` with a reason.
    pub fn decide(&self, req: &CheckRequest) -> Decision {
        self.decide_at(req, self.clock.now_unix())
    }

    /// Decide one check as of `now` (unix seconds): what `context.mandate.now` and the
    /// recertification dates see. A caller that keyed a cache on the second decides at it.
    pub fn decide_at(&self, req: &CheckRequest, now: i64) -> Decision {
        let bundle = self.bundle.load();
        let version = bundle.version();
        match self.evaluate(&bundle, req, now) {
            Ok(verdict) => verdict.into_decision(version),
            // Fail closed: whatever went wrong, the answer is deny.
            Err(reason) => Decision {
                id: uuid::Uuid::now_v7(),
                outcome: Outcome::Deny,
                policy_version: version,
                policy_ids: reason.policy_id.iter().cloned().collect(),
                reasons: vec![reason],
                approval: None,
            },
        }
    }

    fn evaluate(&self, bundle: &Bundle, req: &CheckRequest, now: i64) -> Result<Verdict, Reason> {
        let Some(slice) = bundle.slice(&req.action) else {
            return Err(deny(
                "unknown_action",
                None,
                format!(
                    "action `{}` is not declared in the policy schema",
                    req.action
                ),
            ));
        };
        if req.context.contains_key(RESERVED_CONTEXT_KEY) {
            return Err(invalid(format!(
                "`context.{RESERVED_CONTEXT_KEY}` is reserved for what Mandate adds"
            )));
        }

        // Context: the caller's fields plus `mandate: { now, action? }`, built straight into
        // the values Cedar's evaluator reads.
        // One reading of the clock (`now`) serves the context and the recertification dates.
        let mut mandate = None;
        // `context.mandate` only when a policy of this action can read it: it is a nested
        // record Cedar evaluates on every check.
        if slice.uses_mandate_context() {
            let mut fields = vec![("now", values::CoreValue::from(now))];
            if let Some(props) = &req.action_properties {
                fields.push((
                    "action",
                    values::record_value("action.properties", props, []).map_err(invalid_value)?,
                ));
            }
            mandate = Some((
                RESERVED_CONTEXT_KEY,
                values::CoreValue::record(fields, None),
            ));
        } else if let Some(props) = &req.action_properties {
            // Still refuse action properties Cedar cannot hold, whether or not read.
            values::record_value("action.properties", props, []).map_err(invalid_value)?;
        }
        let context = match values::record_value("context", &req.context, mandate)
            .map_err(invalid_value)?
            .value
        {
            ValueKind::Record(fields) => fields,
            _ => return Err(invalid("`context` is not a record".to_owned())),
        };

        // Entities: the slice's base, plus the principal and the resource. An entity the
        // bundle knows and the request describes without attributes keeps the bundle's data
        // (AuthZEN requests often carry identifiers only); given attributes win. A resource
        // named without properties that the bundle does not know needs no entity at all:
        // Cedar treats a missing entity like one without attributes or parents.
        let base = slice.entities();
        let base_empty = base.iter().next().is_none();
        let principal_uid = req.principal.entity.uid();
        let r = &req.resource;
        let resource_uid =
            values::entity_uid("resource.type", &r.kind, &r.id).map_err(invalid_value)?;
        let known = if base_empty {
            None
        } else {
            base.get(&resource_uid)
        };
        let resource_entity = if r.properties.is_empty() {
            None
        } else if resource_uid == principal_uid {
            // One store holds one entity per uid: a resource that is the principal itself,
            // described with properties, would replace the verified principal's attributes
            // with caller-supplied ones.
            return Err(invalid(format!(
                "`resource` names the principal `{resource_uid}` itself: it may not carry properties"
            )));
        } else {
            // Hierarchy is the bundle's data: a described resource keeps its known parents.
            let parents = known.map(|e| e.clone().into_inner().2).unwrap_or_default();
            Some(
                values::entity_from_json(
                    "resource.properties",
                    &r.kind,
                    &r.id,
                    &r.properties,
                    parents,
                )
                .map_err(invalid_value)?,
            )
        };
        let owned: Entities;
        let entities = match (base_empty, resource_entity) {
            // The hot path of an agent naming a resource by id: the store cached with the
            // verified token, nothing built per request.
            (true, None) => &*req.principal.entities,
            (true, Some(resource)) => {
                owned = values::store_without_hierarchy([&*req.principal.entity, &resource])
                    .map_err(invalid_value)?;
                &owned
            }
            (false, resource) => {
                let mut extra = Vec::with_capacity(2);
                let in_bundle = base.get(&principal_uid);
                if !(req.principal.attributes.is_empty() && in_bundle.is_some()) {
                    // The token says what the principal is; the bundle's entity data says
                    // what it belongs to (`principal in Team::"..."`): both count.
                    let principal = match in_bundle {
                        Some(known) => {
                            let (uid, attrs, _) = (*req.principal.entity).clone().into_inner();
                            let parents = known.clone().into_inner().2;
                            cedar_policy::Entity::new(uid, attrs, parents)
                                .map_err(|e| invalid(format!("principal: {e}")))?
                        }
                        None => (*req.principal.entity).clone(),
                    };
                    extra.push(principal);
                }
                extra.extend(resource);
                if extra.is_empty() {
                    base
                } else {
                    owned = base
                        .clone()
                        .upsert_entities(extra, None)
                        .map_err(|e| invalid(format!("entities: {e}")))?;
                    &owned
                }
            }
        };

        // The fast path answers the conditions it can (`policy::fast`), exactly as Cedar
        // would; Cedar's own evaluator, built only when needed, answers the rest.
        let (principal, action, resource): (&ast::EntityUID, &ast::EntityUID, &ast::EntityUID) = (
            principal_uid.as_ref(),
            slice.uid().as_ref(),
            resource_uid.as_ref(),
        );
        let input = fast::Input {
            principal,
            resource,
            context: &context,
            entities: entities.as_ref(),
        };
        let mut evaluator = None;
        let mut satisfied = Vec::new();
        let mut errors = Vec::new();
        for condition in slice.conditions() {
            if let Some(b) = condition.fast.as_ref().and_then(|f| f.eval(&input)) {
                if b {
                    satisfied.push(condition.id.as_str());
                }
                continue;
            }
            // No schema here: AuthZEN callers may send properties the schema does not
            // declare; the policies themselves were validated strictly at load.
            let evaluator = evaluator.get_or_insert_with(|| {
                let known = |u: &ast::EntityUID| ast::EntityUIDEntry::known(u.clone(), None);
                let request = ast::Request::new_unchecked(
                    known(principal),
                    known(action),
                    known(resource),
                    Some(ast::Context::Value(Arc::clone(&context))),
                );
                Evaluator::new(request, entities.as_ref(), Extensions::all_available())
            });
            // Cedar's authorizer, minus its per-request rebuild of every condition: each
            // policy of the slice is satisfied (its condition is `true`), not satisfied, or in
            // error.
            match evaluator.interpret(&condition.expr, &condition.env) {
                Ok(ast::Value {
                    value: ValueKind::Lit(ast::Literal::Bool(b)),
                    ..
                }) => {
                    if b {
                        satisfied.push(condition.id.as_str());
                    }
                }
                Ok(other) => errors.push((
                    condition,
                    format!("its condition is not a boolean but `{other}`"),
                )),
                Err(e) => errors.push((condition, e.to_string())),
            }
        }

        // Fail closed: a policy that errors may have been the forbid that mattered.
        if !errors.is_empty() {
            let mut reasons: Vec<Reason> = errors
                .into_iter()
                .map(|(c, e)| {
                    deny(
                        "policy_error",
                        Some(c.id.clone()),
                        format!("policy `{}` failed to evaluate: {e}", c.id),
                    )
                })
                .collect();
            reasons.sort_by(|a, b| a.policy_id.cmp(&b.policy_id));
            return Ok(Verdict::Errors(reasons));
        }

        let mut verdict = Tally::default();
        for id in satisfied {
            let Some(meta) = bundle.policy_meta(id) else {
                // Every policy of a slice has metadata; if not, refuse rather than guess.
                return Err(deny(
                    "policy_error",
                    Some(id.to_owned()),
                    format!("policy `{id}` has no metadata in this bundle"),
                ));
            };
            match (meta.effect, meta.kind) {
                (Effect::Forbid, _) | (_, PolicyKind::Forbid) => verdict.forbids.push(id),
                (_, PolicyKind::Approval) => match &meta.approval {
                    Some(a) => verdict.approvals.push((id, a, false)),
                    // Load guarantees a requirement; without one, refuse rather than guess.
                    None => {
                        return Err(deny(
                            "policy_error",
                            Some(id.to_owned()),
                            format!("policy `{id}` has no approval requirement"),
                        ));
                    }
                },
                (_, PolicyKind::Autonomous) => match meta.recertification_due(now) {
                    Some(a) => verdict.approvals.push((id, a, true)),
                    None => verdict.permits.push(id),
                },
                // Not in the regular slices; never allows outside a declared emergency.
                (_, PolicyKind::Breakglass) => {}
            }
        }
        Ok(verdict.finish())
    }
}

/// Satisfied policies, sorted by what they mean.
#[derive(Default)]
struct Tally<'a> {
    forbids: Vec<&'a str>,
    permits: Vec<&'a str>,
    /// (policy id, requirement, degraded from an autonomous permit past its recertify date)
    approvals: Vec<(&'a str, &'a ApprovalRequirement, bool)>,
}

impl Tally<'_> {
    fn finish(mut self) -> Verdict {
        if !self.forbids.is_empty() {
            self.forbids.sort_unstable();
            let reasons = self
                .forbids
                .iter()
                .map(|id| {
                    deny(
                        "forbidden",
                        Some((*id).to_owned()),
                        format!("forbidden by policy `{id}`"),
                    )
                })
                .collect();
            return Verdict::Done {
                outcome: Outcome::Deny,
                policy_ids: self.forbids.iter().map(|s| (*s).to_owned()).collect(),
                reasons,
                approval: None,
            };
        }
        if !self.permits.is_empty() {
            self.permits.sort_unstable();
            let reasons = self
                .permits
                .iter()
                .map(|id| Reason {
                    code: "permitted",
                    policy_id: Some((*id).to_owned()),
                    message: format!("permitted by policy `{id}`"),
                })
                .collect();
            return Verdict::Done {
                outcome: Outcome::Allow,
                policy_ids: self.permits.iter().map(|s| (*s).to_owned()).collect(),
                reasons,
                approval: None,
            };
        }
        if self.approvals.is_empty() {
            return Verdict::Done {
                outcome: Outcome::Deny,
                policy_ids: Vec::new(),
                reasons: vec![deny(
                    "no_matching_policy",
                    None,
                    "no policy permits this request".to_owned(),
                )],
                approval: None,
            };
        }
        self.approvals.sort_unstable_by(|a, b| a.0.cmp(b.0));
        // The strictest requirement wins: highest quorum; ties go to the smallest policy id.
        let mut chosen = self.approvals[0].1;
        for (_, a, _) in &self.approvals[1..] {
            if a.quorum > chosen.quorum {
                chosen = a;
            }
        }
        let reasons = self
            .approvals
            .iter()
            .map(|(id, a, degraded)| {
                if *degraded {
                    Reason {
                        code: "recertification_due",
                        policy_id: Some((*id).to_owned()),
                        message: format!(
                            "policy `{id}` was due for recertification by {}: approval by `{}` is required",
                            a.recertify_by.as_deref().unwrap_or("?"),
                            a.groups.join(", ")
                        ),
                    }
                } else {
                    Reason {
                        code: "approval_required",
                        policy_id: Some((*id).to_owned()),
                        message: format!(
                            "policy `{id}` requires approval by `{}`",
                            a.groups.join(", ")
                        ),
                    }
                }
            })
            .collect();
        Verdict::Done {
            outcome: Outcome::Escalate,
            policy_ids: self
                .approvals
                .iter()
                .map(|(id, _, _)| (*id).to_owned())
                .collect(),
            reasons,
            approval: Some(chosen.clone()),
        }
    }
}

/// A decision before it gets its id and version.
enum Verdict {
    Done {
        outcome: Outcome,
        policy_ids: Vec<String>,
        reasons: Vec<Reason>,
        approval: Option<ApprovalRequirement>,
    },
    /// Policies failed to evaluate: deny, naming each.
    Errors(Vec<Reason>),
}

impl Verdict {
    fn into_decision(self, policy_version: Arc<str>) -> Decision {
        let (outcome, policy_ids, reasons, approval) = match self {
            Verdict::Done {
                outcome,
                policy_ids,
                reasons,
                approval,
            } => (outcome, policy_ids, reasons, approval),
            Verdict::Errors(reasons) => (
                Outcome::Deny,
                reasons.iter().filter_map(|r| r.policy_id.clone()).collect(),
                reasons,
                None,
            ),
        };
        Decision {
            id: uuid::Uuid::now_v7(),
            outcome,
            policy_version,
            policy_ids,
            reasons,
            approval,
        }
    }
}

fn deny(code: &'static str, policy_id: Option<String>, message: String) -> Reason {
    Reason {
        code,
        policy_id,
        message,
    }
}

fn invalid(message: String) -> Reason {
    deny("invalid_request", None, message)
}

fn invalid_value(e: values::ValueError) -> Reason {
    invalid(e.to_string())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::clock::ManualClock;

    const SCHEMA: &str = r#"
        type Mandate = { now: Long, "action"?: { dry_run?: Bool } };
        entity Agent = { owner?: String };
        entity Account = { frozen?: Bool };
        action "payments:transfer" appliesTo {
          principal: [Agent], resource: [Account], context: { amount: Long, mandate: Mandate }
        };
        action "crm:read" appliesTo {
          principal: [Agent], resource: [Account], context: { mandate: Mandate }
        };
    "#;

    /// 2026-06-01T00:00:00Z
    const JUNE_2026: i64 = 1_780_272_000;

    fn bundle(policies: &str) -> Arc<Bundle> {
        let dir = tempfile::tempdir().unwrap();
        write_bundle(dir.path(), policies);
        Arc::new(Bundle::load(dir.path()).unwrap_or_else(|e| panic!("{e}")))
    }

    fn write_bundle(dir: &Path, policies: &str) {
        std::fs::write(dir.join("schema.cedarschema"), SCHEMA).unwrap();
        std::fs::write(
            dir.join("manifest.toml"),
            "name = \"t\"\nrevision = \"1\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("p.cedar"), policies).unwrap();
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn request(action: &str, context: Value) -> CheckRequest {
        let principal =
            Principal::from_parts("Agent", "agent-1", "test", obj(json!({"owner": "bob"})))
                .unwrap();
        CheckRequest {
            principal: Arc::new(principal),
            action: action.to_owned(),
            action_properties: None,
            resource: Resource {
                kind: "Account".into(),
                id: "acct-1".into(),
                properties: Map::new(),
            },
            context: obj(context),
        }
    }

    fn transfer(amount: i64) -> CheckRequest {
        request("payments:transfer", json!({ "amount": amount }))
    }

    const PAYMENTS: &str = r#"
        @id("small") permit (principal, action == Action::"payments:transfer", resource)
        when { context.amount <= 100 };
        @id("medium") @approval("finance") @evidence("ticket") @grant_ttl("1h")
        @fallback("leads") @fallback_after("30m")
        permit (principal, action == Action::"payments:transfer", resource)
        when { context.amount > 100 && context.amount <= 10000 };
        @id("large") forbid (principal, action == Action::"payments:transfer", resource)
        when { context.amount > 10000 };
    "#;

    fn engine(policies: &str) -> Engine {
        Engine::new(bundle(policies), ManualClock::new(JUNE_2026))
    }

    fn codes(d: &Decision) -> Vec<&'static str> {
        d.reasons.iter().map(|r| r.code).collect()
    }

    #[test]
    fn autonomous_permit_allows() {
        let d = engine(PAYMENTS).decide(&transfer(100));
        assert_eq!(d.outcome, Outcome::Allow);
        assert_eq!(d.policy_ids, vec!["small"]);
        assert_eq!(codes(&d), vec!["permitted"]);
        assert!(d.approval.is_none());
        assert!(d.policy_version.starts_with("1+"));
    }

    #[test]
    fn approval_permit_escalates_with_its_requirement() {
        let d = engine(PAYMENTS).decide(&transfer(101));
        assert_eq!(d.outcome, Outcome::Escalate);
        assert_eq!(codes(&d), vec!["approval_required"]);
        let a = d.approval.unwrap();
        assert_eq!(a.policy_id, "medium");
        assert_eq!(a.groups, vec!["finance"]);
        assert_eq!(a.quorum, 1);
        assert_eq!(a.evidence, vec!["ticket"]);
        assert_eq!(a.grant_ttl, Duration::from_secs(3600));
        assert_eq!(
            a.fallback,
            Some(Fallback {
                group: "leads".into(),
                after: Duration::from_secs(1800)
            })
        );
    }

    #[test]
    fn forbid_denies() {
        let d = engine(PAYMENTS).decide(&transfer(10_001));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy_ids, vec!["large"]);
        assert_eq!(codes(&d), vec!["forbidden"]);
    }

    #[test]
    fn forbid_overrides_permit_and_approval() {
        let e = engine(
            r#"
            @id("p") permit (principal, action, resource);
            @id("a") @approval("x") permit (principal, action, resource);
            @id("f") forbid (principal, action == Action::"payments:transfer", resource)
            when { context.amount > 5 };
            "#,
        );
        assert_eq!(e.decide(&transfer(5)).outcome, Outcome::Allow);
        let d = e.decide(&transfer(6));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy_ids, vec!["f"]);
    }

    #[test]
    fn autonomous_permit_wins_over_approval_permit() {
        let e = engine(
            r#"
            @id("a") @approval("x") permit (principal, action, resource);
            @id("p") permit (principal, action, resource);
            "#,
        );
        let d = e.decide(&transfer(1));
        assert_eq!(d.outcome, Outcome::Allow);
        assert_eq!(d.policy_ids, vec!["p"]);
    }

    #[test]
    fn nothing_matching_is_default_deny() {
        let d = engine(PAYMENTS).decide(&request("crm:read", json!({})));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(codes(&d), vec!["no_matching_policy"]);
        assert!(d.policy_ids.is_empty());
    }

    #[test]
    fn strictest_approval_wins_ties_to_smallest_id() {
        let e = engine(
            r#"
            @id("c") @approval("c") @quorum("2") permit (principal, action, resource);
            @id("b") @approval("b") @quorum("2") permit (principal, action, resource);
            @id("a") @approval("a") permit (principal, action, resource);
            "#,
        );
        let d = e.decide(&transfer(1));
        assert_eq!(d.outcome, Outcome::Escalate);
        assert_eq!(d.policy_ids, vec!["a", "b", "c"]);
        let a = d.approval.unwrap();
        assert_eq!((a.policy_id.as_str(), a.quorum), ("b", 2));
    }

    #[test]
    fn recertify_date_degrades_to_owner_approval() {
        let clock = ManualClock::new(JUNE_2026);
        let e = Engine::new(
            bundle(
                r#"
                @id("reads") @owner("crm-team") @recertify_by("2026-06-30")
                permit (principal, action == Action::"crm:read", resource);
                "#,
            ),
            clock.clone(),
        );
        let req = request("crm:read", json!({}));
        assert_eq!(e.decide(&req).outcome, Outcome::Allow);
        // Last second of the named day: still allowed.
        clock.set(1_782_863_999);
        assert_eq!(e.decide(&req).outcome, Outcome::Allow);
        clock.set(1_782_864_000);
        let d = e.decide(&req);
        assert_eq!(d.outcome, Outcome::Escalate);
        assert_eq!(codes(&d), vec!["recertification_due"]);
        let a = d.approval.unwrap();
        assert_eq!(a.groups, vec!["crm-team"]);
        assert_eq!(a.quorum, 1);
        assert_eq!(a.grant_ttl, crate::policy::annotations::DEFAULT_GRANT_TTL);
        assert_eq!(a.recertify_by.as_deref(), Some("2026-06-30"));
    }

    #[test]
    fn unknown_action_is_denied() {
        let d = engine(PAYMENTS).decide(&request("payments:refund", json!({})));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(codes(&d), vec!["unknown_action"]);
        assert!(d.reasons[0].message.contains("`payments:refund`"));
    }

    #[test]
    fn policy_error_is_denied_naming_the_policy() {
        // No `amount`: every payments policy fails to evaluate, the forbid included.
        let d = engine(PAYMENTS).decide(&request("payments:transfer", json!({})));
        assert_eq!(d.outcome, Outcome::Deny);
        assert!(codes(&d).iter().all(|c| *c == "policy_error"), "{d:?}");
        assert_eq!(d.policy_ids, vec!["large", "medium", "small"]);
        assert!(d.reasons[0].message.contains("policy `large`"), "{d:?}");
        assert!(d.reasons[0].message.contains("amount"), "{d:?}");
    }

    #[test]
    fn float_in_context_is_denied_naming_the_field() {
        let d = engine(PAYMENTS).decide(&request("payments:transfer", json!({"amount": 50.5})));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(codes(&d), vec!["invalid_request"]);
        assert!(d.reasons[0].message.contains("`context.amount`"), "{d:?}");
    }

    #[test]
    fn reserved_context_key_is_refused() {
        let d = engine(PAYMENTS).decide(&request(
            "payments:transfer",
            json!({"amount": 1, "mandate": {"now": 0}}),
        ));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(codes(&d), vec!["invalid_request"]);
    }

    #[test]
    fn mandate_context_carries_now_and_action_properties() {
        let e = engine(
            r#"
            @id("dry") permit (principal, action == Action::"crm:read", resource)
            when { context.mandate has "action" && context.mandate["action"] has dry_run &&
                   context.mandate["action"].dry_run };
            @id("late") forbid (principal, action == Action::"crm:read", resource)
            when { context.mandate.now >= 1780272001 };
            "#,
        );
        let mut req = request("crm:read", json!({}));
        assert_eq!(e.decide(&req).outcome, Outcome::Deny);
        req.action_properties = Some(obj(json!({"dry_run": true})));
        assert_eq!(e.decide(&req).outcome, Outcome::Allow);
        req.action_properties = Some(obj(json!({"dry_run": 1.5})));
        let d = e.decide(&req);
        assert_eq!(codes(&d), vec!["invalid_request"]);
        assert!(
            d.reasons[0].message.contains("`action.properties.dry_run`"),
            "{d:?}"
        );
    }

    #[test]
    fn resource_properties_and_bundle_entities() {
        let dir = tempfile::tempdir().unwrap();
        write_bundle(
            dir.path(),
            r#"@id("open") permit (principal, action == Action::"crm:read", resource)
               when { !(resource has frozen && resource.frozen) };"#,
        );
        std::fs::write(
            dir.path().join("entities.json"),
            r#"[{"uid": {"type": "Account", "id": "acct-1"}, "attrs": {"frozen": true}, "parents": []}]"#,
        )
        .unwrap();
        let e = Engine::new(
            Arc::new(Bundle::load(dir.path()).unwrap()),
            ManualClock::new(JUNE_2026),
        );
        let mut req = request("crm:read", json!({}));
        // Known resource, no properties: the bundle's data (frozen) holds.
        assert_eq!(e.decide(&req).outcome, Outcome::Deny);
        // Properties given: they win.
        req.resource.properties = obj(json!({"frozen": false}));
        assert_eq!(e.decide(&req).outcome, Outcome::Allow);
        // Unknown resource: no attributes.
        req.resource = Resource {
            kind: "Account".into(),
            id: "acct-2".into(),
            properties: Map::new(),
        };
        assert_eq!(e.decide(&req).outcome, Outcome::Allow);
    }

    #[test]
    fn swap_changes_the_version_of_later_decisions() {
        let e = engine(PAYMENTS);
        let v1 = e.decide(&transfer(1)).policy_version;
        let next = bundle(&format!("{PAYMENTS}\n// edited\n"));
        e.swap(Arc::clone(&next));
        let d = e.decide(&transfer(1));
        assert_ne!(d.policy_version, v1);
        assert_eq!(d.policy_version, next.version());
        assert_eq!(e.bundle().version(), next.version());
    }

    #[test]
    fn decision_ids_are_unique() {
        let e = engine(PAYMENTS);
        assert_ne!(e.decide(&transfer(1)).id, e.decide(&transfer(1)).id);
    }

    #[test]
    fn cached_decision_is_a_new_decision_with_the_same_verdict() {
        let cache = DecisionCache::new(16);
        let d = engine(PAYMENTS).decide(&transfer(250));
        let key = CacheKey::new().part(b"token").part(b"body").finish();
        assert!(cache.get(&key, 100).is_none());
        cache.insert(key, 100, transfer(250), d.clone());
        let hit = cache.get(&key, 100).unwrap().fresh();
        assert_ne!(hit.id, d.id);
        assert_eq!(
            (hit.outcome, &hit.policy_ids, &hit.approval),
            (d.outcome, &d.policy_ids, &d.approval)
        );
    }

    #[test]
    fn r04c_cached_decisions_live_only_within_their_second_and_are_bounded() {
        let cache = DecisionCache::new(2);
        let d = engine(PAYMENTS).decide(&transfer(1));
        let key = |i: u8| CacheKey::new().part(&[i]).finish();
        cache.insert(key(1), 100, transfer(1), d.clone());
        assert!(cache.get(&key(1), 100).is_some());
        // The next second sees nothing of the previous one.
        assert!(cache.get(&key(1), 101).is_none());
        // A late insert for an older second does not replace the newer generation.
        cache.insert(key(2), 101, transfer(1), d.clone());
        cache.insert(key(3), 100, transfer(1), d.clone());
        assert!(cache.get(&key(3), 100).is_none());
        assert_eq!(cache.len(), 1);
        // Full: nothing more is taken until the next second.
        cache.insert(key(4), 101, transfer(1), d.clone());
        cache.insert(key(5), 101, transfer(1), d.clone());
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&key(5), 101).is_none());
        cache.insert(key(5), 102, transfer(1), d);
        assert_eq!(cache.len(), 1);
    }

    proptest::proptest! {
        /// SECURITY R-04c: two checks that differ in any one input never share a cache entry;
        /// length prefixes keep shifted boundaries apart too.
        #[test]
        fn r04c_cache_keys_differ_when_any_input_differs(
            parts in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..8), 4),
            which in 0usize..4,
            flip in proptest::num::u8::ANY,
        ) {
            let key = |ps: &[Vec<u8>]| ps.iter().fold(CacheKey::new(), |k, p| k.part(p)).finish();
            let mut changed = parts.clone();
            changed[which].push(flip);
            proptest::prop_assert_ne!(key(&parts), key(&changed));
            // Moving a byte across a boundary changes the key as well.
            if !parts[0].is_empty() {
                let mut shifted = parts.clone();
                let b = shifted[0].pop().unwrap();
                shifted[1].insert(0, b);
                proptest::prop_assert_ne!(key(&parts), key(&shifted));
            }
        }
    }

    #[test]
    fn resource_properties_cannot_rewrite_the_principal() {
        let e = engine(PAYMENTS);
        let mut req = transfer(50);
        req.resource.kind = "Agent".into();
        req.resource.id = req.principal.id.clone();
        req.resource.properties = obj(json!({"groups": ["admins"]}));
        let d = e.decide(&req);
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(codes(&d), vec!["invalid_request"]);
    }

    #[test]
    fn engine_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Engine>();
    }

    #[test]
    fn namespaced_actions_are_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("schema.cedarschema"),
            r#"namespace Pay {
                 entity Agent; entity Account;
                 action "transfer" appliesTo { principal: [Agent], resource: [Account] };
               }"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("manifest.toml"),
            "name = \"t\"\nrevision = \"1\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("p.cedar"),
            r#"permit (principal, action == Pay::Action::"transfer", resource);"#,
        )
        .unwrap();
        let e = Engine::new(
            Arc::new(Bundle::load(dir.path()).unwrap_or_else(|e| panic!("{e}"))),
            ManualClock::new(JUNE_2026),
        );
        let mut req = request("transfer", json!({}));
        req.principal =
            Arc::new(Principal::from_parts("Pay::Agent", "a", "test", Map::new()).unwrap());
        req.resource.kind = "Pay::Account".into();
        assert_eq!(e.decide(&req).outcome, Outcome::Allow);

        // The same name in two namespaces is ambiguous: refused at load.
        std::fs::write(
            dir.path().join("schema.cedarschema"),
            r#"namespace A { entity E; action "x" appliesTo { principal: [E], resource: [E] }; }
               namespace B { entity E; action "x" appliesTo { principal: [E], resource: [E] }; }"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("p.cedar"), "").unwrap();
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("action `x` is declared twice"), "{err}");
    }

    /// One generated policy: effect/kind and a threshold its condition compares the amount to.
    #[derive(Debug, Clone)]
    enum Gen {
        Permit(i64),
        Approval(i64, u32),
        Forbid(i64),
    }

    impl Gen {
        fn text(&self, i: usize) -> String {
            let scope = "(principal, action == Action::\"payments:transfer\", resource)";
            match self {
                Gen::Permit(t) => {
                    format!("@id(\"g{i}\") permit {scope} when {{ context.amount > {t} }};\n")
                }
                Gen::Approval(t, q) => format!(
                    "@id(\"g{i}\") @approval(\"grp{i}\") @quorum(\"{q}\") permit {scope} when {{ context.amount > {t} }};\n"
                ),
                Gen::Forbid(t) => {
                    format!("@id(\"g{i}\") forbid {scope} when {{ context.amount > {t} }};\n")
                }
            }
        }
        fn satisfied(&self, amount: i64) -> bool {
            match self {
                Gen::Permit(t) | Gen::Approval(t, _) | Gen::Forbid(t) => amount > *t,
            }
        }
    }

    /// The reference model of shared/DESIGN.md §1.
    fn model(policies: &[Gen], amount: i64) -> Outcome {
        let hit = |f: fn(&Gen) -> bool| policies.iter().any(|p| p.satisfied(amount) && f(p));
        if hit(|p| matches!(p, Gen::Forbid(_))) {
            Outcome::Deny
        } else if hit(|p| matches!(p, Gen::Permit(_))) {
            Outcome::Allow
        } else if hit(|p| matches!(p, Gen::Approval(..))) {
            Outcome::Escalate
        } else {
            Outcome::Deny
        }
    }

    fn gen_policy() -> impl Strategy<Value = Gen> {
        prop_oneof![
            (0i64..20).prop_map(Gen::Permit),
            ((0i64..20), (1u32..=10)).prop_map(|(t, q)| Gen::Approval(t, q)),
            (0i64..20).prop_map(Gen::Forbid),
        ]
    }

    fn render(policies: &[Gen]) -> String {
        policies
            .iter()
            .enumerate()
            .map(|(i, p)| p.text(i))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// PB-01: the engine agrees with the reference model; escalate is never allow; a
        /// satisfied forbid always denies; policy order does not matter.
        #[test]
        fn pb01_engine_matches_reference_model(
            policies in proptest::collection::vec(gen_policy(), 0..6),
            amount in 0i64..25,
        ) {
            let e = engine(&render(&policies));
            let d = e.decide(&transfer(amount));
            let want = model(&policies, amount);
            prop_assert_eq!(d.outcome, want);
            prop_assert_eq!(d.approval.is_some(), d.outcome == Outcome::Escalate);
            if d.outcome == Outcome::Escalate {
                let max_q = policies
                    .iter()
                    .filter_map(|p| match p {
                        Gen::Approval(t, q) if amount > *t => Some(*q),
                        _ => None,
                    })
                    .max();
                prop_assert_eq!(d.approval.as_ref().map(|a| a.quorum), max_q);
            }

            // Same policies, reverse file order, same ids: same answer.
            let reversed: String = policies
                .iter()
                .enumerate()
                .rev()
                .map(|(i, p)| p.text(i))
                .collect();
            let r = engine(&reversed).decide(&transfer(amount));
            prop_assert_eq!(r.outcome, d.outcome);
            prop_assert_eq!(&r.policy_ids, &d.policy_ids);

            // Adding a satisfied forbid always yields deny.
            let mut with_forbid = policies.clone();
            with_forbid.push(Gen::Forbid(amount - 1));
            let f = engine(&render(&with_forbid)).decide(&transfer(amount));
            prop_assert_eq!(f.outcome, Outcome::Deny);
            let forbid_id = format!("g{}", policies.len());
            prop_assert!(f.policy_ids.contains(&forbid_id));
        }
    }
}
