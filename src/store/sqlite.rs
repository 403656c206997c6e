//! The SQLite backend: one file, WAL, `synchronous=FULL` so an acknowledged approval or grant
//! survives a crash or power loss (SECURITY R-03c). Every write transaction starts with
//! `BEGIN IMMEDIATE`: it takes the write lock up front, so writers queue on `busy_timeout`
//! instead of failing when a read snapshot would have to be upgraded.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use uuid::Uuid;

use super::{
    ACQUIRE_TIMEOUT, EncodedRequest, GrantRow, LimitCounts, RequestRow, ReviewRow, db_error,
    grants, is_unique_violation, migrate_error, not_found_grant, not_found_request, requests,
    to_json,
};
use crate::approval::{
    ApprovalRequest, ApprovalStore, EscalationLimits, Grant, ListFilter, NewRequest, Review,
    ReviewOutcome, Status, StoreError, apply_review,
};

/// How long a writer waits for the file's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

macro_rules! request_columns {
    () => {
        "id, binding_hash, principal, action, action_properties, resource, context, \
         policy_version, policy_ids, policy_text, groups, current_groups, quorum, evidence, grant_ttl_secs, \
         fallback_group, fallback_after_secs, status, created_at, expires_at, fallback_at, \
         fell_back_at, decided_at, version"
    };
}

macro_rules! grant_columns {
    () => {
        "id, request_id, binding_hash, policy_version, created_at, expires_at, revoked_at"
    };
}

/// Approval store in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Open (creating when missing) the file named by `url` (`sqlite://path`, `sqlite:path` or
    /// a plain path) and run the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::Unavailable(format!("invalid sqlite url `{url}`: {e}")))?
        } else {
            SqliteConnectOptions::new().filename(url)
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power loss,
            // and an acknowledged approval must not be lost (SECURITY R-03c).
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open sqlite `{url}`: {e}")))?;
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .map_err(migrate_error)?;
        Ok(Self { pool })
    }

    /// The connection pool, for checks of the connection settings (tests read
    /// `PRAGMA synchronous`).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Close every connection; pending writes are already committed.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)
    }
}

async fn fetch_request(
    tx: &mut Transaction<'static, Sqlite>,
    id: Uuid,
) -> Result<Option<ApprovalRequest>, StoreError> {
    let row: Option<RequestRow> = sqlx::query_as(concat!(
        "SELECT ",
        request_columns!(),
        " FROM approval_requests WHERE id = ?"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_error)?;
    row.map(ApprovalRequest::try_from).transpose()
}

async fn fetch_reviews(
    executor: impl sqlx::SqliteExecutor<'_>,
    id: Uuid,
) -> Result<Vec<Review>, StoreError> {
    let rows: Vec<ReviewRow> = sqlx::query_as(
        "SELECT request_id, approver_id, approver_issuer, verdict, rationale, evidence, at \
         FROM approval_reviews WHERE request_id = ? ORDER BY rowid",
    )
    .bind(id.to_string())
    .fetch_all(executor)
    .await
    .map_err(db_error)?;
    rows.into_iter().map(Review::try_from).collect()
}

/// The counts the escalation limits of `request`'s principal are checked against. The
/// `json_extract(principal, '$.id')` expression is the one indexed by
/// `approval_requests_requester`.
async fn limit_counts(
    tx: &mut Transaction<'static, Sqlite>,
    request: &ApprovalRequest,
) -> Result<LimitCounts, StoreError> {
    sqlx::query_as(
        "SELECT \
           EXISTS (SELECT 1 FROM approval_requests \
                   WHERE binding_hash = ?1 AND status = 'pending') AS twin, \
           (SELECT COUNT(*) FROM approval_requests \
             WHERE json_extract(principal, '$.id') = ?2 \
               AND json_extract(principal, '$.issuer') = ?3 \
               AND json_extract(principal, '$.kind') = ?4 \
               AND status = 'pending' AND expires_at > ?5) AS pending, \
           (SELECT COUNT(*) FROM approval_requests \
             WHERE json_extract(principal, '$.id') = ?2 \
               AND json_extract(principal, '$.issuer') = ?3 \
               AND json_extract(principal, '$.kind') = ?4 \
               AND created_at > ?6) AS recent",
    )
    .bind(&request.binding_hash)
    .bind(&request.principal.id)
    .bind(&request.principal.issuer)
    .bind(&request.principal.kind)
    .bind(request.created_at)
    .bind(
        request
            .created_at
            .saturating_sub(EscalationLimits::WINDOW_SECS),
    )
    .fetch_one(&mut **tx)
    .await
    .map_err(db_error)
}

#[async_trait]
impl ApprovalStore for SqliteStore {
    async fn create_or_get_pending(
        &self,
        req: NewRequest,
    ) -> Result<(ApprovalRequest, bool), StoreError> {
        let limits = req.limits;
        let request = req.into_pending();
        let enc = EncodedRequest::new(&request)?;
        let mut tx = self.write_tx().await?;
        // A pending twin already past its expiry would refuse every review: expire it so the
        // agent's retry gets a fresh request.
        sqlx::query(
            "UPDATE approval_requests SET status = 'expired', decided_at = ?, \
             version = version + 1 \
             WHERE binding_hash = ? AND status = 'pending' AND expires_at <= ?",
        )
        .bind(request.created_at)
        .bind(&request.binding_hash)
        .bind(request.created_at)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let existing: Option<RequestRow> = sqlx::query_as(concat!(
            "SELECT ",
            request_columns!(),
            " FROM approval_requests WHERE binding_hash = ? AND status = 'pending'"
        ))
        .bind(&request.binding_hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        if let Some(row) = existing {
            tx.commit().await.map_err(db_error)?;
            return Ok((ApprovalRequest::try_from(row)?, false));
        }
        // SECURITY A-16: counted under the write lock `BEGIN IMMEDIATE` took, so no other
        // creator can slip in between the count and the insert.
        limit_counts(&mut tx, &request)
            .await?
            .check(&request, &limits)?;
        sqlx::query(concat!(
            "INSERT INTO approval_requests (",
            request_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(request.id.to_string())
        .bind(&request.binding_hash)
        .bind(&enc.principal)
        .bind(&request.action)
        .bind(&enc.action_properties)
        .bind(&enc.resource)
        .bind(&enc.context)
        .bind(&request.policy_version)
        .bind(&enc.policy_ids)
        .bind(&enc.policy_text)
        .bind(&enc.groups)
        .bind(&enc.current_groups)
        .bind(i64::from(request.quorum))
        .bind(&enc.evidence)
        .bind(enc.grant_ttl_secs)
        .bind(&enc.fallback_group)
        .bind(enc.fallback_after_secs)
        .bind(request.status.as_str())
        .bind(request.created_at)
        .bind(request.expires_at)
        .bind(request.fallback_at)
        .bind(request.fell_back_at)
        .bind(request.decided_at)
        .bind(request.version)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok((request, true))
    }

    async fn get(&self, id: Uuid) -> Result<Option<ApprovalRequest>, StoreError> {
        let row: Option<RequestRow> = sqlx::query_as(concat!(
            "SELECT ",
            request_columns!(),
            " FROM approval_requests WHERE id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(ApprovalRequest::try_from).transpose()
    }

    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<ApprovalRequest>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let rows: Vec<RequestRow> = sqlx::query_as(concat!(
            "SELECT ",
            request_columns!(),
            " FROM approval_requests WHERE id IN (SELECT value FROM json_each(?))"
        ))
        .bind(to_json(&ids)?)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        requests(rows)
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<ApprovalRequest>, StoreError> {
        // An unknown cursor yields nothing rather than starting over from the beginning.
        let rows: Vec<RequestRow> = sqlx::query_as(concat!(
            "SELECT ",
            request_columns!(),
            " FROM approval_requests \
              WHERE (?1 IS NULL OR status = ?1) \
                AND (?2 IS NULL OR EXISTS \
                     (SELECT 1 FROM json_each(current_groups) WHERE json_each.value = ?2)) \
                AND (?3 IS NULL OR seq > \
                     COALESCE((SELECT seq FROM approval_requests WHERE id = ?3), 9223372036854775807)) \
              ORDER BY seq LIMIT ?4"
        ))
        .bind(filter.status.map(Status::as_str))
        .bind(filter.group.as_deref())
        .bind(filter.after.map(|u| u.to_string()))
        .bind(filter.effective_limit())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        requests(rows)
    }

    async fn reviews(&self, id: Uuid) -> Result<Vec<Review>, StoreError> {
        fetch_reviews(&self.pool, id).await
    }

    async fn review(&self, review: Review, now: i64) -> Result<ReviewOutcome, StoreError> {
        let mut tx = self.write_tx().await?;
        let request = fetch_request(&mut tx, review.request_id)
            .await?
            .ok_or_else(|| not_found_request(review.request_id))?;
        let prior = fetch_reviews(&mut *tx, review.request_id).await?;
        let effect = apply_review(&request, &prior, &review, now)?;
        let inserted = sqlx::query(
            "INSERT INTO approval_reviews \
             (request_id, approver_id, approver_issuer, verdict, rationale, evidence, at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(review.request_id.to_string())
        .bind(&review.approver_id)
        .bind(&review.approver_issuer)
        .bind(review.verdict.as_str())
        .bind(&review.rationale)
        .bind(to_json(&review.evidence)?)
        .bind(review.at)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::AlreadyReviewed {
                    id: review.request_id,
                    approver: review.approver_id,
                });
            }
            Err(e) => return Err(db_error(e)),
        }
        let updated: Option<RequestRow> = sqlx::query_as(concat!(
            "UPDATE approval_requests SET status = ?, decided_at = ?, version = version + 1 \
             WHERE id = ? AND version = ? RETURNING ",
            request_columns!()
        ))
        .bind(effect.status.as_str())
        .bind(effect.decided_at)
        .bind(request.id.to_string())
        .bind(request.version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let Some(updated) = updated else {
            return Err(StoreError::Conflict(request.id.to_string()));
        };
        if let Some(grant) = &effect.grant {
            sqlx::query(concat!(
                "INSERT INTO grants (",
                grant_columns!(),
                ") VALUES (?, ?, ?, ?, ?, ?, ?)"
            ))
            .bind(grant.id.to_string())
            .bind(grant.request_id.to_string())
            .bind(&grant.binding_hash)
            .bind(&grant.policy_version)
            .bind(grant.created_at)
            .bind(grant.expires_at)
            .bind(grant.revoked_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(ReviewOutcome {
            request: ApprovalRequest::try_from(updated)?,
            grant: effect.grant,
        })
    }

    async fn cancel(&self, id: Uuid, now: i64) -> Result<ApprovalRequest, StoreError> {
        let mut tx = self.write_tx().await?;
        let request = fetch_request(&mut tx, id)
            .await?
            .ok_or_else(|| not_found_request(id))?;
        if request.status != Status::Pending {
            return Err(StoreError::NotPending {
                id,
                status: request.status,
            });
        }
        let updated: Option<RequestRow> = sqlx::query_as(concat!(
            "UPDATE approval_requests SET status = 'cancelled', decided_at = ?, \
             version = version + 1 WHERE id = ? AND version = ? RETURNING ",
            request_columns!()
        ))
        .bind(now)
        .bind(id.to_string())
        .bind(request.version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let updated = updated.ok_or_else(|| StoreError::Conflict(id.to_string()))?;
        tx.commit().await.map_err(db_error)?;
        ApprovalRequest::try_from(updated)
    }

    async fn expire_due(&self, now: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
        let mut tx = self.write_tx().await?;
        let rows: Vec<RequestRow> = sqlx::query_as(concat!(
            "UPDATE approval_requests SET status = 'expired', decided_at = ?1, \
             version = version + 1 WHERE status = 'pending' AND expires_at <= ?1 RETURNING ",
            request_columns!()
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        requests(rows)
    }

    async fn fallback_due(&self, now: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
        let mut tx = self.write_tx().await?;
        let rows: Vec<RequestRow> = sqlx::query_as(concat!(
            "UPDATE approval_requests SET current_groups = json_array(fallback_group), \
             fell_back_at = ?1, version = version + 1 \
             WHERE status = 'pending' AND fallback_group IS NOT NULL AND fell_back_at IS NULL \
               AND fallback_at <= ?1 AND expires_at > ?1 RETURNING ",
            request_columns!()
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        requests(rows)
    }

    async fn active_grant(
        &self,
        binding_hash: &str,
        now: i64,
    ) -> Result<Option<Grant>, StoreError> {
        let row: Option<GrantRow> = sqlx::query_as(concat!(
            "SELECT ",
            grant_columns!(),
            " FROM grants WHERE binding_hash = ? AND revoked_at IS NULL AND expires_at > ? \
              ORDER BY expires_at DESC LIMIT 1"
        ))
        .bind(binding_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(Grant::try_from).transpose()
    }

    async fn get_grant(&self, id: Uuid) -> Result<Option<Grant>, StoreError> {
        let row: Option<GrantRow> = sqlx::query_as(concat!(
            "SELECT ",
            grant_columns!(),
            " FROM grants WHERE id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(Grant::try_from).transpose()
    }

    async fn grants(&self, active_only: bool, now: i64) -> Result<Vec<Grant>, StoreError> {
        let rows: Vec<GrantRow> = sqlx::query_as(concat!(
            "SELECT ",
            grant_columns!(),
            " FROM grants WHERE ?1 = 0 OR (revoked_at IS NULL AND expires_at > ?2) ORDER BY seq"
        ))
        .bind(active_only)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        grants(rows)
    }

    async fn revoke_grant(&self, id: Uuid, now: i64) -> Result<Grant, StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE grants SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let row: Option<GrantRow> = sqlx::query_as(concat!(
            "SELECT ",
            grant_columns!(),
            " FROM grants WHERE id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        row.map(Grant::try_from)
            .transpose()?
            .ok_or_else(|| not_found_grant(id))
    }
}
