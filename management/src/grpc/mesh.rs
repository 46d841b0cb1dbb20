//! `ProxyMesh`: the WireGuard mesh of every account in which a proxy has a peer
//! (`SyncMesh`), and where the proxy's WireGuard listens (`ReportEndpoint`).
//!
//! Changes made in this process wake the streams through the change bus; every 30 s each stream
//! also re-reads all its accounts, which picks up changes made through another management
//! replica on the same PostgreSQL, and sends an empty `MeshUpdate` as a liveness probe when
//! nothing changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use proto::mesh as pm;
use proto::mesh::proxy_mesh_server::ProxyMesh;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ProxyServiceImpl;
use super::mappings::ResponseStream;
use crate::events::MeshEvent;
use crate::model;
use crate::store::{MeshPeer, PeerKind, ProxyToken, Store, StoreError, host_route};

/// Re-read and liveness interval of mesh streams.
pub const MESH_REFRESH: Duration = Duration::from_secs(30);
/// Messages queued towards one stream before the sender waits.
const QUEUE: usize = 8;

fn unavailable(e: StoreError) -> Status {
    tracing::error!(error = %e, "mesh query failed");
    Status::unavailable("management store unavailable")
}

/// The mesh of the account `proxy_peer` belongs to, as this proxy sees it.
async fn account_mesh(
    store: &Store,
    proxy_peer: &MeshPeer,
) -> Result<Option<pm::AccountMesh>, StoreError> {
    let account = &proxy_peer.account_id;
    let Some(range) = store.tunnel_range(account).await? else {
        return Ok(None);
    };
    let mut routes: HashMap<String, Vec<String>> = HashMap::new();
    for r in store.resources(account).await? {
        if let Some(net) = r.routed_network() {
            routes.entry(r.peer_id.clone()).or_default().push(net);
        }
    }
    let peers = store
        .mesh_peers(account)
        .await?
        .into_iter()
        .filter(|p| p.kind != PeerKind::Proxy)
        .map(|p| {
            let mut allowed_ips = vec![host_route(p.tunnel_ip)];
            allowed_ips.extend(routes.remove(&p.id).unwrap_or_default());
            pm::MeshPeer {
                id: p.id,
                name: p.name,
                public_key: p.public_key,
                allowed_ips,
            }
        })
        .collect();
    Ok(Some(pm::AccountMesh {
        account_id: account.clone(),
        public_key: proxy_peer.public_key.clone(),
        tunnel_address: range.address_of(proxy_peer.tunnel_ip),
        peers,
    }))
}

fn visible(token: &ProxyToken, account_id: &str) -> bool {
    token.account_id.as_deref().is_none_or(|a| a == account_id)
}

/// Every account mesh of this proxy (or only `only`'s), keyed by account.
async fn meshes(
    store: &Store,
    token: &ProxyToken,
    proxy_id: &str,
    only: Option<&str>,
) -> Result<BTreeMap<String, pm::AccountMesh>, StoreError> {
    let peers = match only {
        Some(a) => store.proxy_peer(a, proxy_id).await?.into_iter().collect(),
        None => store.peers_of_proxy(proxy_id).await?,
    };
    let mut out = BTreeMap::new();
    for p in peers.iter().filter(|p| visible(token, &p.account_id)) {
        if let Some(m) = account_mesh(store, p).await? {
            out.insert(p.account_id.clone(), m);
        }
    }
    Ok(out)
}

/// What changed between `sent` and `now` for `scope` (all accounts when `None`); updates `sent`.
fn diff(
    sent: &mut BTreeMap<String, pm::AccountMesh>,
    now: BTreeMap<String, pm::AccountMesh>,
    scope: Option<&BTreeSet<String>>,
) -> pm::MeshUpdate {
    let mut update = pm::MeshUpdate::default();
    let gone: Vec<String> = sent
        .keys()
        .filter(|a| scope.is_none_or(|s| s.contains(*a)) && !now.contains_key(*a))
        .cloned()
        .collect();
    for a in gone {
        sent.remove(&a);
        update.removed_accounts.push(a);
    }
    for (a, m) in now {
        if sent.get(&a) != Some(&m) {
            update.accounts.push(m.clone());
            sent.insert(a, m);
        }
    }
    update
}

async fn run_sync_mesh(
    svc: ProxyServiceImpl,
    token: ProxyToken,
    proxy_id: String,
    mut events: broadcast::Receiver<MeshEvent>,
    tx: mpsc::Sender<Result<pm::MeshUpdate, Status>>,
) {
    let outcome = serve_sync_mesh(&svc, &token, &proxy_id, &mut events, &tx).await;
    if let Err(status) = outcome {
        tracing::info!(proxy = %proxy_id, reason = status.message(), "ending mesh stream");
        let _ = tx.send(Err(status)).await;
    }
}

async fn serve_sync_mesh(
    svc: &ProxyServiceImpl,
    token: &ProxyToken,
    proxy_id: &str,
    events: &mut broadcast::Receiver<MeshEvent>,
    tx: &mpsc::Sender<Result<pm::MeshUpdate, Status>>,
) -> Result<(), Status> {
    let store = &svc.store;
    let mut sent = BTreeMap::new();
    let all = meshes(store, token, proxy_id, None)
        .await
        .map_err(unavailable)?;
    let snapshot = diff(&mut sent, all, None);
    if tx.send(Ok(snapshot)).await.is_err() {
        return Ok(());
    }
    let mut refresh = tokio::time::interval(MESH_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    let mut heartbeat = tokio::time::interval(svc.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    loop {
        let update = tokio::select! {
            ev = events.recv() => {
                let mut touched = BTreeSet::new();
                let mut lagged = false;
                match ev {
                    Ok(ev) => { touched.insert(ev.account_id); }
                    Err(broadcast::error::RecvError::Lagged(_)) => lagged = true,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
                loop {
                    match events.try_recv() {
                        Ok(ev) => { touched.insert(ev.account_id); }
                        Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                        Err(_) => break,
                    }
                }
                if lagged {
                    let all = meshes(store, token, proxy_id, None).await.map_err(unavailable)?;
                    diff(&mut sent, all, None)
                } else {
                    touched.retain(|a| visible(token, a));
                    let mut now = BTreeMap::new();
                    for a in &touched {
                        now.extend(meshes(store, token, proxy_id, Some(a)).await.map_err(unavailable)?);
                    }
                    let u = diff(&mut sent, now, Some(&touched));
                    if u.accounts.is_empty() && u.removed_accounts.is_empty() {
                        continue;
                    }
                    u
                }
            }
            _ = refresh.tick() => {
                // Also the liveness probe: empty when nothing changed.
                let all = meshes(store, token, proxy_id, None).await.map_err(unavailable)?;
                diff(&mut sent, all, None)
            }
            _ = heartbeat.tick() => {
                match store.proxy_token(&token.id).await {
                    Ok(Some(t)) if t.is_valid_at(crate::store::now()) => {}
                    Ok(_) => return Err(Status::unauthenticated("proxy token revoked or expired")),
                    Err(e) => tracing::warn!(error = %e, "token re-check failed; will retry"),
                }
                continue;
            }
            _ = tx.closed() => return Ok(()),
        };
        if tx.send(Ok(update)).await.is_err() {
            return Ok(());
        }
    }
}

#[tonic::async_trait]
impl ProxyMesh for ProxyServiceImpl {
    type SyncMeshStream = ResponseStream<pm::MeshUpdate>;

    async fn sync_mesh(
        &self,
        request: Request<pm::SyncMeshRequest>,
    ) -> Result<Response<Self::SyncMeshStream>, Status> {
        let token = self.authenticate(&request).await?;
        let req = request.into_inner();
        if req.proxy_id.is_empty() {
            return Err(Status::invalid_argument("proxy_id is required"));
        }
        // Subscribe before reading the snapshot so that no change falls between the two.
        let events = self.bus.subscribe_mesh();
        let (tx, rx) = mpsc::channel(QUEUE);
        tracing::info!(proxy = %req.proxy_id, token = %token.id, "mesh stream opened");
        tokio::spawn(run_sync_mesh(self.clone(), token, req.proxy_id, events, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_endpoint(
        &self,
        request: Request<pm::ReportEndpointRequest>,
    ) -> Result<Response<pm::ReportEndpointResponse>, Status> {
        let token = self.authenticate(&request).await?;
        let remote = request.remote_addr().map(|a| a.ip().to_canonical());
        let req = request.into_inner();
        if !visible(&token, &req.account_id) {
            return Err(Status::permission_denied(
                "this proxy token cannot report for another account",
            ));
        }
        let port = u16::try_from(req.listen_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Status::invalid_argument("listen_port must be 1-65535"))?;
        let host = req.host.trim().trim_end_matches('.').to_ascii_lowercase();
        let host = if host.is_empty() {
            remote.map(|ip| ip.to_string()).ok_or_else(|| {
                Status::invalid_argument("host is empty and the connection's address is unknown")
            })?
        } else {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            match bare.parse::<IpAddr>() {
                Ok(ip) => ip.to_string(),
                Err(_) if model::is_valid_domain(&host) && !host.starts_with("*.") => host,
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "host {host:?} is not an IP address or DNS name"
                    )));
                }
            }
        };
        let changed = self
            .store
            .set_proxy_endpoint(
                &req.account_id,
                &req.proxy_id,
                req.public_key.trim(),
                port,
                &host,
            )
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "proxy {} has no peer with this public key in account {}; call CreateProxyPeer first",
                    req.proxy_id, req.account_id
                ))
            })?;
        if changed {
            tracing::info!(account = %req.account_id, proxy = %req.proxy_id, host = %host, port, "proxy endpoint reported");
            self.bus.publish_mesh(&req.account_id);
        }
        Ok(Response::new(pm::ReportEndpointResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(account: &str, key: &str) -> pm::AccountMesh {
        pm::AccountMesh {
            account_id: account.into(),
            public_key: key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn diffs_send_changes_and_removals_only() {
        let mut sent = BTreeMap::new();
        let first = diff(
            &mut sent,
            BTreeMap::from([
                ("a".to_string(), mesh("a", "k")),
                ("b".to_string(), mesh("b", "k")),
            ]),
            None,
        );
        assert_eq!(first.accounts.len(), 2);
        // Nothing changed: an empty update (the liveness probe).
        let same = diff(
            &mut sent,
            BTreeMap::from([
                ("a".to_string(), mesh("a", "k")),
                ("b".to_string(), mesh("b", "k")),
            ]),
            None,
        );
        assert!(same.accounts.is_empty() && same.removed_accounts.is_empty());
        // Only account a was touched: b is not reported as removed.
        let scope = BTreeSet::from(["a".to_string()]);
        let u = diff(
            &mut sent,
            BTreeMap::from([("a".to_string(), mesh("a", "k2"))]),
            Some(&scope),
        );
        assert_eq!(u.accounts, vec![mesh("a", "k2")]);
        assert!(u.removed_accounts.is_empty());
        let u = diff(&mut sent, BTreeMap::new(), Some(&scope));
        assert_eq!(u.removed_accounts, vec!["a".to_string()]);
        assert!(sent.contains_key("b"));
    }
}
