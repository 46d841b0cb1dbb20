//! The mesh control task (control thread): registers this proxy's WireGuard identity in each
//! account it serves (`CreateProxyPeer` with a mapping's one-time token), follows management's
//! mesh stream, keeps one tunnel per account, watches the peers' handshakes and publishes what
//! the data plane needs. Keys live only in memory: after a restart the proxy registers a new key
//! with the fresh tokens of the new mapping snapshot.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use proto::CreateProxyPeerRequest;
use proto::mesh::proxy_mesh_client::ProxyMeshClient;
use proto::mesh::{AccountMesh, MeshUpdate, ReportEndpointRequest, SyncMeshRequest};
use proto::proxy_service_client::ProxyServiceClient;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tonic::{Code, Status};
use wireguard_control::Key;

use super::firewall::{MeshFirewall, MeshInterface};
use super::inbound::MeshInbound;
use super::settings::MeshSettings;
use super::table::{AccountRoutes, Carrier, MeshSnapshot, PeerRoute};
use super::tunnel::{Backend, Peer, Tunnel};
use super::{MeshInputs, MeshStart, Tokens};
use crate::control::management::ManagementLink;
use crate::state::Shared;

/// A handshake older than this means the session expired (WireGuard's reject-after-time).
const HANDSHAKE_FRESH: Duration = Duration::from_secs(180);
/// Peers send a keepalive every 10 s (management's configs say so); this long without a byte
/// from a peer means it is gone.
const SILENCE_IS_DOWN: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A management without our extension is asked again this often.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(300);

/// One account's identity and tunnel.
struct Account {
    private: Key,
    public: String,
    registered: bool,
    /// The last token tried, so a refused one is not retried.
    tried_token: Option<String>,
    tunnel: Option<Tunnel>,
    address: Option<IpNet>,
    peers: Vec<MeshPeerState>,
    reported_port: Option<u16>,
    bridges: HashMap<SocketAddr, SocketAddr>,
    /// NB_PROXY_PRIVATE: closes the account's mesh listeners when dropped.
    inbound: Option<watch::Sender<bool>>,
    error: Option<String>,
}

struct MeshPeerState {
    name: String,
    public_key: Key,
    networks: Vec<IpNet>,
    rx_bytes: u64,
    last_rx: Option<Instant>,
    last_handshake: Option<SystemTime>,
    up: bool,
}

impl Account {
    fn new() -> Self {
        let private = Key::generate_private();
        let public = private.get_public().to_base64();
        Self {
            private,
            public,
            registered: false,
            tried_token: None,
            tunnel: None,
            address: None,
            peers: Vec::new(),
            reported_port: None,
            bridges: HashMap::new(),
            inbound: None,
            error: None,
        }
    }
}

struct Mesh {
    shared: Arc<Shared>,
    link: ManagementLink,
    settings: MeshSettings,
    backend: Backend,
    reason: String,
    accounts: BTreeMap<String, Account>,
    firewall: MeshFirewall,
    firewall_error: Option<String>,
    inbound: Option<MeshInbound>,
}

/// Runs for the life of the proxy.
pub async fn run(
    shared: Arc<Shared>,
    link: ManagementLink,
    settings: MeshSettings,
    mut inputs: MeshInputs,
    start: MeshStart,
) {
    let (backend, reason) = match start.picked {
        Ok(picked) => picked,
        Err(reason) => {
            tracing::info!(%reason, "WireGuard mesh off: targets are dialed directly");
            set_health(
                &shared,
                serde_json::json!({ "backend": format!("off: {reason}") }),
            );
            return;
        }
    };
    tracing::info!(%backend, %reason, "WireGuard mesh backend");
    let mut mesh = Mesh {
        shared,
        link,
        settings,
        backend,
        reason,
        accounts: BTreeMap::new(),
        firewall: MeshFirewall::new(),
        firewall_error: None,
        inbound: start.inbound,
    };
    mesh.publish();
    let mut retry = Duration::from_secs(1);
    loop {
        let wait = match mesh.session(&mut inputs).await {
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::warn!(
                    "management has no mesh service (portcullis.mesh.v1): targets are dialed \
                     directly"
                );
                UNSUPPORTED_RETRY
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), reason = status.message(), "mesh stream lost; tunnels keep running");
                retry
            }
            Ok(()) => retry,
        };
        retry = (retry * 2).min(RETRY_MAX);
        tokio::time::sleep(wait).await;
    }
}

impl Mesh {
    async fn session(&mut self, inputs: &mut MeshInputs) -> Result<(), Status> {
        let channel = self
            .link
            .endpoint()
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach management: {e}")))?;
        let mut proxies = ProxyServiceClient::new(channel.clone());
        let mut meshes = ProxyMeshClient::new(channel);
        let request = SyncMeshRequest {
            proxy_id: self.link.proxy_id.clone(),
        };
        let mut stream = meshes
            .sync_mesh(self.link.authorized(request))
            .await?
            .into_inner();
        let tokens = inputs.tokens.borrow_and_update().clone();
        self.register(&mut proxies, &tokens).await;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = stream.message() => match msg? {
                    None => return Ok(()),
                    Some(update) => self.apply(update, &mut meshes, &inputs.status_events).await,
                },
                changed = inputs.tokens.changed() => {
                    if changed.is_err() {
                        // The management link is gone for good (shutdown).
                        return Ok(());
                    }
                    let tokens = inputs.tokens.borrow_and_update().clone();
                    self.register(&mut proxies, &tokens).await;
                }
                _ = tick.tick() => self.poll(&inputs.status_events),
            }
        }
    }

    /// `CreateProxyPeer` for every account that has a fresh token and no registered key.
    async fn register(&mut self, client: &mut ProxyServiceClient<Channel>, tokens: &Tokens) {
        for (account_id, (service_id, token)) in tokens.iter() {
            let account = self
                .accounts
                .entry(account_id.clone())
                .or_insert_with(Account::new);
            if account.registered || account.tried_token.as_deref() == Some(token.as_str()) {
                continue;
            }
            account.tried_token = Some(token.clone());
            let request = CreateProxyPeerRequest {
                service_id: service_id.clone(),
                account_id: account_id.clone(),
                token: token.clone(),
                wireguard_public_key: account.public.clone(),
                cluster: self.link.domain.clone(),
            };
            match client
                .create_proxy_peer(self.link.authorized(request))
                .await
            {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    if resp.success {
                        account.registered = true;
                        account.error = None;
                        tracing::info!(account = %account_id, public_key = %account.public, "WireGuard peer registered");
                    } else {
                        let reason = resp.error_message.unwrap_or_default();
                        tracing::warn!(account = %account_id, %reason, "management refused this proxy's WireGuard peer; waiting for a new token");
                        account.error = Some(format!("CreateProxyPeer refused: {reason}"));
                    }
                }
                Err(status) if status.code() == Code::Unimplemented => {
                    account.error = Some("management has no CreateProxyPeer".to_string());
                }
                Err(status) => {
                    // The token may still be good: try it again on the next change.
                    account.tried_token = None;
                    tracing::warn!(account = %account_id, error = %status.message(), "CreateProxyPeer failed");
                }
            }
        }
        self.publish();
    }

    async fn apply(
        &mut self,
        update: MeshUpdate,
        client: &mut ProxyMeshClient<Channel>,
        events: &mpsc::Sender<String>,
    ) {
        let mut changed = Vec::new();
        for removed in &update.removed_accounts {
            if let Some(account) = self.accounts.get_mut(removed)
                && let Some(tunnel) = account.tunnel.take()
            {
                account.registered = false;
                account.address = None;
                account.peers.clear();
                account.bridges.clear();
                account.reported_port = None;
                account.inbound = None;
                let _ = tokio::task::spawn_blocking(move || drop(tunnel)).await;
                changed.push(removed.clone());
            }
        }
        for mesh in update.accounts {
            let account_id = mesh.account_id.clone();
            if self.apply_account(mesh).await {
                self.report_endpoint(&account_id, client).await;
                changed.push(account_id);
            }
        }
        if changed.is_empty() {
            return;
        }
        self.apply_firewall();
        self.publish();
        for account in changed {
            let _ = events.try_send(account);
        }
    }

    /// Creates or updates one account's tunnel; false when nothing was applied.
    async fn apply_account(&mut self, mesh: AccountMesh) -> bool {
        let first_port = self.settings.wg_port;
        let others_have_tunnels = self
            .accounts
            .iter()
            .any(|(id, a)| *id != mesh.account_id && a.tunnel.is_some());
        let backend = self.backend;
        let inbound = &self.inbound;
        let Some(account) = self.accounts.get_mut(&mesh.account_id) else {
            return false;
        };
        if mesh.public_key != account.public {
            tracing::debug!(account = %mesh.account_id, "mesh for a key this proxy no longer holds");
            return false;
        }
        let address: IpNet = match mesh.tunnel_address.parse() {
            Ok(a) => a,
            Err(_) => {
                account.error = Some(format!(
                    "management sent a bad tunnel address {:?}",
                    mesh.tunnel_address
                ));
                return false;
            }
        };
        if account.tunnel.is_none() && mesh.peers.is_empty() {
            // No peer to reach yet: no interface (and no process) per idle account.
            return false;
        }
        if account.tunnel.is_none() || account.address != Some(address) {
            account.inbound = None;
            let old = account.tunnel.take();
            let private = account.private.clone();
            let port = if others_have_tunnels { 0 } else { first_port };
            let created = tokio::task::spawn_blocking(move || {
                drop(old);
                let name = super::device::unique_interface_name("pcm");
                Tunnel::create(backend, &name, private, port, address)
            })
            .await;
            match created {
                Ok(Ok(tunnel)) => {
                    tracing::info!(account = %mesh.account_id, %address, port = tunnel.listen_port(), "account tunnel up");
                    account.tunnel = Some(tunnel);
                    account.address = Some(address);
                    account.reported_port = None;
                    account.bridges.clear();
                    account.error = None;
                    if let Some(inbound) = inbound {
                        open_inbound(&mesh.account_id, account, inbound, address);
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(account = %mesh.account_id, error = %e, "cannot create the account's WireGuard tunnel");
                    account.error = Some(e.to_string());
                    return false;
                }
                Err(_) => return false,
            }
        }
        account.peers = mesh_peers(&mesh, &account.peers);
        let peers: Vec<Peer> = account
            .peers
            .iter()
            .map(|p| Peer {
                public_key: p.public_key.clone(),
                allowed_ips: p.networks.clone(),
                preshared_key: self.settings.preshared_key.clone(),
            })
            .collect();
        if let Some(tunnel) = &account.tunnel
            && let Err(e) = tunnel.set_peers(&peers)
        {
            tracing::error!(account = %mesh.account_id, error = %e, "cannot configure the account's peers");
            account.error = Some(e.to_string());
        }
        true
    }

    async fn report_endpoint(&mut self, account_id: &str, client: &mut ProxyMeshClient<Channel>) {
        let Some(account) = self.accounts.get_mut(account_id) else {
            return;
        };
        let Some(port) = account.tunnel.as_ref().map(Tunnel::listen_port) else {
            return;
        };
        if account.reported_port == Some(port) {
            return;
        }
        let request = ReportEndpointRequest {
            proxy_id: self.link.proxy_id.clone(),
            account_id: account_id.to_string(),
            public_key: account.public.clone(),
            listen_port: u32::from(port),
            host: self.settings.endpoint_host.clone(),
        };
        match client.report_endpoint(self.link.authorized(request)).await {
            Ok(_) => account.reported_port = Some(port),
            Err(status) => {
                tracing::warn!(account = %account_id, error = %status.message(), "WireGuard endpoint not reported; retrying with the next update");
            }
        }
    }

    fn apply_firewall(&mut self) {
        let port = self.inbound.as_ref().map(MeshInbound::port);
        let interfaces: Vec<MeshInterface<'_>> = self
            .accounts
            .values()
            .filter_map(|a| {
                let name = a.tunnel.as_ref().and_then(Tunnel::interface)?;
                let accepts = match (&a.inbound, a.address, port) {
                    (Some(_), Some(address), Some(port)) => {
                        Some(SocketAddr::new(address.addr(), port))
                    }
                    _ => None,
                };
                Some(MeshInterface { name, accepts })
            })
            .collect();
        if interfaces.is_empty() && self.firewall_error.is_none() {
            let _ = self.firewall.apply(&[]);
            return;
        }
        match self.firewall.apply(&interfaces) {
            Ok(()) => self.firewall_error = None,
            Err(e) => {
                tracing::error!(error = %e, "the mesh interfaces are not isolated by nftables");
                self.firewall_error = Some(e.to_string());
            }
        }
    }

    /// Reads every tunnel's peer state; republishes when a peer went up or down or the set of
    /// in-process bridges changed.
    fn poll(&mut self, events: &mpsc::Sender<String>) {
        let now = Instant::now();
        // Only the in-process backend needs the targets (for its bridges).
        let bridged = self
            .accounts
            .values()
            .any(|a| matches!(a.tunnel, Some(Tunnel::InProcess(_))));
        let targets = if bridged {
            self.shared.routes.load().mesh_targets()
        } else {
            Vec::new()
        };
        let mut republish = false;
        let inbound = &self.inbound;
        let mut reopened = false;
        for (account_id, account) in &mut self.accounts {
            if let (Some(inbound), None, Some(address)) =
                (inbound, &account.inbound, account.address)
                && account.tunnel.is_some()
            {
                // Opening failed before (a worker's queue was full, the address not ready yet).
                open_inbound(account_id, account, inbound, address);
                reopened |= account.inbound.is_some();
            }
            let Some(tunnel) = &account.tunnel else {
                continue;
            };
            let states = match tunnel.peers() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(account = %account_id, error = %e, "cannot read the tunnel's peers");
                    continue;
                }
            };
            let mut flipped = false;
            for peer in &mut account.peers {
                let Some(state) = states.iter().find(|s| s.public_key == peer.public_key) else {
                    continue;
                };
                if state.rx_bytes != peer.rx_bytes {
                    peer.rx_bytes = state.rx_bytes;
                    peer.last_rx = Some(now);
                }
                peer.last_handshake = state.last_handshake;
                let fresh = state.last_handshake.is_some_and(|t| {
                    SystemTime::now()
                        .duration_since(t)
                        .is_ok_and(|age| age < HANDSHAKE_FRESH)
                });
                let up = fresh
                    && peer
                        .last_rx
                        .is_some_and(|t| now.duration_since(t) < SILENCE_IS_DOWN);
                if up != peer.up {
                    tracing::info!(account = %account_id, peer = %peer.name, up, "mesh peer {}", if up { "up" } else { "down" });
                    peer.up = up;
                    flipped = true;
                }
            }
            if flipped {
                republish = true;
                let _ = events.try_send(account_id.clone());
            }
            if matches!(tunnel, Tunnel::InProcess(_)) {
                republish |= sync_bridges(account_id, account, &targets);
            }
        }
        if reopened {
            // The firewall must let the new listener's connections in.
            self.apply_firewall();
        }
        if republish || reopened {
            self.publish();
        }
    }

    /// The data plane's snapshot and the `/healthz` view.
    fn publish(&self) {
        let mut snapshot = MeshSnapshot::default();
        let mut health = serde_json::Map::new();
        for (id, account) in &self.accounts {
            let peers: Vec<serde_json::Value> = account
                .peers
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.name,
                        "public_key": p.public_key.to_base64(),
                        "allowed_ips": p.networks.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "up": p.up,
                        "handshake_age_s": p.last_handshake.and_then(|t| SystemTime::now().duration_since(t).ok()).map(|d| d.as_secs()),
                    })
                })
                .collect();
            health.insert(
                id.clone(),
                serde_json::json!({
                    "registered": account.registered,
                    "public_key": account.public,
                    "tunnel_address": account.address.map(|a| a.to_string()),
                    "interface": account.tunnel.as_ref().and_then(Tunnel::interface),
                    "listen_port": account.tunnel.as_ref().map(Tunnel::listen_port),
                    "accepts_private": account.inbound.is_some(),
                    "peers": peers,
                    "error": account.error,
                }),
            );
            let (Some(tunnel), Some(address)) = (&account.tunnel, account.address) else {
                continue;
            };
            snapshot.accounts.insert(
                id.clone(),
                AccountRoutes {
                    range: address.trunc(),
                    address: address.addr(),
                    carrier: tunnel.carrier(),
                    peers: account
                        .peers
                        .iter()
                        .map(|p| PeerRoute {
                            name: p.name.clone(),
                            public_key: Arc::from(p.public_key.to_base64()),
                            networks: p.networks.clone(),
                            up: p.up,
                        })
                        .collect(),
                    bridges: if tunnel.carrier() == Carrier::InProcess {
                        account.bridges.clone()
                    } else {
                        HashMap::new()
                    },
                },
            );
        }
        self.shared.mesh.publish(snapshot);
        set_health(
            &self.shared,
            serde_json::json!({
                "backend": self.backend.to_string(),
                "reason": self.reason,
                "firewall": self.firewall_error.clone().unwrap_or_else(|| "on".to_string()),
                "accounts": health,
            }),
        );
    }
}

/// The account's peers from management, keeping what was observed of peers that stay.
fn mesh_peers(mesh: &AccountMesh, previous: &[MeshPeerState]) -> Vec<MeshPeerState> {
    let mut out = Vec::new();
    for p in &mesh.peers {
        let Ok(public_key) = Key::from_base64(&p.public_key) else {
            tracing::warn!(peer = %p.name, "management sent a peer with a bad public key; skipped");
            continue;
        };
        let networks: Vec<IpNet> = p
            .allowed_ips
            .iter()
            .filter_map(|n| match n.parse::<IpNet>() {
                Ok(n) => Some(n.trunc()),
                Err(_) => {
                    tracing::warn!(peer = %p.name, network = %n, "bad allowed IP skipped");
                    None
                }
            })
            .collect();
        let seen = previous.iter().find(|q| q.public_key == public_key);
        out.push(MeshPeerState {
            name: if p.name.is_empty() {
                p.id.clone()
            } else {
                p.name.clone()
            },
            public_key,
            networks,
            rx_bytes: seen.map_or(0, |s| s.rx_bytes),
            last_rx: seen.and_then(|s| s.last_rx),
            last_handshake: seen.and_then(|s| s.last_handshake),
            up: seen.is_some_and(|s| s.up),
        });
    }
    out
}

/// Opens a loopback bridge for every target of this account the mesh carries and closes the
/// rest; true when the set changed.
fn sync_bridges(account_id: &str, account: &mut Account, targets: &[(String, SocketAddr)]) -> bool {
    let Some(tunnel) = &account.tunnel else {
        return false;
    };
    let range = account.address.map(|a| a.trunc());
    let wanted: Vec<SocketAddr> = targets
        .iter()
        .filter(|(acc, addr)| {
            acc == account_id
                && (range.is_some_and(|r| r.contains(&addr.ip()))
                    || account
                        .peers
                        .iter()
                        .any(|p| p.networks.iter().any(|n| n.contains(&addr.ip()))))
        })
        .map(|(_, addr)| *addr)
        .collect();
    let mut changed = false;
    let stale: Vec<SocketAddr> = account
        .bridges
        .keys()
        .filter(|t| !wanted.contains(t))
        .copied()
        .collect();
    for target in stale {
        tunnel.close_bridge(target);
        account.bridges.remove(&target);
        changed = true;
    }
    for target in wanted {
        if account.bridges.contains_key(&target) {
            continue;
        }
        if let Some(bridge) = tunnel.bridge(target) {
            account.bridges.insert(target, bridge);
            changed = true;
        }
    }
    changed
}

/// Opens the account's listeners for private services; a failure is the account's error (and
/// logged once per distinct reason), and the next poll tries again.
fn open_inbound(account_id: &str, account: &mut Account, inbound: &MeshInbound, address: IpNet) {
    let Some(interface) = account.tunnel.as_ref().and_then(Tunnel::interface) else {
        return;
    };
    match inbound.open(account_id, interface, address.addr()) {
        Ok(closer) => {
            tracing::info!(account = %account_id, address = %address.addr(), port = inbound.port(), "accepting private services' requests over the mesh");
            account.inbound = Some(closer);
            if account
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(INBOUND_ERROR))
            {
                account.error = None;
            }
        }
        Err(e) => {
            let e = format!("{INBOUND_ERROR}: {e}");
            if account.error.as_deref() != Some(e.as_str()) {
                tracing::error!(account = %account_id, error = %e, "private services cannot be served over this account's mesh");
            }
            account.error = Some(e);
        }
    }
}

const INBOUND_ERROR: &str = "no listener for private services";

fn set_health(shared: &Shared, value: serde_json::Value) {
    *shared.mesh_health.lock().unwrap_or_else(|p| p.into_inner()) = value;
}
