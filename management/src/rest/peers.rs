//! `/api/peers`: the account's mesh peers (agents, manual stock-WireGuard peers, proxies), the
//! wg-quick configuration of a manual peer, and `/api/mesh`: the account's tunnel range.
//!
//! A private key management generates for a manual peer is in the creation response only; it is
//! never stored or logged.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiResult, AppState, Caller, JsonBody, rfc3339};
use crate::store::{
    Cidr, MeshPeer, NewPeer, PeerKind, Store, StoreError, generate_wg_keypair, host_route,
    is_wg_key,
};

/// Keepalive a manual peer uses towards proxies (keeps NAT mappings open).
const PERSISTENT_KEEPALIVE: u32 = 10;
/// What the `PrivateKey` line says when management does not know the key.
pub const PRIVATE_KEY_PLACEHOLDER: &str = "<the private key of this peer>";

pub fn peer_json(p: &MeshPeer, routes: &[String]) -> serde_json::Value {
    json!({
        "id": p.id,
        "name": p.name,
        "public_key": p.public_key,
        "tunnel_ip": p.tunnel_ip.to_string(),
        "kind": p.kind,
        "connected": p.connected,
        "last_seen": p.last_seen.map(rfc3339),
        "routes": routes,
        "proxy_id": p.proxy_id,
        "endpoint": p.endpoint(),
        "created_at": rfc3339(p.created_at),
        "user_id": p.user_id,
        "groups": p.groups,
    })
}

/// Routed networks (host resources as /32, subnets) per routing peer.
pub async fn routes_by_peer(
    store: &Store,
    account: &str,
) -> Result<HashMap<String, Vec<String>>, StoreError> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for r in store.resources(account).await? {
        if let Some(net) = r.routed_network() {
            out.entry(r.peer_id).or_default().push(net);
        }
    }
    Ok(out)
}

/// The wg-quick file of a (manual) peer: its tunnel address with the range's prefix, its private
/// key (or a placeholder line to fill in), and one `[Peer]` per proxy of the account. Only
/// standard keys, no `DNS`: it works with `wg-quick up` on the kernel module or wireguard-go.
pub fn render_wg_quick(
    tunnel_address: &str,
    private_key: Option<&str>,
    proxies: &[MeshPeer],
) -> String {
    let mut out = format!(
        "[Interface]\nAddress = {tunnel_address}\nPrivateKey = {}\n",
        private_key.unwrap_or(PRIVATE_KEY_PLACEHOLDER)
    );
    for p in proxies.iter().filter(|p| p.kind == PeerKind::Proxy) {
        out.push_str(&format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
            p.public_key,
            host_route(p.tunnel_ip)
        ));
        if let Some(endpoint) = p.endpoint() {
            out.push_str(&format!("Endpoint = {endpoint}\n"));
        }
        out.push_str(&format!("PersistentKeepalive = {PERSISTENT_KEEPALIVE}\n"));
    }
    out
}

async fn wg_quick_of(
    st: &AppState,
    peer: &MeshPeer,
    private_key: Option<&str>,
) -> ApiResult<String> {
    let range = st
        .store
        .tunnel_range(&peer.account_id)
        .await?
        .ok_or_else(|| ApiError::not_found("account"))?;
    let proxies: Vec<MeshPeer> = st
        .store
        .mesh_peers(&peer.account_id)
        .await?
        .into_iter()
        .filter(|p| p.kind == PeerKind::Proxy)
        .collect();
    Ok(render_wg_quick(
        &range.address_of(peer.tunnel_ip),
        private_key,
        &proxies,
    ))
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let mut routes = routes_by_peer(&st.store, caller.account()).await?;
    let peers = st.store.mesh_peers(caller.account()).await?;
    Ok(Json(
        peers
            .iter()
            .map(|p| peer_json(p, &routes.remove(&p.id).unwrap_or_default()))
            .collect(),
    ))
}

pub async fn get_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let peer = st
        .store
        .mesh_peer(caller.account(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("peer"))?;
    let routes = routes_by_peer(&st.store, caller.account())
        .await?
        .remove(&peer.id)
        .unwrap_or_default();
    Ok(Json(peer_json(&peer, &routes)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualPeerRequest {
    name: String,
    #[serde(default)]
    public_key: Option<String>,
}

pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<ManualPeerRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    caller.require_admin()?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 255 || crate::model::has_control_chars(name) {
        return Err(ApiError::unprocessable(
            "name is required and must be at most 255 characters, without control characters",
        ));
    }
    let given = req
        .public_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty());
    let (private_key, public_key) = match given {
        Some(k) if is_wg_key(k) => (None, k.to_string()),
        Some(_) => {
            return Err(ApiError::unprocessable(
                "public_key must be a base64 Curve25519 public key (as `wg pubkey` prints it)",
            ));
        }
        None => {
            let (private, public) = generate_wg_keypair();
            (Some(private), public)
        }
    };
    let peer = st
        .store
        .insert_mesh_peer(&NewPeer {
            account_id: caller.account(),
            name,
            public_key: &public_key,
            kind: PeerKind::Manual,
            proxy_id: None,
            cluster_address: None,
            hashed_token: None,
            setup_key_id: None,
        })
        .await?;
    st.bus.publish_mesh(caller.account());
    tracing::info!(peer = %peer.id, account = caller.account(), tunnel_ip = %peer.tunnel_ip, "manual peer created");
    let config = wg_quick_of(&st, &peer, private_key.as_deref()).await?;
    let mut body = json!({"peer": peer_json(&peer, &[]), "config": config});
    if let Some(k) = private_key {
        body["private_key"] = json!(k);
    }
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn wg_quick(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::response::Response> {
    let peer = st
        .store
        .mesh_peer(caller.account(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("peer"))?;
    if peer.kind == PeerKind::Proxy {
        return Err(ApiError::unprocessable(
            "wg-quick configurations are for agent and manual peers, not proxies",
        ));
    }
    let config = wg_quick_of(&st, &peer, None).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        config,
    )
        .into_response())
}

pub async fn remove(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let account = caller.account();
    let peer = st
        .store
        .mesh_peer(account, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("peer"))?;
    if let Some(service) = st.store.service_using(account, &peer.id, true).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("peer {} is a target of service {service}", peer.id),
        ));
    }
    for r in st.store.resources_of_peer(account, &peer.id).await? {
        if let Some(service) = st.store.service_using(account, &r.id, false).await? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "resource {} ({}) of peer {} is a target of service {service}",
                    r.name, r.id, peer.id
                ),
            ));
        }
    }
    st.store
        .delete_mesh_peer(account, &peer.id)
        .await?
        .ok_or_else(|| ApiError::not_found("peer"))?;
    st.bus.publish_mesh(account);
    tracing::info!(peer = %peer.id, account, kind = peer.kind.as_str(), "peer deleted");
    Ok(Json(json!({})))
}

// === /api/mesh ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshRequest {
    tunnel_range: String,
}

pub async fn get_mesh(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let range = st
        .store
        .tunnel_range(caller.account())
        .await?
        .ok_or_else(|| ApiError::not_found("account"))?;
    Ok(Json(json!({"tunnel_range": range.to_string()})))
}

pub async fn put_mesh(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<MeshRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let range = Cidr::parse_range(&req.tunnel_range).map_err(ApiError::unprocessable)?;
    st.store.set_tunnel_range(caller.account(), &range).await?;
    tracing::info!(account = caller.account(), range = %range, "tunnel range changed");
    Ok(Json(json!({"tunnel_range": range.to_string()})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(ip: &str, port: Option<i64>, host: Option<&str>) -> MeshPeer {
        MeshPeer {
            id: "p".into(),
            account_id: "a".into(),
            name: "px".into(),
            public_key: "PUB".into(),
            tunnel_ip: ip.parse().unwrap(),
            kind: PeerKind::Proxy,
            proxy_id: Some("px".into()),
            cluster_address: Some("proxy.example".into()),
            listen_port: port,
            endpoint_host: host.map(str::to_string),
            setup_key_id: None,
            connected: false,
            last_seen: None,
            created_at: 0,
            user_id: None,
            groups: Vec::new(),
        }
    }

    #[test]
    fn wg_quick_has_only_standard_keys() {
        let conf = render_wg_quick(
            "100.64.0.3/10",
            Some("PRIV"),
            &[
                proxy("100.64.0.1", Some(51820), Some("203.0.113.7")),
                proxy("100.64.0.2", None, None),
            ],
        );
        assert_eq!(
            conf,
            "[Interface]\nAddress = 100.64.0.3/10\nPrivateKey = PRIV\n\
             \n[Peer]\nPublicKey = PUB\nAllowedIPs = 100.64.0.1/32\nEndpoint = 203.0.113.7:51820\nPersistentKeepalive = 10\n\
             \n[Peer]\nPublicKey = PUB\nAllowedIPs = 100.64.0.2/32\nPersistentKeepalive = 10\n"
        );
        assert!(!conf.contains("DNS"));
        let unknown = render_wg_quick(
            "fd00::2/64",
            None,
            &[proxy("fd00::1", Some(1), Some("::1"))],
        );
        assert!(unknown.contains("PrivateKey = <the private key of this peer>\n"));
        assert!(unknown.contains("AllowedIPs = fd00::1/128\n"));
        assert!(unknown.contains("Endpoint = [::1]:1\n"));
    }
}
