//! The connection to management: register with the proxy token, receive the snapshot and every
//! change of this cluster's services, publish them to the data plane, report service status.
//!
//! `SyncMappings` (an ack after each applied batch) is tried first; a management that answers
//! `UNIMPLEMENTED` gets `GetMappingUpdate`. While disconnected the last table keeps serving.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::proxy_service_client::ProxyServiceClient;
use proto::{
    GetMappingUpdateRequest, ProxyCapabilities, ProxyMapping, ProxyMappingUpdateType,
    SendStatusUpdateRequest, SyncMappingsAck, SyncMappingsInit, SyncMappingsRequest,
    sync_mappings_request,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use super::sources::Sources;
use crate::state::Shared;

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error(
        "refusing to send the proxy token over plaintext {0}: use https:// or set NB_PROXY_ALLOW_INSECURE=true"
    )]
    Insecure(String),
    #[error("NB_PROXY_MANAGEMENT_ADDRESS {address:?} is not a valid URL: {message}")]
    BadAddress { address: String, message: String },
    #[error("NB_PROXY_DOMAIN is required to register with management (the cluster address)")]
    NoDomain,
    #[error("the proxy token is not valid in gRPC metadata")]
    BadToken,
    #[error("cannot read NB_PROXY_MANAGEMENT_CA_FILE {path}: {message}")]
    CaFile { path: String, message: String },
}

/// Everything needed to talk to management.
#[derive(Clone)]
pub struct ManagementLink {
    endpoint: Endpoint,
    token: MetadataValue<tonic::metadata::Ascii>,
    pub domain: String,
    pub proxy_id: String,
    pub require_subdomain: bool,
    /// Reported to management as `supports_custom_ports`.
    pub custom_ports: bool,
    /// Reported as `supports_crowdsec`: a bouncer is configured.
    pub crowdsec: bool,
    /// Reported as `supports_private_service`: NB_PROXY_PRIVATE on a mesh backend that accepts
    /// connections.
    pub private_services: bool,
}

impl ManagementLink {
    pub fn new(
        address: &str,
        token: &str,
        allow_insecure: bool,
        domain: Option<&str>,
        proxy_id: String,
        require_subdomain: bool,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, ManagementError> {
        let bad = |message: String| ManagementError::BadAddress {
            address: address.to_string(),
            message,
        };
        let domain = domain
            .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .ok_or(ManagementError::NoDomain)?;
        let mut endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(path) = ca_file {
                let pem = std::fs::read(path).map_err(|e| ManagementError::CaFile {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        } else if address.starts_with("http://") {
            if !allow_insecure {
                return Err(ManagementError::Insecure(address.to_string()));
            }
        } else {
            return Err(bad("the scheme must be https:// or http://".to_string()));
        }
        let token = format!("Bearer {token}")
            .parse()
            .map_err(|_| ManagementError::BadToken)?;
        Ok(Self {
            endpoint,
            token,
            domain,
            proxy_id,
            require_subdomain,
            custom_ports: true,
            crowdsec: false,
            private_services: false,
        })
    }

    /// The management endpoint, for the other gRPC services of ours (the mesh).
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub(crate) fn authorized<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.token.clone());
        req
    }

    fn capabilities(&self) -> ProxyCapabilities {
        ProxyCapabilities {
            supports_custom_ports: Some(self.custom_ports),
            require_subdomain: Some(self.require_subdomain),
            supports_crowdsec: Some(self.crowdsec),
            // NetBird's "serves only over the mesh": this proxy serves its public listeners too.
            private: Some(false),
            supports_private_service: Some(self.private_services),
        }
    }

    fn init(&self) -> SyncMappingsInit {
        let now = std::time::SystemTime::now();
        SyncMappingsInit {
            proxy_id: self.proxy_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: Some(prost_types::Timestamp::from(now)),
            address: self.domain.clone(),
            capabilities: Some(self.capabilities()),
        }
    }
}

/// Backoff between reconnects: NetBird's 800 ms × 1.7, capped at 10 s, with ±20 % jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(800);
    const CAP: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Self { next: Self::START }
    }

    fn reset(&mut self) {
        self.next = Self::START;
    }

    fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next.mul_f64(1.7)).min(Self::CAP);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = 0.8 + f64::from(nanos % 1000) / 2500.0;
        base.mul_f64(jitter)
    }
}

/// What makes the proxy send services' status again, and where mapping tokens go.
pub struct StatusEvents {
    /// Domains whose ACME certificate state changed.
    pub certificates: mpsc::Receiver<String>,
    /// Accounts whose mesh tunnel state changed.
    pub mesh: mpsc::Receiver<String>,
    /// The newest one-time `CreateProxyPeer` token of each account, for the mesh task.
    pub tokens: watch::Sender<crate::mesh::Tokens>,
}

/// Runs forever: connects, follows the mapping stream, reconnects.
pub async fn run(
    shared: Arc<Shared>,
    link: ManagementLink,
    sources: Arc<Sources>,
    mut events: StatusEvents,
) {
    let mut backoff = Backoff::new();
    loop {
        let outcome = session(&shared, &link, &sources, &mut backoff, &mut events).await;
        shared
            .status
            .management_connected
            .store(false, Ordering::SeqCst);
        let wait = match outcome {
            Err(status) if status.code() == Code::Unauthenticated => {
                tracing::error!(
                    reason = status.message(),
                    "management rejected the proxy token (NB_PROXY_TOKEN): check that it is \
                     right and not revoked or expired; retrying slowly"
                );
                Backoff::CAP * 3
            }
            Err(status) if status.code() == Code::AlreadyExists => {
                tracing::error!(
                    reason = status.message(),
                    "management refused this cluster address (NB_PROXY_DOMAIN)"
                );
                Backoff::CAP * 3
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), reason = status.message(), "management connection lost; serving the last known services");
                backoff.step()
            }
            Ok(()) => {
                tracing::warn!("management closed the mapping stream; reconnecting");
                backoff.step()
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One connection: returns when the stream ends.
async fn session(
    shared: &Arc<Shared>,
    link: &ManagementLink,
    sources: &Arc<Sources>,
    backoff: &mut Backoff,
    events: &mut StatusEvents,
) -> Result<(), Status> {
    let channel = link
        .endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach management: {e}")))?;
    let mut client = ProxyServiceClient::new(channel.clone());
    let (ack_tx, ack_rx) = mpsc::channel::<SyncMappingsRequest>(4);
    ack_tx
        .send(SyncMappingsRequest {
            msg: Some(sync_mappings_request::Msg::Init(link.init())),
        })
        .await
        .map_err(|_| Status::internal("ack channel closed"))?;
    let sync = client
        .sync_mappings(link.authorized(ReceiverStream::new(ack_rx)))
        .await;
    let mut applier = Applier::new(
        shared.clone(),
        sources.clone(),
        link.clone(),
        channel,
        events.tokens.clone(),
    );
    match sync {
        Ok(resp) => {
            let mut stream = resp.into_inner();
            connected(shared, backoff);
            while let Some(msg) = next_message(&mut stream, &mut applier, events).await? {
                applier.apply(msg.mapping, msg.initial_sync_complete);
                // The batch is in the table: ask for the next one.
                if ack_tx
                    .send(SyncMappingsRequest {
                        msg: Some(sync_mappings_request::Msg::Ack(SyncMappingsAck {})),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(())
        }
        Err(status) if status.code() == Code::Unimplemented => {
            tracing::info!("management has no SyncMappings; using GetMappingUpdate");
            let init = link.init();
            let req = GetMappingUpdateRequest {
                proxy_id: init.proxy_id,
                version: init.version,
                started_at: init.started_at,
                address: init.address,
                capabilities: init.capabilities,
            };
            let mut stream = client
                .get_mapping_update(link.authorized(req))
                .await?
                .into_inner();
            connected(shared, backoff);
            while let Some(msg) = next_message(&mut stream, &mut applier, events).await? {
                applier.apply(msg.mapping, msg.initial_sync_complete);
            }
            Ok(())
        }
        Err(status) => Err(status),
    }
}

/// The next message of a mapping stream; certificate and tunnel events that arrive meanwhile
/// are reported.
async fn next_message<T>(
    stream: &mut tonic::Streaming<T>,
    applier: &mut Applier,
    events: &mut StatusEvents,
) -> Result<Option<T>, Status> {
    loop {
        let retry_at = applier.next_port_retry;
        let retry = applier.ports_failed();
        tokio::select! {
            msg = stream.message() => return msg,
            Some(domain) = events.certificates.recv() => applier.report_domain(&domain),
            Some(account) = events.mesh.recv() => applier.report_account(&account),
            _ = tokio::time::sleep_until(retry_at), if retry => applier.retry_ports(),
        }
    }
}

fn connected(shared: &Shared, backoff: &mut Backoff) {
    shared
        .status
        .management_connected
        .store(true, Ordering::SeqCst);
    backoff.reset();
    tracing::info!("connected to management");
}

/// Applies batches: a snapshot is collected until `initial_sync_complete` and then replaces
/// everything at once; later batches change single services.
struct Applier {
    shared: Arc<Shared>,
    sources: Arc<Sources>,
    snapshot: Option<HashMap<String, ProxyMapping>>,
    current: HashMap<String, ProxyMapping>,
    status_tx: mpsc::Sender<SendStatusUpdateRequest>,
    tokens: watch::Sender<crate::mesh::Tokens>,
    /// The services the last table could not serve, with why.
    skipped: HashMap<String, String>,
    /// When ports that could not be opened are tried again.
    next_port_retry: tokio::time::Instant,
    /// NB_PROXY_PRIVATE in force: the port private services are served on over the mesh.
    private_https_port: Option<u16>,
}

/// How often L4 ports held by another program are tried again.
pub const PORT_RETRY: Duration = Duration::from_secs(5);

/// Status updates waiting to be sent; more are dropped (the next sync sends every status).
const STATUS_QUEUE: usize = 4096;

impl Applier {
    fn new(
        shared: Arc<Shared>,
        sources: Arc<Sources>,
        link: ManagementLink,
        channel: Channel,
        tokens: watch::Sender<crate::mesh::Tokens>,
    ) -> Self {
        let (status_tx, mut status_rx) = mpsc::channel::<SendStatusUpdateRequest>(STATUS_QUEUE);
        let private_https_port = link
            .private_services
            .then_some(shared.config.https_listen.port());
        let mut client = ProxyServiceClient::new(channel);
        // Ends when the Applier (the session) is gone.
        tokio::spawn(async move {
            while let Some(u) = status_rx.recv().await {
                let id = u.service_id.clone();
                if let Err(e) = client.send_status_update(link.authorized(u)).await {
                    tracing::debug!(service = %id, error = %e, "status update not delivered");
                }
            }
        });
        Self {
            status_tx,
            tokens,
            shared,
            sources,
            snapshot: Some(HashMap::new()),
            current: HashMap::new(),
            skipped: HashMap::new(),
            next_port_retry: tokio::time::Instant::now() + PORT_RETRY,
            private_https_port,
        }
    }

    fn ports_failed(&self) -> bool {
        self.sources.ports_failed()
    }

    /// Publishes the table again so ports that were held can open now; services that became
    /// served are reported as such.
    fn retry_ports(&mut self) {
        self.next_port_retry = tokio::time::Instant::now() + PORT_RETRY;
        let skipped = self
            .sources
            .set_management(self.current.values().cloned().collect(), &self.shared);
        let recovered: Vec<ProxyMapping> = self
            .skipped
            .keys()
            .filter(|id| !skipped.contains_key(*id))
            .filter_map(|id| self.current.get(id).cloned())
            .collect();
        if !recovered.is_empty() {
            tracing::info!(services = recovered.len(), "L4 ports opened on a retry");
        }
        self.skipped = skipped.clone();
        self.report(recovered, skipped);
    }

    fn apply(&mut self, batch: Vec<ProxyMapping>, initial_sync_complete: bool) {
        let target = self.snapshot.as_mut().unwrap_or(&mut self.current);
        let mut changed: Vec<ProxyMapping> = Vec::new();
        for m in batch {
            if m.r#type == ProxyMappingUpdateType::UpdateTypeRemoved as i32 {
                target.remove(&m.id);
            } else {
                changed.push(m.clone());
                target.insert(m.id.clone(), m);
            }
        }
        if let Some(snapshot) = &mut self.snapshot {
            if !initial_sync_complete {
                return;
            }
            self.current = std::mem::take(snapshot);
            self.snapshot = None;
            changed = self.current.values().cloned().collect();
            self.shared
                .status
                .initial_sync_complete
                .store(true, Ordering::SeqCst);
            tracing::info!(services = self.current.len(), "initial sync complete");
        }
        let skipped = self
            .sources
            .set_management(self.current.values().cloned().collect(), &self.shared);
        self.hand_over_tokens(&changed);
        self.skipped = skipped.clone();
        self.report(changed, skipped);
    }

    /// Gives the mesh task each account's newest one-time token (management issues a fresh one
    /// with every mapping it sends).
    fn hand_over_tokens(&self, changed: &[ProxyMapping]) {
        let fresh: Vec<&ProxyMapping> = changed
            .iter()
            .filter(|m| !m.auth_token.is_empty() && !m.account_id.is_empty())
            .collect();
        if fresh.is_empty() {
            return;
        }
        self.tokens.send_modify(|tokens| {
            let mut next = HashMap::clone(tokens);
            for m in fresh {
                next.insert(m.account_id.clone(), (m.id.clone(), m.auth_token.clone()));
            }
            *tokens = Arc::new(next);
        });
    }

    /// Sends the status of every service of `account` again (its tunnel state changed).
    fn report_account(&self, account: &str) {
        let changed: Vec<ProxyMapping> = self
            .current
            .values()
            .filter(|m| m.account_id == account)
            .cloned()
            .collect();
        self.report(changed, HashMap::new());
    }

    /// Tells management how each changed service is served, off the apply path.
    fn report(&self, changed: Vec<ProxyMapping>, skipped: HashMap<String, String>) {
        if changed.is_empty() {
            return;
        }
        let certs = self.shared.certs.store();
        let mesh = self.shared.mesh.load();
        let updates: Vec<SendStatusUpdateRequest> = changed
            .iter()
            .map(|m| {
                let (status, message, issued) = match skipped.get(&m.id) {
                    Some(err) => (proto::ProxyStatus::Error, Some(err.clone()), false),
                    None => service_status(&self.shared, &certs, m),
                };
                SendStatusUpdateRequest {
                    service_id: m.id.clone(),
                    account_id: m.account_id.clone(),
                    status: status as i32,
                    certificate_issued: issued,
                    error_message: message,
                    inbound_listener: self.inbound_listener(&mesh, m),
                }
            })
            .collect();
        self.send(updates);
    }

    /// Where mesh peers reach a private service: the proxy's tunnel address in the service's
    /// account, once its tunnel is up.
    fn inbound_listener(
        &self,
        mesh: &crate::mesh::MeshSnapshot,
        m: &ProxyMapping,
    ) -> Option<proto::ProxyInboundListener> {
        let https_port = self.private_https_port.filter(|_| m.private)?;
        let routes = mesh.accounts.get(&m.account_id)?;
        Some(proto::ProxyInboundListener {
            tunnel_ip: routes.address.to_string(),
            https_port: u32::from(https_port),
            http_port: 0,
        })
    }

    /// Sends the status of every HTTP service on `domain` again (its certificate changed).
    fn report_domain(&self, domain: &str) {
        let changed: Vec<ProxyMapping> = self
            .current
            .values()
            .filter(|m| {
                crate::routes::L4Mode::parse(&m.mode).is_none()
                    && m.domain.trim_end_matches('.').eq_ignore_ascii_case(domain)
            })
            .cloned()
            .collect();
        self.report(changed, HashMap::new());
    }

    /// Queues updates for the one sender of this session, so they reach management in order.
    fn send(&self, updates: Vec<SendStatusUpdateRequest>) {
        for u in updates {
            if self.status_tx.try_send(u).is_err() {
                tracing::warn!("status update queue full; the next sync reports every status");
                return;
            }
        }
    }
}

/// How a served service stands with its certificate.
fn service_status(
    shared: &Shared,
    certs: &crate::tls::CertStore,
    m: &ProxyMapping,
) -> (proto::ProxyStatus, Option<String>, bool) {
    use crate::acme::CertState;
    use proto::ProxyStatus;
    if let Some(reason) = tunnel_problem(shared, m) {
        return (ProxyStatus::TunnelNotCreated, Some(reason), false);
    }
    // L4 services carry their clients' TLS, if any: no certificate here.
    if crate::routes::L4Mode::parse(&m.mode).is_some() {
        return (ProxyStatus::Active, None, false);
    }
    let domain = m.domain.trim_end_matches('.').to_ascii_lowercase();
    if shared.config.acme.is_some() {
        if certs.covers(&domain) {
            return (ProxyStatus::Active, None, true);
        }
        return match shared.acme_board.get(&domain) {
            Some(CertState::Failed(reason)) => {
                (ProxyStatus::CertificateFailed, Some(reason), false)
            }
            // Issued but not loaded yet is still pending.
            _ => (
                ProxyStatus::CertificatePending,
                Some("the certificate is being issued".to_string()),
                false,
            ),
        };
    }
    if certs.find(&domain).is_some() {
        (ProxyStatus::Active, None, true)
    } else {
        (
            ProxyStatus::CertificatePending,
            Some("no certificate for this domain yet".to_string()),
            false,
        )
    }
}

/// Why a target of this service cannot be reached through its account's mesh, if so.
fn tunnel_problem(shared: &Shared, m: &ProxyMapping) -> Option<String> {
    let mesh = shared.mesh.load();
    m.path
        .iter()
        .filter(|p| !p.options.as_ref().is_some_and(|o| o.direct_upstream))
        .filter_map(|p| target_addr(&p.target))
        .find_map(|addr| match mesh.dial(&m.account_id, addr) {
            Some(crate::mesh::MeshDial::Unreachable(reason)) => Some(reason),
            _ => None,
        })
}

/// The IP-literal address of a mapping's target (`http://100.64.0.2:8080/` or `100.64.0.2:22`).
fn target_addr(target: &str) -> Option<std::net::SocketAddr> {
    if let Ok(t) = crate::routes::Target::parse(target) {
        return t.socket_addr();
    }
    crate::routes::l4::L4Target::parse(target).ok()?.addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap() {
        let mut b = Backoff::new();
        let first = b.step();
        assert!(first >= Duration::from_millis(600) && first <= Duration::from_millis(1000));
        for _ in 0..20 {
            assert!(b.step() <= Backoff::CAP.mul_f64(1.2));
        }
        b.reset();
        assert!(b.step() <= Duration::from_millis(1000));
    }

    #[test]
    fn plaintext_needs_consent() {
        let err = ManagementLink::new(
            "http://127.0.0.1:1",
            "t",
            false,
            Some("p.example"),
            "id".into(),
            false,
            None,
        )
        .err()
        .expect("refused");
        assert!(err.to_string().contains("NB_PROXY_ALLOW_INSECURE"));
        assert!(
            ManagementLink::new(
                "http://127.0.0.1:1",
                "t",
                true,
                Some("p.example"),
                "id".into(),
                false,
                None
            )
            .is_ok()
        );
        assert!(matches!(
            ManagementLink::new(
                "https://m.example",
                "t",
                false,
                None,
                "id".into(),
                false,
                None
            ),
            Err(ManagementError::NoDomain)
        ));
    }
}
