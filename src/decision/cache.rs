//! The per-second decision cache: a repeat of exactly the same check within the same second
//! reuses the verdict (docs/security.md R-04c).

use std::sync::Arc;

use crate::vocabulary::{CheckRequest, Decision};

/// Recently made decisions, for a caller that repeats the exact same check (agents retry and
/// poll). SECURITY R-04c: an entry may be reused only when its key covers every input of the
/// decision, so the key is a SHA-256 over the caller's credential (which fixes the verified
/// principal and its attributes), the request body bytes (action, resource, context, subject),
/// the policy version, and the current second (which fixes `context.mandate.now` and every
/// date comparison). Entries live at most one second. A hit still gets its own decision id:
/// it is a new decision, made by the same rules from the same inputs. What the cache holds is
/// the policy's verdict only: grants are looked up again for every escalation, hit or not.
///
/// Since a key is only ever valid within its own second, the cache is one generation: the
/// entries of the current second, dropped whole when the clock moves on. That is cheaper
/// than a general cache's bookkeeping (the miss path runs on every new check), bounded by
/// `max_entries`, and an entry cannot outlive its second even if the key forgot to say so.
#[derive(Debug)]
pub struct DecisionCache {
    max_entries: usize,
    current: std::sync::Mutex<Generation>,
}

#[derive(Debug, Default)]
struct Generation {
    second: i64,
    entries: std::collections::HashMap<[u8; 32], Arc<CachedCheck>>,
}

/// A check and the decision it got: what a repeat of the same check reuses (the request
/// too, so its audit record is as complete as the first one's).
#[derive(Debug)]
pub struct CachedCheck {
    pub request: CheckRequest,
    pub decision: Decision,
}

impl CachedCheck {
    /// The reused verdict as a new decision, with its own id.
    pub fn fresh(&self) -> Decision {
        Decision {
            id: uuid::Uuid::now_v7(),
            ..self.decision.clone()
        }
    }
}

/// Length-prefixed parts of a [`DecisionCache`] key, so `("ab", "c")` and `("a", "bc")`
/// never collide.
#[derive(Debug, Default)]
pub struct CacheKey(sha2::Sha256);

impl CacheKey {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn part(mut self, bytes: &[u8]) -> Self {
        use sha2::Digest;
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }
    pub fn finish(self) -> [u8; 32] {
        use sha2::Digest;
        self.0.finalize().into()
    }
}

impl DecisionCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            max_entries,
            current: std::sync::Mutex::new(Generation::default()),
        }
    }

    /// The entry for `key` made during second `now`.
    pub fn get(&self, key: &[u8; 32], now: i64) -> Option<Arc<CachedCheck>> {
        let current = self.current.lock().ok()?;
        if current.second != now {
            return None;
        }
        current.entries.get(key).cloned()
    }

    /// Remember a decision made during second `now`; a full generation takes no more.
    pub fn insert(&self, key: [u8; 32], now: i64, request: CheckRequest, decision: Decision) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if current.second != now {
            // Older seconds' entries can never be hit again; newer ones are not replaced by
            // a decision that finished late.
            if current.second > now {
                return;
            }
            current.second = now;
            current.entries.clear();
        }
        if current.entries.len() < self.max_entries {
            current
                .entries
                .insert(key, Arc::new(CachedCheck { request, decision }));
        }
    }

    pub fn len(&self) -> usize {
        self.current.lock().map_or(0, |c| c.entries.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
