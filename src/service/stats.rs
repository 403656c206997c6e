//! What the service did, counted for the periodic summary line a running server logs
//! (`log.summary_interval`). The hot path pays one relaxed atomic increment per count: no
//! lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::vocabulary::Outcome;

/// Running totals since start.
#[derive(Debug, Default)]
pub struct Stats {
    allow: AtomicU64,
    deny: AtomicU64,
    escalate: AtomicU64,
    approval_requests: AtomicU64,
    token_rejections: AtomicU64,
}

/// A snapshot of [`Stats`], or the difference of two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Decisions answered, by outcome (as answered: an escalation a grant allowed is an
    /// allow, one the store could not take a deny).
    pub allow: u64,
    pub deny: u64,
    pub escalate: u64,
    /// Approval requests created (a repeat of a pending one creates none).
    pub approval_requests: u64,
    /// Callers refused because their credential did not verify (no decision was made).
    pub token_rejections: u64,
}

impl Stats {
    /// A decision was answered with `outcome`.
    pub fn decided(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Allow => &self.allow,
            Outcome::Deny => &self.deny,
            Outcome::Escalate => &self.escalate,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn approval_request_created(&self) {
        self.approval_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn token_rejected(&self) {
        self.token_rejections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> Counts {
        Counts {
            allow: self.allow.load(Ordering::Relaxed),
            deny: self.deny.load(Ordering::Relaxed),
            escalate: self.escalate.load(Ordering::Relaxed),
            approval_requests: self.approval_requests.load(Ordering::Relaxed),
            token_rejections: self.token_rejections.load(Ordering::Relaxed),
        }
    }
}

impl Counts {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Counts) -> Counts {
        Counts {
            allow: self.allow.wrapping_sub(earlier.allow),
            deny: self.deny.wrapping_sub(earlier.deny),
            escalate: self.escalate.wrapping_sub(earlier.escalate),
            approval_requests: self
                .approval_requests
                .wrapping_sub(earlier.approval_requests),
            token_rejections: self.token_rejections.wrapping_sub(earlier.token_rejections),
        }
    }

    pub fn decisions(self) -> u64 {
        self.allow + self.deny + self.escalate
    }

    pub fn is_idle(self) -> bool {
        self == Counts::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_outcome_and_differences() {
        let s = Stats::default();
        s.decided(Outcome::Allow);
        s.decided(Outcome::Allow);
        s.decided(Outcome::Escalate);
        s.approval_request_created();
        let first = s.counts();
        assert_eq!(first.decisions(), 3);
        s.decided(Outcome::Deny);
        s.token_rejected();
        let d = s.counts().since(first);
        assert_eq!(
            d,
            Counts {
                deny: 1,
                token_rejections: 1,
                ..Counts::default()
            }
        );
        assert!(s.counts().since(s.counts()).is_idle());
    }
}
