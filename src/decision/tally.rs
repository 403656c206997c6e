//! The last stage of a decision: the satisfied policies, sorted by what they mean, become one
//! outcome (deny overrides permit, permit overrides approval, nothing is a deny).

use std::sync::Arc;

use crate::policy::values;
use crate::vocabulary::{ApprovalRequirement, Decision, Outcome, Reason};

/// Satisfied policies, sorted by what they mean.
#[derive(Default)]
pub(super) struct Tally<'a> {
    pub(super) forbids: Vec<&'a str>,
    pub(super) permits: Vec<&'a str>,
    /// (policy id, requirement, degraded from an autonomous permit past its recertify date)
    pub(super) approvals: Vec<(&'a str, &'a ApprovalRequirement, bool)>,
}

impl Tally<'_> {
    pub(super) fn finish(mut self) -> Verdict {
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
            approval: Some(ApprovalRequirement {
                // The narrowest grant any of them allows: a wider one would cover requests
                // an approver of the narrower policy never saw.
                grant_scope: self
                    .approvals
                    .iter()
                    .map(|(_, a, _)| a.grant_scope)
                    .min()
                    .unwrap_or_default(),
                ..chosen.clone()
            }),
        }
    }
}

/// A decision before it gets its id and version.
pub(super) enum Verdict {
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
    pub(super) fn into_decision(self, policy_version: Arc<str>) -> Decision {
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

pub(super) fn deny(code: &'static str, policy_id: Option<String>, message: String) -> Reason {
    Reason {
        code,
        policy_id,
        message,
    }
}

pub(super) fn invalid(message: String) -> Reason {
    deny("invalid_request", None, message)
}

pub(super) fn invalid_value(e: values::ValueError) -> Reason {
    invalid(e.to_string())
}
