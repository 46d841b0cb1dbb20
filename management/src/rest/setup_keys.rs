//! `/api/setup-keys`: the keys with which `portcullis agent` joins the account. The plain key
//! is in the creation response only; it is stored hashed and never logged.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiResult, AppState, Caller, JsonBody, rfc3339};
use crate::store::{SetupKey, SetupKeyType, now};

/// Default lifetime of a setup key (NetBird's default).
const DEFAULT_EXPIRES_IN: i64 = 30 * 86_400;
/// Longest lifetime of a setup key.
const MAX_EXPIRES_IN: i64 = 365 * 86_400;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupKeyRequest {
    name: String,
    #[serde(rename = "type")]
    key_type: String,
    /// Seconds.
    #[serde(default)]
    expires_in: Option<i64>,
}

fn key_json(k: &SetupKey) -> serde_json::Value {
    json!({
        "id": k.id,
        "name": k.name,
        "type": k.key_type,
        "expires_at": rfc3339(k.expires_at),
        "revoked": k.revoked,
        "used_times": k.used_times,
        "valid": k.is_valid_at(now()),
        "created_at": rfc3339(k.created_at),
    })
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let keys = st.store.setup_keys(caller.account()).await?;
    Ok(Json(keys.iter().map(key_json).collect()))
}

pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<SetupKeyRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    caller.require_admin()?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 255 {
        return Err(ApiError::unprocessable(
            "name is required and must be at most 255 characters",
        ));
    }
    let key_type = SetupKeyType::parse(req.key_type.trim())
        .ok_or_else(|| ApiError::unprocessable("type must be \"one-off\" or \"reusable\""))?;
    let expires_in = req.expires_in.unwrap_or(DEFAULT_EXPIRES_IN);
    if !(1..=MAX_EXPIRES_IN).contains(&expires_in) {
        return Err(ApiError::unprocessable(format!(
            "expires_in must be 1-{MAX_EXPIRES_IN} seconds (at most one year)"
        )));
    }
    let (key, plain) = st
        .store
        .create_setup_key(caller.account(), name, key_type, now() + expires_in)
        .await?;
    tracing::info!(setup_key = %key.id, account = caller.account(), "setup key created");
    let mut body = key_json(&key);
    body["key"] = json!(plain);
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn revoke(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    if !st.store.revoke_setup_key(caller.account(), &id).await? {
        return Err(ApiError::not_found("setup key"));
    }
    tracing::info!(setup_key = %id, account = caller.account(), "setup key revoked");
    Ok(Json(json!({})))
}
