//! The management store: SQLite (a file, the default) or PostgreSQL (for several replicas), through
//! sqlx's `Any` driver so both run the same queries and migrations. Queries use `$1…$n` in order
//! of appearance, which both engines bind by position.

mod access_logs;
mod accounts;
mod clusters;
mod mesh_access;
mod mesh_peers;
mod proxy_tokens;
mod resources;
mod service_auth;
mod services;
mod setup_keys;
mod sso;

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

pub use access_logs::{AccessLogFilter, AccessLogPage, AccessLogRow, AccessLogSort};
pub use accounts::{Account, Role, User};
pub use clusters::{ClusterInfo, ClusterKind, RegisterError};
pub use mesh_access::{PeerAccess, TunnelPeer};
pub use mesh_peers::{
    Cidr, DEFAULT_TUNNEL_RANGE, MeshPeer, NewPeer, PeerKind, generate_wg_keypair, host_route,
    is_wg_key,
};
pub use proxy_tokens::ProxyToken;
pub use resources::{ResolveError, Resource, ResourceKind};
pub use service_auth::{HeaderHash, ServiceAuthRow};
pub use services::{ServiceRecord, ServiceStatus};
pub use setup_keys::{RegisterAgentError, Registration, SetupKey, SetupKeyType};
pub use sso::{Group, IdentityProvider, PendingSignIn, SignedInUser};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("stored data is not valid: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    pub engine: Engine,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates the store.
    /// `url`: `sqlite:///path/to/file.db` or `postgres://user:pass@host/db`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        install_default_drivers();
        let engine = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Engine::Postgres
        } else {
            Engine::Sqlite
        };
        let url_with_mode = match engine {
            Engine::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let max = if engine == Engine::Sqlite { 4 } else { 16 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if engine == Engine::Sqlite {
                        conn.execute("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url_with_mode)
            .await
            .map_err(|source| StoreError::Open {
                url: redact(url),
                source,
            })?;
        if engine == Engine::Sqlite {
            pool.execute("PRAGMA journal_mode = WAL;").await?;
        }
        MIGRATOR.run(&pool).await?;
        Ok(Store { pool, engine })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// Hides a password in a database URL before it is shown.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.is_unique_violation()
                || db.message().contains("UNIQUE constraint failed")
                || db.code().as_deref() == Some("23505")
        }
        _ => false,
    }
}

/// A fresh store in a temporary SQLite file, for unit tests; with
/// `PORTCULLIS_TEST_POSTGRES=postgres://user@host:port/db` (a user that may create databases),
/// a fresh database on that server instead, so the same tests check the PostgreSQL dialect.
#[cfg(test)]
pub(crate) async fn test_store() -> Store {
    if let Ok(admin) = std::env::var("PORTCULLIS_TEST_POSTGRES") {
        use sqlx::Connection;
        let name = format!("pc_test_{}", crate::secrets::new_id().to_ascii_lowercase());
        let mut conn = sqlx::postgres::PgConnection::connect(&admin)
            .await
            .expect("PORTCULLIS_TEST_POSTGRES");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let (server, _) = admin.rsplit_once('/').expect("a URL ending in /database");
        return Store::open(&format!("{server}/{name}"))
            .await
            .expect("test store");
    }
    let path = std::env::temp_dir().join(format!(
        "portcullis-mgmt-test-{}-{}.db",
        std::process::id(),
        crate::secrets::new_id()
    ));
    Store::open(&format!("sqlite://{}", path.display()))
        .await
        .expect("test store")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://app:secret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
    }
}
