//! Human approval, the core: approval requests, reviews, grants, the binding hash that ties a
//! grant to one exact request, and the [`ApprovalStore`] trait the backends in `store`
//! implement (docs/design.md §4). No SQL here: the state machine of a review is decided by
//! [`apply_review`], so every backend enforces the same rules.

pub mod cache;
mod canonical;
pub mod guard;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::vocabulary::{
    ApprovalRequirement, CheckRequest, Fallback, GrantScope, Principal, Resource,
};

pub use cache::{ActiveGrant, GrantCache, GrantCacheSettings};
pub use canonical::{binding_hash, canonical_json, scoped_binding_hash};
pub use guard::{GuardSettings, GuardedStore};

/// Where an approval request is in its life. Only `Pending` ever changes; the other four are
/// final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Status::Pending,
            "approved" => Status::Approved,
            "denied" => Status::Denied,
            "expired" => Status::Expired,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The requesting principal as it was when the request was made: what separation of duties
/// (requester, owner, `act` chain) and the approver's screen need, without the Cedar entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrincipalSnapshot {
    /// Cedar entity type (`Agent`).
    pub kind: String,
    pub id: String,
    pub issuer: String,
    pub attributes: Map<String, Value>,
    pub owner: Option<String>,
    /// RFC 8693 `act` chain, current actor first.
    pub actors: Vec<String>,
}

impl From<&Principal> for PrincipalSnapshot {
    fn from(p: &Principal) -> Self {
        Self {
            kind: p.kind.clone(),
            id: p.id.clone(),
            issuer: p.issuer.clone(),
            attributes: p.attributes.clone(),
            owner: p.owner.clone(),
            actors: p.actors.clone(),
        }
    }
}

/// The resource of the request, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceSnapshot {
    pub kind: String,
    pub id: String,
    pub properties: Map<String, Value>,
}

impl From<&Resource> for ResourceSnapshot {
    fn from(r: &Resource) -> Self {
        Self {
            kind: r.kind.clone(),
            id: r.id.clone(),
            properties: r.properties.clone(),
        }
    }
}

/// An escalation to persist. The store turns it into an [`ApprovalRequest`] with
/// [`NewRequest::into_pending`], which computes the id and binding hash itself: a caller cannot
/// hand the store a hash that does not match the request it describes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    pub principal: PrincipalSnapshot,
    pub action: String,
    /// AuthZEN `action.properties`: policies see them, so they are part of the binding hash.
    pub action_properties: Option<Map<String, Value>>,
    pub resource: ResourceSnapshot,
    pub context: Map<String, Value>,
    pub policy_version: String,
    pub policy_ids: Vec<String>,
    /// The Cedar source (annotations included) of each of `policy_ids`, as it was in the
    /// bundle of `policy_version`: what the approver is shown, whatever is loaded later.
    pub policy_text: BTreeMap<String, String>,
    pub groups: Vec<String>,
    pub quorum: u32,
    pub evidence: Vec<String>,
    pub grant_ttl: Duration,
    /// What the grant will allow; the binding hash is of this scope.
    pub grant_scope: GrantScope,
    pub fallback: Option<Fallback>,
    pub created_at: i64,
    pub expires_at: i64,
    /// The per-principal limits the store enforces when this creates a new request
    /// (SECURITY A-16). Not stored.
    pub limits: EscalationLimits,
}

impl NewRequest {
    /// The request an `escalate` decision asks for, pending for `pending_ttl` from `now`.
    pub fn from_escalation(
        check: &CheckRequest,
        requirement: &ApprovalRequirement,
        policy_version: &str,
        policy_ids: &[String],
        now: i64,
        pending_ttl: Duration,
    ) -> Self {
        Self {
            principal: PrincipalSnapshot::from(check.principal.as_ref()),
            action: check.action.clone(),
            action_properties: check.action_properties.clone(),
            resource: ResourceSnapshot::from(&check.resource),
            context: check.context.clone(),
            policy_version: policy_version.to_owned(),
            policy_ids: policy_ids.to_vec(),
            policy_text: BTreeMap::new(),
            groups: requirement.groups.clone(),
            quorum: requirement.quorum,
            evidence: requirement.evidence.clone(),
            grant_ttl: requirement.grant_ttl,
            grant_scope: requirement.grant_scope,
            fallback: requirement.fallback.clone(),
            created_at: now,
            expires_at: now.saturating_add(secs(pending_ttl)),
            limits: EscalationLimits::default(),
        }
    }

    /// With the policies' source texts (see [`NewRequest::policy_text`]).
    pub fn with_policy_text(mut self, policy_text: BTreeMap<String, String>) -> Self {
        self.policy_text = policy_text;
        self
    }

    /// With these per-principal limits instead of the defaults.
    pub fn with_limits(mut self, limits: EscalationLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The binding hash of this request for its grant scope (see [`scoped_binding_hash`]).
    pub fn binding_hash(&self) -> String {
        scoped_binding_hash(
            self.grant_scope,
            &self.principal,
            &self.action,
            self.action_properties.as_ref(),
            &self.resource,
            &self.context,
            &self.policy_ids,
        )
    }

    /// The pending request to insert: a random v4 id (128 bits, not guessable: SECURITY
    /// A-22), the binding hash, version 0.
    pub fn into_pending(self) -> ApprovalRequest {
        let binding_hash = self.binding_hash();
        let fallback_at = self
            .fallback
            .as_ref()
            .map(|f| self.created_at.saturating_add(secs(f.after)));
        ApprovalRequest {
            id: Uuid::new_v4(),
            binding_hash,
            principal: self.principal,
            action: self.action,
            action_properties: self.action_properties,
            resource: self.resource,
            context: self.context,
            policy_version: self.policy_version,
            policy_ids: self.policy_ids,
            policy_text: self.policy_text,
            current_groups: self.groups.clone(),
            groups: self.groups,
            // A quorum of 0 would approve on nothing; the annotation parser already refuses it,
            // and this keeps the store from ever holding one.
            quorum: self.quorum.max(1),
            evidence: self.evidence,
            grant_ttl: self.grant_ttl,
            grant_scope: self.grant_scope,
            fallback: self.fallback,
            status: Status::Pending,
            created_at: self.created_at,
            expires_at: self.expires_at,
            fallback_at,
            fell_back_at: None,
            decided_at: None,
            version: 0,
        }
    }
}

/// Per-principal limits on escalations (SECURITY A-16, approval flood): how many approval
/// requests one requesting principal (type, issuer and id) may have pending, and how many new
/// ones it may make in any hour. A repeat of an identical pending request is not a new one.
/// The store checks them in the transaction that inserts, so concurrent escalations cannot
/// overshoot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscalationLimits {
    /// `store.max_pending_per_principal`.
    pub max_pending: u32,
    /// `store.max_requests_per_hour`.
    pub max_per_hour: u32,
}

impl EscalationLimits {
    pub const DEFAULT_MAX_PENDING: u32 = 5;
    pub const DEFAULT_MAX_PER_HOUR: u32 = 30;
    /// The window of `max_per_hour`, in seconds.
    pub const WINDOW_SECS: i64 = 3600;

    /// Refuse a new request for `principal`, which has `pending` unexpired pending requests
    /// and made `recent` requests in the last hour, when either is already at its limit.
    pub fn check(
        &self,
        principal: &PrincipalSnapshot,
        pending: i64,
        recent: i64,
    ) -> Result<(), StoreError> {
        let refuse = |limit: RateLimit, max: u32| {
            Err(StoreError::RateLimited {
                principal: principal.id.clone(),
                limit,
                max,
            })
        };
        if pending >= i64::from(self.max_pending) {
            return refuse(RateLimit::Pending, self.max_pending);
        }
        if recent >= i64::from(self.max_per_hour) {
            return refuse(RateLimit::PerHour, self.max_per_hour);
        }
        Ok(())
    }
}

impl Default for EscalationLimits {
    fn default() -> Self {
        Self {
            max_pending: Self::DEFAULT_MAX_PENDING,
            max_per_hour: Self::DEFAULT_MAX_PER_HOUR,
        }
    }
}

/// Which of the [`EscalationLimits`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    Pending,
    PerHour,
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RateLimit::Pending => "pending approval requests (store.max_pending_per_principal)",
            RateLimit::PerHour => {
                "new approval requests in the last hour (store.max_requests_per_hour)"
            }
        })
    }
}

/// Whole seconds of `d`, saturating: storage keeps times as unix seconds in an `i64`.
pub fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// A persisted approval request. Immutable once created except for `status`, `current_groups`
/// (fallback), `fell_back_at`, `decided_at` and `version` (SECURITY A-24).
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalRequest {
    pub id: Uuid,
    /// Hex SHA-256 of the canonical request; a grant allows exactly this hash.
    pub binding_hash: String,
    pub principal: PrincipalSnapshot,
    pub action: String,
    pub action_properties: Option<Map<String, Value>>,
    pub resource: ResourceSnapshot,
    pub context: Map<String, Value>,
    pub policy_version: String,
    pub policy_ids: Vec<String>,
    /// The Cedar source of each policy that asked for approval, from the bundle of
    /// `policy_version` (empty for requests stored before texts were kept).
    pub policy_text: BTreeMap<String, String>,
    /// The approver groups the policy named.
    pub groups: Vec<String>,
    /// Who may approve now: `groups`, or the fallback group once it has taken over.
    pub current_groups: Vec<String>,
    /// Distinct approvers needed.
    pub quorum: u32,
    /// Evidence kinds each approval must carry (`ticket`).
    pub evidence: Vec<String>,
    pub grant_ttl: Duration,
    /// What its grant allows; `binding_hash` is of this scope.
    pub grant_scope: GrantScope,
    pub fallback: Option<Fallback>,
    pub status: Status,
    pub created_at: i64,
    /// Past this, the request can only become `expired`, never approved (SECURITY A-11).
    pub expires_at: i64,
    /// When the fallback group takes over, if there is a fallback.
    pub fallback_at: Option<i64>,
    /// When the fallback group did take over.
    pub fell_back_at: Option<i64>,
    /// When the request left `pending`.
    pub decided_at: Option<i64>,
    /// Bumped by every change; updates compare-and-swap on it.
    pub version: i64,
}

/// An approver's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Approve,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Approve => "approve",
            Verdict::Deny => "deny",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "approve" => Some(Verdict::Approve),
            "deny" => Some(Verdict::Deny),
            _ => None,
        }
    }
}

/// One approver's review of one request. The approver identity comes from the approver's
/// verified token, never from a request body (SECURITY A-25).
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    pub request_id: Uuid,
    pub approver_id: String,
    pub approver_issuer: String,
    pub verdict: Verdict,
    pub rationale: String,
    /// Evidence by kind, e.g. `{"ticket": "FIN-123"}`.
    pub evidence: Map<String, Value>,
    pub at: i64,
}

/// What an approval produced: the same request is allowed while this is unrevoked and
/// unexpired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: Uuid,
    pub request_id: Uuid,
    pub binding_hash: String,
    /// The policy version the request was approved under (SECURITY A-09).
    pub policy_version: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

impl Grant {
    /// Usable at `now`: not revoked and strictly before `expires_at` (SECURITY A-12).
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}

/// Which requests [`ApprovalStore::list`] returns, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<Status>,
    /// Only requests this group may approve now (`current_groups`).
    pub group: Option<String>,
    /// At most this many: 0 means [`DEFAULT_LIST_LIMIT`]; more than [`MAX_LIST_LIMIT`] is
    /// capped.
    pub limit: u32,
    /// Only requests created after this one (pagination cursor).
    pub after: Option<Uuid>,
}

/// Page size of [`ApprovalStore::list`] when the filter names none.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
/// Upper bound of one [`ApprovalStore::list`] page.
pub const MAX_LIST_LIMIT: u32 = 1000;

impl ListFilter {
    /// The page size to query.
    pub fn effective_limit(&self) -> i64 {
        match self.limit {
            0 => i64::from(DEFAULT_LIST_LIMIT),
            n => i64::from(n.min(MAX_LIST_LIMIT)),
        }
    }
}

/// The result of a recorded review.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewOutcome {
    pub request: ApprovalRequest,
    /// Present exactly when this review completed the quorum.
    pub grant: Option<Grant>,
}

/// Why a store operation failed. Each has a stable [`code`](StoreError::code) the API maps to
/// a status in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("approval request `{id}` expired at {expires_at}")]
    RequestExpired { id: Uuid, expires_at: i64 },
    #[error("approval request `{id}` is {status}, not pending")]
    NotPending { id: Uuid, status: Status },
    #[error("approver `{approver}` already reviewed approval request `{id}`")]
    AlreadyReviewed { id: Uuid, approver: String },
    #[error("approval request `{0}` changed concurrently")]
    Conflict(String),
    #[error("principal `{principal}` is at its limit of {max} {limit}")]
    RateLimited {
        principal: String,
        limit: RateLimit,
        max: u32,
    },
    #[error("approval store unavailable: {0}")]
    Unavailable(String),
    #[error("approval store holds a row that does not decode: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::RequestExpired { .. } => "request_expired",
            StoreError::NotPending { .. } => "not_pending",
            StoreError::AlreadyReviewed { .. } => "already_reviewed",
            StoreError::Conflict(_) => "conflict",
            StoreError::RateLimited { .. } => "escalation_rate_limited",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Corrupt(_) => "corrupt",
        }
    }
}

/// What a review does to its request, decided by [`apply_review`] and written by the store in
/// one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewEffect {
    /// The new status (`Pending` while the quorum is not reached).
    pub status: Status,
    pub decided_at: Option<i64>,
    /// The grant to insert in the same transaction, when the quorum is reached.
    pub grant: Option<Grant>,
}

/// The review state machine, shared by every backend. `prior` are the reviews already stored
/// for `request`; the store calls this inside the transaction that holds the request row.
///
/// - only a pending request before `expires_at` takes reviews (SECURITY A-11);
/// - one review per approver: a second is refused and never counted (SECURITY A-13);
/// - any deny denies, whatever the approvals so far (SECURITY A-14);
/// - `quorum` distinct approvals approve and create the grant, expiring `grant_ttl` later.
pub fn apply_review(
    request: &ApprovalRequest,
    prior: &[Review],
    review: &Review,
    now: i64,
) -> Result<ReviewEffect, StoreError> {
    match request.status {
        Status::Pending if now >= request.expires_at => {
            return Err(StoreError::RequestExpired {
                id: request.id,
                expires_at: request.expires_at,
            });
        }
        Status::Pending => {}
        Status::Expired => {
            return Err(StoreError::RequestExpired {
                id: request.id,
                expires_at: request.expires_at,
            });
        }
        status => {
            return Err(StoreError::NotPending {
                id: request.id,
                status,
            });
        }
    }
    if prior.iter().any(|r| r.approver_id == review.approver_id) {
        return Err(StoreError::AlreadyReviewed {
            id: request.id,
            approver: review.approver_id.clone(),
        });
    }
    if review.verdict == Verdict::Deny {
        return Ok(ReviewEffect {
            status: Status::Denied,
            decided_at: Some(now),
            grant: None,
        });
    }
    let mut approvers: Vec<&str> = prior
        .iter()
        .filter(|r| r.verdict == Verdict::Approve)
        .map(|r| r.approver_id.as_str())
        .collect();
    approvers.push(review.approver_id.as_str());
    approvers.sort_unstable();
    approvers.dedup();
    let distinct = u32::try_from(approvers.len()).unwrap_or(u32::MAX);
    if distinct < request.quorum {
        return Ok(ReviewEffect {
            status: Status::Pending,
            decided_at: None,
            grant: None,
        });
    }
    Ok(ReviewEffect {
        status: Status::Approved,
        decided_at: Some(now),
        grant: Some(Grant {
            id: Uuid::new_v4(),
            request_id: request.id,
            binding_hash: request.binding_hash.clone(),
            policy_version: request.policy_version.clone(),
            created_at: now,
            expires_at: now.saturating_add(secs(request.grant_ttl)),
            revoked_at: None,
        }),
    })
}

/// Persistence of approval requests, reviews and grants. Every method is one transaction;
/// backends live in `crate::store`.
#[async_trait]
pub trait ApprovalStore: Send + Sync + std::fmt::Debug {
    /// Insert a pending request, or return the existing pending one with the same binding hash
    /// (no approval flood from a retrying agent). Atomic under concurrency. A pending request
    /// with that hash that is already past its expiry is expired first, so the caller gets a
    /// fresh one. A new request is refused with [`StoreError::RateLimited`] when its
    /// principal is at one of `req.limits`, counted in the same transaction as the insert
    /// (SECURITY A-16); the existing twin is returned whatever the limits. Returns the request
    /// and whether it was created now.
    async fn create_or_get_pending(
        &self,
        req: NewRequest,
    ) -> Result<(ApprovalRequest, bool), StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<ApprovalRequest>, StoreError>;

    /// The requests with these ids, in no particular order; unknown ids are left out. One
    /// round trip, whatever the number of ids.
    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<ApprovalRequest>, StoreError>;

    async fn list(&self, filter: ListFilter) -> Result<Vec<ApprovalRequest>, StoreError>;

    /// The reviews of a request, in the order they were recorded.
    async fn reviews(&self, id: Uuid) -> Result<Vec<Review>, StoreError>;

    /// Record a review and apply it (see [`apply_review`]) in one transaction; the grant a
    /// final approval creates is inserted in that same transaction (SECURITY R-03d).
    async fn review(&self, review: Review, now: i64) -> Result<ReviewOutcome, StoreError>;

    /// Cancel a pending request.
    async fn cancel(&self, id: Uuid, now: i64) -> Result<ApprovalRequest, StoreError>;

    /// Pending requests at or past `expires_at` become expired (never approved); returns them.
    async fn expire_due(&self, now: i64) -> Result<Vec<ApprovalRequest>, StoreError>;

    /// Pending, unexpired requests at or past `fallback_at` that have not moved yet: their
    /// `current_groups` become the fallback group; returns them.
    async fn fallback_due(&self, now: i64) -> Result<Vec<ApprovalRequest>, StoreError>;

    /// The unrevoked, unexpired grant for exactly this binding hash, if any.
    async fn active_grant(&self, binding_hash: &str, now: i64)
    -> Result<Option<Grant>, StoreError>;

    /// The grant with this id, active or not.
    async fn get_grant(&self, id: Uuid) -> Result<Option<Grant>, StoreError>;

    /// All grants, or only the active ones, oldest first.
    async fn grants(&self, active_only: bool, now: i64) -> Result<Vec<Grant>, StoreError>;

    /// Revoke a grant; revoking a revoked grant returns it unchanged. With PostgreSQL the
    /// revocation is announced to every sidecar's grant cache in the same transaction, as is
    /// the grant a final approval creates in [`review`](Self::review).
    async fn revoke_grant(&self, id: Uuid, now: i64) -> Result<Grant, StoreError>;

    /// Keep a signed checkpoint of the audit log named `log_id` (the hash of its first
    /// record): the store is where the log's writer cannot rewrite it (DESIGN §5). Keeping
    /// one already kept changes nothing.
    async fn put_checkpoint(
        &self,
        log_id: &str,
        checkpoint: &crate::audit::Checkpoint,
    ) -> Result<(), StoreError>;

    /// The checkpoints kept for the log `log_id`, in order.
    async fn checkpoints(&self, log_id: &str) -> Result<Vec<crate::audit::Checkpoint>, StoreError>;

    /// Unexpired pending requests by the approver group they wait on, and active grants, at
    /// `now` (the gauges of `/metrics`).
    async fn counts(&self, now: i64) -> Result<StoreCounts, StoreError>;
}

/// What [`ApprovalStore::counts`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// (group, pending requests it may approve now), by group name.
    pub pending_by_group: Vec<(String, u64)>,
    pub active_grants: u64,
}

#[cfg(test)]
mod tests;
