//! Who is behind a mesh peer, for NetBird-only (private) services: the user a peer belongs to,
//! the groups a peer is in, and the groups an administrator gave a user (`auto_groups`).
//! A peer's groups for access are its own, its user's `auto_groups`, and the groups its user's
//! last sign-in named.

use std::collections::BTreeSet;
use std::net::IpAddr;

use sqlx::Row;

use super::{Group, Store, StoreError, User};

/// What a request arriving over the mesh from one tunnel address is, for `ValidateTunnelPeer`.
#[derive(Debug, Clone)]
pub struct TunnelPeer {
    pub peer_id: String,
    pub peer_name: String,
    /// `Some(None)`: the peer names a user that no longer exists.
    pub user: Option<Option<User>>,
    /// Every group that counts for the peer, by name.
    pub groups: Vec<Group>,
}

/// A peer's own settings for access.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerAccess {
    pub user_id: Option<String>,
    pub groups: Vec<String>,
}

/// A stored JSON list of group ids (or names); NULL is none.
pub(super) fn ids_from(text: Option<String>, what: &str) -> Result<Vec<String>, StoreError> {
    match text {
        None => Ok(Vec::new()),
        Some(t) => {
            serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
        }
    }
}

impl super::MeshPeer {
    /// The peer's own user and groups, to change and store with [`Store::set_peer_access`].
    pub fn access(&self) -> PeerAccess {
        PeerAccess {
            user_id: self.user_id.clone(),
            groups: self.groups.clone(),
        }
    }
}

fn ids_text(ids: &[String]) -> Result<Option<String>, StoreError> {
    if ids.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(ids)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Store {
    /// Replaces a peer's user and groups; false when there is no such peer.
    pub async fn set_peer_access(
        &self,
        account_id: &str,
        peer_id: &str,
        access: &PeerAccess,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE mesh_peers SET user_id = $1, peer_groups = $2 WHERE account_id = $3 AND id = $4",
        )
        .bind(access.user_id.as_deref())
        .bind(ids_text(&access.groups)?)
        .bind(account_id)
        .bind(peer_id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Replaces a user's groups; false when there is no such user.
    pub async fn set_user_auto_groups(
        &self,
        account_id: &str,
        user_id: &str,
        groups: &[String],
    ) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE users SET auto_groups = $1 WHERE account_id = $2 AND id = $3")
                .bind(ids_text(groups)?)
                .bind(account_id)
                .bind(user_id)
                .execute(self.pool())
                .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Whether any peer or user of the account is in group `id` (such a group is not deleted).
    pub async fn group_has_members(&self, account_id: &str, id: &str) -> Result<bool, StoreError> {
        let mut texts: Vec<Option<String>> = Vec::new();
        for sql in [
            "SELECT peer_groups AS g FROM mesh_peers WHERE account_id = $1",
            "SELECT auto_groups AS g FROM users WHERE account_id = $1",
        ] {
            for row in sqlx::query(sql)
                .bind(account_id)
                .fetch_all(self.pool())
                .await?
            {
                texts.push(row.try_get("g")?);
            }
        }
        for t in texts {
            if ids_from(t, "group list")?.iter().any(|g| g == id) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The peer of the account at this tunnel address, its user and every group that counts
    /// for it; `None` when no peer has the address.
    pub async fn tunnel_peer(
        &self,
        account_id: &str,
        tunnel_ip: IpAddr,
    ) -> Result<Option<TunnelPeer>, StoreError> {
        let Some(peer) = self
            .mesh_peer_by_tunnel_ip(account_id, tunnel_ip)
            .await?
            .filter(|p| p.kind != super::PeerKind::Proxy)
        else {
            return Ok(None);
        };
        let mut ids: BTreeSet<String> = peer.groups.iter().cloned().collect();
        let mut names: BTreeSet<String> = BTreeSet::new();
        let user = match &peer.user_id {
            None => None,
            Some(uid) => {
                let found = sqlx::query(
                    "SELECT id, account_id, email, role, auto_groups, idp_groups FROM users \
                     WHERE account_id = $1 AND id = $2",
                )
                .bind(account_id)
                .bind(uid)
                .fetch_optional(self.pool())
                .await?;
                match found {
                    None => Some(None),
                    Some(u) => {
                        ids.extend(ids_from(u.try_get("auto_groups")?, "users.auto_groups")?);
                        names.extend(ids_from(u.try_get("idp_groups")?, "users.idp_groups")?);
                        Some(Some(super::accounts::user_from_row(&u)?))
                    }
                }
            }
        };
        let groups = self
            .groups(account_id)
            .await?
            .into_iter()
            .filter(|g| ids.contains(&g.id) || names.contains(&g.name))
            .collect();
        Ok(Some(TunnelPeer {
            peer_id: peer.id,
            peer_name: peer.name,
            user,
            groups,
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{NewPeer, PeerKind, Role, test_store};

    #[tokio::test]
    async fn a_peer_counts_its_own_its_users_and_signed_in_groups() {
        let s = test_store().await;
        let acct = s.create_account("a").await.unwrap();
        let staff = s.create_group(&acct.id, "staff", "api").await.unwrap();
        let ops = s.create_group(&acct.id, "ops", "api").await.unwrap();
        let _other = s.create_group(&acct.id, "other", "api").await.unwrap();
        let user = s
            .create_user(&acct.id, "u@example.test", Role::User)
            .await
            .unwrap();
        let peer = s
            .insert_mesh_peer(&NewPeer {
                account_id: &acct.id,
                name: "laptop",
                public_key: &crate::store::generate_wg_keypair().1,
                kind: PeerKind::Agent,
                proxy_id: None,
                cluster_address: None,
                hashed_token: None,
                setup_key_id: None,
            })
            .await
            .unwrap();
        let found = s
            .tunnel_peer(&acct.id, peer.tunnel_ip)
            .await
            .unwrap()
            .unwrap();
        assert!(found.user.is_none() && found.groups.is_empty());
        assert!(!s.group_has_members(&acct.id, &staff.id).await.unwrap());

        let access = super::PeerAccess {
            user_id: Some(user.id.clone()),
            groups: vec![ops.id.clone()],
        };
        assert!(
            s.set_peer_access(&acct.id, &peer.id, &access)
                .await
                .unwrap()
        );
        assert!(
            s.set_user_auto_groups(&acct.id, &user.id, std::slice::from_ref(&staff.id))
                .await
                .unwrap()
        );
        let found = s
            .tunnel_peer(&acct.id, peer.tunnel_ip)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            found.user.clone().flatten().map(|u| u.email),
            Some("u@example.test".into())
        );
        let mut names: Vec<_> = found.groups.iter().map(|g| g.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["ops", "staff"]);
        assert!(s.group_has_members(&acct.id, &staff.id).await.unwrap());
        let stored = s.mesh_peer(&acct.id, &peer.id).await.unwrap().unwrap();
        assert_eq!(
            (stored.user_id, stored.groups),
            (access.user_id, access.groups)
        );

        // Another account never sees the peer.
        let other = s.create_account("b").await.unwrap();
        assert!(
            s.tunnel_peer(&other.id, peer.tunnel_ip)
                .await
                .unwrap()
                .is_none()
        );
    }
}
