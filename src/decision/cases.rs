//! A bundle's own test cases, run through the real decision engine: `mandate policy test`,
//! the CI gate of a policy change (docs/design.md §6). The cases are parsed with the bundle
//! ([`crate::policy::TestCase`]); running them needs the engine, so it lives above it.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use super::Engine;
use crate::clock::{self, Clock, ManualClock};
use crate::policy::{Bundle, TestCase};
use crate::vocabulary::Decision;

/// A case whose decision differs from what it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub file: PathBuf,
    pub name: String,
    pub expected: String,
    pub got: String,
    pub detail: String,
}

/// The outcome of running a bundle's tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestReport {
    pub passed: usize,
    pub failed: Vec<Failure>,
}

impl TestReport {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

impl fmt::Display for TestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for fail in &self.failed {
            writeln!(
                f,
                "FAIL {}: `{}`: expected {}, got {}",
                fail.file.display(),
                fail.name,
                fail.expected,
                fail.got
            )?;
            if !fail.detail.is_empty() {
                writeln!(f, "     {}", fail.detail)?;
            }
        }
        write!(f, "{} passed, {} failed", self.passed, self.failed.len())
    }
}

/// Run every test case of `bundle` through the decision engine.
pub fn run(bundle: &Arc<Bundle>) -> TestReport {
    let system = Engine::new(Arc::clone(bundle), clock::system());
    let mut report = TestReport::default();
    for case in bundle.tests() {
        let decision = match case.now {
            Some(now) => {
                let clock: Arc<dyn Clock> = ManualClock::new(now);
                Engine::new(Arc::clone(bundle), clock).decide(&case.request)
            }
            None => system.decide(&case.request),
        };
        match check(case, &decision) {
            Ok(()) => report.passed += 1,
            Err((expected, detail)) => report.failed.push(Failure {
                file: case.file.clone(),
                name: case.name.clone(),
                expected,
                got: describe(&decision),
                detail,
            }),
        }
    }
    report
}

/// `Err((expected, detail))` when the decision does not match the case.
fn check(case: &TestCase, d: &Decision) -> Result<(), (String, String)> {
    let mut expected = case.expect.as_str().to_owned();
    let mut wrong = Vec::new();
    if d.outcome != case.expect {
        wrong.push(format!(
            "outcome is `{}`, not `{}`",
            d.outcome.as_str(),
            case.expect.as_str()
        ));
    }
    if let Some(code) = &case.reason {
        expected.push_str(&format!(", reason `{code}`"));
        if !d.reasons.iter().any(|r| r.code == code) {
            wrong.push(format!("no reason `{code}`"));
        }
    }
    if let Some(want) = &case.policies {
        let mut want = want.clone();
        want.sort();
        let mut got = d.policy_ids.clone();
        got.sort();
        expected.push_str(&format!(", policies {want:?}"));
        if want != got {
            wrong.push(format!("determining policies are {got:?}"));
        }
    }
    if let Some(want) = &case.approval {
        expected.push_str(", approval");
        match &d.approval {
            None => wrong.push("no approval requirement".to_owned()),
            Some(got) => {
                if let Some(g) = &want.groups {
                    expected.push_str(&format!(" groups {g:?}"));
                    if *g != got.groups {
                        wrong.push(format!("approver groups are {:?}", got.groups));
                    }
                }
                if let Some(q) = want.quorum {
                    expected.push_str(&format!(" quorum {q}"));
                    if q != got.quorum {
                        wrong.push(format!("quorum is {}", got.quorum));
                    }
                }
                if let Some(ev) = &want.evidence {
                    expected.push_str(&format!(" evidence {ev:?}"));
                    if *ev != got.evidence {
                        wrong.push(format!("evidence is {:?}", got.evidence));
                    }
                }
                if let Some(ttl) = &want.grant_ttl {
                    expected.push_str(&format!(" grant_ttl {ttl}"));
                    if humantime::parse_duration(ttl).ok() != Some(got.grant_ttl) {
                        wrong.push(format!(
                            "grant_ttl is {}",
                            humantime::format_duration(got.grant_ttl)
                        ));
                    }
                }
                if let Some(id) = &want.policy_id {
                    expected.push_str(&format!(" from `{id}`"));
                    if *id != got.policy_id {
                        wrong.push(format!("approval comes from `{}`", got.policy_id));
                    }
                }
            }
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err((expected, wrong.join("; ")))
    }
}

/// What came out, in one line: outcome, reasons and determining policies.
fn describe(d: &Decision) -> String {
    let mut s = d.outcome.as_str().to_owned();
    for r in &d.reasons {
        s.push_str(&format!(" [{}: {}]", r.code, r.message));
    }
    if let Some(a) = &d.approval {
        s.push_str(&format!(
            " approval {{ policy `{}`, groups {:?}, quorum {} }}",
            a.policy_id, a.groups, a.quorum
        ));
    }
    s
}
