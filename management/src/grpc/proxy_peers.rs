//! One-time tokens in `ProxyMapping.auth_token` and `CreateProxyPeer`, with which a proxy gets a
//! WireGuard peer (and a tunnel IP) in a service's account.
//!
//! Every CREATED/MODIFIED mapping sent to a proxy carries a fresh token bound to the account,
//! the service, the cluster and the proxy_id of that stream, valid 24 h and redeemable once.
//! The plain tokens are never logged.

use proto::{
    CreateProxyPeerRequest, CreateProxyPeerResponse, ProxyMapping, ProxyMappingUpdateType,
};
use tonic::Status;

use super::ProxyServiceImpl;
use crate::store::{Store, StoreError, is_wg_key};

/// Puts a fresh one-time token into every non-removal mapping of a batch for this proxy. On a
/// store failure the mappings go out without tokens (the proxy's CreateProxyPeer then fails and
/// it retries with the token of a later mapping).
pub async fn attach_tokens(
    store: &Store,
    cluster: &str,
    proxy_id: &str,
    batch: &mut [ProxyMapping],
) {
    let wanted: Vec<usize> = batch
        .iter()
        .enumerate()
        .filter(|(_, m)| m.r#type != ProxyMappingUpdateType::UpdateTypeRemoved as i32)
        .map(|(i, _)| i)
        .collect();
    if wanted.is_empty() {
        return;
    }
    let services: Vec<(&str, &str)> = wanted
        .iter()
        .map(|&i| (batch[i].account_id.as_str(), batch[i].id.as_str()))
        .collect();
    match store
        .issue_proxy_peer_tokens(cluster, proxy_id, &services)
        .await
    {
        Ok(tokens) => {
            for (i, token) in wanted.into_iter().zip(tokens) {
                batch[i].auth_token = token;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, proxy = proxy_id, "could not issue proxy-peer tokens");
        }
    }
}

fn refused(message: impl Into<String>) -> CreateProxyPeerResponse {
    CreateProxyPeerResponse {
        success: false,
        error_message: Some(message.into()),
    }
}

/// `CreateProxyPeer`: redeems the one-time token and creates (or re-keys) the peer of the proxy
/// the token was issued to. Bad input answers `success: false`; only authentication failures
/// (and an unavailable store) are gRPC errors.
pub async fn create_proxy_peer(
    svc: &ProxyServiceImpl,
    request: tonic::Request<CreateProxyPeerRequest>,
) -> Result<CreateProxyPeerResponse, Status> {
    let token = svc.authenticate(&request).await?;
    let req = request.into_inner();
    if token
        .account_id
        .as_deref()
        .is_some_and(|a| a != req.account_id)
    {
        return Err(Status::permission_denied(
            "this proxy token cannot create peers in another account",
        ));
    }
    let public_key = req.wireguard_public_key.trim();
    if !is_wg_key(public_key) {
        return Ok(refused(
            "wireguard_public_key must be a base64 Curve25519 public key",
        ));
    }
    let cluster = req
        .cluster
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let unavailable = |e: StoreError| {
        tracing::error!(error = %e, "proxy peer not created");
        Status::unavailable("management store unavailable")
    };
    let Some(proxy_id) = svc
        .store
        .consume_proxy_peer_token(&req.token, &req.account_id, &req.service_id, &cluster)
        .await
        .map_err(unavailable)?
    else {
        return Ok(refused(
            "the one-time token is invalid, expired, already used, or not for this service",
        ));
    };
    match svc
        .store
        .upsert_proxy_peer(&req.account_id, &proxy_id, &cluster, public_key)
        .await
    {
        Ok((peer, changed)) => {
            if changed {
                svc.bus.publish_mesh(&req.account_id);
            }
            tracing::info!(account = %req.account_id, proxy = %proxy_id, peer = %peer.id,
                tunnel_ip = %peer.tunnel_ip, changed, "proxy peer registered");
            Ok(CreateProxyPeerResponse {
                success: true,
                error_message: None,
            })
        }
        Err(StoreError::Conflict(m)) => Ok(refused(m)),
        Err(e) => Err(unavailable(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn request(
        proxy_token: &str,
        account: &str,
        token: &str,
        key: &str,
    ) -> tonic::Request<CreateProxyPeerRequest> {
        let mut r = tonic::Request::new(CreateProxyPeerRequest {
            service_id: "svc1".into(),
            account_id: account.into(),
            token: token.into(),
            wireguard_public_key: key.into(),
            cluster: "proxy.example".into(),
        });
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {proxy_token}").parse().unwrap(),
        );
        r
    }

    #[tokio::test]
    async fn create_proxy_peer_redeems_a_one_time_token() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        let b = store.create_account("b").await.unwrap();
        let (_, shared) = store
            .create_proxy_token(None, "shared", None)
            .await
            .unwrap();
        let (_, only_b) = store
            .create_proxy_token(Some(&b.id), "b", None)
            .await
            .unwrap();
        let svc = ProxyServiceImpl::for_tests(store.clone());
        let mut mesh_events = svc.bus.subscribe_mesh();
        let mut batch = vec![ProxyMapping {
            id: "svc1".into(),
            account_id: a.id.clone(),
            ..Default::default()
        }];
        attach_tokens(&store, "proxy.example", "px1", &mut batch).await;
        let token = batch[0].auth_token.clone();
        assert!(token.starts_with("pco_"));

        // Auth failures are gRPC errors.
        let err = create_proxy_peer(&svc, request(&only_b, &a.id, &token, KEY))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = create_proxy_peer(&svc, request("nbx_bogus", &a.id, &token, KEY))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        // A bad key is an answer, and does not use the token up.
        let r = create_proxy_peer(&svc, request(&shared, &a.id, &token, "nope"))
            .await
            .unwrap();
        assert!(!r.success);

        let r = create_proxy_peer(&svc, request(&shared, &a.id, &token, KEY))
            .await
            .unwrap();
        assert!(r.success, "{:?}", r.error_message);
        assert_eq!(mesh_events.try_recv().unwrap().account_id, a.id);
        let peer = store.proxy_peer(&a.id, "px1").await.unwrap().unwrap();
        assert_eq!(peer.public_key, KEY);

        // Second use of the same token fails.
        let r = create_proxy_peer(&svc, request(&shared, &a.id, &token, KEY))
            .await
            .unwrap();
        assert!(!r.success);
        assert!(r.error_message.unwrap().contains("one-time token"));
    }
}
