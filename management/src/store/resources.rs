//! Network resources: hosts, subnets and domains behind a routing peer (an agent or a manual
//! peer), and how services' targets resolve against peers and resources.

use std::net::IpAddr;

use proto::ProxyMapping;
use sqlx::Row;

use super::mesh_peers::{Cidr, PeerKind, host_route};
use super::{ServiceRecord, Store, StoreError, now};
use crate::model::{self, TargetSpec};
use crate::secrets;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Host,
    Subnet,
    Domain,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Host => "host",
            ResourceKind::Subnet => "subnet",
            ResourceKind::Domain => "domain",
        }
    }

    pub fn parse(s: &str) -> Option<ResourceKind> {
        Some(match s {
            "host" => ResourceKind::Host,
            "subnet" => ResourceKind::Subnet,
            "domain" => ResourceKind::Domain,
            _ => return None,
        })
    }

    /// Checks and normalises an address of this kind: an IP, a CIDR (host bits cleared), a
    /// lower-case DNS name.
    pub fn normalise(self, address: &str) -> Result<String, String> {
        let a = address.trim();
        match self {
            ResourceKind::Host => a
                .parse::<IpAddr>()
                .map(|ip| ip.to_string())
                .map_err(|_| format!("address {a:?} is not an IP address")),
            ResourceKind::Subnet => Cidr::parse(a).map(|c| c.to_string()),
            ResourceKind::Domain => {
                let d = a.trim_end_matches('.').to_ascii_lowercase();
                if model::is_valid_domain(&d) {
                    Ok(d)
                } else {
                    Err(format!("address {a:?} is not a DNS name"))
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub id: String,
    pub account_id: String,
    pub peer_id: String,
    pub kind: ResourceKind,
    pub address: String,
    pub name: String,
    pub created_at: i64,
}

impl Resource {
    /// What the routing peer routes for the proxies: `ip/32` (`/128`) for a host, the CIDR of a
    /// subnet; a domain is not routable by address.
    pub fn routed_network(&self) -> Option<String> {
        match self.kind {
            ResourceKind::Host => self.address.parse().ok().map(host_route),
            ResourceKind::Subnet => Some(self.address.clone()),
            ResourceKind::Domain => None,
        }
    }
}

/// Why a service's targets do not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Reported as 422 with this text.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

macro_rules! columns {
    () => {
        "id, account_id, peer_id, kind, address, name, created_at"
    };
}

impl Store {
    /// Adds a resource routed by `peer_id`, which must be an agent or manual peer of the account
    /// (else a conflict naming the problem). `address` must already be normalised.
    pub async fn create_resource(
        &self,
        account_id: &str,
        peer_id: &str,
        kind: ResourceKind,
        address: &str,
        name: &str,
    ) -> Result<Resource, StoreError> {
        let r = Resource {
            id: secrets::new_id(),
            account_id: account_id.to_string(),
            peer_id: peer_id.to_string(),
            kind,
            address: address.to_string(),
            name: name.to_string(),
            created_at: now(),
        };
        sqlx::query(concat!(
            "INSERT INTO network_resources (",
            columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&r.id)
        .bind(&r.account_id)
        .bind(&r.peer_id)
        .bind(r.kind.as_str())
        .bind(&r.address)
        .bind(&r.name)
        .bind(r.created_at)
        .execute(self.pool())
        .await?;
        Ok(r)
    }

    pub async fn resources(&self, account_id: &str) -> Result<Vec<Resource>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM network_resources WHERE account_id = $1 ORDER BY created_at, id"
        ))
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(resource_from_row).collect()
    }

    pub async fn resources_of_peer(
        &self,
        account_id: &str,
        peer_id: &str,
    ) -> Result<Vec<Resource>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM network_resources WHERE account_id = $1 AND peer_id = $2 ORDER BY created_at, id"
        ))
        .bind(account_id)
        .bind(peer_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(resource_from_row).collect()
    }

    pub async fn resource(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<Resource>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM network_resources WHERE account_id = $1 AND id = $2"
        ))
        .bind(account_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(resource_from_row).transpose()
    }

    pub async fn delete_resource(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<Resource>, StoreError> {
        let Some(r) = self.resource(account_id, id).await? else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM network_resources WHERE account_id = $1 AND id = $2")
            .bind(account_id)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(Some(r))
    }

    /// The first service of the account with a target that names `id` as a peer (`peer`) or a
    /// resource (`host`, `subnet`, `domain`) — "name (id)" — so a deletion can be refused.
    pub async fn service_using(
        &self,
        account_id: &str,
        id: &str,
        as_peer: bool,
    ) -> Result<Option<String>, StoreError> {
        for s in self.services(account_id).await? {
            let Ok(spec) = model::spec_of(&s) else {
                continue;
            };
            let uses = spec.targets.iter().any(|t| {
                t.target_id == id
                    && if as_peer {
                        t.target_type == "peer"
                    } else {
                        matches!(t.target_type.as_str(), "host" | "subnet" | "domain")
                    }
            });
            if uses {
                return Ok(Some(format!("{} ({})", s.name, s.id)));
            }
        }
        Ok(None)
    }

    /// Resolves each target's host against the account's peers and resources: `Some(host)`
    /// replaces the written host, `None` keeps it.
    ///
    /// - `peer` + `target_id`: the peer's tunnel IP (agents and manual peers).
    /// - `host` / `domain` + `target_id` of such a resource: its IP / DNS name.
    /// - `subnet` + `target_id` of a subnet resource: `host` is required and must lie inside it.
    /// - no `target_id`, or (for `host`/`subnet`/`domain`) a `target_id` that names no resource
    ///   while `host` is given: `host` as written (services written before the mesh existed
    ///   use free-form target ids).
    pub async fn resolve_targets(
        &self,
        account_id: &str,
        targets: &[TargetSpec],
    ) -> Result<Vec<Option<String>>, ResolveError> {
        let mut out = Vec::with_capacity(targets.len());
        for (i, t) in targets.iter().enumerate() {
            out.push(self.resolve_target(account_id, i, t).await?);
        }
        Ok(out)
    }

    /// The mapping proxies receive for a service, its targets resolved. `Err` (logged by the
    /// caller) when a target no longer resolves or the store failed.
    pub async fn mapping_for(&self, r: &ServiceRecord) -> Result<ProxyMapping, String> {
        let spec = model::spec_of(r)?;
        let hosts = self
            .resolve_targets(&r.account_id, &spec.targets)
            .await
            .map_err(|e| e.to_string())?;
        let mut mapping = model::to_mapping_with(r, &hosts)?;
        if spec.auth.is_some() {
            // A protected service without its keys is never sent unprotected.
            let auth = self
                .service_auth(&r.id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    "the service's authentication is missing from the store".to_string()
                })?;
            mapping.auth = Some(crate::credentials::to_proto(&auth));
        }
        Ok(mapping)
    }

    async fn resolve_target(
        &self,
        account_id: &str,
        i: usize,
        t: &TargetSpec,
    ) -> Result<Option<String>, ResolveError> {
        let id = t.target_id.trim();
        let host = t.host.as_deref().map(str::trim).filter(|h| !h.is_empty());
        let invalid = |m: String| Err(ResolveError::Invalid(format!("targets[{i}]: {m}")));
        if id.is_empty() {
            return Ok(None);
        }
        match t.target_type.as_str() {
            "peer" => match self.mesh_peer(account_id, id).await? {
                Some(p) if p.kind != PeerKind::Proxy => Ok(Some(p.tunnel_ip.to_string())),
                _ => invalid(format!("peer {id} not found")),
            },
            kind @ ("host" | "subnet" | "domain") => {
                let Some(r) = self.resource(account_id, id).await? else {
                    return match host {
                        Some(_) => Ok(None),
                        None => invalid(format!("{kind} resource {id} not found")),
                    };
                };
                if r.kind.as_str() != kind {
                    return invalid(format!(
                        "resource {id} is a {} resource, not a {kind}",
                        r.kind.as_str()
                    ));
                }
                match r.kind {
                    ResourceKind::Host | ResourceKind::Domain => Ok(Some(r.address)),
                    ResourceKind::Subnet => {
                        let Some(h) = host else {
                            return invalid(format!(
                                "host is required for subnet resource {id} ({})",
                                r.address
                            ));
                        };
                        let subnet = Cidr::parse(&r.address).map_err(ResolveError::Invalid)?;
                        match h.parse::<IpAddr>() {
                            Ok(ip) if subnet.contains(ip) => Ok(Some(ip.to_string())),
                            _ => invalid(format!(
                                "host {h} is not an address inside subnet {}",
                                r.address
                            )),
                        }
                    }
                }
            }
            _ => Ok(None),
        }
    }
}

fn resource_from_row(row: &sqlx::any::AnyRow) -> Result<Resource, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(Resource {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        peer_id: row.try_get("peer_id")?,
        kind: ResourceKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("resource kind {kind:?}")))?,
        address: row.try_get("address")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mesh_peers::NewPeer;
    use crate::store::test_store;

    fn target(kind: &str, id: &str, host: Option<&str>) -> TargetSpec {
        serde_json::from_value(serde_json::json!({
            "target_id": id, "target_type": kind, "protocol": "http", "host": host, "port": 80
        }))
        .unwrap()
    }

    #[test]
    fn addresses_are_normalised() {
        assert_eq!(
            ResourceKind::Subnet.normalise("10.20.0.9/24").unwrap(),
            "10.20.0.0/24"
        );
        assert!(ResourceKind::Subnet.normalise("10.20.0.9").is_err());
        assert_eq!(
            ResourceKind::Host.normalise(" 10.0.0.5 ").unwrap(),
            "10.0.0.5"
        );
        assert!(ResourceKind::Host.normalise("db.internal").is_err());
        assert_eq!(
            ResourceKind::Domain.normalise("DB.Internal.").unwrap(),
            "db.internal"
        );
    }

    #[tokio::test]
    async fn targets_resolve_to_peers_and_resources() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        let b = store.create_account("b").await.unwrap();
        let peer = store
            .insert_mesh_peer(&NewPeer {
                account_id: &a.id,
                name: "gw",
                public_key: "k1",
                kind: PeerKind::Manual,
                proxy_id: None,
                cluster_address: None,
                hashed_token: None,
                setup_key_id: None,
            })
            .await
            .unwrap();
        let host = store
            .create_resource(&a.id, &peer.id, ResourceKind::Host, "10.0.0.5", "db")
            .await
            .unwrap();
        let net = store
            .create_resource(&a.id, &peer.id, ResourceKind::Subnet, "10.20.0.0/24", "lan")
            .await
            .unwrap();
        let dom = store
            .create_resource(&a.id, &peer.id, ResourceKind::Domain, "db.internal", "dns")
            .await
            .unwrap();
        let resolved = store
            .resolve_targets(
                &a.id,
                &[
                    target("peer", &peer.id, None),
                    target("host", &host.id, None),
                    target("subnet", &net.id, Some("10.20.0.7")),
                    target("domain", &dom.id, None),
                    target("host", "web", Some("127.0.0.1")),
                    target("host", "", Some("127.0.0.1")),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            resolved,
            vec![
                Some("100.64.0.1".to_string()),
                Some("10.0.0.5".to_string()),
                Some("10.20.0.7".to_string()),
                Some("db.internal".to_string()),
                None,
                None,
            ]
        );
        let err = |r: Result<Vec<Option<String>>, ResolveError>| match r {
            Err(ResolveError::Invalid(m)) => m,
            other => panic!("expected invalid, got {other:?}"),
        };
        let m = err(store
            .resolve_targets(&a.id, &[target("subnet", &net.id, Some("10.21.0.7"))])
            .await);
        assert!(m.contains("not an address inside subnet"), "{m}");
        let m = err(store
            .resolve_targets(&a.id, &[target("subnet", &net.id, None)])
            .await);
        assert!(m.contains("host is required"), "{m}");
        let m = err(store
            .resolve_targets(&a.id, &[target("host", &net.id, None)])
            .await);
        assert!(m.contains("not a host"), "{m}");
        // Another account's peer is not found.
        let m = err(store
            .resolve_targets(&b.id, &[target("peer", &peer.id, None)])
            .await);
        assert!(m.contains("not found"), "{m}");
        // Deleting the peer takes its resources along.
        store.delete_mesh_peer(&a.id, &peer.id).await.unwrap();
        assert!(store.resources(&a.id).await.unwrap().is_empty());
    }
}
