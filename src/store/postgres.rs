//! The PostgreSQL backend: a fleet of sidecars shares approvals and grants. A review locks its
//! request row (`SELECT ... FOR UPDATE`) for the whole transaction, so concurrent reviews of
//! one request are applied one after the other, whichever sidecar receives them; the version
//! compare-and-swap on the update is the second line of defence.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
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

/// A statement that runs longer than this is cancelled by the server: a stuck lock must not
/// hold a decision forever.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`PostgresStore::create_or_get_pending`] retries when the pending twin it
/// collided with left `pending` before it could be read.
const CREATE_ATTEMPTS: usize = 5;

// The uuid and jsonb columns are read as text so both backends decode the same row type.
macro_rules! request_columns {
    () => {
        "id::text AS id, binding_hash, principal::text AS principal, action, \
         action_properties::text AS action_properties, resource::text AS resource, \
         context::text AS context, policy_version, policy_ids::text AS policy_ids, \
         policy_text::text AS policy_text, groups::text AS groups, current_groups::text AS current_groups, quorum, \
         evidence::text AS evidence, grant_ttl_secs, fallback_group, fallback_after_secs, \
         status, created_at, expires_at, fallback_at, fell_back_at, decided_at, version"
    };
}

macro_rules! grant_columns {
    () => {
        "id::text AS id, request_id::text AS request_id, binding_hash, policy_version, \
         created_at, expires_at, revoked_at"
    };
}

/// Approval store in a PostgreSQL database (the schema is whatever `search_path` names).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connect to `url` (`postgres://...`; `?options[search_path]=...` selects a schema) and run
    /// the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()
            .map_err(|e| StoreError::Unavailable(format!("invalid postgres url: {e}")))?
            .options([(
                "statement_timeout",
                format!("{}ms", STATEMENT_TIMEOUT.as_millis()),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            // The URL may carry a password: the error names the host, never the URL.
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to postgres: {e}")))?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(migrate_error)?;
        Ok(Self { pool })
    }

    /// The connection pool (tests use it to inspect the schema).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Close every connection; pending writes are already committed.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn tx(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(db_error)
    }
}

/// The request, locked for the rest of the transaction.
async fn lock_request(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
) -> Result<Option<ApprovalRequest>, StoreError> {
    let row: Option<RequestRow> = sqlx::query_as(concat!(
        "SELECT ",
        request_columns!(),
        " FROM approval_requests WHERE id = $1::uuid FOR UPDATE"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_error)?;
    row.map(ApprovalRequest::try_from).transpose()
}

async fn fetch_reviews(
    executor: impl sqlx::PgExecutor<'_>,
    id: Uuid,
) -> Result<Vec<Review>, StoreError> {
    let rows: Vec<ReviewRow> = sqlx::query_as(
        "SELECT request_id::text AS request_id, approver_id, approver_issuer, verdict, \
         rationale, evidence::text AS evidence, at \
         FROM approval_reviews WHERE request_id = $1::uuid ORDER BY seq",
    )
    .bind(id.to_string())
    .fetch_all(executor)
    .await
    .map_err(db_error)?;
    rows.into_iter().map(Review::try_from).collect()
}

/// First key of the advisory locks that serialize the creation of one principal's requests
/// (the two-key form keeps them apart from single-key locks such as sqlx's migration lock).
const REQUESTER_LOCK_CLASS: i32 = 0x4d41_4e44; // "MAND"

/// The counts the escalation limits of `request`'s principal are checked against. The
/// `principal->>'id'` expression is the one indexed by `approval_requests_requester`.
async fn limit_counts(
    tx: &mut Transaction<'static, Postgres>,
    request: &ApprovalRequest,
) -> Result<LimitCounts, StoreError> {
    sqlx::query_as(
        "SELECT \
           EXISTS (SELECT 1 FROM approval_requests \
                   WHERE binding_hash = $1 AND status = 'pending') AS twin, \
           (SELECT COUNT(*) FROM approval_requests \
             WHERE principal->>'id' = $2 AND principal->>'issuer' = $3 \
               AND principal->>'kind' = $4 \
               AND status = 'pending' AND expires_at > $5) AS pending, \
           (SELECT COUNT(*) FROM approval_requests \
             WHERE principal->>'id' = $2 AND principal->>'issuer' = $3 \
               AND principal->>'kind' = $4 \
               AND created_at > $6) AS recent",
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
impl ApprovalStore for PostgresStore {
    async fn create_or_get_pending(
        &self,
        req: NewRequest,
    ) -> Result<(ApprovalRequest, bool), StoreError> {
        let limits = req.limits;
        let request = req.into_pending();
        let enc = EncodedRequest::new(&request)?;
        for _ in 0..CREATE_ATTEMPTS {
            let mut tx = self.tx().await?;
            // SECURITY A-16: creators for one principal take turns (a transaction-scoped
            // advisory lock, across the fleet), so the count below cannot be overtaken by a
            // concurrent insert before this one commits.
            sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                .bind(REQUESTER_LOCK_CLASS)
                .bind(to_json(&[
                    &request.principal.kind,
                    &request.principal.issuer,
                    &request.principal.id,
                ])?)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            // A pending twin already past its expiry would refuse every review: expire it so
            // the agent's retry gets a fresh request.
            sqlx::query(
                "UPDATE approval_requests SET status = 'expired', decided_at = $2, \
                 version = version + 1 \
                 WHERE binding_hash = $1 AND status = 'pending' AND expires_at <= $2",
            )
            .bind(&request.binding_hash)
            .bind(request.created_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            limit_counts(&mut tx, &request)
                .await?
                .check(&request, &limits)?;
            // The partial unique index decides between concurrent creators: the loser's insert
            // waits for the winner's commit and then does nothing.
            let inserted = sqlx::query(
                "INSERT INTO approval_requests (id, binding_hash, principal, action, \
                 action_properties, resource, context, policy_version, policy_ids, groups, \
                 current_groups, quorum, evidence, grant_ttl_secs, fallback_group, \
                 fallback_after_secs, status, created_at, expires_at, fallback_at, fell_back_at, \
                 decided_at, version, policy_text) \
                 VALUES ($1::uuid, $2, $3::jsonb, $4, $5::jsonb, $6::jsonb, $7::jsonb, $8, \
                 $9::jsonb, $10::jsonb, $11::jsonb, $12, $13::jsonb, $14, $15, $16, $17, $18, \
                 $19, $20, $21, $22, $23, $24::jsonb) \
                 ON CONFLICT (binding_hash) WHERE status = 'pending' DO NOTHING",
            )
            .bind(request.id.to_string())
            .bind(&request.binding_hash)
            .bind(&enc.principal)
            .bind(&request.action)
            .bind(&enc.action_properties)
            .bind(&enc.resource)
            .bind(&enc.context)
            .bind(&request.policy_version)
            .bind(&enc.policy_ids)
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
            .bind(&enc.policy_text)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            if inserted.rows_affected() == 1 {
                tx.commit().await.map_err(db_error)?;
                return Ok((request, true));
            }
            let existing: Option<RequestRow> = sqlx::query_as(concat!(
                "SELECT ",
                request_columns!(),
                " FROM approval_requests WHERE binding_hash = $1 AND status = 'pending'"
            ))
            .bind(&request.binding_hash)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            if let Some(row) = existing {
                return Ok((ApprovalRequest::try_from(row)?, false));
            }
            // The twin was decided between our insert and our read: try again.
        }
        Err(StoreError::Conflict(request.binding_hash))
    }

    async fn get(&self, id: Uuid) -> Result<Option<ApprovalRequest>, StoreError> {
        let row: Option<RequestRow> = sqlx::query_as(concat!(
            "SELECT ",
            request_columns!(),
            " FROM approval_requests WHERE id = $1::uuid"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(ApprovalRequest::try_from).transpose()
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<ApprovalRequest>, StoreError> {
        // An unknown cursor yields nothing rather than starting over from the beginning.
        let rows: Vec<RequestRow> = sqlx::query_as(concat!(
            "SELECT ",
            request_columns!(),
            " FROM approval_requests \
              WHERE ($1::text IS NULL OR status = $1) \
                AND ($2::text IS NULL OR current_groups @> jsonb_build_array($2::text)) \
                AND ($3::text IS NULL OR seq > \
                     COALESCE((SELECT seq FROM approval_requests WHERE id = $3::uuid), \
                              9223372036854775807)) \
              ORDER BY seq LIMIT $4"
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
        let mut tx = self.tx().await?;
        let request = lock_request(&mut tx, review.request_id)
            .await?
            .ok_or_else(|| not_found_request(review.request_id))?;
        let prior = fetch_reviews(&mut *tx, review.request_id).await?;
        let effect = apply_review(&request, &prior, &review, now)?;
        let inserted = sqlx::query(
            "INSERT INTO approval_reviews \
             (request_id, approver_id, approver_issuer, verdict, rationale, evidence, at) \
             VALUES ($1::uuid, $2, $3, $4, $5, $6::jsonb, $7)",
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
            "UPDATE approval_requests SET status = $1, decided_at = $2, version = version + 1 \
             WHERE id = $3::uuid AND version = $4 RETURNING ",
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
            sqlx::query(
                "INSERT INTO grants (id, request_id, binding_hash, policy_version, created_at, \
                 expires_at, revoked_at) VALUES ($1::uuid, $2::uuid, $3, $4, $5, $6, $7)",
            )
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
        let mut tx = self.tx().await?;
        let request = lock_request(&mut tx, id)
            .await?
            .ok_or_else(|| not_found_request(id))?;
        if request.status != Status::Pending {
            return Err(StoreError::NotPending {
                id,
                status: request.status,
            });
        }
        let updated: Option<RequestRow> = sqlx::query_as(concat!(
            "UPDATE approval_requests SET status = 'cancelled', decided_at = $1, \
             version = version + 1 WHERE id = $2::uuid AND version = $3 RETURNING ",
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
        let rows: Vec<RequestRow> = sqlx::query_as(concat!(
            "UPDATE approval_requests SET status = 'expired', decided_at = $1, \
             version = version + 1 WHERE status = 'pending' AND expires_at <= $1 RETURNING ",
            request_columns!()
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        requests(rows)
    }

    async fn fallback_due(&self, now: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
        let rows: Vec<RequestRow> = sqlx::query_as(concat!(
            "UPDATE approval_requests SET current_groups = jsonb_build_array(fallback_group), \
             fell_back_at = $1, version = version + 1 \
             WHERE status = 'pending' AND fallback_group IS NOT NULL AND fell_back_at IS NULL \
               AND fallback_at <= $1 AND expires_at > $1 RETURNING ",
            request_columns!()
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
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
            " FROM grants WHERE binding_hash = $1 AND revoked_at IS NULL AND expires_at > $2 \
              ORDER BY expires_at DESC LIMIT 1"
        ))
        .bind(binding_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(Grant::try_from).transpose()
    }

    async fn grants(&self, active_only: bool, now: i64) -> Result<Vec<Grant>, StoreError> {
        let rows: Vec<GrantRow> = sqlx::query_as(concat!(
            "SELECT ",
            grant_columns!(),
            " FROM grants WHERE NOT $1 OR (revoked_at IS NULL AND expires_at > $2) ORDER BY seq"
        ))
        .bind(active_only)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        grants(rows)
    }

    async fn revoke_grant(&self, id: Uuid, now: i64) -> Result<Grant, StoreError> {
        let mut tx = self.tx().await?;
        sqlx::query("UPDATE grants SET revoked_at = $1 WHERE id = $2::uuid AND revoked_at IS NULL")
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let row: Option<GrantRow> = sqlx::query_as(concat!(
            "SELECT ",
            grant_columns!(),
            " FROM grants WHERE id = $1::uuid"
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
