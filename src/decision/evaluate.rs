//! Stage three of a decision: each policy of the slice is satisfied (its condition is
//! `true`), not satisfied, or in error. The fast path answers the conditions it can
//! (`policy::fast`), exactly as Cedar would; Cedar's own evaluator, built only when needed,
//! answers the rest. This is Cedar's authorizer minus its per-request rebuild of every
//! condition.

use std::sync::Arc;

use cedar_policy_core::ast::{self, ValueKind};
use cedar_policy_core::evaluator::Evaluator;
use cedar_policy_core::extensions::Extensions;

use super::context::Context;
use super::entities::Built;
use super::tally::deny;
use crate::policy::{ActionSlice, fast};
use crate::vocabulary::{CheckRequest, Reason};

/// What the slice's conditions came to.
pub(super) struct Evaluated<'a> {
    /// Ids of the policies whose condition holds.
    pub satisfied: Vec<&'a str>,
    /// A `policy_error` reason for each policy that failed to evaluate, by policy id.
    pub errors: Vec<Reason>,
}

pub(super) fn slice<'a>(
    slice: &'a ActionSlice,
    req: &CheckRequest,
    built: &Built<'_>,
    context: &Context,
) -> Evaluated<'a> {
    let principal_uid = req.principal.entity.uid();
    let (principal, action, resource): (&ast::EntityUID, &ast::EntityUID, &ast::EntityUID) = (
        principal_uid.as_ref(),
        slice.uid().as_ref(),
        built.resource.as_ref(),
    );
    let entities: &cedar_policy::Entities = &built.entities;
    let entities = entities.as_ref();
    let input = fast::Input {
        principal,
        resource,
        context,
        entities,
    };
    let mut evaluator = None;
    let mut satisfied = Vec::new();
    let mut errors = Vec::new();
    // Only the policies whose scope can match this principal and resource (`policy::index`).
    for condition in slice.candidates(principal, resource) {
        if let Some(b) = condition.fast.as_ref().and_then(|f| f.eval(&input)) {
            if b {
                satisfied.push(condition.id.as_str());
            }
            continue;
        }
        // No schema here: AuthZEN callers may send properties the schema does not declare;
        // the policies themselves were validated strictly at load.
        let evaluator = evaluator.get_or_insert_with(|| {
            let known = |u: &ast::EntityUID| ast::EntityUIDEntry::known(u.clone(), None);
            let request = ast::Request::new_unchecked(
                known(principal),
                known(action),
                known(resource),
                Some(ast::Context::Value(Arc::clone(context))),
            );
            Evaluator::new(request, entities, Extensions::all_available())
        });
        let error = match evaluator.interpret(&condition.expr, &condition.env) {
            Ok(ast::Value {
                value: ValueKind::Lit(ast::Literal::Bool(b)),
                ..
            }) => {
                if b {
                    satisfied.push(condition.id.as_str());
                }
                continue;
            }
            Ok(other) => format!("its condition is not a boolean but `{other}`"),
            Err(e) => e.to_string(),
        };
        errors.push(deny(
            "policy_error",
            Some(condition.id.clone()),
            format!("policy `{}` failed to evaluate: {error}", condition.id),
        ));
    }
    errors.sort_by(|a, b| a.policy_id.cmp(&b.policy_id));
    Evaluated { satisfied, errors }
}
