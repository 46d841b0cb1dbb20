//! The REST API for people: `Authorization: Token <PAT>`; NetBird's paths and JSON shapes;
//! errors as `{"message", "code"}`.

mod access_logs;
mod mesh_access;
mod peers;
mod resources;
mod services;
mod setup_keys;
mod sso;

pub use access_logs::prune_forever;
pub use peers::{PRIVATE_KEY_PLACEHOLDER, render_wg_quick};

use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::events::ChangeBus;
use crate::store::{ProxyToken, Role, Store, StoreError, User, now};

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub bus: ChangeBus,
    pub sso: std::sync::Arc<crate::oidc::sign_in::Sso>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/api/reverse-proxies/proxy-tokens",
            get(list_tokens).post(create_token),
        )
        .route(
            "/api/reverse-proxies/proxy-tokens/{id}",
            delete(revoke_token),
        )
        .route("/api/reverse-proxies/clusters", get(list_clusters))
        .route(
            "/api/reverse-proxies/clusters/{address}",
            delete(delete_cluster),
        )
        .route(
            "/api/reverse-proxies/services",
            get(services::list).post(services::create),
        )
        .route(
            "/api/reverse-proxies/services/{id}",
            get(services::get_one)
                .put(services::update)
                .delete(services::remove),
        )
        .route(
            "/api/setup-keys",
            get(setup_keys::list).post(setup_keys::create),
        )
        .route("/api/setup-keys/{id}", delete(setup_keys::revoke))
        .route("/api/peers", get(peers::list).post(peers::create))
        .route(
            "/api/peers/{id}",
            get(peers::get_one)
                .put(mesh_access::update_peer)
                .delete(peers::remove),
        )
        .route("/api/peers/{id}/wg-quick", get(peers::wg_quick))
        .route(
            "/api/networks/resources",
            get(resources::list).post(resources::create),
        )
        .route("/api/networks/resources/{id}", delete(resources::remove))
        .route("/api/mesh", get(peers::get_mesh).put(peers::put_mesh))
        .route("/api/events/proxy", get(access_logs::list))
        .route("/api/users", get(list_users).post(create_user))
        .route(
            "/api/identity-provider",
            get(sso::get_provider)
                .put(sso::put_provider)
                .delete(sso::delete_provider),
        )
        .route("/api/groups", get(sso::list_groups).post(sso::create_group))
        .route("/api/groups/{id}", delete(sso::delete_group))
        .route(crate::oidc::sign_in::CALLBACK_PATH, get(sso::callback))
        .route("/api/users/{id}", put(mesh_access::update_user))
        .route("/api/users/{id}/tokens", post(create_pat))
        .with_state(state)
}

// === errors ===

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"message": self.message, "code": self.status.as_u16()}));
        (self.status, body).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// JSON bodies that fail to parse get a 400 naming the problem, not axum's plain text.
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("couldn't parse JSON request: {}", e.body_text()),
            )),
        }
    }
}

// === authentication ===

/// The authenticated user of a request.
pub struct Caller(pub User);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication required: Authorization: Token <personal access token>",
            )
        };
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(unauthorized)?;
        let token = header
            .strip_prefix("Token ")
            .ok_or_else(unauthorized)?
            .trim();
        match state.store.user_by_pat(token).await? {
            Some(user) => Ok(Caller(user)),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "personal access token is unknown or expired",
            )),
        }
    }
}

impl Caller {
    /// Owner and admin may change proxies, tokens and services.
    pub fn require_admin(&self) -> ApiResult<&User> {
        if self.0.role.can_manage() {
            Ok(&self.0)
        } else {
            Err(ApiError::new(StatusCode::FORBIDDEN, "permission denied"))
        }
    }

    pub fn account(&self) -> &str {
        &self.0.account_id
    }
}

// === proxy tokens ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    name: String,
    #[serde(default)]
    expires_in: i64,
}

fn token_json(t: &ProxyToken) -> serde_json::Value {
    json!({
        "id": t.id,
        "name": t.name,
        "created_at": rfc3339(t.created_at),
        "expires_at": t.expires_at.map(rfc3339),
        "revoked": t.revoked,
    })
}

async fn list_tokens(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let tokens = st.store.list_proxy_tokens(Some(caller.account())).await?;
    Ok(Json(tokens.iter().map(token_json).collect()))
}

async fn create_token(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<TokenRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 255 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "name is required and must be at most 255 characters",
        ));
    }
    if req.expires_in < 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "expires_in must be non-negative",
        ));
    }
    let expires_at = (req.expires_in > 0).then(|| now().saturating_add(req.expires_in));
    let (token, plain) = st
        .store
        .create_proxy_token(Some(caller.account()), name, expires_at)
        .await?;
    tracing::info!(token = %token.id, account = caller.account(), "proxy token created");
    let mut body = token_json(&token);
    body["plain_token"] = json!(plain);
    Ok(Json(body))
}

async fn revoke_token(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    if !st
        .store
        .revoke_proxy_token(Some(caller.account()), &id)
        .await?
    {
        return Err(ApiError::not_found("token"));
    }
    tracing::info!(token = %id, account = caller.account(), "proxy token revoked");
    Ok(Json(json!({})))
}

// === clusters ===

async fn list_clusters(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let clusters = st.store.visible_clusters(caller.account()).await?;
    let out: Vec<_> = clusters
        .iter()
        .map(|c| {
            json!({
                "id": c.address,
                "address": c.address,
                "type": c.kind,
                "online": c.online,
                "connected_proxies": c.connected_proxies,
                "features": c.features,
                "supports_custom_ports": c.features.get("supports_custom_ports"),
                "require_subdomain": c.features.get("require_subdomain"),
                "supports_crowdsec": c.features.get("supports_crowdsec"),
                "private": c.features.get("private"),
            })
        })
        .collect();
    Ok(Json(json!(out)))
}

async fn delete_cluster(
    State(st): State<AppState>,
    caller: Caller,
    Path(address): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.require_admin()?;
    let address = address.to_ascii_lowercase();
    match st.store.cluster_owner(&address).await? {
        Some(None) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "shared clusters cannot be deleted by an account",
        )),
        Some(Some(owner)) if owner == caller.account() => {
            st.store
                .delete_account_cluster(caller.account(), &address)
                .await?;
            Ok(Json(json!({})))
        }
        _ => Err(ApiError::not_found("cluster")),
    }
}

// === users and personal access tokens ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRequest {
    email: String,
    role: String,
}

async fn list_users(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let users = st.store.list_users(caller.account()).await?;
    Ok(Json(json!(users)))
}

async fn create_user(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<UserRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    let me = caller.require_admin()?;
    let role = Role::parse(&req.role)
        .ok_or_else(|| ApiError::unprocessable("role must be owner, admin or user"))?;
    if role > me.role {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cannot grant a role above your own",
        ));
    }
    if !req.email.contains('@') || crate::model::has_control_chars(&req.email) {
        return Err(ApiError::unprocessable("email is not valid"));
    }
    let user = st
        .store
        .create_user(caller.account(), req.email.trim(), role)
        .await?;
    Ok(Json(json!(user)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatRequest {
    name: String,
    /// Days; 0 or absent = never.
    #[serde(default)]
    expires_in: i64,
}

async fn create_pat(
    State(st): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    JsonBody(req): JsonBody<PatRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    if caller.0.id != user_id {
        caller.require_admin()?;
    }
    let user = st
        .store
        .user(caller.account(), &user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    if req.expires_in < 0 {
        return Err(ApiError::unprocessable("expires_in must be non-negative"));
    }
    let expires_at = (req.expires_in > 0).then(|| now().saturating_add(req.expires_in * 86_400));
    let (id, plain) = st
        .store
        .create_pat(&user.id, req.name.trim(), expires_at)
        .await?;
    Ok(Json(
        json!({"id": id, "name": req.name, "plain_token": plain}),
    ))
}

pub fn rfc3339(unix: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}
