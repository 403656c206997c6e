//! A bundle's own test cases (`tests/*.yaml`): requests with the decision they must get,
//! parsed here when the bundle loads, and run through the real decision engine by
//! [`crate::decision::cases`] for `mandate policy test` (the CI gate of a policy
//! change, docs/design.md §6).
//!
//! Format (unknown keys are errors):
//!
//! ```yaml
//! cases:
//!   - name: small transfer is allowed on its own
//!     principal: { type: Agent, id: agent-1, attributes: { owner: bob, groups: [payments-agents] } }
//!     action: payments:transfer
//!     action_properties: { }        # optional: becomes context.mandate.action
//!     resource: { type: Account, id: acct-1, properties: { } }
//!     context: { amount: 50 }       # optional
//!     now: "2026-06-01T00:00:00Z"   # optional (RFC 3339): fixes the clock for this case
//!     expect: allow                 # allow | deny | escalate
//!     reason: permitted             # optional: a reason code the decision must carry
//!     approval: { groups: [finance-approvers], quorum: 1 }  # optional, for escalate:
//!                                   # groups, quorum, evidence, grant_ttl, policy_id (those given)
//!     policies: [payments-autonomous]   # optional: the determining policy ids (any order)
//! ```
//!
//! A case that does not parse fails the bundle load; a case that fails only fails the run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::Problem;
use crate::vocabulary::{CheckRequest, Outcome, Principal, Resource};

/// Issuer recorded on the principals of test cases.
const TEST_ISSUER: &str = "policy-test";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    cases: Vec<CaseDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseDoc {
    name: String,
    principal: PrincipalDoc,
    action: String,
    #[serde(default)]
    action_properties: Option<Map<String, Value>>,
    resource: ResourceDoc,
    #[serde(default)]
    context: Map<String, Value>,
    #[serde(default)]
    now: Option<String>,
    expect: Outcome,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    approval: Option<ApprovalExpectation>,
    #[serde(default)]
    policies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalDoc {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(default)]
    attributes: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceDoc {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(default)]
    properties: Map<String, Value>,
}

/// The parts of an escalation's approval requirement a case checks (only those given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalExpectation {
    pub groups: Option<Vec<String>>,
    pub quorum: Option<u32>,
    pub evidence: Option<Vec<String>>,
    pub grant_ttl: Option<String>,
    pub policy_id: Option<String>,
}

/// One parsed test case, its request already built.
#[derive(Debug, Clone)]
pub struct TestCase {
    pub file: PathBuf,
    /// Position in the file's `cases` list, from 0.
    pub index: usize,
    pub name: String,
    pub request: CheckRequest,
    /// Unix seconds the clock is fixed at, when the case says `now`.
    pub now: Option<i64>,
    pub expect: Outcome,
    pub reason: Option<String>,
    pub approval: Option<ApprovalExpectation>,
    pub policies: Option<Vec<String>>,
}

/// Parse one test file. `Err` holds every problem (a YAML or shape error stops at the first).
pub(crate) fn parse_file(path: &Path, text: &str) -> Result<Vec<TestCase>, Vec<Problem>> {
    let doc: FileDoc = match serde_yaml_ng::from_str(text) {
        Ok(doc) => doc,
        Err(e) => return Err(vec![yaml_problem(path, text, &e)]),
    };
    let mut problems = Vec::new();
    let mut cases = Vec::with_capacity(doc.cases.len());
    for (index, c) in doc.cases.into_iter().enumerate() {
        let problem = |message: String| Problem {
            file: Some(path.to_owned()),
            line: None,
            policy_id: None,
            message: format!("case {index} `{}`: {message}", c.name),
        };
        let principal = match Principal::from_parts(
            &c.principal.kind,
            &c.principal.id,
            TEST_ISSUER,
            c.principal.attributes.clone(),
        ) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                problems.push(problem(format!("principal: {e}")));
                continue;
            }
        };
        let now = match &c.now {
            None => None,
            Some(s) => {
                match time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                {
                    Ok(t) => Some(t.unix_timestamp()),
                    Err(_) => {
                        problems.push(problem(format!(
                            "`now`: `{s}` is not an RFC 3339 time such as `2026-06-01T00:00:00Z`"
                        )));
                        continue;
                    }
                }
            }
        };
        if let Some(ApprovalExpectation {
            grant_ttl: Some(ttl),
            ..
        }) = &c.approval
            && humantime::parse_duration(ttl).is_err()
        {
            problems.push(problem(format!(
                "`approval.grant_ttl`: `{ttl}` is not a duration"
            )));
            continue;
        }
        cases.push(TestCase {
            file: path.to_owned(),
            index,
            name: c.name,
            request: CheckRequest {
                principal,
                action: c.action,
                action_properties: c.action_properties,
                resource: Resource {
                    kind: c.resource.kind,
                    id: c.resource.id,
                    properties: c.resource.properties,
                },
                context: c.context,
            },
            now,
            expect: c.expect,
            reason: c.reason,
            approval: c.approval,
            policies: c.policies,
        });
    }
    if problems.is_empty() {
        Ok(cases)
    } else {
        Err(problems)
    }
}

/// A YAML error as a problem: its line, and the case it is in (index and name) when the
/// error path says so.
fn yaml_problem(path: &Path, text: &str, e: &serde_yaml_ng::Error) -> Problem {
    let mut message = e.to_string();
    // The location goes into `line`; drop the copy serde_yaml_ng appends.
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    // `cases[3].principal: unknown field ...`: add the case's name.
    if let Some(rest) = message.strip_prefix("cases[")
        && let Some((index, _)) = rest.split_once(']')
        && let Ok(index) = index.parse::<usize>()
        && let Ok(loose) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text)
        && let Some(name) = loose
            .get("cases")
            .and_then(|c| c.get(index))
            .and_then(|c| c.get("name"))
            .and_then(|n| n.as_str())
    {
        message = format!("case {index} `{name}`: {message}");
    }
    Problem {
        file: Some(path.to_owned()),
        line: e.location().map(|l| l.line()),
        policy_id: None,
        message,
    }
}
