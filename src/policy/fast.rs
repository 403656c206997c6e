//! A fast path for the conditions most policies are made of: scope tests (`principal is
//! Agent`, `action == Action::"x"`, `resource in Folder::"y"`), attribute reads, `has`,
//! comparisons and arithmetic on longs, string patterns, set membership (`contains`,
//! `containsAll`, `containsAny`, `isEmpty`, literal sets), `&&`, `||`, `!` and `if`.
//!
//! Each policy's condition is compiled once at load into a small tree ([`Fast`]) when every
//! node of it is in that subset. Evaluating it answers `Some(bool)` only where Cedar's own
//! evaluator would answer exactly that boolean; wherever Cedar would raise an error (a missing
//! attribute, a type error, an overflow) or the values are of a kind the fast path does not
//! handle (extension values, records compared with `<`), it answers `None`, and the
//! caller evaluates the condition with Cedar, which produces the verdict and the error text.
//! So the fast path changes how quickly a decision is made, never what it is; the
//! differential property test beside it checks that against Cedar on random policies.

use std::collections::BTreeMap;

use cedar_policy_core::ast::{
    BinaryOp, EntityType, EntityUID, Expr, ExprKind, Literal, PartialValue, Pattern, Set, SlotEnv,
    UnaryOp, Value, ValueKind, Var,
};
use cedar_policy_core::entities::{Dereference, Entities};
use smol_str::SmolStr;

/// Deeper conditions are left to Cedar (which guards its own stack).
const MAX_DEPTH: usize = 48;

/// A compiled condition.
#[derive(Debug, Clone)]
pub enum Fast {
    Bool(bool),
    Long(i64),
    Str(SmolStr),
    Entity(EntityUID),
    /// A set literal whose elements are all literals.
    Set(Set),
    Var(Var),
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    If(Box<(Fast, Fast, Fast)>),
    Not(Box<Fast>),
    Neg(Box<Fast>),
    IsEmpty(Box<Fast>),
    Binary(BinaryOp, Box<Fast>, Box<Fast>),
    /// `lhs in [A, B, ...]` with a literal set of entities on the right.
    InAny(Box<Fast>, Vec<EntityUID>),
    Is(Box<Fast>, EntityType),
    GetAttr(Box<Fast>, SmolStr),
    HasAttr(Box<Fast>, SmolStr),
    Like(Box<Fast>, Pattern),
}

/// What a condition reads: the request and the entities it is decided against (the action
/// is the one the condition was compiled for).
#[allow(
    missing_debug_implementations,
    reason = "borrowed views, never printed"
)]
pub struct Input<'a> {
    pub principal: &'a EntityUID,
    pub resource: &'a EntityUID,
    pub context: &'a BTreeMap<SmolStr, Value>,
    pub entities: &'a Entities,
}

/// A value during fast evaluation: borrowed from the compiled tree or the input.
#[derive(Clone, Copy)]
enum V<'a> {
    Bool(bool),
    Long(i64),
    Str(&'a str),
    Entity(&'a EntityUID),
    Record(&'a BTreeMap<SmolStr, Value>),
    Set(&'a Set),
}

impl<'a> V<'a> {
    /// A Cedar value the fast path can hold; `None` for sets and extension values.
    fn of(value: &'a Value) -> Option<Self> {
        Some(match value.value_kind() {
            ValueKind::Lit(Literal::Bool(b)) => V::Bool(*b),
            ValueKind::Lit(Literal::Long(i)) => V::Long(*i),
            ValueKind::Lit(Literal::String(s)) => V::Str(s.as_str()),
            ValueKind::Lit(Literal::EntityUID(uid)) => V::Entity(uid),
            ValueKind::Record(fields) => V::Record(fields),
            ValueKind::Set(set) => V::Set(set),
            ValueKind::ExtensionValue(_) => return None,
        })
    }

    fn bool(self) -> Option<bool> {
        match self {
            V::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn long(self) -> Option<i64> {
        match self {
            V::Long(i) => Some(i),
            _ => None,
        }
    }

    fn set(self) -> Option<&'a Set> {
        match self {
            V::Set(s) => Some(s),
            _ => None,
        }
    }

    fn entity(self) -> Option<&'a EntityUID> {
        match self {
            V::Entity(uid) => Some(uid),
            _ => None,
        }
    }

    /// Cedar's `==`: structural, and values of different kinds are simply unequal.
    fn equals(self, other: Self) -> bool {
        match (self, other) {
            (V::Bool(a), V::Bool(b)) => a == b,
            (V::Long(a), V::Long(b)) => a == b,
            (V::Str(a), V::Str(b)) => a == b,
            (V::Entity(a), V::Entity(b)) => a == b,
            (V::Record(a), V::Record(b)) => a == b,
            (V::Set(a), V::Set(b)) => a == b,
            _ => false,
        }
    }
}

impl Fast {
    /// Compile a policy's condition (with its template slots filled from `env`); `None` when
    /// any part of it is outside the fast subset.
    ///
    /// A condition is compiled for one action (the slice it serves): `action` becomes that
    /// entity, and what it decides at load (`action == Action::"x"`, the `true` of an empty
    /// scope) is folded away.
    pub fn compile(expr: &Expr, env: &SlotEnv, action: &EntityUID) -> Option<Self> {
        compile(expr, &Scope { env, action }, 0)
    }

    /// `Some(b)` exactly when Cedar evaluates the condition to the boolean `b`; `None` when
    /// Cedar must decide (an error, or values the fast path does not handle).
    pub fn eval(&self, input: &Input<'_>) -> Option<bool> {
        self.value(input)?.bool()
    }

    fn value<'a>(&'a self, input: &Input<'a>) -> Option<V<'a>> {
        Some(match self {
            Fast::Bool(b) => V::Bool(*b),
            Fast::Long(i) => V::Long(*i),
            Fast::Str(s) => V::Str(s),
            Fast::Entity(uid) => V::Entity(uid),
            Fast::Set(set) => V::Set(set),
            Fast::Var(var) => match var {
                Var::Principal => V::Entity(input.principal),
                Var::Resource => V::Entity(input.resource),
                Var::Context => V::Record(input.context),
                // Compiled to the slice's action entity.
                Var::Action => return None,
            },
            // Short-circuit as Cedar does: the right side is not evaluated when the left
            // decides, and each side evaluated must be a boolean.
            Fast::And(left, right) => {
                if left.value(input)?.bool()? {
                    V::Bool(right.value(input)?.bool()?)
                } else {
                    V::Bool(false)
                }
            }
            Fast::Or(left, right) => {
                if left.value(input)?.bool()? {
                    V::Bool(true)
                } else {
                    V::Bool(right.value(input)?.bool()?)
                }
            }
            Fast::If(branches) => {
                let (test, then, otherwise) = &**branches;
                if test.value(input)?.bool()? {
                    then.value(input)?
                } else {
                    otherwise.value(input)?
                }
            }
            Fast::Not(arg) => V::Bool(!arg.value(input)?.bool()?),
            Fast::Neg(arg) => V::Long(arg.value(input)?.long()?.checked_neg()?),
            Fast::IsEmpty(arg) => V::Bool(arg.value(input)?.set()?.is_empty()),
            Fast::Binary(op, arg1, arg2) => {
                // Cedar evaluates both operands before applying any binary operator.
                let (a, b) = (arg1.value(input)?, arg2.value(input)?);
                match op {
                    BinaryOp::Eq => V::Bool(a.equals(b)),
                    // On longs only: the same operators on extension values (`datetime`,
                    // `decimal`) are Cedar's.
                    BinaryOp::Less => V::Bool(a.long()? < b.long()?),
                    BinaryOp::LessEq => V::Bool(a.long()? <= b.long()?),
                    BinaryOp::Add => V::Long(a.long()?.checked_add(b.long()?)?),
                    BinaryOp::Sub => V::Long(a.long()?.checked_sub(b.long()?)?),
                    BinaryOp::Mul => V::Long(a.long()?.checked_mul(b.long()?)?),
                    BinaryOp::In => {
                        let (child, parent) = (a.entity()?, b.entity()?);
                        V::Bool(is_in(input, child, std::slice::from_ref(parent)))
                    }
                    // Membership is Cedar's equality, element by element (an element the
                    // fast path cannot hold, an extension value, equals nothing it can).
                    BinaryOp::Contains => V::Bool(
                        a.set()?
                            .iter()
                            .any(|e| V::of(e).is_some_and(|e| e.equals(b))),
                    ),
                    BinaryOp::ContainsAll => V::Bool(b.set()?.is_subset(a.set()?)),
                    BinaryOp::ContainsAny => V::Bool(!a.set()?.is_disjoint(b.set()?)),
                    // Compilation admits no other operator.
                    _ => return None,
                }
            }
            Fast::InAny(arg, parents) => {
                let child = arg.value(input)?.entity()?;
                V::Bool(is_in(input, child, parents))
            }
            Fast::Is(arg, entity_type) => {
                V::Bool(arg.value(input)?.entity()?.entity_type() == entity_type)
            }
            Fast::GetAttr(arg, attr) => match arg.value(input)? {
                V::Record(fields) => V::of(fields.get(attr)?)?,
                V::Entity(uid) => match input.entities.entity(uid) {
                    Dereference::Data(entity) => match entity.get(attr)? {
                        PartialValue::Value(v) => V::of(v)?,
                        PartialValue::Residual(_) => return None,
                    },
                    // A missing entity is an error in Cedar.
                    Dereference::NoSuchEntity | Dereference::Residual(_) => return None,
                },
                _ => return None,
            },
            Fast::HasAttr(arg, attr) => match arg.value(input)? {
                V::Record(fields) => V::Bool(fields.contains_key(attr)),
                V::Entity(uid) => match input.entities.entity(uid) {
                    Dereference::Data(entity) => V::Bool(entity.get(attr).is_some()),
                    Dereference::NoSuchEntity => V::Bool(false),
                    Dereference::Residual(_) => return None,
                },
                _ => return None,
            },
            Fast::Like(arg, pattern) => match arg.value(input)? {
                V::Str(s) => V::Bool(pattern.wildcard_match(s)),
                _ => return None,
            },
        })
    }
}

/// Cedar's `in` on entities: the same entity, or an ancestor of it in the entity data (an
/// entity the data does not hold has no ancestors).
fn is_in(input: &Input<'_>, child: &EntityUID, parents: &[EntityUID]) -> bool {
    let entity = match input.entities.entity(child) {
        Dereference::Data(e) => Some(e),
        _ => None,
    };
    parents
        .iter()
        .any(|p| p == child || entity.is_some_and(|e| e.is_descendant_of(p)))
}

struct Scope<'a> {
    env: &'a SlotEnv,
    action: &'a EntityUID,
}

fn compile(expr: &Expr, scope: &Scope<'_>, depth: usize) -> Option<Fast> {
    if depth > MAX_DEPTH {
        return None;
    }
    let sub = |e: &Expr| compile(e, scope, depth + 1).map(Box::new);
    let env = scope.env;
    Some(fold(match expr.expr_kind() {
        ExprKind::Lit(lit) => literal(lit),
        ExprKind::Var(Var::Action) => Fast::Entity(scope.action.clone()),
        ExprKind::Var(var) => Fast::Var(*var),
        ExprKind::Slot(id) => Fast::Entity(env.get(id)?.clone()),
        ExprKind::If {
            test_expr,
            then_expr,
            else_expr,
        } => Fast::If(Box::new((
            *sub(test_expr)?,
            *sub(then_expr)?,
            *sub(else_expr)?,
        ))),
        ExprKind::And { left, right } => Fast::And(sub(left)?, sub(right)?),
        ExprKind::Or { left, right } => Fast::Or(sub(left)?, sub(right)?),
        ExprKind::UnaryApp { op, arg } => match op {
            UnaryOp::Not => Fast::Not(sub(arg)?),
            UnaryOp::Neg => Fast::Neg(sub(arg)?),
            UnaryOp::IsEmpty => Fast::IsEmpty(sub(arg)?),
        },
        ExprKind::BinaryApp { op, arg1, arg2 } => match op {
            BinaryOp::Eq
            | BinaryOp::Less
            | BinaryOp::LessEq
            | BinaryOp::Add
            | BinaryOp::Sub
            | BinaryOp::Mul
            | BinaryOp::Contains
            | BinaryOp::ContainsAll
            | BinaryOp::ContainsAny => Fast::Binary(*op, sub(arg1)?, sub(arg2)?),
            BinaryOp::In => match arg2.expr_kind() {
                ExprKind::Set(items) => {
                    let parents = items
                        .iter()
                        .map(|item| match item.expr_kind() {
                            ExprKind::Lit(Literal::EntityUID(uid)) => Some((**uid).clone()),
                            ExprKind::Slot(id) => env.get(id).cloned(),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Fast::InAny(sub(arg1)?, parents)
                }
                _ => Fast::Binary(BinaryOp::In, sub(arg1)?, sub(arg2)?),
            },
            _ => return None,
        },
        ExprKind::GetAttr { expr, attr } => Fast::GetAttr(sub(expr)?, attr.clone()),
        ExprKind::HasAttr { expr, attr } => Fast::HasAttr(sub(expr)?, attr.clone()),
        ExprKind::Like { expr, pattern } => Fast::Like(sub(expr)?, pattern.clone()),
        ExprKind::Is { expr, entity_type } => Fast::Is(sub(expr)?, entity_type.clone()),
        // A set of literals is built once here, as Cedar would build it on every request.
        ExprKind::Set(items) => Fast::Set(Set::from_lits(
            items
                .iter()
                .map(|item| match item.expr_kind() {
                    ExprKind::Lit(lit) => Some(lit.clone()),
                    ExprKind::Slot(id) => env.get(id).map(|uid| Literal::from(uid.clone())),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?,
        )),
        _ => return None,
    }))
}

/// Fold what is known at load, keeping Cedar's meaning exactly: a `true &&` is dropped only
/// before an operand that can only be a boolean, so no type error disappears with it.
fn fold(f: Fast) -> Fast {
    match f {
        Fast::Binary(BinaryOp::Eq, a, b) => match (literal_value(&a), literal_value(&b)) {
            (Some(x), Some(y)) => Fast::Bool(x.equals(y)),
            _ => Fast::Binary(BinaryOp::Eq, a, b),
        },
        Fast::Is(arg, entity_type) => match *arg {
            Fast::Entity(uid) => Fast::Bool(*uid.entity_type() == entity_type),
            arg => Fast::Is(Box::new(arg), entity_type),
        },
        Fast::Not(arg) => match *arg {
            Fast::Bool(b) => Fast::Bool(!b),
            arg => Fast::Not(Box::new(arg)),
        },
        Fast::And(left, right) => match (*left, *right) {
            (Fast::Bool(false), _) => Fast::Bool(false),
            (Fast::Bool(true), right) if right.is_boolean() => right,
            (left, Fast::Bool(true)) if left.is_boolean() => left,
            (left, right) => Fast::And(Box::new(left), Box::new(right)),
        },
        Fast::Or(left, right) => match (*left, *right) {
            (Fast::Bool(true), _) => Fast::Bool(true),
            (Fast::Bool(false), right) if right.is_boolean() => right,
            (left, Fast::Bool(false)) if left.is_boolean() => left,
            (left, right) => Fast::Or(Box::new(left), Box::new(right)),
        },
        Fast::If(branches) => match *branches {
            (Fast::Bool(true), then, _) => then,
            (Fast::Bool(false), _, otherwise) => otherwise,
            branches => Fast::If(Box::new(branches)),
        },
        other => other,
    }
}

/// A literal's value, for folding.
fn literal_value(f: &Fast) -> Option<V<'_>> {
    Some(match f {
        Fast::Bool(b) => V::Bool(*b),
        Fast::Long(i) => V::Long(*i),
        Fast::Str(s) => V::Str(s),
        Fast::Entity(uid) => V::Entity(uid),
        _ => return None,
    })
}

impl Fast {
    /// Whether every value this can evaluate to is a boolean.
    fn is_boolean(&self) -> bool {
        matches!(
            self,
            Fast::Bool(_)
                | Fast::And(..)
                | Fast::Or(..)
                | Fast::Not(_)
                | Fast::InAny(..)
                | Fast::Is(..)
                | Fast::HasAttr(..)
                | Fast::Like(..)
                | Fast::Binary(
                    BinaryOp::Eq | BinaryOp::Less | BinaryOp::LessEq | BinaryOp::In,
                    ..
                )
        )
    }
}

fn literal(lit: &Literal) -> Fast {
    match lit {
        Literal::Bool(b) => Fast::Bool(*b),
        Literal::Long(i) => Fast::Long(*i),
        Literal::String(s) => Fast::Str(s.clone()),
        Literal::EntityUID(uid) => Fast::Entity((**uid).clone()),
    }
}

#[cfg(test)]
mod tests;
