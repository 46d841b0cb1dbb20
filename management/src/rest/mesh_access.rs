//! Who may use NetBird-only (private) services over the mesh: `PUT /api/peers/{id}` gives a
//! peer its user and groups, `PUT /api/users/{id}` gives a user groups (`auto_groups`) that
//! count for every peer of that user.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiResult, AppState, Caller, JsonBody};

/// Groups named in one request, at most; a list longer than this is a mistake, not a policy.
const MAX_GROUPS: usize = 256;

/// Every id names a group of the account; returns them sorted, without repeats.
async fn known_groups(
    st: &AppState,
    account: &str,
    field: &str,
    ids: Vec<String>,
) -> ApiResult<Vec<String>> {
    if ids.len() > MAX_GROUPS {
        return Err(ApiError::unprocessable(format!(
            "{field}: at most {MAX_GROUPS} groups"
        )));
    }
    let mut out: Vec<String> = ids.into_iter().map(|g| g.trim().to_string()).collect();
    out.sort_unstable();
    out.dedup();
    super::sso::check_groups_exist(st, account, field, &out).await?;
    Ok(out)
}

/// Tells a field given as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerUpdate {
    /// Absent: unchanged; `null`: the peer belongs to nobody.
    #[serde(default, deserialize_with = "present")]
    user_id: Option<Option<String>>,
    #[serde(default)]
    groups: Option<Vec<String>>,
}

pub async fn update_peer(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<PeerUpdate>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let account = caller.account();
    let mut peer = st
        .store
        .mesh_peer(account, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("peer"))?;
    let mut access = peer.access();
    if let Some(user) = req.user_id {
        let user = user.map(|u| u.trim().to_string()).filter(|u| !u.is_empty());
        if let Some(u) = &user
            && st.store.user(account, u).await?.is_none()
        {
            return Err(ApiError::unprocessable(format!(
                "user_id: no user with id {u:?}"
            )));
        }
        access.user_id = user;
    }
    if let Some(groups) = req.groups {
        access.groups = known_groups(&st, account, "groups", groups).await?;
    }
    if !st.store.set_peer_access(account, &id, &access).await? {
        return Err(ApiError::not_found("peer"));
    }
    (peer.user_id, peer.groups) = (access.user_id, access.groups);
    let routes = super::peers::routes_by_peer(&st.store, account)
        .await?
        .remove(&peer.id)
        .unwrap_or_default();
    Ok(Json(super::peers::peer_json(&peer, &routes)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    auto_groups: Vec<String>,
}

pub async fn update_user(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UserUpdate>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let account = caller.account();
    let groups = known_groups(&st, account, "auto_groups", req.auto_groups).await?;
    if !st.store.set_user_auto_groups(account, &id, &groups).await? {
        return Err(ApiError::not_found("user"));
    }
    let user = st
        .store
        .user(account, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(Json(json!({
        "id": user.id,
        "email": user.email,
        "role": user.role,
        "auto_groups": groups,
    })))
}
