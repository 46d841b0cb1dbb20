//! Clusters (the proxies sharing one domain) and the proxies connected to them.

use std::collections::BTreeMap;

use sqlx::Row;

use super::{Store, StoreError, is_unique_violation, now};
use crate::store::ProxyToken;

/// A proxy counts as online while it was seen this recently (seconds).
pub const ONLINE_WINDOW_SECS: i64 = 120;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterKind {
    Shared,
    Account,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterInfo {
    pub address: String,
    #[serde(rename = "type")]
    pub kind: ClusterKind,
    #[serde(skip)]
    pub account_id: Option<String>,
    pub online: bool,
    pub connected_proxies: i64,
    /// Capabilities reported by the online proxies (true when any proxy claims it).
    pub features: BTreeMap<String, bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("cluster address {0} is already in use")]
    AddressInUse(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for RegisterError {
    fn from(e: sqlx::Error) -> Self {
        RegisterError::Store(StoreError::Query(e))
    }
}

impl Store {
    /// Registers a proxy under `address`, creating the cluster for the token's account (or as
    /// shared for a management-wide token). An address owned by anyone else is refused.
    pub async fn register_proxy(
        &self,
        token: &ProxyToken,
        address: &str,
        proxy_id: &str,
        version: &str,
        capabilities_json: &str,
    ) -> Result<(), RegisterError> {
        for _ in 0..3 {
            match self.cluster_owner(address).await? {
                Some(owner) if owner != token.account_id => {
                    return Err(RegisterError::AddressInUse(address.to_string()));
                }
                Some(_) => break,
                None => {
                    let res = sqlx::query("INSERT INTO clusters (address, account_id, created_at) VALUES ($1, $2, $3)")
                        .bind(address)
                        .bind(token.account_id.as_deref())
                        .bind(now())
                        .execute(self.pool())
                        .await;
                    match res {
                        Ok(_) => break,
                        // Someone registered it at the same moment: look again.
                        Err(e) if is_unique_violation(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        let t = now();
        sqlx::query("DELETE FROM proxies WHERE cluster_address = $1 AND proxy_id = $2")
            .bind(address)
            .bind(proxy_id)
            .execute(self.pool())
            .await?;
        sqlx::query(
            "INSERT INTO proxies (cluster_address, proxy_id, token_id, version, capabilities, connected_at, last_seen, connected) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1)",
        )
        .bind(address)
        .bind(proxy_id)
        .bind(&token.id)
        .bind(version)
        .bind(capabilities_json)
        .bind(t)
        .bind(t)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// `Some(None)`: shared; `Some(Some(account))`: an account's; `None`: no such cluster.
    pub async fn cluster_owner(&self, address: &str) -> Result<Option<Option<String>>, StoreError> {
        let row = sqlx::query("SELECT account_id FROM clusters WHERE address = $1")
            .bind(address)
            .fetch_optional(self.pool())
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<Option<String>, _>("account_id")?),
            None => None,
        })
    }

    pub async fn proxy_seen(&self, address: &str, proxy_id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE proxies SET last_seen = $1 WHERE cluster_address = $2 AND proxy_id = $3",
        )
        .bind(now())
        .bind(address)
        .bind(proxy_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn proxy_disconnected(
        &self,
        address: &str,
        proxy_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE proxies SET connected = 0 WHERE cluster_address = $1 AND proxy_id = $2",
        )
        .bind(address)
        .bind(proxy_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Clusters an account can reach: its own and the shared ones.
    pub async fn visible_clusters(&self, account_id: &str) -> Result<Vec<ClusterInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT address, account_id FROM clusters WHERE account_id IS NULL OR account_id = $1 ORDER BY address",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let address: String = row.try_get("address")?;
            let owner: Option<String> = row.try_get("account_id")?;
            out.push(self.cluster_info(address, owner).await?);
        }
        Ok(out)
    }

    async fn cluster_info(
        &self,
        address: String,
        owner: Option<String>,
    ) -> Result<ClusterInfo, StoreError> {
        let since = now() - ONLINE_WINDOW_SECS;
        let proxies = sqlx::query(
            "SELECT connected, capabilities FROM proxies WHERE cluster_address = $1 AND last_seen > $2",
        )
        .bind(&address)
        .bind(since)
        .fetch_all(self.pool())
        .await?;
        let mut features = BTreeMap::new();
        let mut connected = 0;
        for p in &proxies {
            let is_connected: i64 = p.try_get("connected")?;
            connected += is_connected;
            let caps: String = p.try_get("capabilities")?;
            let caps: BTreeMap<String, bool> = serde_json::from_str(&caps).unwrap_or_default();
            for (k, v) in caps {
                let e = features.entry(k).or_insert(false);
                *e = *e || v;
            }
        }
        Ok(ClusterInfo {
            address,
            kind: if owner.is_some() {
                ClusterKind::Account
            } else {
                ClusterKind::Shared
            },
            account_id: owner,
            online: !proxies.is_empty(),
            connected_proxies: connected,
            features,
        })
    }

    /// Deletes an account's own cluster record and its proxies; false when the account owns no
    /// cluster with that address.
    pub async fn delete_account_cluster(
        &self,
        account_id: &str,
        address: &str,
    ) -> Result<bool, StoreError> {
        let res = sqlx::query("DELETE FROM clusters WHERE address = $1 AND account_id = $2")
            .bind(address)
            .bind(account_id)
            .execute(self.pool())
            .await?;
        if res.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM proxies WHERE cluster_address = $1")
            .bind(address)
            .execute(self.pool())
            .await?;
        Ok(true)
    }
}
