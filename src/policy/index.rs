//! Which policies of an action's slice can match a request, from their scopes alone (issue 14
//! item 1): bounded authority is usually written one policy per agent or per resource
//! (`principal == Agent::"a-17"`), and evaluating a thousand such conditions to find the one
//! that names the caller made a check grow with the fleet.
//!
//! A policy whose scope says `principal == P` can only be satisfied by a request from `P`:
//! its condition is `principal == P && …`, which Cedar evaluates left to right and stops at
//! the first `false`, so for any other principal it is `false` without error. Skipping it is
//! the same answer, exactly; the same holds for `resource == R`. Every other scope (`in`,
//! `is`, none) is kept for every request: no policy that could match is ever skipped, so no
//! forbid is ever missed.

use std::collections::HashMap;

use cedar_policy::{Policy, PrincipalConstraint, ResourceConstraint};
use cedar_policy_core::ast::EntityUID;

/// The positions (in slice order) of the policies each request must evaluate.
#[derive(Debug, Default)]
pub struct ScopeIndex {
    /// Policies scoped `principal == P`, by `P`.
    by_principal: HashMap<EntityUID, Vec<u32>>,
    /// Policies scoped `resource == R` (and not `principal ==`), by `R`.
    by_resource: HashMap<EntityUID, Vec<u32>>,
    /// Every other policy: evaluated for every request.
    rest: Vec<u32>,
}

impl ScopeIndex {
    /// The index of `policies`, in the order the slice evaluates them.
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Self {
        let mut index = Self::default();
        for (i, p) in policies.into_iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            if let PrincipalConstraint::Eq(uid) = p.principal_constraint() {
                let uid: &EntityUID = uid.as_ref();
                index.by_principal.entry(uid.clone()).or_default().push(i);
            } else if let ResourceConstraint::Eq(uid) = p.resource_constraint() {
                let uid: &EntityUID = uid.as_ref();
                index.by_resource.entry(uid.clone()).or_default().push(i);
            } else {
                index.rest.push(i);
            }
        }
        index
    }

    /// The positions of the policies a request from `principal` on `resource` can satisfy,
    /// ascending (the slice's own order, so answers never depend on the index).
    pub fn candidates(&self, principal: &EntityUID, resource: &EntityUID) -> Candidates<'_> {
        Candidates {
            lists: [
                bucket(&self.by_principal, principal),
                bucket(&self.by_resource, resource),
                &self.rest,
            ],
        }
    }
}

/// The positions under `uid`; none without a hash when nothing is scoped that way.
fn bucket<'a>(map: &'a HashMap<EntityUID, Vec<u32>>, uid: &EntityUID) -> &'a [u32] {
    if map.is_empty() {
        &[]
    } else {
        map.get(uid).map_or(&[], Vec::as_slice)
    }
}

/// Three ascending lists of positions, merged.
#[derive(Debug)]
pub struct Candidates<'a> {
    lists: [&'a [u32]; 3],
}

impl Iterator for Candidates<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        // The list whose head is smallest; a position is in exactly one list.
        let (k, head) = self
            .lists
            .iter()
            .enumerate()
            .filter_map(|(k, l)| l.first().map(|h| (k, *h)))
            .min_by_key(|(_, h)| *h)?;
        self.lists[k] = &self.lists[k][1..];
        usize::try_from(head).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cedar_policy::PolicySet;

    fn uid(s: &str) -> EntityUID {
        let u: cedar_policy::EntityUid = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        u.as_ref().clone()
    }

    #[test]
    fn only_policies_that_can_match_the_request_are_candidates_in_slice_order() {
        let set: PolicySet = r#"
            permit (principal == Agent::"a", action, resource);
            permit (principal, action, resource == Account::"x");
            forbid (principal in Team::"t", action, resource);
            permit (principal == Agent::"b", action, resource == Account::"x");
            permit (principal is Agent, action, resource);
            forbid (principal == Agent::"a", action, resource == Account::"y");
            permit (principal, action, resource);
        "#
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
        // `policies()` is not in text order; the slice's order is whatever it is given.
        let policies: Vec<&Policy> = {
            let mut v: Vec<&Policy> = set.policies().collect();
            v.sort_by_key(|p| p.id().to_string());
            v
        };
        let index = ScopeIndex::new(policies.iter().copied());
        let got = |p: &str, r: &str| -> Vec<usize> { index.candidates(&uid(p), &uid(r)).collect() };
        // policy0 .. policy6 in text order.
        assert_eq!(
            got(r#"Agent::"a""#, r#"Account::"x""#),
            vec![0, 1, 2, 4, 5, 6]
        );
        assert_eq!(got(r#"Agent::"b""#, r#"Account::"x""#), vec![1, 2, 3, 4, 6]);
        assert_eq!(got(r#"Agent::"c""#, r#"Account::"z""#), vec![2, 4, 6]);
        // The same id under another type is another entity.
        assert_eq!(got(r#"User::"a""#, r#"Account::"z""#), vec![2, 4, 6]);
    }
}
