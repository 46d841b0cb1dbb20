//! `/api/networks/resources`: hosts, subnets and domains reachable through a routing peer (an
//! agent or manual peer of the account). Services target them with `target_id`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiResult, AppState, Caller, JsonBody, rfc3339};
use crate::store::{Cidr, PeerKind, Resource, ResourceKind};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceRequest {
    name: String,
    peer_id: String,
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

fn resource_json(r: &Resource) -> serde_json::Value {
    json!({
        "id": r.id,
        "name": r.name,
        "peer_id": r.peer_id,
        "type": r.kind,
        "address": r.address,
        "created_at": rfc3339(r.created_at),
    })
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let resources = st.store.resources(caller.account()).await?;
    Ok(Json(resources.iter().map(resource_json).collect()))
}

pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<ResourceRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    caller.require_admin()?;
    let account = caller.account();
    let name = req.name.trim();
    if name.is_empty() || name.len() > 255 {
        return Err(ApiError::unprocessable(
            "name is required and must be at most 255 characters",
        ));
    }
    let kind = ResourceKind::parse(req.kind.trim())
        .ok_or_else(|| ApiError::unprocessable("type must be host, subnet or domain"))?;
    let address = kind
        .normalise(&req.address)
        .map_err(ApiError::unprocessable)?;
    // A routed network inside the tunnel range would let its routing peer send from other
    // peers' tunnel addresses, which vouch for who they are (NetBird-only services).
    if let Some(range) = st.store.tunnel_range(account).await? {
        let overlaps = match kind {
            ResourceKind::Host => address.parse().is_ok_and(|ip| range.contains(ip)),
            ResourceKind::Subnet => Cidr::parse(&address)
                .is_ok_and(|net| range.contains(net.network()) || net.contains(range.network())),
            ResourceKind::Domain => false,
        };
        if overlaps {
            return Err(ApiError::unprocessable(format!(
                "{address} overlaps the account's tunnel range {range}; peers are reached by \
                 their own tunnel addresses"
            )));
        }
    }
    let peer_id = req.peer_id.trim();
    match st.store.mesh_peer(account, peer_id).await? {
        Some(p) if p.kind != PeerKind::Proxy => {}
        Some(_) => {
            return Err(ApiError::unprocessable(format!(
                "peer {peer_id} is a proxy; resources are routed by agent or manual peers"
            )));
        }
        None => {
            return Err(ApiError::unprocessable(format!("peer {peer_id} not found")));
        }
    }
    let r = st
        .store
        .create_resource(account, peer_id, kind, &address, name)
        .await?;
    st.bus.publish_mesh(account);
    tracing::info!(resource = %r.id, account, peer = %r.peer_id, kind = kind.as_str(), "network resource created");
    Ok((StatusCode::CREATED, Json(resource_json(&r))))
}

pub async fn remove(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let account = caller.account();
    let r = st
        .store
        .resource(account, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("resource"))?;
    if let Some(service) = st.store.service_using(account, &r.id, false).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("resource {} is a target of service {service}", r.id),
        ));
    }
    st.store.delete_resource(account, &r.id).await?;
    st.bus.publish_mesh(account);
    Ok(Json(json!({})))
}
