//! The decision: a verified principal, an action, a resource and a context in; exactly one of
//! allow, deny or escalate out (docs/design.md §1).
//!
//! A decision runs in named stages over the action's slice of the bundle: `context` builds
//! the Cedar context, `entities` the entity store, `evaluate` answers each policy's
//! condition (the fast path, else Cedar's evaluator), and `tally` turns the satisfied
//! policies into one outcome.
//!
//! Fail closed: any error on this path (a value Cedar cannot hold, a policy that errors while
//! evaluating, an unknown action) is a `deny` with a reason, never an `allow`.

mod cache;
pub mod cases;
mod context;
mod entities;
mod evaluate;
mod tally;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use arc_swap::ArcSwap;
use cedar_policy::Effect;

use crate::clock::Clock;
use crate::policy::{Bundle, PolicyKind};
use crate::vocabulary::{CheckRequest, Decision, Outcome, Reason};

pub use cache::{CacheKey, CachedCheck, DecisionCache};
use tally::{Tally, Verdict, deny};

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

    /// The clock decisions read.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
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
        match evaluate_request(&bundle, req, now) {
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
}

/// The stages of one decision over the action's slice.
fn evaluate_request(bundle: &Bundle, req: &CheckRequest, now: i64) -> Result<Verdict, Reason> {
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
    let context = context::build(slice, req, now)?;
    let built = entities::build(slice, req)?;
    let evaluated = evaluate::slice(slice, req, &built, &context);
    // Fail closed: a policy that errors may have been the forbid that mattered.
    if !evaluated.errors.is_empty() {
        return Ok(Verdict::Errors(evaluated.errors));
    }
    tally(bundle, evaluated.satisfied, now)
}

/// Sort the satisfied policies by what they mean, and decide.
fn tally<'b>(bundle: &'b Bundle, satisfied: Vec<&'b str>, now: i64) -> Result<Verdict, Reason> {
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
