//! Approval store backends: the only module that knows SQL. SQLite is the embedded default
//! (one file); PostgreSQL lets a fleet of sidecars share approvals and grants. Both are one
//! `ApprovalStore` implementation, `sql::SqlStore`, written
//! once over a small dialect trait, with the review rules of
//! [`apply_review`](crate::approval::apply_review); they run the same test suite
//! (tests/store.rs).

mod postgres;
mod sql;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::approval::{
    ApprovalRequest, ApprovalStore, EscalationLimits, Grant, GrantCache, Review, Status,
    StoreError, Verdict,
};
use crate::vocabulary::{Fallback, GrantScope};

pub use postgres::{GRANT_CHANNEL, LISTENER_APPLICATION_NAME, PostgresStore};
pub use sqlite::SqliteStore;

/// Open the store named by `url` and bring its schema up to date: `postgres://` or
/// `postgresql://` is PostgreSQL; `sqlite://path`, `sqlite:path` or a plain path is a SQLite
/// file, created when missing.
pub async fn connect(url: &str) -> Result<Arc<dyn ApprovalStore>, StoreError> {
    if is_shared(url) {
        Ok(Arc::new(PostgresStore::connect(url).await?))
    } else {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    }
}

/// Whether other processes may change the grants of the store at `url` (PostgreSQL: a
/// fleet shares it), so a grant cache must hear their changes ([`listen_grant_changes`])
/// before it may be trusted. A SQLite file belongs to one process.
pub fn is_shared(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Where the store at `url` is, for the log: the SQLite file, or the PostgreSQL URL with its
/// password (in the user part or a `password=` parameter) replaced by `***`.
pub fn location(url: &str) -> String {
    if !is_shared(url) {
        return match sqlite_file(url) {
            Some(file) => format!("sqlite {}", file.display()),
            None => format!("sqlite {url}"),
        };
    }
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match base.find('/') {
        Some(i) => base.split_at(i),
        None => (base, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// The file of a SQLite store at `url`, for the one-writer lock taken at start-up
/// ([`crate::lockfile`]); `None` for PostgreSQL (shared by design) and in-memory SQLite.
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    if is_shared(url) || url.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    if url.starts_with("sqlite:") {
        use std::str::FromStr as _;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
        return Some(options.get_filename().to_path_buf());
    }
    Some(std::path::PathBuf::from(url))
}

/// Keep `cache` coherent with grant changes made by other processes, until `stop`: the
/// PostgreSQL listener for a shared store; nothing to do (returns at once) for SQLite.
pub async fn listen_grant_changes(
    url: String,
    cache: Arc<GrantCache>,
    stop: impl std::future::Future<Output = ()>,
) {
    if is_shared(&url) {
        postgres::listen_grant_changes(url, cache, stop).await;
    }
}

/// How long a statement may wait for a connection or a lock before the store reports itself
/// unavailable (and decisions that need it deny).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A database error, as a store error. Unique violations are the caller's to interpret; here
/// they are a generic conflict (a review's insert makes it `AlreadyReviewed`).
fn db_error(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        sqlx::Error::Database(ref db) if db.is_unique_violation() => {
            StoreError::Conflict(db.message().to_owned())
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn migrate_error(e: sqlx::migrate::MigrateError) -> StoreError {
    StoreError::Unavailable(format!("schema migration failed: {e}"))
}

fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("cannot encode json: {e}")))
}

fn from_json<T: DeserializeOwned>(column: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("column `{column}`: {e}")))
}

fn parse_uuid(column: &str, s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("column `{column}`: {e}")))
}

fn nonneg_secs(column: &str, n: i64) -> Result<Duration, StoreError> {
    u64::try_from(n)
        .map(Duration::from_secs)
        .map_err(|_| StoreError::Corrupt(format!("column `{column}`: negative duration {n}")))
}

/// An `approval_requests` row with every column as text or integer, the same for both
/// backends (PostgreSQL casts its `uuid` and `jsonb` columns to text when selecting).
#[derive(Debug, sqlx::FromRow)]
struct RequestRow {
    id: String,
    binding_hash: String,
    principal: String,
    action: String,
    action_properties: Option<String>,
    resource: String,
    context: String,
    policy_version: String,
    policy_ids: String,
    policy_text: String,
    groups: String,
    current_groups: String,
    quorum: i64,
    evidence: String,
    grant_ttl_secs: i64,
    grant_scope: String,
    fallback_group: Option<String>,
    fallback_after_secs: Option<i64>,
    status: String,
    created_at: i64,
    expires_at: i64,
    fallback_at: Option<i64>,
    fell_back_at: Option<i64>,
    decided_at: Option<i64>,
    version: i64,
}

impl TryFrom<RequestRow> for ApprovalRequest {
    type Error = StoreError;

    fn try_from(r: RequestRow) -> Result<Self, StoreError> {
        let fallback = match (r.fallback_group, r.fallback_after_secs) {
            (Some(group), Some(after)) => Some(Fallback {
                group,
                after: nonneg_secs("fallback_after_secs", after)?,
            }),
            (None, None) => None,
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "approval request `{}`: fallback group and delay must be set together",
                    r.id
                )));
            }
        };
        Ok(ApprovalRequest {
            id: parse_uuid("id", &r.id)?,
            binding_hash: r.binding_hash,
            principal: from_json("principal", &r.principal)?,
            action: r.action,
            action_properties: r
                .action_properties
                .as_deref()
                .map(|s| from_json("action_properties", s))
                .transpose()?,
            resource: from_json("resource", &r.resource)?,
            context: from_json("context", &r.context)?,
            policy_version: r.policy_version,
            policy_ids: from_json("policy_ids", &r.policy_ids)?,
            policy_text: from_json("policy_text", &r.policy_text)?,
            groups: from_json("groups", &r.groups)?,
            current_groups: from_json("current_groups", &r.current_groups)?,
            quorum: u32::try_from(r.quorum)
                .ok()
                .filter(|q| *q >= 1)
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("column `quorum`: invalid quorum {}", r.quorum))
                })?,
            evidence: from_json("evidence", &r.evidence)?,
            grant_ttl: nonneg_secs("grant_ttl_secs", r.grant_ttl_secs)?,
            grant_scope: GrantScope::parse(&r.grant_scope).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "column `grant_scope`: unknown scope `{}`",
                    r.grant_scope
                ))
            })?,
            fallback,
            status: Status::parse(&r.status).ok_or_else(|| {
                StoreError::Corrupt(format!("column `status`: unknown status `{}`", r.status))
            })?,
            created_at: r.created_at,
            expires_at: r.expires_at,
            fallback_at: r.fallback_at,
            fell_back_at: r.fell_back_at,
            decided_at: r.decided_at,
            version: r.version,
        })
    }
}

fn requests(rows: Vec<RequestRow>) -> Result<Vec<ApprovalRequest>, StoreError> {
    rows.into_iter().map(ApprovalRequest::try_from).collect()
}

/// An `approval_reviews` row.
#[derive(Debug, sqlx::FromRow)]
struct ReviewRow {
    request_id: String,
    approver_id: String,
    approver_issuer: String,
    verdict: String,
    rationale: String,
    evidence: String,
    at: i64,
}

impl TryFrom<ReviewRow> for Review {
    type Error = StoreError;

    fn try_from(r: ReviewRow) -> Result<Self, StoreError> {
        Ok(Review {
            request_id: parse_uuid("request_id", &r.request_id)?,
            verdict: Verdict::parse(&r.verdict).ok_or_else(|| {
                StoreError::Corrupt(format!("column `verdict`: unknown verdict `{}`", r.verdict))
            })?,
            approver_id: r.approver_id,
            approver_issuer: r.approver_issuer,
            rationale: r.rationale,
            evidence: from_json("evidence", &r.evidence)?,
            at: r.at,
        })
    }
}

/// An `audit_checkpoints` row.
#[derive(Debug, sqlx::FromRow)]
struct CheckpointRow {
    seq: i64,
    hash: String,
    at: i64,
    key_id: String,
    signature: String,
}

impl TryFrom<CheckpointRow> for crate::audit::Checkpoint {
    type Error = StoreError;

    fn try_from(r: CheckpointRow) -> Result<Self, StoreError> {
        Ok(crate::audit::Checkpoint {
            seq: u64::try_from(r.seq)
                .map_err(|_| StoreError::Corrupt(format!("column `seq`: negative {}", r.seq)))?,
            hash: r.hash,
            at: r.at,
            key_id: r.key_id,
            signature: r.signature,
        })
    }
}

/// A `grants` row.
#[derive(Debug, sqlx::FromRow)]
struct GrantRow {
    id: String,
    request_id: String,
    binding_hash: String,
    policy_version: String,
    created_at: i64,
    expires_at: i64,
    revoked_at: Option<i64>,
}

impl TryFrom<GrantRow> for Grant {
    type Error = StoreError;

    fn try_from(r: GrantRow) -> Result<Self, StoreError> {
        Ok(Grant {
            id: parse_uuid("id", &r.id)?,
            request_id: parse_uuid("request_id", &r.request_id)?,
            binding_hash: r.binding_hash,
            policy_version: r.policy_version,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
        })
    }
}

fn grants(rows: Vec<GrantRow>) -> Result<Vec<Grant>, StoreError> {
    rows.into_iter().map(Grant::try_from).collect()
}

/// What [`EscalationLimits`](crate::approval::EscalationLimits) are checked against, read in
/// the transaction that inserts: whether the new request's pending twin exists (then it is
/// returned, not created, and no limit applies), the principal's unexpired pending requests
/// and its requests created in the last hour.
#[derive(Debug, sqlx::FromRow)]
struct LimitCounts {
    twin: bool,
    pending: i64,
    recent: i64,
}

impl LimitCounts {
    fn check(
        &self,
        request: &ApprovalRequest,
        limits: &EscalationLimits,
    ) -> Result<(), StoreError> {
        if self.twin {
            return Ok(());
        }
        limits.check(&request.principal, self.pending, self.recent)
    }
}

fn not_found_request(id: Uuid) -> StoreError {
    StoreError::NotFound {
        what: "approval request",
        id: id.to_string(),
    }
}

fn not_found_grant(id: Uuid) -> StoreError {
    StoreError::NotFound {
        what: "grant",
        id: id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::location;

    #[test]
    fn location_names_the_file_or_the_server_never_a_password() {
        assert_eq!(location("data/mandate.db"), "sqlite data/mandate.db");
        assert_eq!(
            location("postgres://postgres@127.0.0.1:5432/test"),
            "postgres://postgres@127.0.0.1:5432/test"
        );
        assert_eq!(
            location("postgresql://app:s3cr%40t@db.internal/mandate?sslmode=require&password=x"),
            "postgresql://app:***@db.internal/mandate?sslmode=require&password=***"
        );
        assert_eq!(location("postgres://db"), "postgres://db");
    }
}
