//! The calls a worker makes to management while it answers a request (check a password, PIN or
//! header, validate a session after SSO, authorise a tunnel peer). Workers run monoio and cannot
//! use tonic, so each call crosses a bounded queue to the control thread, which makes the RPC
//! and answers on a oneshot channel (both runtime-agnostic). A full queue or an unreachable
//! management is an error at once: requests never wait on an unbounded backlog.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proto::proxy_service_client::ProxyServiceClient;
use proto::{
    AuthenticateRequest, AuthenticateResponse, GetOidcurlRequest, GetOidcurlResponse,
    ValidateSessionRequest, ValidateSessionResponse, ValidateTunnelPeerRequest,
    ValidateTunnelPeerResponse,
};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::management::ManagementLink;

/// Calls waiting for the control thread; beyond this a request is answered "unavailable".
const QUEUE: usize = 1024;
/// Calls in flight to management at once.
const IN_FLIGHT: usize = 64;
/// How long one call may take, queueing included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthCallError {
    #[error("this proxy has no management server to check credentials with")]
    NoManagement,
    #[error("too many authentication calls are waiting")]
    Busy,
    #[error("management did not answer: {0}")]
    Unavailable(String),
}

enum Call {
    Authenticate(AuthenticateRequest, Reply<AuthenticateResponse>),
    ValidateSession(ValidateSessionRequest, Reply<ValidateSessionResponse>),
    OidcUrl(GetOidcurlRequest, Reply<GetOidcurlResponse>),
    TunnelPeer(ValidateTunnelPeerRequest, Reply<ValidateTunnelPeerResponse>),
}

type Reply<T> = oneshot::Sender<Result<T, AuthCallError>>;

/// The workers' side: cheap to share; inert until the control thread connects it.
#[derive(Default)]
pub struct AuthCalls {
    tx: OnceLock<mpsc::Sender<Call>>,
}

impl AuthCalls {
    /// Connects the queue; returns the receiving end for [`serve`]. Only the first call counts.
    pub fn connect(&self) -> Option<AuthCallQueue> {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.tx.set(tx).ok().map(|_| AuthCallQueue(rx))
    }

    pub async fn authenticate(
        &self,
        req: AuthenticateRequest,
    ) -> Result<AuthenticateResponse, AuthCallError> {
        self.call(|tx| Call::Authenticate(req, tx)).await
    }

    pub async fn validate_session(
        &self,
        req: ValidateSessionRequest,
    ) -> Result<ValidateSessionResponse, AuthCallError> {
        self.call(|tx| Call::ValidateSession(req, tx)).await
    }

    pub async fn oidc_url(
        &self,
        req: GetOidcurlRequest,
    ) -> Result<GetOidcurlResponse, AuthCallError> {
        self.call(|tx| Call::OidcUrl(req, tx)).await
    }

    pub async fn validate_tunnel_peer(
        &self,
        req: ValidateTunnelPeerRequest,
    ) -> Result<ValidateTunnelPeerResponse, AuthCallError> {
        self.call(|tx| Call::TunnelPeer(req, tx)).await
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Call) -> Result<T, AuthCallError> {
        let queue = self.tx.get().ok_or(AuthCallError::NoManagement)?;
        let (tx, rx) = oneshot::channel();
        queue.try_send(make(tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AuthCallError::Busy,
            mpsc::error::TrySendError::Closed(_) => AuthCallError::NoManagement,
        })?;
        // The control side bounds each RPC; a dropped sender means it gave up.
        rx.await
            .unwrap_or_else(|_| Err(AuthCallError::Unavailable("call abandoned".into())))
    }
}

/// The receiving end, handed to [`serve`] on the control thread.
pub struct AuthCallQueue(mpsc::Receiver<Call>);

/// Runs on the control thread: makes each queued call with a bounded number in flight.
pub async fn serve(queue: AuthCallQueue, link: ManagementLink) {
    let AuthCallQueue(mut rx) = queue;
    let channel = link.endpoint().connect_lazy();
    let client = ProxyServiceClient::new(channel);
    let link = Arc::new(link);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(call) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut client = client.clone();
        let link = link.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match call {
                Call::Authenticate(req, reply) => {
                    let res = bounded(client.authenticate(link.authorized(req))).await;
                    let _ = reply.send(res);
                }
                Call::ValidateSession(req, reply) => {
                    let res = bounded(client.validate_session(link.authorized(req))).await;
                    let _ = reply.send(res);
                }
                Call::OidcUrl(req, reply) => {
                    let res = bounded(client.get_oidcurl(link.authorized(req))).await;
                    let _ = reply.send(res);
                }
                Call::TunnelPeer(req, reply) => {
                    let res = bounded(client.validate_tunnel_peer(link.authorized(req))).await;
                    let _ = reply.send(res);
                }
            }
        });
    }
}

async fn bounded<T>(
    rpc: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AuthCallError> {
    match tokio::time::timeout(CALL_TIMEOUT, rpc).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => {
            tracing::warn!(code = ?status.code(), reason = status.message(), "authentication call failed");
            Err(AuthCallError::Unavailable(status.message().to_string()))
        }
        Err(_) => Err(AuthCallError::Unavailable("timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unconnected_and_full_queues_fail_at_once() {
        let calls = AuthCalls::default();
        assert_eq!(
            calls
                .authenticate(AuthenticateRequest::default())
                .await
                .unwrap_err(),
            AuthCallError::NoManagement
        );
        let _queue = calls.connect().unwrap();
        assert!(calls.connect().is_none());
        // Nobody serves the queue: once it is full, calls are refused instead of waiting.
        let mut waiting = Vec::new();
        for _ in 0..QUEUE {
            let (tx, _rx) = oneshot::channel();
            waiting.push(_rx);
            calls
                .tx
                .get()
                .unwrap()
                .try_send(Call::Authenticate(AuthenticateRequest::default(), tx))
                .unwrap();
        }
        assert_eq!(
            calls
                .authenticate(AuthenticateRequest::default())
                .await
                .unwrap_err(),
            AuthCallError::Busy
        );
    }
}
