//! Single sign-on over REST: the account's identity provider (`/api/identity-provider`), its
//! groups (`/api/groups`), and the provider's callback (`/oauth2/callback`), which answers the
//! browser, not an API client.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiResult, AppState, Caller, JsonBody};
use crate::model;
use crate::oidc::check_issuer_url;
use crate::oidc::sign_in::{Callback, SignInError};
use crate::store::IdentityProvider;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderRequest {
    issuer: String,
    client_id: String,
    /// Empty or left out on a change: keep the stored one.
    #[serde(default)]
    client_secret: String,
    /// The ID token claim that lists the user's groups.
    #[serde(default)]
    groups_claim: Option<String>,
}

fn provider_json(st: &AppState, p: &IdentityProvider) -> serde_json::Value {
    json!({
        "issuer": p.issuer,
        "client_id": p.client_id,
        "client_secret_set": !p.client_secret.is_empty(),
        "groups_claim": p.groups_claim,
        "redirect_uri": st.sso.redirect_uri(),
    })
}

pub async fn get_provider(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let p = st
        .store
        .identity_provider(caller.account())
        .await?
        .ok_or_else(|| ApiError::not_found("identity provider"))?;
    Ok(Json(provider_json(&st, &p)))
}

pub async fn put_provider(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<ProviderRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let issuer = req.issuer.trim().trim_end_matches('/').to_string();
    check_issuer_url(&issuer).map_err(ApiError::unprocessable)?;
    let client_id = req.client_id.trim().to_string();
    if client_id.is_empty() || client_id.len() > 512 {
        return Err(ApiError::unprocessable(
            "client_id is required (at most 512 characters)",
        ));
    }
    let groups_claim = req.groups_claim.unwrap_or_else(|| "groups".into());
    let groups_claim = groups_claim.trim().to_string();
    if groups_claim.is_empty() || groups_claim.len() > 128 {
        return Err(ApiError::unprocessable(
            "groups_claim must name a claim (at most 128 characters)",
        ));
    }
    let client_secret = if req.client_secret.is_empty() {
        match st.store.identity_provider(caller.account()).await? {
            Some(old) if old.client_id == client_id => old.client_secret,
            _ => {
                return Err(ApiError::unprocessable(
                    "client_secret is required for a new provider or client",
                ));
            }
        }
    } else if req.client_secret.len() > 4096 {
        return Err(ApiError::unprocessable(
            "client_secret is longer than 4096 characters",
        ));
    } else {
        req.client_secret
    };
    // Mistakes show now, not at somebody's first sign-in.
    st.sso.probe(&issuer).await.map_err(|e| {
        ApiError::unprocessable(format!("the identity provider is not usable: {e}"))
    })?;
    let p = IdentityProvider {
        account_id: caller.account().to_string(),
        issuer,
        client_id,
        client_secret,
        groups_claim,
    };
    st.store.put_identity_provider(&p).await?;
    Ok(Json(provider_json(&st, &p)))
}

pub async fn delete_provider(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    if let Some(name) = service_using(&st, caller.account(), |_| true).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("service {name:?} uses single sign-on; turn it off there first"),
        ));
    }
    if !st.store.delete_identity_provider(caller.account()).await? {
        return Err(ApiError::not_found("identity provider"));
    }
    Ok(Json(json!({})))
}

/// The name of a service of `account` with single sign-on on whose groups match `pred`.
async fn service_using(
    st: &AppState,
    account: &str,
    pred: impl Fn(&[String]) -> bool,
) -> ApiResult<Option<String>> {
    for r in st.store.services(account).await? {
        let Ok(spec) = model::spec_of(&r) else {
            continue;
        };
        if spec.private && pred(&spec.access_groups) {
            return Ok(Some(r.name));
        }
        let Some(auth) = spec.auth else {
            continue;
        };
        if auth.bearer_auth.enabled && pred(&auth.bearer_auth.distribution_groups) {
            return Ok(Some(r.name));
        }
    }
    Ok(None)
}

/// Peers put in a new group by one request, at most.
const MAX_GROUP_PEERS: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    name: String,
    /// Mesh peers (ids) to put in the new group.
    #[serde(default)]
    peers: Vec<String>,
}

/// Every id in `ids` names a group of the account, else 422 naming `field` and the first
/// unknown id.
pub(super) async fn check_groups_exist(
    st: &AppState,
    account: &str,
    field: &str,
    ids: &[String],
) -> ApiResult<()> {
    let known = st.store.groups(account).await?;
    match ids.iter().find(|g| !known.iter().any(|k| &k.id == *g)) {
        Some(g) => Err(ApiError::unprocessable(format!(
            "{field}: no group with id {g:?}"
        ))),
        None => Ok(()),
    }
}

pub async fn list_groups(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!(st.store.groups(caller.account()).await?)))
}

pub async fn create_group(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<GroupRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 256 || model::has_control_chars(name) {
        return Err(ApiError::unprocessable(
            "name is required (at most 256 characters, no control characters)",
        ));
    }
    if req.peers.len() > MAX_GROUP_PEERS {
        return Err(ApiError::unprocessable(format!(
            "peers: at most {MAX_GROUP_PEERS} at once"
        )));
    }
    let mut members = Vec::with_capacity(req.peers.len());
    for id in &req.peers {
        match st.store.mesh_peer(caller.account(), id).await? {
            Some(peer) => members.push((id, peer.access())),
            None => {
                return Err(ApiError::unprocessable(format!(
                    "peers: no peer with id {id:?}"
                )));
            }
        }
    }
    let g = st.store.create_group(caller.account(), name, "api").await?;
    for (id, mut access) in members {
        access.groups.push(g.id.clone());
        st.store
            .set_peer_access(caller.account(), id, &access)
            .await?;
    }
    Ok(Json(json!(g)))
}

pub async fn delete_group(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    if let Some(name) = service_using(&st, caller.account(), |g| g.contains(&id)).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("service {name:?} lets this group in; remove it there first"),
        ));
    }
    if st.store.group_has_members(caller.account(), &id).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "peers or users are in this group; take them out first (PUT /api/peers/{id}, \
             PUT /api/users/{id})",
        ));
    }
    if !st.store.delete_group(caller.account(), &id).await? {
        return Err(ApiError::not_found("group"));
    }
    Ok(Json(json!({})))
}

/// The provider sends the browser here; it goes on to the proxy with a session token, or gets
/// a page that says what went wrong.
pub async fn callback(State(st): State<AppState>, Query(cb): Query<Callback>) -> Response {
    match st.sso.finish(&st.store, &cb).await {
        Ok(location) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, location),
                (header::CACHE_CONTROL, "no-store".to_string()),
            ],
        )
            .into_response(),
        Err(e) => {
            let status = match &e {
                SignInError::UnknownState | SignInError::Provider(_) | SignInError::Claim(_) => {
                    StatusCode::BAD_REQUEST
                }
                SignInError::Oidc(_) => StatusCode::BAD_GATEWAY,
                SignInError::ServiceNotFound => StatusCode::NOT_FOUND,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            if status.is_server_error() {
                tracing::error!(error = %e, "single sign-on callback failed");
            } else {
                tracing::info!(error = %e, "single sign-on callback refused");
            }
            let shown = if matches!(e, SignInError::Store(_) | SignInError::Sign(_)) {
                "internal error".to_string()
            } else {
                e.to_string()
            };
            (
                status,
                [(header::CACHE_CONTROL, "no-store")],
                Html(error_page(&shown)),
            )
                .into_response()
        }
    }
}

fn error_page(message: &str) -> String {
    let escaped: String = message
        .chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            c => c.to_string(),
        })
        .collect();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Sign-in failed</title></head><body style=\"font-family:system-ui,sans-serif;\
         max-width:32rem;margin:4rem auto;padding:0 1rem\"><h1>Sign-in failed</h1>\
         <p role=\"alert\">{escaped}</p></body></html>"
    )
}
