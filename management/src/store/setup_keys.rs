//! Setup keys: the credential with which `portcullis agent` joins an account. Shown once in
//! plain text, stored as a SHA-256 hash; one-off keys register one machine, reusable keys any
//! number until they expire or are revoked.

use sqlx::Row;

use super::mesh_peers::{MeshPeer, NewPeer, PeerKind};
use super::{Store, StoreError, now};
use crate::secrets;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SetupKeyType {
    #[serde(rename = "one-off")]
    OneOff,
    #[serde(rename = "reusable")]
    Reusable,
}

impl SetupKeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            SetupKeyType::OneOff => "one-off",
            SetupKeyType::Reusable => "reusable",
        }
    }

    pub fn parse(s: &str) -> Option<SetupKeyType> {
        match s {
            "one-off" => Some(SetupKeyType::OneOff),
            "reusable" => Some(SetupKeyType::Reusable),
            _ => None,
        }
    }
}

/// A setup key without its secret.
#[derive(Debug, Clone)]
pub struct SetupKey {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub key_type: SetupKeyType,
    pub expires_at: i64,
    pub revoked: bool,
    pub used_times: i64,
    pub created_at: i64,
}

impl SetupKey {
    /// Usable for a new registration at `t`.
    pub fn is_valid_at(&self, t: i64) -> bool {
        !self.revoked
            && self.expires_at > t
            && (self.key_type == SetupKeyType::Reusable || self.used_times == 0)
    }
}

/// Why a registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterAgentError {
    #[error("setup key is invalid, expired, revoked or used")]
    InvalidKey,
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for RegisterAgentError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => RegisterAgentError::Conflict(m),
            other => RegisterAgentError::Store(other),
        }
    }
}

impl From<sqlx::Error> for RegisterAgentError {
    fn from(e: sqlx::Error) -> Self {
        RegisterAgentError::Store(e.into())
    }
}

/// A registered agent and the secrets for it. Deliberately not `Debug`: it holds the plain
/// peer token.
pub struct Registration {
    pub peer: MeshPeer,
    /// Plain peer token, handed to the agent once; only its hash is stored.
    pub peer_token: String,
    /// `ip/prefix` with the account range's prefix length.
    pub tunnel_address: String,
}

macro_rules! columns {
    () => {
        "id, account_id, name, key_type, expires_at, revoked_at, used_times, created_at"
    };
}

impl Store {
    /// Mints a setup key; returns the record and the plain key, which is not stored.
    pub async fn create_setup_key(
        &self,
        account_id: &str,
        name: &str,
        key_type: SetupKeyType,
        expires_at: i64,
    ) -> Result<(SetupKey, String), StoreError> {
        let id = secrets::new_id();
        let plain = secrets::new_token(secrets::SETUP_KEY_PREFIX);
        let created_at = now();
        sqlx::query(
            "INSERT INTO setup_keys (id, account_id, name, hashed_key, key_type, expires_at, \
             used_times, created_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(name)
        .bind(secrets::hash_token(&plain))
        .bind(key_type.as_str())
        .bind(expires_at)
        .bind(created_at)
        .execute(self.pool())
        .await?;
        Ok((
            SetupKey {
                id,
                account_id: account_id.to_string(),
                name: name.to_string(),
                key_type,
                expires_at,
                revoked: false,
                used_times: 0,
                created_at,
            },
            plain,
        ))
    }

    pub async fn setup_keys(&self, account_id: &str) -> Result<Vec<SetupKey>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM setup_keys WHERE account_id = $1 ORDER BY created_at DESC, id"
        ))
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    pub async fn setup_key(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<SetupKey>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM setup_keys WHERE account_id = $1 AND id = $2"
        ))
        .bind(account_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// Revokes a key of the account (again: no change); false when there is no such key.
    pub async fn revoke_setup_key(&self, account_id: &str, id: &str) -> Result<bool, StoreError> {
        let res = sqlx::query(
            "UPDATE setup_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 AND account_id = $3",
        )
        .bind(now())
        .bind(id)
        .bind(account_id)
        .execute(self.pool())
        .await?;
        Ok(res.rows_affected() > 0)
    }

    async fn setup_key_by_plain(&self, plain: &str) -> Result<Option<SetupKey>, StoreError> {
        if !secrets::well_formed(plain, secrets::SETUP_KEY_PREFIX) {
            return Ok(None);
        }
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM setup_keys WHERE hashed_key = $1"
        ))
        .bind(secrets::hash_token(plain))
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// Counts one use of the key if it is still usable (race-safe: a one-off key is consumed by
    /// exactly one caller).
    async fn consume_setup_key(&self, id: &str) -> Result<bool, StoreError> {
        let res = sqlx::query(
            "UPDATE setup_keys SET used_times = used_times + 1 WHERE id = $1 AND revoked_at IS NULL \
             AND expires_at > $2 AND (key_type = 'reusable' OR used_times = 0)",
        )
        .bind(id)
        .bind(now())
        .execute(self.pool())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn unconsume_setup_key(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE setup_keys SET used_times = used_times - 1 WHERE id = $1 AND used_times > 0",
        )
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Registers (or re-registers) an agent with a setup key: a new peer with the lowest free
    /// tunnel IP, or, for a public key already registered as an agent in the key's account, the
    /// same peer with a new peer token. A one-off key that was used already is accepted again
    /// only to re-register the peer it registered (a retried registration).
    pub async fn register_agent(
        &self,
        setup_key: &str,
        public_key: &str,
        name: &str,
    ) -> Result<Registration, RegisterAgentError> {
        let t = now();
        let key = self
            .setup_key_by_plain(setup_key)
            .await?
            .filter(|k| !k.revoked && k.expires_at > t)
            .ok_or(RegisterAgentError::InvalidKey)?;
        let range = self
            .tunnel_range(&key.account_id)
            .await?
            .ok_or(RegisterAgentError::InvalidKey)?;
        let peer_token = secrets::new_token(secrets::PEER_TOKEN_PREFIX);
        if let Some(existing) = self.mesh_peer_by_key(&key.account_id, public_key).await? {
            if existing.kind != PeerKind::Agent {
                return Err(RegisterAgentError::Conflict(
                    "this public key is already used by another peer of the account".into(),
                ));
            }
            let retry = existing.setup_key_id.as_deref() == Some(key.id.as_str());
            // A retried one-off registration does not count as another use.
            let one_off_retry = retry && key.key_type == SetupKeyType::OneOff;
            let usable = one_off_retry || self.consume_setup_key(&key.id).await?;
            if !usable {
                return Err(RegisterAgentError::InvalidKey);
            }
            self.set_peer_token(&existing.id, &peer_token).await?;
            return Ok(Registration {
                tunnel_address: range.address_of(existing.tunnel_ip),
                peer: existing,
                peer_token,
            });
        }
        if !self.consume_setup_key(&key.id).await? {
            return Err(RegisterAgentError::InvalidKey);
        }
        let new = NewPeer {
            account_id: &key.account_id,
            name,
            public_key,
            kind: PeerKind::Agent,
            proxy_id: None,
            cluster_address: None,
            hashed_token: Some(secrets::hash_token(&peer_token)),
            setup_key_id: Some(&key.id),
        };
        match self.insert_mesh_peer(&new).await {
            Ok(peer) => Ok(Registration {
                tunnel_address: range.address_of(peer.tunnel_ip),
                peer,
                peer_token,
            }),
            Err(e) => {
                // Give the use back: the key did not register anything.
                if let Err(e2) = self.unconsume_setup_key(&key.id).await {
                    tracing::warn!(error = %e2, key = %key.id, "could not give back a setup key use");
                }
                Err(e.into())
            }
        }
    }
}

fn key_from_row(row: &sqlx::any::AnyRow) -> Result<SetupKey, StoreError> {
    let kt: String = row.try_get("key_type")?;
    let revoked_at: Option<i64> = row.try_get("revoked_at")?;
    Ok(SetupKey {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        key_type: SetupKeyType::parse(&kt)
            .ok_or_else(|| StoreError::Corrupt(format!("setup key type {kt:?}")))?,
        expires_at: row.try_get("expires_at")?,
        revoked: revoked_at.is_some(),
        used_times: row.try_get("used_times")?,
        created_at: row.try_get("created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    const KEY_A: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const KEY_B: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=";

    fn invalid(r: Result<Registration, RegisterAgentError>) -> bool {
        matches!(r, Err(RegisterAgentError::InvalidKey))
    }

    #[tokio::test]
    async fn one_off_keys_register_once_but_retries_are_safe() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        let (_, key) = store
            .create_setup_key(&a.id, "k", SetupKeyType::OneOff, now() + 3600)
            .await
            .unwrap();
        let first = store.register_agent(&key, KEY_A, "m1").await.unwrap();
        assert_eq!(first.tunnel_address, "100.64.0.1/10");
        // The same machine retrying: same peer, new token; the old token no longer works.
        let again = store.register_agent(&key, KEY_A, "m1").await.unwrap();
        assert_eq!(again.peer.id, first.peer.id);
        assert_ne!(again.peer_token, first.peer_token);
        assert!(
            store
                .agent_by_token(&first.peer_token)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store
                .agent_by_token(&again.peer_token)
                .await
                .unwrap()
                .unwrap()
                .id,
            first.peer.id
        );
        // Another machine: the key is used up.
        assert!(invalid(store.register_agent(&key, KEY_B, "m2").await));
        let listed = store.setup_keys(&a.id).await.unwrap();
        assert_eq!(listed[0].used_times, 1);
    }

    #[tokio::test]
    async fn reusable_expired_and_revoked_keys() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        let (k, key) = store
            .create_setup_key(&a.id, "k", SetupKeyType::Reusable, now() + 3600)
            .await
            .unwrap();
        let p1 = store.register_agent(&key, KEY_A, "m1").await.unwrap();
        let p2 = store.register_agent(&key, KEY_B, "m2").await.unwrap();
        assert_ne!(p1.peer.id, p2.peer.id);
        assert_eq!(p2.tunnel_address, "100.64.0.2/10");
        assert!(store.revoke_setup_key(&a.id, &k.id).await.unwrap());
        assert!(invalid(store.register_agent(&key, KEY_A, "m1").await));
        assert!(
            store
                .setup_key(&a.id, &k.id)
                .await
                .unwrap()
                .unwrap()
                .revoked
        );

        let (_, expired) = store
            .create_setup_key(&a.id, "old", SetupKeyType::Reusable, now() - 1)
            .await
            .unwrap();
        assert!(invalid(store.register_agent(&expired, KEY_A, "m1").await));
        assert!(invalid(
            store.register_agent("pcs_nonsense", KEY_A, "m1").await
        ));
        // Another account cannot revoke it.
        let b = store.create_account("b").await.unwrap();
        assert!(!store.revoke_setup_key(&b.id, &k.id).await.unwrap());
    }
}
