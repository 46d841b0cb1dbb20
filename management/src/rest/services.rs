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
        "private": spec.private,
        "access_groups": spec.access_groups,
        "meta": {
            "created_at": rfc3339(r.created_at),
            "status": r.status,
            "status_message": r.status_message,
            "certificate_issued": r.certificate_issued,
            "inbound_listener": r
                .inbound_listener
                .as_deref()
                .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()),
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
    if let Some(groups) = valid.auth.as_ref().and_then(|a| a.sso_groups.as_ref()) {
        check_sso(st, account, groups).await?;
    }
    if valid.spec.private {
        super::sso::check_groups_exist(st, account, "access_groups", &valid.spec.access_groups)
            .await?;
    }
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
    let auth = credentials(&mut valid, None).await?;
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
        inbound_listener: None,
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
    let auth = credentials(&mut valid, previous).await?;
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

/// Single sign-on needs the account's identity provider, and names groups the account has.
async fn check_sso(st: &AppState, account: &str, groups: &[String]) -> ApiResult<()> {
    if st.store.identity_provider(account).await?.is_none() {
        return Err(ApiError::unprocessable(
            "single sign-on (auth.bearer_auth) needs the account's identity provider: \
             PUT /api/identity-provider first",
        ));
    }
    super::sso::check_groups_exist(st, account, "auth.bearer_auth.distribution_groups", groups)
        .await
}

/// The stored form of a service's authentication (`None`: unprotected). Takes the secrets out
/// of `valid` and puts the session age in force into its summary.
async fn credentials(
    valid: &mut model::ValidService,
    previous: Option<crate::store::ServiceAuthRow>,
) -> ApiResult<Option<crate::store::ServiceAuthRow>> {
    let input = match valid.auth.take() {
        Some(input) => input,
        // No sign-in method, but `ValidateTunnelPeer` signs sessions with the service's key.
        None if valid.spec.private => model::auth::AuthInput::default(),
        None => return Ok(None),
    };
    match crate::credentials::prepare(input, previous).await {
        Ok(row) => {
            if let Some(summary) = valid.spec.auth.as_mut() {
                summary.max_session_age_seconds = row.max_session_age;
            }
            Ok(Some(row))
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::ChangeBus;
    use crate::store::{Role, User, test_store};

    async fn state() -> (AppState, Caller) {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        let (token, _) = store
            .create_proxy_token(Some(&a.id), "t", None)
            .await
            .unwrap();
        store
            .register_proxy(&token, "proxy.example", "px1", "test", "{}")
            .await
            .unwrap();
        let caller = Caller(User {
            id: "u1".into(),
            account_id: a.id,
            email: "owner@example.com".into(),
            role: Role::Owner,
        });
        (
            AppState {
                store,
                bus: ChangeBus::new(),
                sso: crate::oidc::sign_in::Sso::for_tests(),
            },
            caller,
        )
    }

    fn body(auth: serde_json::Value) -> JsonBody<ServiceRequest> {
        JsonBody(
            serde_json::from_value(json!({
                "name": "app",
                "domain": "app.proxy.example",
                "targets": [{"target_type": "host", "protocol": "http", "host": "10.0.0.1", "port": 80}],
                "auth": auth,
                "access_restrictions": {"allowed_cidrs": ["10.0.0.0/8"], "blocked_countries": ["de"],
                                        "crowdsec_mode": "enforce"},
            }))
            .unwrap(),
        )
    }

    fn caller(c: &Caller) -> Caller {
        Caller(c.0.clone())
    }

    /// Deleting the group is refused: a service still lets it in.
    async fn assert_group_in_use(st: &AppState, owner: &Caller, group_id: &str) {
        let e = super::super::sso::delete_group(
            State(st.clone()),
            caller(owner),
            Path(group_id.to_string()),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::CONFLICT);
    }

    #[tokio::test]
    async fn private_services_keep_a_session_key_and_their_groups() {
        let (st, owner) = state().await;
        let private = |groups: serde_json::Value| {
            JsonBody(
                serde_json::from_value::<ServiceRequest>(json!({
                    "name": "team", "domain": "team.proxy.example", "private": true,
                    "access_groups": groups,
                    "targets": [{"target_type": "host", "protocol": "http", "host": "10.0.0.1", "port": 80}],
                }))
                .unwrap(),
            )
        };
        let e = create(State(st.clone()), caller(&owner), private(json!(["nope"])))
            .await
            .unwrap_err();
        assert!(
            e.message.contains("access_groups: no group"),
            "{}",
            e.message
        );
        let staff = st
            .store
            .create_group(owner.account(), "staff", "api")
            .await
            .unwrap();
        let Json(created) = create(
            State(st.clone()),
            caller(&owner),
            private(json!([staff.id])),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(
            (
                created["private"].clone(),
                created["access_groups"][0].clone()
            ),
            (json!(true), json!(staff.id))
        );
        let id = created["id"].as_str().unwrap();
        let keys = st.store.service_auth(id).await.unwrap();
        assert!(
            keys.is_some_and(|k| k.password_hash.is_none() && !k.session_private_key.is_empty())
        );
        let record = st
            .store
            .service(owner.account(), id)
            .await
            .unwrap()
            .unwrap();
        let mapping = st.store.mapping_for(&record).await.unwrap();
        assert!(mapping.private && mapping.auth.is_none(), "{mapping:?}");
        assert_group_in_use(&st, &owner, &staff.id).await;
    }

    #[tokio::test]
    async fn single_sign_on_needs_the_provider_and_known_groups_that_stay_while_used() {
        let (st, owner) = state().await;
        let sso = |groups: serde_json::Value| {
            body(json!({"bearer_auth": {"enabled": true, "distribution_groups": groups}}))
        };
        let e = create(State(st.clone()), caller(&owner), sso(json!([])))
            .await
            .unwrap_err();
        assert!(e.message.contains("identity provider"), "{}", e.message);
        st.store
            .put_identity_provider(&crate::store::IdentityProvider {
                account_id: owner.account().to_string(),
                issuer: "https://id.example".into(),
                client_id: "c".into(),
                client_secret: "s".into(),
                groups_claim: "groups".into(),
            })
            .await
            .unwrap();
        let staff = st
            .store
            .create_group(owner.account(), "staff", "api")
            .await
            .unwrap();
        let e = create(State(st.clone()), caller(&owner), sso(json!(["nope"])))
            .await
            .unwrap_err();
        assert!(e.message.contains("no group with id"), "{}", e.message);
        let Json(created) = create(State(st.clone()), caller(&owner), sso(json!([staff.id])))
            .await
            .unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(
            created["auth"]["bearer_auth"]["distribution_groups"][0],
            staff.id.as_str()
        );
        let id = created["id"].as_str().unwrap();
        let stored = st.store.service_auth(id).await.unwrap().unwrap();
        assert_eq!(stored.sso_groups, Some(vec![staff.id.clone()]));
        assert!(crate::credentials::to_proto(&stored).oidc);
        // In use: neither the group nor the provider can go.
        assert_group_in_use(&st, &owner, &staff.id).await;
        let e = super::super::sso::delete_provider(State(st.clone()), caller(&owner))
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::CONFLICT);
    }

    #[tokio::test]
    async fn credentials_are_hashed_kept_and_removed() {
        let (st, owner) = state().await;
        let mut events = st.bus.subscribe();
        let Json(created) = create(
            State(st.clone()),
            caller(&owner),
            body(json!({
                "password_auth": {"enabled": true, "password": "correct horse"},
                "pin_auth": {"enabled": true, "pin": "123456"},
                "header_auths": [{"enabled": true, "header": "X-API-Key", "value": "k3y-value"}],
                "bearer_auth": {"enabled": false, "distribution_groups": []},
                "max_session_age_seconds": 2,
            })),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.message));
        let text = created.to_string();
        for secret in ["correct horse", "123456", "k3y-value", "argon2", "hash"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(created["auth"]["password_auth"]["enabled"], true);
        assert_eq!(created["auth"]["pin_auth"]["enabled"], true);
        assert_eq!(created["auth"]["header_auths"][0]["header"], "X-API-Key");
        assert_eq!(created["auth"]["max_session_age_seconds"], 2);
        assert_eq!(created["access_restrictions"]["blocked_countries"][0], "DE");
        let id = created["id"].as_str().unwrap().to_string();

        // Proxies get the public key, the flags and the header hashes.
        let m = events.try_recv().unwrap().mapping;
        let auth = m.auth.clone().unwrap();
        let stored = st.store.service_auth(&id).await.unwrap().unwrap();
        assert_eq!(auth.session_key, stored.session_public_key);
        assert!(auth.password && auth.pin && !auth.oidc);
        assert_eq!(auth.max_session_age_seconds, 2);
        assert_eq!(auth.header_auths[0].header, "X-API-Key");
        assert!(crate::credentials::verify(
            &auth.header_auths[0].hashed_value,
            "k3y-value"
        ));
        assert!(!format!("{m:?}").contains(&stored.session_private_key));
        assert!(!text.contains(&stored.session_private_key));
        let r = m.access_restrictions.unwrap();
        assert_eq!(r.allowed_cidrs, ["10.0.0.0/8"]);
        assert_eq!(r.crowdsec_mode, "enforce");
        assert!(crate::credentials::verify(
            stored.password_hash.as_deref().unwrap(),
            "correct horse"
        ));

        // Secrets sent back empty (as clients do) are kept, and so is the key pair.
        let Json(again) = update(
            State(st.clone()),
            caller(&owner),
            Path(id.clone()),
            body(json!({
                "password_auth": {"enabled": true, "password": ""},
                "pin_auth": {"enabled": true},
                "header_auths": [{"enabled": true, "header": "x-api-key"}],
            })),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.message));
        let kept = st.store.service_auth(&id).await.unwrap().unwrap();
        assert_eq!(kept.password_hash, stored.password_hash);
        assert_eq!(kept.pin_hash, stored.pin_hash);
        assert_eq!(
            kept.header_auths[0].hashed_value,
            stored.header_auths[0].hashed_value
        );
        assert_eq!(kept.session_private_key, stored.session_private_key);
        assert_eq!(kept.max_session_age, 2, "left out: kept");
        assert_eq!(again["auth"]["max_session_age_seconds"], 2);

        // A new password replaces the hash; the PIN, now off, is dropped.
        let _ = update(
            State(st.clone()),
            caller(&owner),
            Path(id.clone()),
            body(json!({"password_auth": {"enabled": true, "password": "battery staple"}})),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.message));
        let changed = st.store.service_auth(&id).await.unwrap().unwrap();
        assert_ne!(changed.password_hash, stored.password_hash);
        assert!(changed.pin_hash.is_none() && changed.header_auths.is_empty());
        assert_eq!(changed.session_public_key, stored.session_public_key);

        // A method turned on without a secret and none stored: 422.
        let e = update(
            State(st.clone()),
            caller(&owner),
            Path(id.clone()),
            body(json!({"pin_auth": {"enabled": true, "pin": ""}})),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.message.contains("auth.pin_auth.pin"), "{}", e.message);

        // SSO and link auth are refused clearly.
        for (auth, needle) in [
            (
                json!({"bearer_auth": {"enabled": true}}),
                "PUT /api/identity-provider",
            ),
            (json!({"link_auth": {"enabled": true}}), "link_auth"),
        ] {
            let e = update(
                State(st.clone()),
                caller(&owner),
                Path(id.clone()),
                body(auth),
            )
            .await
            .unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(e.message.contains(needle), "{}", e.message);
        }

        // Every method off: the protection and its keys are gone.
        while events.try_recv().is_ok() {}
        let Json(off) = update(
            State(st.clone()),
            caller(&owner),
            Path(id.clone()),
            body(json!({"password_auth": {"enabled": false}})),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(off["auth"], json!({}));
        assert!(st.store.service_auth(&id).await.unwrap().is_none());
        let m = events.try_recv().unwrap().mapping;
        assert!(m.auth.is_none());
        assert!(m.access_restrictions.is_some());
    }
}
