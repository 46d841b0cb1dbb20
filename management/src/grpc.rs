//! The gRPC `ProxyService` that proxies dial: mapping streams and status updates; our
//! extensions `ProxyAccessLogs` (batched access logs) and the mesh services `ProxyMesh`
//! (proxies) and `Agent` (`portcullis agent`).
//! The proxy token travels as `authorization: Bearer <token>` metadata on every call.

mod access_log_writer;
mod access_logs;
mod agent;
mod auth;
mod mappings;
mod mesh;
mod proxy_peers;
mod tunnel_peer;

use std::time::Duration;

use proto::proxy_service_server::ProxyService;
use proto::*;
use tonic::{Request, Response, Status, Streaming};

use crate::events::ChangeBus;
use crate::store::{ProxyToken, ServiceStatus, Store};

pub use agent::AgentService;
pub use mappings::BATCH_SIZE;
pub use mesh::MESH_REFRESH;

#[derive(Clone)]
pub struct ProxyServiceImpl {
    pub store: Store,
    pub bus: ChangeBus,
    /// How often open streams re-check their token and mark their proxy as seen.
    pub heartbeat: Duration,
    /// Single sign-on (`GetOIDCURL`).
    pub sso: std::sync::Arc<crate::oidc::sign_in::Sso>,
    /// Stores `SendAccessLog` and `SendAccessLogs` entries in batches.
    access_logs: access_log_writer::AccessLogWriter,
}

impl ProxyServiceImpl {
    /// Starts the access-log writer on the current tokio runtime.
    pub fn new(
        store: Store,
        bus: ChangeBus,
        heartbeat: Duration,
        sso: std::sync::Arc<crate::oidc::sign_in::Sso>,
    ) -> ProxyServiceImpl {
        ProxyServiceImpl {
            access_logs: access_log_writer::AccessLogWriter::start(store.clone()),
            store,
            bus,
            heartbeat,
            sso,
        }
    }

    async fn authenticate<T>(&self, req: &Request<T>) -> Result<ProxyToken, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::unauthenticated("missing proxy token (authorization: Bearer …)")
            })?;
        let plain = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <proxy token>`"))?
            .trim();
        match self.store.proxy_token_by_plain(plain).await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(Status::unauthenticated(
                "proxy token is unknown, revoked or expired",
            )),
            Err(e) => {
                tracing::error!(error = %e, "token lookup failed");
                Err(Status::unavailable("management store unavailable"))
            }
        }
    }
}

#[cfg(test)]
impl ProxyServiceImpl {
    /// A service on `store` with its own change bus, a 60 s heartbeat and no single sign-on.
    pub(crate) fn for_tests(store: Store) -> ProxyServiceImpl {
        ProxyServiceImpl::new(
            store,
            ChangeBus::new(),
            Duration::from_secs(60),
            crate::oidc::sign_in::Sso::for_tests(),
        )
    }
}

/// Proxy tokens for tests: one scoped to account `a`, one to account `b`, one to no account.
#[cfg(test)]
pub(crate) async fn test_tokens(
    store: &Store,
    a: &str,
    b: &str,
) -> (ProxyToken, ProxyToken, ProxyToken) {
    let (own, _) = store.create_proxy_token(Some(a), "a", None).await.unwrap();
    let (other, _) = store.create_proxy_token(Some(b), "b", None).await.unwrap();
    let (shared, _) = store
        .create_proxy_token(None, "shared", None)
        .await
        .unwrap();
    (own, other, shared)
}

/// The inbound listener a proxy reported, as stored; a nonsensical one is ignored.
fn inbound_json(l: Option<&proto::ProxyInboundListener>) -> Option<String> {
    let l = l?;
    let ip: std::net::IpAddr = l.tunnel_ip.trim().parse().ok()?;
    let port = u16::try_from(l.https_port).ok().filter(|p| *p != 0)?;
    Some(serde_json::json!({"tunnel_ip": ip.to_string(), "https_port": port}).to_string())
}

#[tonic::async_trait]
impl ProxyService for ProxyServiceImpl {
    type GetMappingUpdateStream = mappings::ResponseStream<GetMappingUpdateResponse>;

    async fn get_mapping_update(
        &self,
        request: Request<GetMappingUpdateRequest>,
    ) -> Result<Response<Self::GetMappingUpdateStream>, Status> {
        let token = self.authenticate(&request).await?;
        let init = request.into_inner();
        let stream = mappings::open_update_stream(self.clone(), token, init).await?;
        Ok(Response::new(stream))
    }

    type SyncMappingsStream = mappings::ResponseStream<SyncMappingsResponse>;

    async fn sync_mappings(
        &self,
        request: Request<Streaming<SyncMappingsRequest>>,
    ) -> Result<Response<Self::SyncMappingsStream>, Status> {
        let token = self.authenticate(&request).await?;
        let inbound = request.into_inner();
        let stream = mappings::open_sync_stream(self.clone(), token, inbound).await?;
        Ok(Response::new(stream))
    }

    async fn send_status_update(
        &self,
        request: Request<SendStatusUpdateRequest>,
    ) -> Result<Response<SendStatusUpdateResponse>, Status> {
        let token = self.authenticate(&request).await?;
        let update = request.into_inner();
        if token
            .account_id
            .as_deref()
            .is_some_and(|a| a != update.account_id)
        {
            return Err(Status::permission_denied(
                "this proxy token cannot report on another account's services",
            ));
        }
        let status = match proto::ProxyStatus::try_from(update.status) {
            Ok(proto::ProxyStatus::Pending) => ServiceStatus::Pending,
            Ok(proto::ProxyStatus::Active) => ServiceStatus::Active,
            Ok(proto::ProxyStatus::TunnelNotCreated) => ServiceStatus::TunnelNotCreated,
            Ok(proto::ProxyStatus::CertificatePending) => ServiceStatus::CertificatePending,
            Ok(proto::ProxyStatus::CertificateFailed) => ServiceStatus::CertificateFailed,
            Ok(proto::ProxyStatus::Error) => ServiceStatus::Error,
            Err(_) => return Err(Status::invalid_argument("unknown status value")),
        };
        let found = self
            .store
            .set_service_status(
                &update.account_id,
                &update.service_id,
                status,
                update.error_message.as_deref(),
                update.certificate_issued,
                inbound_json(update.inbound_listener.as_ref()).as_deref(),
            )
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "status update not stored");
                Status::unavailable("management store unavailable")
            })?;
        if !found {
            return Err(Status::not_found(format!(
                "service {} not found",
                update.service_id
            )));
        }
        Ok(Response::new(SendStatusUpdateResponse {}))
    }

    async fn send_access_log(
        &self,
        request: Request<SendAccessLogRequest>,
    ) -> Result<Response<SendAccessLogResponse>, Status> {
        let token = self.authenticate(&request).await?;
        access_logs::send_access_log(self, &token, request.into_inner().log).await?;
        Ok(Response::new(SendAccessLogResponse {}))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let token = ProxyServiceImpl::authenticate(self, &request).await?;
        auth::authenticate(self, &token, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_proxy_peer(
        &self,
        request: Request<CreateProxyPeerRequest>,
    ) -> Result<Response<CreateProxyPeerResponse>, Status> {
        proxy_peers::create_proxy_peer(self, request)
            .await
            .map(Response::new)
    }

    async fn get_oidcurl(
        &self,
        request: Request<GetOidcurlRequest>,
    ) -> Result<Response<GetOidcurlResponse>, Status> {
        let token = ProxyServiceImpl::authenticate(self, &request).await?;
        auth::oidc_url(self, &token, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn validate_session(
        &self,
        request: Request<ValidateSessionRequest>,
    ) -> Result<Response<ValidateSessionResponse>, Status> {
        let token = ProxyServiceImpl::authenticate(self, &request).await?;
        auth::validate_session(self, &token, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn validate_tunnel_peer(
        &self,
        request: Request<ValidateTunnelPeerRequest>,
    ) -> Result<Response<ValidateTunnelPeerResponse>, Status> {
        let token = ProxyServiceImpl::authenticate(self, &request).await?;
        tunnel_peer::validate_tunnel_peer(self, &token, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn check_llm_policy_limits(
        &self,
        _request: Request<CheckLlmPolicyLimitsRequest>,
    ) -> Result<Response<CheckLlmPolicyLimitsResponse>, Status> {
        Err(Status::unimplemented("the LLM gateway is out of scope"))
    }

    async fn record_llm_usage(
        &self,
        _request: Request<RecordLlmUsageRequest>,
    ) -> Result<Response<RecordLlmUsageResponse>, Status> {
        Err(Status::unimplemented("the LLM gateway is out of scope"))
    }
}
