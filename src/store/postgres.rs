//! The PostgreSQL backend: a fleet of sidecars shares approvals and grants. A review locks its
//! request row (`SELECT ... FOR UPDATE`) for the whole transaction, so concurrent reviews of
//! one request are applied one after the other, whichever sidecar receives them; the version
//! compare-and-swap on the update is the second line of defence.
//!
//! Grant changes reach every sidecar's grant cache by LISTEN/NOTIFY: the transaction that
//! creates or revokes a grant sends its binding hash on [`GRANT_CHANNEL`], and
//! [`listen_grant_changes`] invalidates it in this process's cache, distrusting the whole
//! cache whenever the listening connection is not known to be alive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{
    ACQUIRE_TIMEOUT, EncodedRequest, GrantRow, LimitCounts, RequestRow, ReviewRow, db_error,
    grants, is_unique_violation, migrate_error, not_found_grant, not_found_request, requests,
    to_json,
};
use crate::approval::{
    ApprovalRequest, ApprovalStore, EscalationLimits, Grant, GrantCache, ListFilter, NewRequest,
    Review, ReviewOutcome, Status, StoreError, apply_review,
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

/// Tell every sidecar's grant cache that the grants of `binding_hash` changed. `pg_notify` in
/// the transaction: delivered when (and only if) it commits.
async fn announce_grant_change(
    tx: &mut Transaction<'static, Postgres>,
    binding_hash: &str,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(GRANT_CHANNEL)
        .bind(binding_hash)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    Ok(())
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

    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<ApprovalRequest>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let rows: Vec<RequestRow> = sqlx::query_as(concat!(
            "SELECT ",
            request_columns!(),
            " FROM approval_requests WHERE id = ANY($1::uuid[])"
        ))
        .bind(ids)
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
            announce_grant_change(&mut tx, &grant.binding_hash).await?;
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

    async fn get_grant(&self, id: Uuid) -> Result<Option<Grant>, StoreError> {
        let row: Option<GrantRow> = sqlx::query_as(concat!(
            "SELECT ",
            grant_columns!(),
            " FROM grants WHERE id = $1::uuid"
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
        let grant = row
            .map(Grant::try_from)
            .transpose()?
            .ok_or_else(|| not_found_grant(id))?;
        // Announced even when it was revoked already: one more invalidation costs nothing.
        announce_grant_change(&mut tx, &grant.binding_hash).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(grant)
    }
}

/// The notification channel grant changes are announced on, with the binding hash as payload.
/// Channels belong to the database, not to a schema: fleets in different schemas of one
/// database now and then invalidate each other's entries, which costs a store read, nothing
/// more.
pub const GRANT_CHANNEL: &str = "mandate_grants";

/// `application_name` of the listening connection, so an operator sees it in
/// `pg_stat_activity` (and a test can cut it).
pub const LISTENER_APPLICATION_NAME: &str = "mandate-grant-listener";

/// How long the listener waits for a notification before it checks that its connection is
/// alive (a connection that died silently would deliver nothing, and say nothing).
const LISTENER_PING_EVERY: Duration = Duration::from_secs(5);
/// How long that check may take before the connection is given up.
const LISTENER_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// First and longest wait between two connection attempts of the listener.
const LISTENER_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Keep `cache` coherent with the grant changes every process sharing the database at `url`
/// makes, until `stop`. The cache is distrusted (every lookup reads the store) from the
/// start and whenever the listening connection is lost or does not answer a ping; it is
/// flushed and trusted again only once `LISTEN` is in place on a new connection.
pub async fn listen_grant_changes(
    url: String,
    cache: Arc<GrantCache>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut backoff = LISTENER_BACKOFF.0;
    loop {
        cache.distrust();
        let connected = tokio::select! {
            r = connect_listener(&url) => r,
            () = &mut stop => return,
        };
        match connected {
            Ok(mut listener) => {
                // From here on no change goes unheard; what was cached before may be stale.
                cache.trust();
                backoff = LISTENER_BACKOFF.0;
                tracing::info!(
                    channel = GRANT_CHANNEL,
                    "grant change listener connected; grant cache in use"
                );
                let why = tokio::select! {
                    why = hear(&mut listener, &cache) => why,
                    () = &mut stop => return,
                };
                cache.distrust();
                tracing::warn!(
                    error = %why,
                    "grant change listener lost; the grant cache is bypassed until it reconnects"
                );
            }
            Err(e) => tracing::warn!(
                error = %e,
                "grant change listener cannot connect; the grant cache is bypassed"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = &mut stop => return,
        }
        backoff = (backoff * 2).min(LISTENER_BACKOFF.1);
    }
}

/// A listener on [`GRANT_CHANNEL`] that reports a lost connection instead of reconnecting
/// behind our back (notifications sent meanwhile would be lost without a word).
async fn connect_listener(url: &str) -> Result<PgListener, String> {
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()
        .map_err(|e| format!("invalid postgres url: {e}"))?
        .application_name(LISTENER_APPLICATION_NAME);
    let connect = async {
        // A pool of one, as `PgListener::connect` makes, only to name the connection.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.ignore_pool_close_event(true);
        listener.eager_reconnect(false);
        listener.listen(GRANT_CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match tokio::time::timeout(ACQUIRE_TIMEOUT, connect).await {
        Ok(Ok(listener)) => Ok(listener),
        // The URL may carry a password: the error names the host, never the URL.
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {ACQUIRE_TIMEOUT:?}")),
    }
}

/// Invalidate the binding hash each notification names; return why the connection can no
/// longer be relied on.
async fn hear(listener: &mut PgListener, cache: &GrantCache) -> String {
    loop {
        // `try_recv` is cancel-safe: a timeout loses no notification.
        match tokio::time::timeout(LISTENER_PING_EVERY, listener.try_recv()).await {
            Ok(Ok(Some(n))) => cache.invalidate(n.payload()),
            Ok(Ok(None)) => return "connection lost".into(),
            Ok(Err(e)) => return e.to_string(),
            Err(_) => {
                let ping = sqlx::query("SELECT 1").execute(&mut *listener);
                match tokio::time::timeout(LISTENER_PING_TIMEOUT, ping).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("ping failed: {e}"),
                    Err(_) => return format!("ping unanswered within {LISTENER_PING_TIMEOUT:?}"),
                }
            }
        }
    }
}
