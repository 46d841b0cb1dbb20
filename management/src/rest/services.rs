//! `/api/reverse-proxies/services`: create, list, read, replace, delete. Every change reaches
//! the proxies of the service's cluster through the change bus.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::json;

use super::{ApiError, ApiResult, AppState, Caller, JsonBody, rfc3339};
use crate::events::ServiceEvent;
use crate::model::{self, ServiceRequest};
use crate::secrets;
use crate::store::{ResolveError, ServiceRecord, ServiceStatus, now};

fn service_json(r: &ServiceRecord) -> serde_json::Value {
    let spec = model::spec_of(r).unwrap_or_default();
    json!({
        "id": r.id,
        "name": r.name,
        "domain": r.domain,
        "proxy_cluster": r.cluster_address,
        "mode": spec.mode,
        "listen_port": spec.listen_port,
        "targets": spec.targets,
        "enabled": r.enabled,
        "pass_host_header": spec.pass_host_header,
        "rewrite_redirects": spec.rewrite_redirects,
        "auth": spec.auth.as_ref().map_or_else(|| json!({}), |a| json!(a)),
        "access_restrictions": spec.access_restrictions,
        "meta": {
            "created_at": rfc3339(r.created_at),
            "status": r.status,
            "status_message": r.status_message,
            "certificate_issued": r.certificate_issued,
        },
    })
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let records = st.store.services(caller.account()).await?;
    Ok(Json(records.iter().map(service_json).collect()))
}

pub async fn get_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let r = st
        .store
        .service(caller.account(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("service"))?;
    Ok(Json(service_json(&r)))
}

/// Validates a request and resolves its cluster among those the account can reach.
async fn prepare(
    st: &AppState,
    account: &str,
    req: ServiceRequest,
) -> ApiResult<(model::ValidService, String)> {
    let valid = req.validate().map_err(|e| ApiError::unprocessable(e.0))?;
    match st.store.resolve_targets(account, &valid.spec.targets).await {
        Ok(_) => {}
        Err(ResolveError::Invalid(m)) => return Err(ApiError::unprocessable(m)),
        Err(ResolveError::Store(e)) => return Err(e.into()),
    }
    let clusters: Vec<String> = st
        .store
        .visible_clusters(account)
        .await?
        .into_iter()
        .map(|c| c.address)
        .collect();
    let cluster =
        model::derive_cluster(&valid.domain, valid.requested_cluster.as_deref(), &clusters)
            .map_err(|m| ApiError::new(StatusCode::PRECONDITION_FAILED, m))?;
    Ok((valid, cluster))
}

/// Refuses a custom port another enabled service of the cluster already uses (TLS services
/// may share a port: the proxy tells them apart by SNI).
async fn check_port(
    st: &AppState,
    valid: &model::ValidService,
    cluster: &str,
    own_id: Option<&str>,
) -> ApiResult<()> {
    let spec = &valid.spec;
    let Some(transport) = model::transport_of(&spec.mode) else {
        return Ok(());
    };
    if !valid.enabled {
        return Ok(());
    }
    for other in st.store.services_for_cluster(cluster, None).await? {
        if Some(other.id.as_str()) == own_id {
            continue;
        }
        let Ok(theirs) = model::spec_of(&other) else {
            continue;
        };
        let both_tls = spec.mode == "tls" && theirs.mode == "tls";
        if theirs.listen_port == spec.listen_port
            && model::transport_of(&theirs.mode) == Some(transport)
            && !both_tls
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "port {}/{transport} of cluster {cluster} is already used by another service",
                    spec.listen_port
                ),
            ));
        }
    }
    Ok(())
}

pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<ServiceRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let (mut valid, cluster) = prepare(&st, caller.account(), req).await?;
    check_port(&st, &valid, &cluster, None).await?;
    let auth = credentials(valid.auth.take(), None).await?;
    let t = now();
    let record = ServiceRecord {
        id: secrets::new_id(),
        account_id: caller.account().to_string(),
        name: valid.name,
        domain: valid.domain,
        cluster_address: cluster,
        spec: serde_json::to_string(&valid.spec)
            .map_err(|e| ApiError::unprocessable(e.to_string()))?,
        enabled: valid.enabled,
        status: ServiceStatus::Pending,
        status_message: None,
        certificate_issued: false,
        created_at: t,
        updated_at: t,
    };
    st.store.insert_service(&record).await?;
    if let Err(e) = st.store.put_service_auth(&record.id, auth.as_ref()).await {
        // Never leave a service that asked for protection without it.
        let _ = st
            .store
            .delete_service(&record.account_id, &record.id)
            .await;
        return Err(e.into());
    }
    if record.enabled {
        announce(
            &st,
            &record,
            proto::ProxyMappingUpdateType::UpdateTypeCreated,
        )
        .await;
    }
    tracing::info!(service = %record.id, domain = %record.domain, cluster = %record.cluster_address, "service created");
    Ok(Json(service_json(&record)))
}

pub async fn update(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ServiceRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let old = st
        .store
        .service(caller.account(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("service"))?;
    let (mut valid, cluster) = prepare(&st, caller.account(), req).await?;
    check_port(&st, &valid, &cluster, Some(&old.id)).await?;
    let previous = st.store.service_auth(&old.id).await?;
    let auth = credentials(valid.auth.take(), previous).await?;
    let mut new = old.clone();
    new.name = valid.name;
    new.domain = valid.domain;
    new.cluster_address = cluster;
    new.spec =
        serde_json::to_string(&valid.spec).map_err(|e| ApiError::unprocessable(e.to_string()))?;
    new.enabled = valid.enabled;
    new.updated_at = now();
    st.store.update_service(&new).await?;
    st.store.put_service_auth(&new.id, auth.as_ref()).await?;
    let moved = old.cluster_address != new.cluster_address || old.domain != new.domain;
    if old.enabled && (moved || !new.enabled) {
        announce_removed(&st, &old);
    }
    if new.enabled {
        let kind = if old.enabled && !moved {
            proto::ProxyMappingUpdateType::UpdateTypeModified
        } else {
            proto::ProxyMappingUpdateType::UpdateTypeCreated
        };
        announce(&st, &new, kind).await;
    }
    Ok(Json(service_json(&new)))
}

pub async fn remove(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let old = st
        .store
        .delete_service(caller.account(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("service"))?;
    if old.enabled {
        announce_removed(&st, &old);
    }
    Ok(Json(json!({})))
}

/// The stored form of a service's authentication (`None`: unprotected).
async fn credentials(
    input: Option<model::auth::AuthInput>,
    previous: Option<crate::store::ServiceAuthRow>,
) -> ApiResult<Option<crate::store::ServiceAuthRow>> {
    let Some(input) = input else {
        return Ok(None);
    };
    match crate::credentials::prepare(input, previous).await {
        Ok(row) => Ok(Some(row)),
        Err(crate::credentials::CredentialError::Missing(what)) => Err(ApiError::unprocessable(
            format!("{what} is required when the method is enabled"),
        )),
        Err(e) => {
            tracing::error!(error = %e, "credentials not prepared");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal server error",
            ))
        }
    }
}

async fn announce(st: &AppState, r: &ServiceRecord, kind: proto::ProxyMappingUpdateType) {
    match st.store.mapping_for(r).await {
        Ok(mut mapping) => {
            mapping.r#type = kind as i32;
            st.bus.publish(ServiceEvent {
                account_id: r.account_id.clone(),
                cluster_address: r.cluster_address.clone(),
                mapping,
            });
        }
        Err(e) => tracing::error!(service = %r.id, error = %e, "service not announced"),
    }
}

fn announce_removed(st: &AppState, r: &ServiceRecord) {
    st.bus.publish(ServiceEvent {
        account_id: r.account_id.clone(),
        cluster_address: r.cluster_address.clone(),
        mapping: model::removed_mapping(r),
    });
}
