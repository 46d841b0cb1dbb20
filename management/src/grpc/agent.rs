//! The `Agent` service for `portcullis agent`: joining an account with a setup key
//! (`Register`), then the peer's WireGuard configuration as a stream (`Sync`).
//!
//! Setup keys and peer tokens are credentials: they are never logged.
//! Changes made in this process wake the streams through the change bus; every 30 s each stream
//! re-reads its configuration (picking up changes made through another management replica on
//! the same PostgreSQL), re-checks its peer token and resends the configuration as a liveness
//! probe.

use proto::mesh as pm;
use proto::mesh::agent_server::Agent;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::mappings::ResponseStream;
use super::mesh::MESH_REFRESH;
use crate::events::{ChangeBus, MeshEvent};
use crate::store::{
    MeshPeer, PeerKind, RegisterAgentError, Store, StoreError, host_route, is_wg_key,
};

/// Keepalive the agent uses towards proxies (NAT mappings stay open).
pub const PERSISTENT_KEEPALIVE: u32 = 10;
const QUEUE: usize = 8;

#[derive(Clone)]
pub struct AgentService {
    pub store: Store,
    pub bus: ChangeBus,
}

fn unavailable(e: StoreError) -> Status {
    tracing::error!(error = %e, "agent query failed");
    Status::unavailable("management store unavailable")
}

fn gone() -> Status {
    Status::unauthenticated("peer token is unknown, replaced, or the peer was deleted")
}

/// The configuration of agent `peer_id` of `account_id`; `None` when the peer is gone.
pub async fn agent_config(
    store: &Store,
    account_id: &str,
    peer_id: &str,
) -> Result<Option<pm::AgentConfig>, StoreError> {
    let Some(range) = store.tunnel_range(account_id).await? else {
        return Ok(None);
    };
    let peers = store.mesh_peers(account_id).await?;
    let Some(me) = peers.iter().find(|p| p.id == peer_id) else {
        return Ok(None);
    };
    let proxies = peers
        .iter()
        .filter(|p| p.kind == PeerKind::Proxy)
        .map(|p| pm::ProxyPeer {
            public_key: p.public_key.clone(),
            endpoint: p.endpoint().unwrap_or_default(),
            allowed_ips: vec![host_route(p.tunnel_ip)],
            persistent_keepalive: PERSISTENT_KEEPALIVE,
        })
        .collect();
    let routed_networks = store
        .resources_of_peer(account_id, peer_id)
        .await?
        .iter()
        .filter_map(|r| r.routed_network())
        .collect();
    Ok(Some(pm::AgentConfig {
        tunnel_address: range.address_of(me.tunnel_ip),
        proxies,
        routed_networks,
    }))
}

fn bearer<T>(req: &Request<T>) -> Result<String, Status> {
    let header = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated("missing peer token (authorization: Bearer …)"))?;
    let plain = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <peer token>`"))?;
    Ok(plain.trim().to_string())
}

async fn run_sync(
    store: Store,
    peer: MeshPeer,
    peer_token: String,
    mut events: broadcast::Receiver<MeshEvent>,
    tx: mpsc::Sender<Result<pm::AgentConfig, Status>>,
) {
    if let Err(e) = store.set_peer_connected(&peer.id, true).await {
        tracing::warn!(error = %e, "could not mark peer connected");
    }
    let outcome = serve_sync(&store, &peer, &peer_token, &mut events, &tx).await;
    if let Err(status) = outcome {
        tracing::info!(peer = %peer.id, reason = status.message(), "ending agent stream");
        let _ = tx.send(Err(status)).await;
    }
    if let Err(e) = store.set_peer_connected(&peer.id, false).await {
        tracing::warn!(error = %e, "could not mark peer disconnected");
    }
    tracing::info!(peer = %peer.id, account = %peer.account_id, "agent disconnected");
}

async fn serve_sync(
    store: &Store,
    peer: &MeshPeer,
    peer_token: &str,
    events: &mut broadcast::Receiver<MeshEvent>,
    tx: &mpsc::Sender<Result<pm::AgentConfig, Status>>,
) -> Result<(), Status> {
    let account = peer.account_id.as_str();
    let mut last = agent_config(store, account, &peer.id)
        .await
        .map_err(unavailable)?
        .ok_or_else(gone)?;
    if tx.send(Ok(last.clone())).await.is_err() {
        return Ok(());
    }
    let mut refresh = tokio::time::interval(MESH_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    loop {
        let resend = tokio::select! {
            ev = events.recv() => {
                let mut ours = false;
                match ev {
                    Ok(ev) => ours |= ev.account_id == account,
                    Err(broadcast::error::RecvError::Lagged(_)) => ours = true,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
                loop {
                    match events.try_recv() {
                        Ok(ev) => ours |= ev.account_id == account,
                        Err(broadcast::error::TryRecvError::Lagged(_)) => ours = true,
                        Err(_) => break,
                    }
                }
                if !ours {
                    continue;
                }
                false
            }
            _ = refresh.tick() => {
                match store.agent_by_token(peer_token).await {
                    Ok(Some(p)) if p.id == peer.id => {}
                    Ok(_) => return Err(gone()),
                    Err(e) => tracing::warn!(error = %e, "peer token re-check failed; will retry"),
                }
                if let Err(e) = store.set_peer_connected(&peer.id, true).await {
                    tracing::warn!(error = %e, "could not record peer heartbeat");
                }
                true
            }
            _ = tx.closed() => return Ok(()),
        };
        let config = agent_config(store, account, &peer.id)
            .await
            .map_err(unavailable)?
            .ok_or_else(gone)?;
        if resend || config != last {
            last = config.clone();
            if tx.send(Ok(config)).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn register(
        &self,
        request: Request<pm::RegisterRequest>,
    ) -> Result<Response<pm::RegisterResponse>, Status> {
        let req = request.into_inner();
        let public_key = req.public_key.trim();
        if !is_wg_key(public_key) {
            return Err(Status::invalid_argument(
                "public_key must be a base64 Curve25519 public key",
            ));
        }
        let name = req.name.trim();
        let name = if name.is_empty() { "agent" } else { name };
        if name.len() > 255 || crate::model::has_control_chars(name) {
            return Err(Status::invalid_argument(
                "name must be at most 255 characters, without control characters",
            ));
        }
        match self
            .store
            .register_agent(req.setup_key.trim(), public_key, name)
            .await
        {
            Ok(reg) => {
                tracing::info!(peer = %reg.peer.id, account = %reg.peer.account_id,
                    tunnel_ip = %reg.peer.tunnel_ip, "agent registered");
                self.bus.publish_mesh(&reg.peer.account_id);
                Ok(Response::new(pm::RegisterResponse {
                    peer_id: reg.peer.id,
                    peer_token: reg.peer_token,
                    tunnel_address: reg.tunnel_address,
                }))
            }
            Err(RegisterAgentError::InvalidKey) => Err(Status::unauthenticated(
                "setup key is invalid, expired, revoked or used",
            )),
            Err(RegisterAgentError::Conflict(m)) => Err(Status::already_exists(m)),
            Err(RegisterAgentError::Store(e)) => Err(unavailable(e)),
        }
    }

    type SyncStream = ResponseStream<pm::AgentConfig>;

    async fn sync(
        &self,
        request: Request<pm::AgentSyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let token = bearer(&request)?;
        let req = request.into_inner();
        let peer = self
            .store
            .agent_by_token(&token)
            .await
            .map_err(unavailable)?
            .ok_or_else(gone)?;
        if peer.id != req.peer_id {
            return Err(Status::unauthenticated(
                "the peer token does not belong to this peer_id",
            ));
        }
        let events = self.bus.subscribe_mesh();
        let (tx, rx) = mpsc::channel(QUEUE);
        tracing::info!(peer = %peer.id, account = %peer.account_id, "agent connected");
        tokio::spawn(run_sync(self.store.clone(), peer, token, events, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SetupKeyType, test_store};

    const AGENT_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const PROXY_KEY: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=";

    #[tokio::test]
    async fn agent_config_lists_proxies_and_routes() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        let (_, key) = store
            .create_setup_key(&a.id, "k", SetupKeyType::Reusable, crate::store::now() + 60)
            .await
            .unwrap();
        let reg = store.register_agent(&key, AGENT_KEY, "m1").await.unwrap();
        store
            .upsert_proxy_peer(&a.id, "px1", "proxy.example", PROXY_KEY)
            .await
            .unwrap();
        store
            .create_resource(
                &a.id,
                &reg.peer.id,
                crate::store::ResourceKind::Subnet,
                "10.20.0.0/24",
                "lan",
            )
            .await
            .unwrap();
        store
            .create_resource(
                &a.id,
                &reg.peer.id,
                crate::store::ResourceKind::Domain,
                "db.internal",
                "db",
            )
            .await
            .unwrap();
        let config = agent_config(&store, &a.id, &reg.peer.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(config.tunnel_address, "100.64.0.1/10");
        assert_eq!(config.routed_networks, vec!["10.20.0.0/24".to_string()]);
        assert_eq!(
            config.proxies,
            vec![pm::ProxyPeer {
                public_key: PROXY_KEY.into(),
                endpoint: String::new(),
                allowed_ips: vec!["100.64.0.2/32".into()],
                persistent_keepalive: 10,
            }]
        );
        store
            .set_proxy_endpoint(&a.id, "px1", PROXY_KEY, 51820, "203.0.113.7")
            .await
            .unwrap();
        let config = agent_config(&store, &a.id, &reg.peer.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(config.proxies[0].endpoint, "203.0.113.7:51820");
        store.delete_mesh_peer(&a.id, &reg.peer.id).await.unwrap();
        assert!(
            agent_config(&store, &a.id, &reg.peer.id)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .agent_by_token(&reg.peer_token)
                .await
                .unwrap()
                .is_none()
        );
    }
}
