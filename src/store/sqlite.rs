//! The SQLite dialect: one file, WAL, `synchronous=FULL` so an acknowledged approval or grant
//! survives a crash or power loss (SECURITY R-03c). Every write transaction starts with
//! `BEGIN IMMEDIATE`: it takes the file's one write lock up front, so writers queue on
//! `busy_timeout` instead of failing when a read snapshot would have to be upgraded, and a
//! transaction's reads stay true until it commits (no row locks needed). Ids and JSON are
//! stored as text.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Sqlite;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};

use super::sql::{Dialect, SqlStore};
use super::{ACQUIRE_TIMEOUT, migrate_error};
use crate::approval::{PrincipalSnapshot, StoreError};

/// How long a writer waits for the file's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Approval store in a SQLite file.
pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
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
        Ok(Self::new(pool))
    }
}

impl Dialect for Sqlite {
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const ONE_WRITER: bool = true;
    const CASTS: bool = false;
    // `BEGIN IMMEDIATE` already keeps every other writer out until the transaction ends.
    const FOR_UPDATE: &'static str = "";
    const JSON_EACH_TEXT: &'static str = "json_each";
    const JSON_ARRAY: &'static str = "json_array";
    // The implicit rowid: `approval_reviews` has no `seq` column in SQLite.
    const REVIEW_ORDER: &'static str = "rowid";

    /// The expression indexed by `approval_requests_requester` for the key `id`.
    fn json_text(column: &str, key: &str) -> String {
        format!("json_extract({column}, '$.{key}')")
    }

    /// Nothing to take: the write lock `BEGIN IMMEDIATE` took already serializes every
    /// creator, so no other one can slip in between the count and the insert.
    async fn lock_requester(
        _: &mut SqliteConnection,
        _: &PrincipalSnapshot,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// Nothing to tell: a SQLite file belongs to one process, whose grant cache the service
    /// updates itself.
    async fn announce_grant_change(_: &mut SqliteConnection, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed step must stop the test loudly"
    )]

    use sqlx::SqlitePool;

    /// The statements are written with numbered `$N` parameters for both dialects: sqlx binds
    /// SQLite's `$N` by number, whatever the order and however often each is used.
    #[tokio::test]
    async fn numbered_parameters_bind_by_number() {
        let pool = SqlitePool::connect("sqlite::memory:").await.unwrap();
        let s: String = sqlx::query_scalar("SELECT $2 || $1 || $2")
            .bind("a")
            .bind("b")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(s, "bab");
    }
}
