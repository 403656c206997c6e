//! Why an approvals workflow refused or failed. Adapters map each variant to their own
//! status in one `match`; nothing here knows HTTP.

use uuid::Uuid;

use crate::approval::StoreError;
use crate::audit::AuditError;

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// Only an approver's own token may do this; an enforcement point or bot cannot act in
    /// its own name (SECURITY A-03).
    #[error("{0}")]
    ApproverRequired(&'static str),
    /// A bad value in the input, naming its field.
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// Nothing of that id for this caller: also what anyone who may not see an existing one
    /// is told, so ids cannot be probed (SECURITY A-22).
    #[error("no {what} `{id}` for this caller")]
    NotFound { what: &'static str, id: String },
    /// The reviewer is in the request's requester set (SECURITY ).
    #[error(
        "`{approver}` is the requester, its owner or in its delegation chain: it cannot review this request"
    )]
    SelfApproval { approver: String },
    /// The caller asked for a group it is not in.
    #[error("`{approver}` is not in group `{group}`")]
    NotInGroup { approver: String, group: String },
    /// The bundle's `approve` policy does not permit this reviewer.
    #[error("the policy does not permit `{approver}` to approve this request: {why}")]
    NotPermitted { approver: String, why: String },
    /// The review names another request than the one stored under the id.
    #[error(
        "approval request `{id}` is not the request that was shown: its binding hash is `{stored}`, the review names `{shown}`"
    )]
    Mismatch {
        id: Uuid,
        stored: String,
        shown: String,
    },
    /// The store refused the change: the request expired, is no longer pending, was already
    /// reviewed by this approver, or changed concurrently.
    #[error("{0}")]
    Refused(StoreError),
    /// The store could not be reached or read.
    #[error("the approval store is unavailable: {}", .0.code())]
    StoreUnavailable(StoreError),
    /// The change was not made: its audit event could not be written first.
    #[error("the {what} was not recorded, the audit log cannot be written: {error}")]
    NotAudited {
        what: &'static str,
        error: AuditError,
    },
    /// The change was made but its audit event could not be written; `what` says which
    /// change and what became of it.
    #[error("{what}: {error}")]
    AppliedNotAudited { what: String, error: AuditError },
}

impl ApprovalError {
    /// A store error of an operation on `what` `id`: a missing row is the same "not found" as
    /// an id the caller may not see; a refusal is the store's rule; anything else is an
    /// outage.
    pub(super) fn from_store(e: StoreError, what: &'static str, id: &str) -> Self {
        match e {
            StoreError::NotFound { .. } => ApprovalError::NotFound {
                what,
                id: id.to_owned(),
            },
            StoreError::RequestExpired { .. }
            | StoreError::NotPending { .. }
            | StoreError::AlreadyReviewed { .. }
            | StoreError::Conflict(_)
            | StoreError::RateLimited { .. } => ApprovalError::Refused(e),
            StoreError::Unavailable(_) | StoreError::Corrupt(_) => {
                ApprovalError::StoreUnavailable(e)
            }
        }
    }
}
