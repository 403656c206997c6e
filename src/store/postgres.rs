//! The PostgreSQL dialect: a fleet of sidecars shares approvals and grants. A review locks its
//! request row (`SELECT ... FOR UPDATE`) for the whole transaction, so concurrent reviews of
//! one request are applied one after the other, whichever sidecar receives them; the version
//! compare-and-swap on the update is the second line of defence. Ids are `uuid` and JSON is
//! `jsonb`; both are read as text so the two dialects decode the same rows.
//!
//! Grant changes reach every sidecar's grant cache by LISTEN/NOTIFY: the transaction that
//! creates or revokes a grant sends its binding hash on [`GRANT_CHANNEL`], and
//! [`listen_grant_changes`] invalidates it in this process's cache, distrusting the whole
//! cache whenever the listening connection is not known to be alive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Postgres;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};

use super::sql::{Dialect, SqlStore};
use super::{ACQUIRE_TIMEOUT, db_error, migrate_error, to_json};
use crate::approval::{GrantCache, PrincipalSnapshot, StoreError};

/// A statement that runs longer than this is cancelled by the server: a stuck lock must not
/// hold a decision forever.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Approval store in a PostgreSQL database (the schema is whatever `search_path` names).
pub type PostgresStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
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
        Ok(Self::new(pool))
    }
}

/// First key of the advisory locks that serialize the creation of one principal's requests
/// (the two-key form keeps them apart from single-key locks such as sqlx's migration lock).
const REQUESTER_LOCK_CLASS: i32 = 0x4d41_4e44; // "MAND"

impl Dialect for Postgres {
    const BEGIN_WRITE: &'static str = "BEGIN";
    const ONE_WRITER: bool = false;
    const CASTS: bool = true;
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const JSON_EACH_TEXT: &'static str = "jsonb_array_elements_text";
    const JSON_ARRAY: &'static str = "jsonb_build_array";
    const REVIEW_ORDER: &'static str = "seq";

    /// The expression indexed by `approval_requests_requester` for the key `id`.
    fn json_text(column: &str, key: &str) -> String {
        format!("{column}->>'{key}'")
    }

    /// A transaction-scoped advisory lock, so creators for one principal take turns across
    /// the fleet and the count cannot be overtaken by a concurrent insert before this one
    /// commits.
    async fn lock_requester(
        tx: &mut PgConnection,
        principal: &PrincipalSnapshot,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(REQUESTER_LOCK_CLASS)
            .bind(to_json(&[
                &principal.kind,
                &principal.issuer,
                &principal.id,
            ])?)
            .execute(tx)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// `pg_notify` in the transaction: delivered when (and only if) it commits.
    async fn announce_grant_change(
        tx: &mut PgConnection,
        binding_hash: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(GRANT_CHANNEL)
            .bind(binding_hash)
            .execute(tx)
            .await
            .map_err(db_error)?;
        Ok(())
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
