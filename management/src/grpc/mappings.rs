//! The mapping streams: register the proxy in its cluster, send the snapshot of its services in
//! batches, then every change; re-check the token every heartbeat.
//!
//! `GetMappingUpdate` sends freely; `SyncMappings` sends the next batch only after the proxy
//! acknowledged the previous one.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use proto::{
    GetMappingUpdateRequest, GetMappingUpdateResponse, ProxyCapabilities, ProxyMapping,
    SyncMappingsRequest, SyncMappingsResponse, sync_mappings_request,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::ProxyServiceImpl;
use crate::events::ServiceEvent;
use crate::model;
use crate::store::{ProxyToken, RegisterError};

/// Mappings per message in the initial snapshot (NetBird sends 500).
pub const BATCH_SIZE: usize = 500;
/// Messages queued towards one proxy before the sender waits.
const QUEUE: usize = 8;
/// How long a `SyncMappings` proxy may take to acknowledge a batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Who is on the other end of a stream.
struct Peer {
    token: ProxyToken,
    cluster: String,
    proxy_id: String,
    /// Claims `supports_private_service`: only then does it get private services' mappings.
    private_services: bool,
}

/// Where batches go: the two stream kinds differ only in how a batch is delivered.
trait BatchSink: Send {
    fn deliver(
        &mut self,
        mappings: Vec<ProxyMapping>,
        initial_sync_complete: bool,
    ) -> impl std::future::Future<Output = Result<(), Closed>> + Send;
    fn fail(&mut self, status: Status) -> impl std::future::Future<Output = ()> + Send;
    fn closed(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

/// The proxy went away (or broke the protocol).
struct Closed;

pub async fn open_update_stream(
    svc: ProxyServiceImpl,
    token: ProxyToken,
    init: GetMappingUpdateRequest,
) -> Result<ResponseStream<GetMappingUpdateResponse>, Status> {
    let peer = register(
        &svc,
        token,
        &init.address,
        &init.proxy_id,
        &init.version,
        init.capabilities,
    )
    .await?;
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(svc, peer, UpdateSink { tx }));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

pub async fn open_sync_stream(
    svc: ProxyServiceImpl,
    token: ProxyToken,
    mut inbound: Streaming<SyncMappingsRequest>,
) -> Result<ResponseStream<SyncMappingsResponse>, Status> {
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the stream ended before `init`"))?;
    let Some(sync_mappings_request::Msg::Init(init)) = first.msg else {
        return Err(Status::invalid_argument("the first message must be `init`"));
    };
    let peer = register(
        &svc,
        token,
        &init.address,
        &init.proxy_id,
        &init.version,
        init.capabilities,
    )
    .await?;
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(svc, peer, SyncSink { tx, inbound }));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

async fn register(
    svc: &ProxyServiceImpl,
    token: ProxyToken,
    address: &str,
    proxy_id: &str,
    version: &str,
    capabilities: Option<ProxyCapabilities>,
) -> Result<Peer, Status> {
    let address = address.trim().trim_end_matches('.').to_ascii_lowercase();
    if !model::is_valid_domain(&address) {
        return Err(Status::invalid_argument(format!(
            "cluster address {address:?} is not a valid domain (set NB_PROXY_DOMAIN)"
        )));
    }
    if proxy_id.is_empty() {
        return Err(Status::invalid_argument("proxy_id is required"));
    }
    let caps = capabilities_json(capabilities.as_ref());
    let private_services = capabilities
        .as_ref()
        .and_then(|c| c.supports_private_service)
        .unwrap_or(false);
    match svc
        .store
        .register_proxy(&token, &address, proxy_id, version, &caps)
        .await
    {
        Ok(()) => {}
        Err(RegisterError::AddressInUse(a)) => {
            return Err(Status::already_exists(format!(
                "cluster address {a} is already in use"
            )));
        }
        Err(RegisterError::Store(e)) => {
            tracing::error!(error = %e, "proxy registration failed");
            return Err(Status::unavailable("management store unavailable"));
        }
    }
    tracing::info!(cluster = %address, proxy = proxy_id, version, token = %token.id, "proxy connected");
    Ok(Peer {
        token,
        cluster: address,
        proxy_id: proxy_id.to_string(),
        private_services,
    })
}

fn capabilities_json(c: Option<&ProxyCapabilities>) -> String {
    let mut m = BTreeMap::new();
    if let Some(c) = c {
        for (k, v) in [
            ("supports_custom_ports", c.supports_custom_ports),
            ("require_subdomain", c.require_subdomain),
            ("supports_crowdsec", c.supports_crowdsec),
            ("private", c.private),
            ("supports_private_service", c.supports_private_service),
        ] {
            if let Some(v) = v {
                m.insert(k, v);
            }
        }
    }
    serde_json::to_string(&m).unwrap_or_else(|_| "{}".to_string())
}

async fn run<S: BatchSink>(svc: ProxyServiceImpl, peer: Peer, mut sink: S) {
    // Subscribe before reading the snapshot so that no change falls between the two.
    let mut events = svc.bus.subscribe();
    let outcome = serve(&svc, &peer, &mut sink, &mut events).await;
    if let Err(status) = outcome {
        tracing::info!(cluster = %peer.cluster, proxy = %peer.proxy_id, reason = status.message(), "ending mapping stream");
        sink.fail(status).await;
    }
    if let Err(e) = svc
        .store
        .proxy_disconnected(&peer.cluster, &peer.proxy_id)
        .await
    {
        tracing::warn!(error = %e, "could not mark proxy disconnected");
    }
    tracing::info!(cluster = %peer.cluster, proxy = %peer.proxy_id, "proxy disconnected");
}

/// Returns `Err` with the status to end the stream with, `Ok` when the proxy left.
async fn serve<S: BatchSink>(
    svc: &ProxyServiceImpl,
    peer: &Peer,
    sink: &mut S,
    events: &mut broadcast::Receiver<ServiceEvent>,
) -> Result<(), Status> {
    let account = peer.token.account_id.as_deref();
    let records = svc
        .store
        .services_for_cluster(&peer.cluster, account)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "snapshot query failed");
            Status::unavailable("management store unavailable")
        })?;
    let mut snapshot: Vec<ProxyMapping> = Vec::with_capacity(records.len());
    for r in &records {
        match svc.store.mapping_for(r).await {
            Ok(m) if m.private && !peer.private_services => {
                tracing::warn!(service = %r.id, proxy = %peer.proxy_id, "private service not sent: the proxy does not claim supports_private_service");
            }
            Ok(m) => snapshot.push(m),
            Err(e) => {
                tracing::error!(service = %r.id, error = %e, "service left out of the snapshot");
            }
        }
    }
    let batches = snapshot.len().div_ceil(BATCH_SIZE).max(1);
    let mut rest = snapshot;
    for i in 0..batches {
        let take = rest.len().min(BATCH_SIZE);
        let mut batch: Vec<ProxyMapping> = rest.drain(..take).collect();
        super::proxy_peers::attach_tokens(&svc.store, &peer.cluster, &peer.proxy_id, &mut batch)
            .await;
        if sink.deliver(batch, i + 1 == batches).await.is_err() {
            return Ok(());
        }
    }

    let mut tick = tokio::time::interval(svc.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            ev = events.recv() => {
                let mut batch = Vec::new();
                match ev {
                    Ok(ev) => push_if_ours(peer, ev, &mut batch),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        return Err(Status::unavailable(format!(
                            "{n} changes were missed; reconnect for a fresh snapshot"
                        )));
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
                // Whatever else is already queued goes in the same batch.
                while batch.len() < BATCH_SIZE {
                    match events.try_recv() {
                        Ok(ev) => push_if_ours(peer, ev, &mut batch),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            return Err(Status::unavailable(format!(
                                "{n} changes were missed; reconnect for a fresh snapshot"
                            )));
                        }
                        Err(_) => break,
                    }
                }
                super::proxy_peers::attach_tokens(&svc.store, &peer.cluster, &peer.proxy_id, &mut batch)
                    .await;
                if !batch.is_empty() && sink.deliver(batch, false).await.is_err() {
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                match svc.store.proxy_token(&peer.token.id).await {
                    Ok(Some(t)) if t.is_valid_at(crate::store::now()) => {}
                    Ok(_) => return Err(Status::unauthenticated("proxy token revoked or expired")),
                    Err(e) => tracing::warn!(error = %e, "token re-check failed; will retry"),
                }
                if let Err(e) = svc.store.proxy_seen(&peer.cluster, &peer.proxy_id).await {
                    tracing::warn!(error = %e, "could not record proxy heartbeat");
                }
            }
            _ = sink.closed() => return Ok(()),
        }
    }
}

fn push_if_ours(peer: &Peer, ev: ServiceEvent, batch: &mut Vec<ProxyMapping>) {
    let same_cluster = ev.cluster_address == peer.cluster;
    let visible = peer
        .token
        .account_id
        .as_deref()
        .is_none_or(|a| a == ev.account_id);
    if !(same_cluster && visible) {
        return;
    }
    if ev.mapping.private && !peer.private_services {
        // It may have been public until now: the proxy must stop serving it, not keep the old
        // mapping.
        batch.push(ProxyMapping {
            r#type: proto::ProxyMappingUpdateType::UpdateTypeRemoved as i32,
            id: ev.mapping.id,
            account_id: ev.mapping.account_id,
            domain: ev.mapping.domain,
            ..Default::default()
        });
        return;
    }
    batch.push(ev.mapping);
}

// === impl UpdateSink ===

struct UpdateSink {
    tx: mpsc::Sender<Result<GetMappingUpdateResponse, Status>>,
}

impl BatchSink for UpdateSink {
    async fn deliver(
        &mut self,
        mapping: Vec<ProxyMapping>,
        initial_sync_complete: bool,
    ) -> Result<(), Closed> {
        self.tx
            .send(Ok(GetMappingUpdateResponse {
                mapping,
                initial_sync_complete,
            }))
            .await
            .map_err(|_| Closed)
    }

    async fn fail(&mut self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }

    async fn closed(&mut self) {
        self.tx.closed().await;
    }
}

// === impl SyncSink ===

struct SyncSink {
    tx: mpsc::Sender<Result<SyncMappingsResponse, Status>>,
    inbound: Streaming<SyncMappingsRequest>,
}

impl BatchSink for SyncSink {
    async fn deliver(
        &mut self,
        mapping: Vec<ProxyMapping>,
        initial_sync_complete: bool,
    ) -> Result<(), Closed> {
        self.tx
            .send(Ok(SyncMappingsResponse {
                mapping,
                initial_sync_complete,
            }))
            .await
            .map_err(|_| Closed)?;
        // Back-pressure: the next batch waits for this one's acknowledgement.
        match tokio::time::timeout(ACK_TIMEOUT, self.inbound.message()).await {
            Ok(Ok(Some(SyncMappingsRequest {
                msg: Some(sync_mappings_request::Msg::Ack(_)),
            }))) => Ok(()),
            Ok(Ok(Some(_))) => {
                self.fail(Status::invalid_argument("expected `ack`")).await;
                Err(Closed)
            }
            Ok(Ok(None)) | Ok(Err(_)) => Err(Closed),
            Err(_) => {
                self.fail(Status::deadline_exceeded("no `ack` for a mapping batch"))
                    .await;
                Err(Closed)
            }
        }
    }

    async fn fail(&mut self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }

    async fn closed(&mut self) {
        tokio::select! {
            _ = self.tx.closed() => {}
            // Between batches nothing is expected from the proxy; its stream ending means it left.
            msg = self.inbound.message() => {
                if let Ok(Some(_)) = msg {
                    tracing::debug!("unexpected message between batches");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(private_services: bool) -> Peer {
        Peer {
            token: ProxyToken {
                id: "t".into(),
                account_id: None,
                name: "t".into(),
                created_at: 0,
                expires_at: None,
                revoked: false,
            },
            cluster: "proxy.example".into(),
            proxy_id: "p".into(),
            private_services,
        }
    }

    fn event(private: bool) -> ServiceEvent {
        ServiceEvent {
            account_id: "a".into(),
            cluster_address: "proxy.example".into(),
            mapping: ProxyMapping {
                r#type: proto::ProxyMappingUpdateType::UpdateTypeModified as i32,
                id: "s".into(),
                account_id: "a".into(),
                domain: "app.proxy.example".into(),
                private,
                ..Default::default()
            },
        }
    }

    #[test]
    fn private_services_reach_only_proxies_that_enforce_them() {
        let mut batch = Vec::new();
        push_if_ours(&peer(true), event(true), &mut batch);
        assert!(
            batch[0].private,
            "sent as is to a proxy that claims the capability"
        );
        let mut batch = Vec::new();
        push_if_ours(&peer(false), event(true), &mut batch);
        assert_eq!(
            batch[0].r#type,
            proto::ProxyMappingUpdateType::UpdateTypeRemoved as i32,
            "a proxy that cannot enforce it drops the service instead"
        );
        assert!(!batch[0].private && batch[0].path.is_empty());
        let mut batch = Vec::new();
        push_if_ours(&peer(false), event(false), &mut batch);
        assert_eq!(batch.len(), 1);
    }
}
