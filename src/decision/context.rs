//! Stage one of a decision: the Cedar context, built from the caller's JSON straight into the
//! values Cedar's evaluator reads, plus what Mandate adds itself (`context.mandate`).

use std::collections::BTreeMap;
use std::sync::Arc;

use cedar_policy_core::ast::{Value, ValueKind};
use smol_str::SmolStr;

use super::tally::{invalid, invalid_value};
use crate::policy::{ActionSlice, values};
use crate::vocabulary::{CheckRequest, RESERVED_CONTEXT_KEY, Reason};

/// The evaluated context record of a check.
pub(super) type Context = Arc<BTreeMap<SmolStr, Value>>;

/// The caller's context fields plus `mandate: { now, action? }`. One reading of the clock
/// (`now`) serves the context and the recertification dates.
pub(super) fn build(slice: &ActionSlice, req: &CheckRequest, now: i64) -> Result<Context, Reason> {
    if req.context.contains_key(RESERVED_CONTEXT_KEY) {
        return Err(invalid(format!(
            "`context.{RESERVED_CONTEXT_KEY}` is reserved for what Mandate adds"
        )));
    }
    // The declared types first: a mistyped field is refused by name, before any policy
    // reads it (or, unread, lets it through to what acts on the request).
    if let Some(shape) = slice.context_shape() {
        shape.check_context(&req.context).map_err(invalid_value)?;
    }
    let mut mandate = None;
    // `context.mandate` only when a policy of this action can read it: it is a nested record
    // Cedar evaluates on every check.
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
    match values::record_value("context", &req.context, mandate)
        .map_err(invalid_value)?
        .value
    {
        ValueKind::Record(fields) => Ok(fields),
        _ => Err(invalid("`context` is not a record".to_owned())),
    }
}
