//! Mandate's policy annotations (`@approval`, `@quorum`, `@recertify_by`, ...), parsed and
//! checked once at load into a [`PolicyMeta`], so the decision path only reads prepared values.
//!
//! Annotation rules (docs/design.md §1):
//! - on approval permits: `@approval("g1,g2")`, `@quorum("N")` (1..=10), `@grant_ttl("1h")`
//!   (at most 24h, default 15m), `@evidence("ticket,...")`, `@fallback("g")` together with
//!   `@fallback_after("30m")`, `@grant_scope("call"|"tool"|"resource")` (default `call`);
//! - on autonomous permits: `@owner("g")` and `@recertify_by("YYYY-MM-DD")` (needs `@owner`);
//! - `@breakglass` on permits without `@approval`;
//! - on forbids only `@id`, `@description` and `@owner` among Mandate's annotations.
//!
//! Annotations Mandate does not know are allowed everywhere (other tools put their own there).

use std::path::PathBuf;
use std::time::Duration;

use cedar_policy::{Effect, Policy};

use crate::vocabulary::{ApprovalRequirement, Fallback, GrantScope};

/// Grant lifetime when an approval permit has no `@grant_ttl`.
pub const DEFAULT_GRANT_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest `@grant_ttl` accepted: an approval is a bounded exception, not a standing grant.
pub const MAX_GRANT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Largest `@quorum` accepted.
pub const MAX_QUORUM: u32 = 10;

/// Annotations this module interprets. Any other annotation is left alone.
const KNOWN: &[&str] = &[
    "id",
    "description",
    "approval",
    "quorum",
    "grant_ttl",
    "grant_scope",
    "evidence",
    "fallback",
    "fallback_after",
    "recertify_by",
    "owner",
    "breakglass",
];

/// Annotations a forbid may carry among [`KNOWN`].
const ON_FORBID: &[&str] = &["id", "description", "owner"];

/// What a policy does for Mandate, derived from its effect and annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Forbid,
    /// A permit that allows on its own (until its `@recertify_by` date, if any).
    Autonomous,
    /// A permit annotated `@approval`: it escalates.
    Approval,
    /// A `@breakglass` permit: applies only to declared emergencies.
    Breakglass,
}

/// The `@recertify_by` date of an autonomous permit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecertifyBy {
    /// As written, `YYYY-MM-DD`.
    pub date: String,
    /// First second (unix, UTC) at which the permit no longer allows on its own: the permit
    /// still holds through the whole named day, and degrades from the next midnight UTC.
    pub deadline: i64,
}

/// Everything the decision path needs to know about one policy, prepared at load.
#[derive(Debug, Clone)]
pub struct PolicyMeta {
    pub id: String,
    pub effect: Effect,
    pub kind: PolicyKind,
    /// Path of the `.cedar` file, relative to the bundle directory.
    pub file: PathBuf,
    /// 1-based line where the policy (its first annotation) starts.
    pub line: usize,
    pub description: Option<String>,
    /// The requirement an approval permit asks for (`Some` exactly for [`PolicyKind::Approval`]).
    pub approval: Option<ApprovalRequirement>,
    pub recertify_by: Option<RecertifyBy>,
    pub owner: Option<String>,
    pub breakglass: bool,
    /// What an autonomous permit past its `@recertify_by` date asks for instead of allowing:
    /// approval by its `@owner`, quorum 1, the default grant TTL.
    degraded: Option<ApprovalRequirement>,
}

impl PolicyMeta {
    /// The approval requirement this autonomous permit degrades to once `now` (unix seconds)
    /// is past its `@recertify_by` date; `None` while it still allows on its own.
    pub fn recertification_due(&self, now: i64) -> Option<&ApprovalRequirement> {
        match &self.recertify_by {
            Some(r) if now >= r.deadline => self.degraded.as_ref(),
            _ => None,
        }
    }
}

/// Read and check the annotations of `policy`. `Err` holds every problem found, as messages
/// (the caller adds file, line and policy id).
pub fn parse(
    id: &str,
    policy: &Policy,
    file: PathBuf,
    line: usize,
) -> Result<PolicyMeta, Vec<String>> {
    let mut errors = Vec::new();
    let effect = policy.effect();
    let get = |key: &str| policy.annotation(key);

    if effect == Effect::Forbid {
        let mut keys: Vec<&str> = policy
            .annotations()
            .map(|(k, _)| k)
            .filter(|k| KNOWN.contains(k) && !ON_FORBID.contains(k))
            .collect();
        keys.sort_unstable();
        for k in keys {
            errors.push(format!(
                "`@{k}` is not allowed on a forbid (only `@id`, `@description` and `@owner` are)"
            ));
        }
    }

    let approval_groups = get("approval").map(|v| group_list("approval", v, &mut errors));
    let breakglass = get("breakglass").is_some();
    let is_permit = effect == Effect::Permit;
    if approval_groups.is_some() && breakglass {
        errors.push("`@breakglass` cannot be combined with `@approval`".to_owned());
    }

    // Annotations that only make sense on an approval permit.
    for key in [
        "quorum",
        "grant_ttl",
        "grant_scope",
        "evidence",
        "fallback",
        "fallback_after",
    ] {
        if is_permit && approval_groups.is_none() && get(key).is_some() {
            errors.push(format!("`@{key}` requires `@approval`"));
        }
    }
    let quorum = match get("quorum") {
        None => 1,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_QUORUM).contains(&n) => n,
            _ => {
                errors.push(format!(
                    "`@quorum(\"{v}\")`: expected a whole number from 1 to {MAX_QUORUM}"
                ));
                1
            }
        },
    };
    let grant_ttl = match get("grant_ttl") {
        None => DEFAULT_GRANT_TTL,
        Some(v) => match duration("grant_ttl", v) {
            Ok(d) if d > MAX_GRANT_TTL => {
                errors.push(format!(
                    "`@grant_ttl(\"{v}\")`: longer than the maximum of 24h"
                ));
                DEFAULT_GRANT_TTL
            }
            Ok(d) => d,
            Err(e) => {
                errors.push(e);
                DEFAULT_GRANT_TTL
            }
        },
    };
    let grant_scope = match get("grant_scope") {
        None => GrantScope::Call,
        Some(v) => GrantScope::parse(v.trim()).unwrap_or_else(|| {
            errors.push(format!(
                "`@grant_scope(\"{v}\")`: expected `call` (this request only), `tool` (this \
                 action on this resource, any context) or `resource` (any action on it)"
            ));
            GrantScope::Call
        }),
    };
    let evidence = get("evidence")
        .map(|v| group_list("evidence", v, &mut errors))
        .unwrap_or_default();
    let fallback = match (get("fallback"), get("fallback_after")) {
        (None, None) => None,
        (Some(group), Some(after)) => {
            let group = group.trim();
            if group.is_empty() || group.contains(',') {
                errors.push(format!("`@fallback(\"{group}\")`: expected one group name"));
            }
            match duration("fallback_after", after) {
                Ok(after) => Some(Fallback {
                    group: group.to_owned(),
                    after,
                }),
                Err(e) => {
                    errors.push(e);
                    None
                }
            }
        }
        (Some(_), None) => {
            errors.push("`@fallback` requires `@fallback_after`".to_owned());
            None
        }
        (None, Some(_)) => {
            errors.push("`@fallback_after` requires `@fallback`".to_owned());
            None
        }
    };

    if is_permit && approval_groups.is_none() && breakglass {
        for key in ["owner", "recertify_by"] {
            if get(key).is_some() {
                errors.push(format!("`@{key}` is not allowed on a `@breakglass` permit"));
            }
        }
    }
    if approval_groups.is_some() {
        for key in ["owner", "recertify_by"] {
            if get(key).is_some() {
                errors.push(format!(
                    "`@{key}` is only allowed on autonomous permits (without `@approval`)"
                ));
            }
        }
    }
    let owner = get("owner").map(|v| {
        let v = v.trim();
        if v.is_empty() || v.contains(',') {
            errors.push(format!("`@owner(\"{v}\")`: expected one group name"));
        }
        v.to_owned()
    });
    let recertify_by = match get("recertify_by") {
        None => None,
        Some(v) => {
            if owner.is_none() {
                errors.push("`@recertify_by` requires `@owner`".to_owned());
            }
            match recertify_deadline(v) {
                Ok(deadline) => Some(RecertifyBy {
                    date: v.trim().to_owned(),
                    deadline,
                }),
                Err(e) => {
                    errors.push(e);
                    None
                }
            }
        }
    };
    if let Some("") = get("id").map(str::trim) {
        errors.push("`@id` must not be empty".to_owned());
    }

    if !errors.is_empty() {
        return Err(errors);
    }

    let kind = match (effect, &approval_groups, breakglass) {
        (Effect::Forbid, _, _) => PolicyKind::Forbid,
        (Effect::Permit, Some(_), _) => PolicyKind::Approval,
        (Effect::Permit, None, true) => PolicyKind::Breakglass,
        (Effect::Permit, None, false) => PolicyKind::Autonomous,
    };
    let approval = match (kind, approval_groups) {
        (PolicyKind::Approval, Some(groups)) => Some(ApprovalRequirement {
            policy_id: id.to_owned(),
            groups,
            quorum,
            evidence,
            grant_ttl,
            grant_scope,
            fallback,
            recertify_by: None,
        }),
        _ => None,
    };
    let degraded = match (kind, &recertify_by, &owner) {
        (PolicyKind::Autonomous, Some(r), Some(owner)) => Some(ApprovalRequirement {
            policy_id: id.to_owned(),
            groups: vec![owner.clone()],
            quorum: 1,
            evidence: Vec::new(),
            grant_ttl: DEFAULT_GRANT_TTL,
            grant_scope: GrantScope::Call,
            fallback: None,
            recertify_by: Some(r.date.clone()),
        }),
        _ => None,
    };
    Ok(PolicyMeta {
        id: id.to_owned(),
        effect,
        kind,
        file,
        line,
        description: get("description").map(str::to_owned),
        approval,
        recertify_by,
        owner,
        breakglass,
        degraded,
    })
}

/// A comma separated, non-empty list of names.
fn group_list(key: &str, value: &str, errors: &mut Vec<String>) -> Vec<String> {
    let items: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if items.is_empty() || value.split(',').any(|s| s.trim().is_empty()) {
        errors.push(format!(
            "`@{key}(\"{value}\")`: expected a comma separated list of non-empty names"
        ));
    }
    items
}

fn duration(key: &str, value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value.trim()) {
        Ok(d) if d.is_zero() => Err(format!("`@{key}(\"{value}\")`: must be longer than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!(
            "`@{key}(\"{value}\")`: not a duration such as `30m` or `1h` ({e})"
        )),
    }
}

/// Midnight UTC after the named day, as unix seconds.
fn recertify_deadline(value: &str) -> Result<i64, String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(value.trim(), &format)
        .map_err(|_| format!("`@recertify_by(\"{value}\")`: not a date such as `2027-03-31`"))?;
    let next = date
        .next_day()
        .ok_or_else(|| format!("`@recertify_by(\"{value}\")`: date out of range"))?;
    Ok(next.midnight().assume_utc().unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(src: &str) -> Result<PolicyMeta, Vec<String>> {
        let p = Policy::parse(None, src).unwrap();
        parse("p", &p, PathBuf::from("x.cedar"), 1)
    }

    const SCOPE: &str = "(principal, action, resource);";

    #[test]
    fn approval_permit_is_fully_read() {
        let m = meta(&format!(
            "@approval(\"a, b\") @quorum(\"2\") @grant_ttl(\"1h\") @evidence(\"ticket\") \
             @fallback(\"leads\") @fallback_after(\"30m\") permit {SCOPE}"
        ))
        .unwrap();
        assert_eq!(m.kind, PolicyKind::Approval);
        let a = m.approval.unwrap();
        assert_eq!(a.groups, vec!["a", "b"]);
        assert_eq!(a.quorum, 2);
        assert_eq!(a.grant_ttl, Duration::from_secs(3600));
        assert_eq!(a.evidence, vec!["ticket"]);
        assert_eq!(a.fallback.unwrap().after, Duration::from_secs(1800));
        assert_eq!(a.grant_scope, GrantScope::Call);
        for scope in [GrantScope::Call, GrantScope::Tool, GrantScope::Resource] {
            let m = meta(&format!(
                "@approval(\"a\") @grant_scope(\"{}\") permit {SCOPE}",
                scope.as_str()
            ))
            .unwrap();
            assert_eq!(m.approval.unwrap().grant_scope, scope);
        }
    }

    #[test]
    fn defaults_and_degrade_deadline() {
        let m = meta(&format!("@approval(\"a\") permit {SCOPE}")).unwrap();
        assert_eq!(m.approval.unwrap().grant_ttl, DEFAULT_GRANT_TTL);
        let m = meta(&format!(
            "@owner(\"team\") @recertify_by(\"2027-03-31\") permit {SCOPE}"
        ))
        .unwrap();
        assert_eq!(m.kind, PolicyKind::Autonomous);
        // 2027-04-01T00:00:00Z
        assert!(m.recertification_due(1_806_537_599).is_none());
        let due = m.recertification_due(1_806_537_600).unwrap();
        assert_eq!(due.groups, vec!["team"]);
        assert_eq!(due.recertify_by.as_deref(), Some("2027-03-31"));
    }

    #[test]
    fn bad_annotations_are_each_reported() {
        let cases = [
            ("@approval(\"a\") @grant_ttl(\"soon\")", "not a duration"),
            ("@approval(\"a\") @grant_ttl(\"25h\")", "maximum of 24h"),
            ("@quorum(\"2\")", "`@quorum` requires `@approval`"),
            ("@approval(\"a\") @quorum(\"11\")", "from 1 to 10"),
            (
                "@approval(\"a\") @fallback(\"b\")",
                "requires `@fallback_after`",
            ),
            ("@owner(\"o\") @recertify_by(\"2027-02-30\")", "not a date"),
            ("@recertify_by(\"2027-03-01\")", "requires `@owner`"),
            (
                "@approval(\"a\") @owner(\"o\")",
                "only allowed on autonomous",
            ),
            ("@approval(\"a\") @breakglass", "cannot be combined"),
            ("@approval(\"\")", "non-empty names"),
            (
                "@approval(\"a\") @grant_scope(\"server\")",
                "expected `call`",
            ),
            (
                "@grant_scope(\"tool\")",
                "`@grant_scope` requires `@approval`",
            ),
        ];
        for (ann, want) in cases {
            let errs = meta(&format!("{ann} permit {SCOPE}")).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(want)), "{ann}: {errs:?}");
        }
        let errs = meta(&format!("@approval(\"a\") forbid {SCOPE}")).unwrap_err();
        assert!(errs[0].contains("not allowed on a forbid"), "{errs:?}");
        assert!(meta(&format!("@owner(\"o\") @custom(\"x\") forbid {SCOPE}")).is_ok());
    }
}
