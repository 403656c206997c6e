//! The approval store, written once over a [`Dialect`]: every statement, transaction and
//! review rule lives here, for SQLite and PostgreSQL alike. A dialect supplies only what
//! really differs: a few SQL fragments (casts, JSON functions, row locking), the statement
//! that opens a writing transaction, and two hooks run inside transactions (the
//! per-principal lock of SECURITY A-16 and the announcement of grant changes).
//!
//! Parameters are numbered (`$1`) in both dialects: sqlx binds SQLite's `$N` by number, so
//! a parameter used twice is bound once (tested in `sqlite`).

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::database::Database;
use sqlx::encode::Encode;
use sqlx::pool::PoolConnection;
use sqlx::types::Type;
use sqlx::{
    Arguments, AssertSqlSafe, Executor, FromRow, IntoArguments, Pool, SqlSafeStr, SqlStr,
    Transaction,
};
use uuid::Uuid;

use super::{
    CheckpointRow, GrantRow, LimitCounts, RequestRow, ReviewRow, db_error, grants, not_found_grant,
    not_found_request, requests, to_json,
};
use crate::approval::{
    ApprovalRequest, ApprovalStore, EscalationLimits, Grant, ListFilter, NewRequest,
    PrincipalSnapshot, Review, ReviewOutcome, Status, StoreCounts, StoreError, apply_review,
};
use crate::audit::Checkpoint;

/// What differs between the SQL of SQLite and of PostgreSQL. Implemented for
/// [`sqlx::Sqlite`] and [`sqlx::Postgres`].
pub trait Dialect: Database {
    /// The statement that opens a transaction that writes.
    const BEGIN_WRITE: &'static str;
    /// The database admits one writer at a time (SQLite): writing transactions of this
    /// process then take turns on an in-process lock before they begin, instead of meeting
    /// the database's busy handler, which sleeps in steps of up to 100 ms between retries
    /// and made an escalation's tail latency (issue 10 point 9).
    const ONE_WRITER: bool;
    /// Whether ids and JSON have column types of their own (`uuid`, `jsonb`): then a text
    /// parameter is cast to the column's type, and such a column is read back as text.
    const CASTS: bool;
    /// Ends a `SELECT` of a row the transaction goes on to change.
    const FOR_UPDATE: &'static str;
    /// The table function over the elements of a JSON array, as text in column `value`.
    const JSON_EACH_TEXT: &'static str;
    /// The function that makes a JSON array of its arguments.
    const JSON_ARRAY: &'static str;
    /// The column that orders the reviews of a request as they were recorded.
    const REVIEW_ORDER: &'static str;

    /// The text at `key` of the JSON object in `column`, written exactly as the index on it.
    fn json_text(column: &str, key: &str) -> String;

    /// Make the creators of `principal`'s requests take turns until the transaction ends, so
    /// the escalation limits are counted and enforced atomically (SECURITY A-16).
    fn lock_requester(
        tx: &mut Self::Connection,
        principal: &PrincipalSnapshot,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Tell every process sharing the store that the grants of `binding_hash` changed, when
    /// (and only if) the transaction commits.
    fn announce_grant_change(
        tx: &mut Self::Connection,
        binding_hash: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// `::ty` where the dialect casts, else nothing.
fn cast<D: Dialect>(ty: &str) -> String {
    if D::CASTS {
        format!("::{ty}")
    } else {
        String::new()
    }
}

/// The columns of a request, a review and a grant, each `name` or `name:type` (the type of a
/// uuid or JSON column), in the order the inserts bind them.
const REQUEST_COLUMNS: &str = "id:uuid binding_hash principal:jsonb action \
     action_properties:jsonb resource:jsonb context:jsonb policy_version policy_ids:jsonb \
     policy_text:jsonb groups:jsonb current_groups:jsonb quorum evidence:jsonb grant_ttl_secs \
     grant_scope fallback_group fallback_after_secs status created_at expires_at fallback_at fell_back_at \
     decided_at version";
const REVIEW_COLUMNS: &str =
    "request_id:uuid approver_id approver_issuer verdict rationale evidence:jsonb at";
const GRANT_COLUMNS: &str =
    "id:uuid request_id:uuid binding_hash policy_version created_at expires_at revoked_at";

/// `(name, type)` of each of `columns`, the type empty for a plain column.
fn columns(columns: &'static str) -> impl Iterator<Item = (&'static str, &'static str)> {
    columns
        .split_whitespace()
        .map(|c| c.split_once(':').unwrap_or((c, "")))
}

/// The select list of `columns`, every one read as text or integer so both dialects decode
/// the same row types.
fn select_list<D: Dialect>(list: &'static str) -> String {
    let read = |(name, ty): (&str, &str)| match ty {
        "" => name.to_owned(),
        _ => format!("{name}{} AS {name}", cast::<D>("text")),
    };
    columns(list).map(read).collect::<Vec<_>>().join(", ")
}

/// `INSERT INTO table (columns) VALUES ($1, ...)`, each parameter cast to its column's type.
fn insert<D: Dialect>(table: &str, list: &'static str) -> String {
    let names: Vec<&str> = columns(list).map(|(name, _)| name).collect();
    let values: Vec<String> = (1..)
        .zip(columns(list))
        .map(|(n, (_, ty))| match ty {
            "" => format!("${n}"),
            _ => format!("${n}{}", cast::<D>(ty)),
        })
        .collect();
    format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        names.join(", "),
        values.join(", ")
    )
}

/// The statements of a dialect, rendered once per store. Each is documented with its
/// parameters.
#[derive(Debug)]
struct Statements {
    /// `$1` binding hash, `$2` now: a pending twin already past its expiry would refuse every
    /// review, so it is expired first and the agent's retry gets a fresh request.
    expire_stale_twin: SqlStr,
    /// `$1` binding hash: its pending request.
    pending_twin: SqlStr,
    /// `$1` binding hash, `$2..$4` principal id, issuer and kind, `$5` now, `$6` start of the
    /// hourly window: [`LimitCounts`].
    limit_counts: SqlStr,
    /// [`REQUEST_COLUMNS`]; returns the new `seq` when it inserts, nothing when the binding
    /// hash has a pending request already.
    insert_request: SqlStr,
    /// `$1` id.
    request: SqlStr,
    /// `$1` id, the row locked for the rest of the transaction.
    request_for_update: SqlStr,
    /// `$1` JSON array of ids.
    requests_by_id: SqlStr,
    /// `$1` status, `$2` group, `$3` cursor (each may be null), `$4` limit.
    list: SqlStr,
    /// `$1` request id.
    reviews: SqlStr,
    /// [`REVIEW_COLUMNS`].
    insert_review: SqlStr,
    /// `$1` status, `$2` decided at, `$3` id, `$4` expected version.
    decide: SqlStr,
    /// `$1` now.
    expire_due: SqlStr,
    /// `$1` now.
    fallback_due: SqlStr,
    /// [`GRANT_COLUMNS`].
    insert_grant: SqlStr,
    /// `$1` binding hash, `$2` now.
    active_grant: SqlStr,
    /// `$1` id.
    grant: SqlStr,
    /// `$1` active only, `$2` now.
    grants: SqlStr,
    /// `$1` now, `$2` id.
    revoke_grant: SqlStr,
    /// `$1` log id, `$2` seq, `$3` hash, `$4` at, `$5` key id, `$6` signature; a checkpoint
    /// already kept is left as it is.
    insert_checkpoint: SqlStr,
    /// `$1` log id: its checkpoints in order.
    checkpoints: SqlStr,
    /// `$1` now: (group, count) of the unexpired pending requests each group may approve.
    pending_by_group: SqlStr,
    /// `$1` now: the number of active grants.
    active_grant_count: SqlStr,
}

/// A statement rendered for a dialect. Its only inputs are this module's constants and the
/// dialect's fragments, never a value: those are bound.
fn sql(text: String) -> SqlStr {
    AssertSqlSafe(Arc::<str>::from(text)).into_sql_str()
}

impl Statements {
    fn new<D: Dialect>() -> Self {
        let (uuid, json, text) = (cast::<D>("uuid"), cast::<D>("jsonb"), cast::<D>("text"));
        let (json_each, json_array) = (D::JSON_EACH_TEXT, D::JSON_ARRAY);
        let request = select_list::<D>(REQUEST_COLUMNS);
        let grant = select_list::<D>(GRANT_COLUMNS);
        let principal_is = format!(
            "{} = $2 AND {} = $3 AND {} = $4",
            D::json_text("principal", "id"),
            D::json_text("principal", "issuer"),
            D::json_text("principal", "kind"),
        );
        let get_request = format!("SELECT {request} FROM approval_requests WHERE id = $1{uuid}");
        Self {
            expire_stale_twin: "UPDATE approval_requests SET status = 'expired', \
                 decided_at = $2, version = version + 1 \
                 WHERE binding_hash = $1 AND status = 'pending' AND expires_at <= $2"
                .into_sql_str(),
            pending_twin: sql(format!(
                "SELECT {request} FROM approval_requests \
                 WHERE binding_hash = $1 AND status = 'pending'"
            )),
            limit_counts: sql(format!(
                "SELECT \
                   EXISTS (SELECT 1 FROM approval_requests \
                           WHERE binding_hash = $1 AND status = 'pending') AS twin, \
                   (SELECT COUNT(*) FROM approval_requests \
                     WHERE {principal_is} AND status = 'pending' AND expires_at > $5) AS pending, \
                   (SELECT COUNT(*) FROM approval_requests \
                     WHERE {principal_is} AND created_at > $6) AS recent"
            )),
            // The partial unique index decides between concurrent creators: the loser's
            // insert waits for the winner's commit and then does nothing.
            insert_request: sql(format!(
                "{} ON CONFLICT (binding_hash) WHERE status = 'pending' DO NOTHING RETURNING seq",
                insert::<D>("approval_requests", REQUEST_COLUMNS)
            )),
            request_for_update: sql(format!("{get_request}{}", D::FOR_UPDATE)),
            request: sql(get_request),
            requests_by_id: sql(format!(
                "SELECT {request} FROM approval_requests \
                 WHERE id IN (SELECT value{uuid} FROM {json_each}($1{json}))"
            )),
            // An unknown cursor yields nothing rather than starting over from the beginning.
            list: sql(format!(
                "SELECT {request} FROM approval_requests \
                  WHERE ($1{text} IS NULL OR status = $1) \
                    AND ($2{text} IS NULL OR EXISTS \
                         (SELECT 1 FROM {json_each}(current_groups) WHERE value = $2)) \
                    AND ($3{text} IS NULL OR seq > \
                         COALESCE((SELECT seq FROM approval_requests WHERE id = $3{uuid}), \
                                  9223372036854775807)) \
                  ORDER BY seq LIMIT $4"
            )),
            reviews: sql(format!(
                "SELECT {} FROM approval_reviews WHERE request_id = $1{uuid} ORDER BY {}",
                select_list::<D>(REVIEW_COLUMNS),
                D::REVIEW_ORDER
            )),
            insert_review: sql(insert::<D>("approval_reviews", REVIEW_COLUMNS)),
            decide: sql(format!(
                "UPDATE approval_requests SET status = $1, decided_at = $2, version = version + 1 \
                 WHERE id = $3{uuid} AND version = $4 RETURNING {request}"
            )),
            expire_due: sql(format!(
                "UPDATE approval_requests SET status = 'expired', decided_at = $1, \
                 version = version + 1 WHERE status = 'pending' AND expires_at <= $1 \
                 RETURNING {request}"
            )),
            fallback_due: sql(format!(
                "UPDATE approval_requests SET current_groups = {json_array}(fallback_group), \
                 fell_back_at = $1, version = version + 1 \
                 WHERE status = 'pending' AND fallback_group IS NOT NULL AND fell_back_at IS NULL \
                   AND fallback_at <= $1 AND expires_at > $1 RETURNING {request}"
            )),
            insert_grant: sql(insert::<D>("grants", GRANT_COLUMNS)),
            active_grant: sql(format!(
                "SELECT {grant} FROM grants \
                 WHERE binding_hash = $1 AND revoked_at IS NULL AND expires_at > $2 \
                 ORDER BY expires_at DESC LIMIT 1"
            )),
            grant: sql(format!("SELECT {grant} FROM grants WHERE id = $1{uuid}")),
            grants: sql(format!(
                "SELECT {grant} FROM grants \
                 WHERE NOT $1 OR (revoked_at IS NULL AND expires_at > $2) ORDER BY seq"
            )),
            revoke_grant: sql(format!(
                "UPDATE grants SET revoked_at = $1 WHERE id = $2{uuid} AND revoked_at IS NULL"
            )),
            insert_checkpoint: "INSERT INTO audit_checkpoints \
                 (log_id, seq, hash, at, key_id, signature) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (log_id, seq) DO NOTHING"
                .into_sql_str(),
            checkpoints: "SELECT seq, hash, at, key_id, signature FROM audit_checkpoints \
                 WHERE log_id = $1 ORDER BY seq"
                .into_sql_str(),
            pending_by_group: sql(format!(
                "SELECT value, COUNT(*) FROM approval_requests, {json_each}(current_groups) \
                  WHERE status = 'pending' AND expires_at > $1 GROUP BY value ORDER BY value"
            )),
            active_grant_count: "SELECT COUNT(*) FROM grants \
                 WHERE revoked_at IS NULL AND expires_at > $1"
                .into_sql_str(),
        }
    }
}

/// The values of `r`'s [`REQUEST_COLUMNS`], in order, JSON encoded once for every attempt.
fn request_values(r: &ApprovalRequest) -> Result<Vec<Arg>, StoreError> {
    Ok(vec![
        r.id.into(),
        r.binding_hash.as_str().into(),
        to_json(&r.principal)?.into(),
        r.action.as_str().into(),
        r.action_properties
            .as_ref()
            .map(to_json)
            .transpose()?
            .into(),
        to_json(&r.resource)?.into(),
        to_json(&r.context)?.into(),
        r.policy_version.as_str().into(),
        to_json(&r.policy_ids)?.into(),
        to_json(&r.policy_text)?.into(),
        to_json(&r.groups)?.into(),
        to_json(&r.current_groups)?.into(),
        i64::from(r.quorum).into(),
        to_json(&r.evidence)?.into(),
        crate::approval::secs(r.grant_ttl).into(),
        r.grant_scope.as_str().into(),
        r.fallback.as_ref().map(|f| f.group.as_str()).into(),
        r.fallback
            .as_ref()
            .map(|f| crate::approval::secs(f.after))
            .into(),
        r.status.as_str().into(),
        r.created_at.into(),
        r.expires_at.into(),
        r.fallback_at.into(),
        r.fell_back_at.into(),
        r.decided_at.into(),
        r.version.into(),
    ])
}

/// How often `create_or_get_pending` retries when the pending twin it collided with left
/// `pending` before it could be read (PostgreSQL: another sidecar decided it meanwhile).
const CREATE_ATTEMPTS: usize = 5;

/// One value bound to a statement parameter.
#[derive(Debug, Clone)]
pub(super) enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(bool),
}

macro_rules! arg_from {
    ($($ty:ty => |$v:ident| $arg:expr;)*) => {
        $(impl From<$ty> for Arg {
            fn from($v: $ty) -> Self {
                $arg
            }
        })*
    };
}

arg_from! {
    &str => |v| Arg::Text(Some(v.to_owned()));
    String => |v| Arg::Text(Some(v));
    Option<String> => |v| Arg::Text(v);
    Option<&str> => |v| Arg::Text(v.map(str::to_owned));
    Uuid => |v| Arg::Text(Some(v.to_string()));
    i64 => |v| Arg::Int(Some(v));
    Option<i64> => |v| Arg::Int(v);
    bool => |v| Arg::Bool(v);
}

/// A statement with its arguments, run by [`Execute`] or [`Fetch`].
#[derive(Debug)]
pub(super) struct Stmt {
    sql: SqlStr,
    args: Vec<Arg>,
}

impl Stmt {
    fn new(sql: &SqlStr) -> Self {
        Self {
            sql: sql.clone(),
            args: Vec::new(),
        }
    }

    fn bind(mut self, arg: impl Into<Arg>) -> Self {
        self.args.push(arg.into());
        self
    }

    fn bind_all(mut self, args: &[Arg]) -> Self {
        self.args.extend_from_slice(args);
        self
    }
}

/// Runs statements that return no rows. sqlx's generic API wants a bound for each type that
/// is bound or decoded; they are stated once, here and on [`Fetch`], and hold for every
/// dialect.
pub(super) trait Execute: Dialect {
    fn arguments(args: Vec<Arg>) -> Result<Self::Arguments, StoreError>;

    fn execute(
        conn: &mut Self::Connection,
        stmt: Stmt,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl<D> Execute for D
where
    D: Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> String: Encode<'q, D> + Type<D>,
    for<'q> Option<String>: Encode<'q, D>,
    for<'q> i64: Encode<'q, D> + Type<D>,
    for<'q> Option<i64>: Encode<'q, D>,
    for<'q> bool: Encode<'q, D> + Type<D>,
{
    fn arguments(args: Vec<Arg>) -> Result<D::Arguments, StoreError> {
        let mut out = D::Arguments::default();
        for arg in args {
            match arg {
                Arg::Text(v) => out.add(v),
                Arg::Int(v) => out.add(v),
                Arg::Bool(v) => out.add(v),
            }
            .map_err(|e| StoreError::Unavailable(format!("cannot bind a parameter: {e}")))?;
        }
        Ok(out)
    }

    async fn execute(conn: &mut D::Connection, stmt: Stmt) -> Result<(), StoreError> {
        let args = D::arguments(stmt.args)?;
        sqlx::query_with(stmt.sql, args)
            .execute(conn)
            .await
            .map_err(db_error)?;
        Ok(())
    }
}

/// Runs statements that return rows of type `O`.
pub(super) trait Fetch<O>: Execute {
    fn fetch(
        conn: &mut Self::Connection,
        stmt: Stmt,
    ) -> impl Future<Output = Result<Vec<O>, StoreError>> + Send;
}

impl<D, O> Fetch<O> for D
where
    D: Execute,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    O: for<'r> FromRow<'r, D::Row> + Send + Unpin,
{
    async fn fetch(conn: &mut D::Connection, stmt: Stmt) -> Result<Vec<O>, StoreError> {
        let args = D::arguments(stmt.args)?;
        sqlx::query_as_with(stmt.sql, args)
            .fetch_all(conn)
            .await
            .map_err(db_error)
    }
}

/// The rows of type `O` that `stmt` returns. (`D::fetch` names `O` only through the type
/// it returns, which inference does not follow for a trait parameter.)
fn rows<D: Fetch<O>, O>(
    conn: &mut D::Connection,
    stmt: Stmt,
) -> impl Future<Output = Result<Vec<O>, StoreError>> + Send {
    D::fetch(conn, stmt)
}

/// Everything the store runs, in one bound.
pub(super) trait Run:
    Fetch<RequestRow>
    + Fetch<ReviewRow>
    + Fetch<GrantRow>
    + Fetch<LimitCounts>
    + Fetch<CheckpointRow>
    + Fetch<(i64,)>
    + Fetch<(String, i64)>
{
}

impl<D> Run for D where
    D: Fetch<RequestRow>
        + Fetch<ReviewRow>
        + Fetch<GrantRow>
        + Fetch<LimitCounts>
        + Fetch<CheckpointRow>
        + Fetch<(i64,)>
        + Fetch<(String, i64)>
{
}

/// The request the statement returns, if any.
async fn fetch_request<D: Run>(
    conn: &mut D::Connection,
    stmt: Stmt,
) -> Result<Option<ApprovalRequest>, StoreError> {
    let rows: Vec<RequestRow> = rows::<D, _>(conn, stmt).await?;
    rows.into_iter()
        .next()
        .map(ApprovalRequest::try_from)
        .transpose()
}

/// The grant the statement returns, if any.
async fn fetch_grant<D: Run>(
    conn: &mut D::Connection,
    stmt: Stmt,
) -> Result<Option<Grant>, StoreError> {
    let rows: Vec<GrantRow> = rows::<D, _>(conn, stmt).await?;
    rows.into_iter().next().map(Grant::try_from).transpose()
}

/// Approval store in a SQL database of dialect `D`; see [`SqliteStore`](super::SqliteStore)
/// and [`PostgresStore`](super::PostgresStore).
pub struct SqlStore<D: Dialect> {
    pool: Pool<D>,
    sql: Arc<Statements>,
    /// Whose turn it is to write, when the dialect admits [one writer](Dialect::ONE_WRITER).
    turn: Arc<tokio::sync::Mutex<()>>,
}

/// A writing transaction, holding the process's write turn (if the dialect needs one) until
/// it commits or is dropped.
struct WriteTx<D: Dialect> {
    tx: Transaction<'static, D>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<D: Dialect> WriteTx<D> {
    async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(db_error)
    }
}

impl<D: Dialect> std::ops::Deref for WriteTx<D> {
    type Target = Transaction<'static, D>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl<D: Dialect> std::ops::DerefMut for WriteTx<D> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl<D: Dialect> std::fmt::Debug for SqlStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("pool", &self.pool)
            .finish()
    }
}

impl<D: Dialect> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            sql: Arc::clone(&self.sql),
            turn: Arc::clone(&self.turn),
        }
    }
}

impl<D: Dialect> SqlStore<D> {
    /// A store over `pool`, whose schema is up to date.
    pub(super) fn new(pool: Pool<D>) -> Self {
        Self {
            pool,
            sql: Arc::new(Statements::new::<D>()),
            turn: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The connection pool, for checks of the connection settings and the schema.
    pub fn pool(&self) -> &Pool<D> {
        &self.pool
    }

    /// Close every connection; pending writes are already committed.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn conn(&self) -> Result<PoolConnection<D>, StoreError> {
        self.pool.acquire().await.map_err(db_error)
    }

    async fn write_tx(&self) -> Result<WriteTx<D>, StoreError> {
        let turn = if D::ONE_WRITER {
            Some(Arc::clone(&self.turn).lock_owned().await)
        } else {
            None
        };
        let tx = self
            .pool
            .begin_with(D::BEGIN_WRITE)
            .await
            .map_err(db_error)?;
        Ok(WriteTx { tx, _turn: turn })
    }
}

/// One attempt of `create_or_get_pending`: `None` when the pending twin
/// it collided with was decided before it could be read.
async fn create_once<D: Run>(
    store: &SqlStore<D>,
    request: &ApprovalRequest,
    values: &[Arg],
    limits: &EscalationLimits,
) -> Result<Option<(ApprovalRequest, bool)>, StoreError> {
    let mut tx = store.write_tx().await?;
    D::lock_requester(&mut tx, &request.principal).await?;
    let expire = Stmt::new(&store.sql.expire_stale_twin)
        .bind(request.binding_hash.as_str())
        .bind(request.created_at);
    D::execute(&mut tx, expire).await?;
    let counts = Stmt::new(&store.sql.limit_counts)
        .bind(request.binding_hash.as_str())
        .bind(request.principal.id.as_str())
        .bind(request.principal.issuer.as_str())
        .bind(request.principal.kind.as_str())
        .bind(request.created_at)
        .bind(
            request
                .created_at
                .saturating_sub(EscalationLimits::WINDOW_SECS),
        );
    let counts: Vec<LimitCounts> = rows::<D, _>(&mut tx, counts).await?;
    counts
        .first()
        .ok_or_else(|| StoreError::Corrupt("escalation limit counts: no row".into()))?
        .check(request, limits)?;
    let insert = Stmt::new(&store.sql.insert_request).bind_all(values);
    let inserted: Vec<(i64,)> = rows::<D, _>(&mut tx, insert).await?;
    if !inserted.is_empty() {
        tx.commit().await?;
        return Ok(Some((request.clone(), true)));
    }
    let twin = Stmt::new(&store.sql.pending_twin).bind(request.binding_hash.as_str());
    let existing = fetch_request::<D>(&mut tx, twin).await?;
    tx.commit().await?;
    Ok(existing.map(|r| (r, false)))
}

/// Run a sweep (`expire_due`, `fallback_due`: `$1` now) in a transaction of its own;
/// returns the requests it changed.
async fn sweep<D: Run>(
    store: &SqlStore<D>,
    sql: &SqlStr,
    now: i64,
) -> Result<Vec<ApprovalRequest>, StoreError> {
    let mut tx = store.write_tx().await?;
    let changed: Vec<RequestRow> = rows::<D, _>(&mut tx, Stmt::new(sql).bind(now)).await?;
    tx.commit().await?;
    requests(changed)
}

/// The request `id`, locked for the rest of the transaction.
async fn lock_request<D: Run>(
    sql: &Statements,
    tx: &mut D::Connection,
    id: Uuid,
) -> Result<ApprovalRequest, StoreError> {
    fetch_request::<D>(tx, Stmt::new(&sql.request_for_update).bind(id))
        .await?
        .ok_or_else(|| not_found_request(id))
}

/// The reviews of request `id`, in the order they were recorded.
async fn reviews_of<D: Run>(
    sql: &Statements,
    conn: &mut D::Connection,
    id: Uuid,
) -> Result<Vec<Review>, StoreError> {
    let found: Vec<ReviewRow> = rows::<D, _>(conn, Stmt::new(&sql.reviews).bind(id)).await?;
    found.into_iter().map(Review::try_from).collect()
}

#[async_trait]
impl<D: Run> ApprovalStore for SqlStore<D> {
    async fn create_or_get_pending(
        &self,
        req: NewRequest,
    ) -> Result<(ApprovalRequest, bool), StoreError> {
        let limits = req.limits;
        let request = req.into_pending();
        let values = request_values(&request)?;
        for _ in 0..CREATE_ATTEMPTS {
            if let Some(done) = create_once(self, &request, &values, &limits).await? {
                return Ok(done);
            }
        }
        Err(StoreError::Conflict(request.binding_hash))
    }

    async fn get(&self, id: Uuid) -> Result<Option<ApprovalRequest>, StoreError> {
        fetch_request::<D>(
            &mut *self.conn().await?,
            Stmt::new(&self.sql.request).bind(id),
        )
        .await
    }

    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<ApprovalRequest>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let stmt = Stmt::new(&self.sql.requests_by_id).bind(to_json(&ids)?.as_str());
        requests(rows::<D, _>(&mut *self.conn().await?, stmt).await?)
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<ApprovalRequest>, StoreError> {
        let stmt = Stmt::new(&self.sql.list)
            .bind(filter.status.map(Status::as_str))
            .bind(filter.group.as_deref())
            .bind(filter.after.map(|u| u.to_string()).as_deref())
            .bind(filter.effective_limit());
        requests(rows::<D, _>(&mut *self.conn().await?, stmt).await?)
    }

    async fn reviews(&self, id: Uuid) -> Result<Vec<Review>, StoreError> {
        reviews_of::<D>(&self.sql, &mut *self.conn().await?, id).await
    }

    async fn review(&self, review: Review, now: i64) -> Result<ReviewOutcome, StoreError> {
        let mut tx = self.write_tx().await?;
        let request = lock_request::<D>(&self.sql, &mut tx, review.request_id).await?;
        let prior = reviews_of::<D>(&self.sql, &mut tx, review.request_id).await?;
        let effect = apply_review(&request, &prior, &review, now)?;
        let insert = Stmt::new(&self.sql.insert_review)
            .bind(review.request_id)
            .bind(review.approver_id.as_str())
            .bind(review.approver_issuer.as_str())
            .bind(review.verdict.as_str())
            .bind(review.rationale.as_str())
            .bind(to_json(&review.evidence)?.as_str())
            .bind(review.at);
        match D::execute(&mut tx, insert).await {
            Ok(()) => {}
            // `db_error` reports the violated (request, approver) key as a conflict.
            Err(StoreError::Conflict(_)) => {
                return Err(StoreError::AlreadyReviewed {
                    id: review.request_id,
                    approver: review.approver_id,
                });
            }
            Err(e) => return Err(e),
        }
        let decide = Stmt::new(&self.sql.decide)
            .bind(effect.status.as_str())
            .bind(effect.decided_at)
            .bind(request.id)
            .bind(request.version);
        let updated = fetch_request::<D>(&mut tx, decide)
            .await?
            .ok_or_else(|| StoreError::Conflict(request.id.to_string()))?;
        if let Some(grant) = &effect.grant {
            let insert = Stmt::new(&self.sql.insert_grant)
                .bind(grant.id)
                .bind(grant.request_id)
                .bind(grant.binding_hash.as_str())
                .bind(grant.policy_version.as_str())
                .bind(grant.created_at)
                .bind(grant.expires_at)
                .bind(grant.revoked_at);
            D::execute(&mut tx, insert).await?;
            D::announce_grant_change(&mut tx, &grant.binding_hash).await?;
        }
        tx.commit().await?;
        Ok(ReviewOutcome {
            request: updated,
            grant: effect.grant,
        })
    }

    async fn cancel(&self, id: Uuid, now: i64) -> Result<ApprovalRequest, StoreError> {
        let mut tx = self.write_tx().await?;
        let request = lock_request::<D>(&self.sql, &mut tx, id).await?;
        if request.status != Status::Pending {
            return Err(StoreError::NotPending {
                id,
                status: request.status,
            });
        }
        let decide = Stmt::new(&self.sql.decide)
            .bind(Status::Cancelled.as_str())
            .bind(now)
            .bind(id)
            .bind(request.version);
        let updated = fetch_request::<D>(&mut tx, decide)
            .await?
            .ok_or_else(|| StoreError::Conflict(id.to_string()))?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn expire_due(&self, now: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
        sweep(self, &self.sql.expire_due, now).await
    }

    async fn fallback_due(&self, now: i64) -> Result<Vec<ApprovalRequest>, StoreError> {
        sweep(self, &self.sql.fallback_due, now).await
    }

    async fn active_grant(
        &self,
        binding_hash: &str,
        now: i64,
    ) -> Result<Option<Grant>, StoreError> {
        let stmt = Stmt::new(&self.sql.active_grant)
            .bind(binding_hash)
            .bind(now);
        fetch_grant::<D>(&mut *self.conn().await?, stmt).await
    }

    async fn get_grant(&self, id: Uuid) -> Result<Option<Grant>, StoreError> {
        fetch_grant::<D>(
            &mut *self.conn().await?,
            Stmt::new(&self.sql.grant).bind(id),
        )
        .await
    }

    async fn grants(&self, active_only: bool, now: i64) -> Result<Vec<Grant>, StoreError> {
        let stmt = Stmt::new(&self.sql.grants).bind(active_only).bind(now);
        grants(rows::<D, _>(&mut *self.conn().await?, stmt).await?)
    }

    async fn revoke_grant(&self, id: Uuid, now: i64) -> Result<Grant, StoreError> {
        let mut tx = self.write_tx().await?;
        D::execute(
            &mut tx,
            Stmt::new(&self.sql.revoke_grant).bind(now).bind(id),
        )
        .await?;
        let grant = fetch_grant::<D>(&mut tx, Stmt::new(&self.sql.grant).bind(id))
            .await?
            .ok_or_else(|| not_found_grant(id))?;
        // Announced even when it was revoked already: one more invalidation costs nothing.
        D::announce_grant_change(&mut tx, &grant.binding_hash).await?;
        tx.commit().await?;
        Ok(grant)
    }

    async fn put_checkpoint(&self, log_id: &str, cp: &Checkpoint) -> Result<(), StoreError> {
        let seq = i64::try_from(cp.seq)
            .map_err(|_| StoreError::Conflict(format!("checkpoint seq {} is too large", cp.seq)))?;
        let stmt = Stmt::new(&self.sql.insert_checkpoint)
            .bind(log_id)
            .bind(seq)
            .bind(cp.hash.as_str())
            .bind(cp.at)
            .bind(cp.key_id.as_str())
            .bind(cp.signature.as_str());
        D::execute(&mut *self.conn().await?, stmt).await
    }

    async fn checkpoints(&self, log_id: &str) -> Result<Vec<Checkpoint>, StoreError> {
        let stmt = Stmt::new(&self.sql.checkpoints).bind(log_id);
        let rows: Vec<CheckpointRow> = rows::<D, _>(&mut *self.conn().await?, stmt).await?;
        rows.into_iter().map(Checkpoint::try_from).collect()
    }

    async fn counts(&self, now: i64) -> Result<StoreCounts, StoreError> {
        let mut conn = self.conn().await?;
        let stmt = Stmt::new(&self.sql.pending_by_group).bind(now);
        let pending: Vec<(String, i64)> = rows::<D, _>(&mut conn, stmt).await?;
        let stmt = Stmt::new(&self.sql.active_grant_count).bind(now);
        let grants: Vec<(i64,)> = rows::<D, _>(&mut conn, stmt).await?;
        Ok(StoreCounts {
            pending_by_group: pending
                .into_iter()
                .map(|(g, n)| (g, u64::try_from(n).unwrap_or(0)))
                .collect(),
            active_grants: grants
                .first()
                .map_or(0, |(n,)| u64::try_from(*n).unwrap_or(0)),
        })
    }
}
