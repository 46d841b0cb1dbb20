//! Runs the management server: gRPC for proxies and REST for people, on one store.

use std::net::SocketAddr;
use std::time::Duration;

use proto::logs::proxy_access_logs_server::ProxyAccessLogsServer;
use proto::mesh::agent_server::AgentServer;
use proto::mesh::proxy_mesh_server::ProxyMeshServer;
use proto::proxy_service_server::ProxyServiceServer;
use tokio::net::TcpListener;

use crate::events::ChangeBus;
use crate::grpc::{AgentService, ProxyServiceImpl};
use crate::oidc::sign_in::Sso;
use crate::rest::{self, AppState};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone)]
pub struct ManagementConfig {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub store_url: String,
    /// How often open proxy streams re-check their token (NetBird: 60 s).
    pub heartbeat: Duration,
    /// PEM certificate chain and key for the gRPC listener; plaintext when `None`.
    pub grpc_tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Access logs older than this many days are deleted (0: kept forever).
    pub access_log_retention_days: u32,
    /// Where browsers reach the REST listener (single sign-on callbacks); `None`: the REST
    /// address itself, with an unspecified IP read as loopback.
    pub public_url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("REST server failed: {0}")]
    Rest(std::io::Error),
    #[error("single sign-on cannot start: {0}")]
    Sso(#[from] crate::oidc::OidcError),
    #[error("public URL {0:?} must be an http:// or https:// URL without path or query")]
    PublicUrl(String),
}

/// A management server whose sockets are bound and store is open, ready to serve.
pub struct Management {
    pub store: Store,
    pub bus: ChangeBus,
    grpc: TcpListener,
    http: TcpListener,
    heartbeat: Duration,
    grpc_tls: Option<(Vec<u8>, Vec<u8>)>,
    retention_days: u32,
    sso: std::sync::Arc<Sso>,
}

impl Management {
    pub async fn bind(config: &ManagementConfig) -> Result<Management, ServeError> {
        let store = Store::open(&config.store_url).await?;
        let listen = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr, what, source })
        };
        let grpc = listen(config.grpc_listen, "gRPC for proxies").await?;
        let http = listen(config.http_listen, "REST API").await?;
        let public_url = match &config.public_url {
            Some(u) => {
                let u = u.trim().trim_end_matches('/').to_string();
                let rest = u
                    .strip_prefix("https://")
                    .or_else(|| u.strip_prefix("http://"))
                    .unwrap_or_default();
                if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
                    return Err(ServeError::PublicUrl(u));
                }
                u
            }
            None => {
                let mut addr = http.local_addr().unwrap_or(config.http_listen);
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
        };
        let sso = std::sync::Arc::new(Sso::new(&public_url)?);
        Ok(Management {
            store,
            bus: ChangeBus::new(),
            grpc,
            http,
            heartbeat: config.heartbeat,
            grpc_tls: config.grpc_tls.clone(),
            retention_days: config.access_log_retention_days,
            sso,
        })
    }

    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let svc = ProxyServiceImpl::new(
            self.store.clone(),
            self.bus.clone(),
            self.heartbeat,
            self.sso.clone(),
        );
        let agent = AgentService {
            store: self.store.clone(),
            bus: self.bus.clone(),
        };
        tokio::spawn(rest::prune_forever(self.store.clone(), self.retention_days));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut grpc_stop = stop_rx.clone();
        let mut builder = tonic::transport::Server::builder();
        if let Some((cert, key)) = &self.grpc_tls {
            let identity = tonic::transport::Identity::from_pem(cert, key);
            builder =
                builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
        }
        let grpc = builder
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(ProxyAccessLogsServer::new(svc.clone()))
            .add_service(ProxyMeshServer::new(svc.clone()))
            .add_service(AgentServer::new(agent))
            .add_service(ProxyServiceServer::new(svc))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(self.grpc),
                async move {
                    let _ = grpc_stop.wait_for(|v| *v).await;
                },
            );
        let app = rest::router(AppState {
            store: self.store.clone(),
            bus: self.bus.clone(),
            sso: self.sso,
        });
        let mut rest_stop = stop_rx;
        let rest = axum::serve(self.http, app).with_graceful_shutdown(async move {
            let _ = rest_stop.wait_for(|v| *v).await;
        });
        let (g, r) = tokio::join!(grpc, rest);
        g?;
        r.map_err(ServeError::Rest)?;
        Ok(())
    }
}
