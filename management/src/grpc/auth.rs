//! The calls a proxy makes while it answers a request: `Authenticate` (a password, PIN or header
//! value entered at the proxy), `ValidateSession`, and `SendAccessLog`.

use proto::session::{SessionClaims, SessionGrant, SessionVerifier};
use proto::{
    AccessLog, AuthenticateRequest, AuthenticateResponse, ValidateSessionRequest,
    ValidateSessionResponse, authenticate_request,
};
use tonic::Status;

use super::ProxyServiceImpl;
use crate::credentials;
use crate::store::{AccessLogRow, ProxyToken, ServiceAuthRow, ServiceRecord, now};

/// An account-scoped proxy token may only act on its own account.
fn check_scope(token: &ProxyToken, account_id: &str) -> Result<(), Status> {
    match token.account_id.as_deref() {
        Some(own) if own != account_id => Err(Status::permission_denied(
            "this proxy token cannot act on another account's services",
        )),
        _ => Ok(()),
    }
}

fn store_error(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "store error");
    Status::unavailable("management store unavailable")
}

pub async fn authenticate(
    svc: &ProxyServiceImpl,
    token: &ProxyToken,
    req: AuthenticateRequest,
) -> Result<AuthenticateResponse, Status> {
    check_scope(token, &req.account_id)?;
    let record = svc
        .store
        .service(&req.account_id, &req.id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| Status::not_found(format!("service {} not found", req.id)))?;
    let Some(auth) = svc
        .store
        .service_auth(&record.id)
        .await
        .map_err(store_error)?
    else {
        return Ok(refused());
    };
    let Some((method, user)) = check(&auth, req.request).await else {
        return Ok(refused());
    };
    let grant = SessionGrant {
        user_id: user.to_string(),
        domain: record.domain.clone(),
        method: method.to_string(),
        max_age_secs: auth.max_session_age,
        ..Default::default()
    };
    let token = proto::session::sign(
        &SessionClaims::new(&grant, now()),
        &auth.session_private_key,
    )
    .map_err(|e| {
        tracing::error!(service = %record.id, error = %e, "session not signed");
        Status::internal("cannot sign the session")
    })?;
    Ok(AuthenticateResponse {
        success: true,
        session_token: token,
    })
}

fn refused() -> AuthenticateResponse {
    AuthenticateResponse {
        success: false,
        session_token: String::new(),
    }
}

/// The method and NetBird's fixed user id of a credential that matches, else `None`.
async fn check(
    auth: &ServiceAuthRow,
    request: Option<authenticate_request::Request>,
) -> Option<(&'static str, &'static str)> {
    use authenticate_request::Request;
    match request? {
        Request::Password(p) => {
            let hashed = auth.password_hash.clone()?;
            credentials::verify_blocking(hashed, p.password)
                .await
                .then_some(("password", "password-user"))
        }
        Request::Pin(p) => {
            let hashed = auth.pin_hash.clone()?;
            credentials::verify_blocking(hashed, p.pin)
                .await
                .then_some(("pin", "pin-user"))
        }
        Request::HeaderAuth(h) => {
            let name = h.header_name.trim();
            for configured in &auth.header_auths {
                if !name.is_empty() && !configured.header.eq_ignore_ascii_case(name) {
                    continue;
                }
                let ok = credentials::verify_blocking(
                    configured.hashed_value.clone(),
                    h.header_value.clone(),
                )
                .await;
                if ok {
                    return Some(("header", "header-user"));
                }
            }
            None
        }
    }
}

pub async fn validate_session(
    svc: &ProxyServiceImpl,
    token: &ProxyToken,
    req: ValidateSessionRequest,
) -> Result<ValidateSessionResponse, Status> {
    let denied = |reason: &str| ValidateSessionResponse {
        valid: false,
        denied_reason: reason.to_string(),
        ..Default::default()
    };
    let found = svc
        .store
        .service_auth_by_domain(&req.domain.to_ascii_lowercase())
        .await
        .map_err(store_error)?;
    let (record, auth): (ServiceRecord, Option<ServiceAuthRow>) = match found {
        Some(f) => f,
        None => return Ok(denied("service_not_found")),
    };
    check_scope(token, &record.account_id)?;
    let Some(auth) = auth else {
        return Ok(denied("service_not_found"));
    };
    let verifier = SessionVerifier::from_base64(&auth.session_public_key).map_err(store_error)?;
    match verifier.verify(&req.session_token, &record.domain, now()) {
        Ok(c) => Ok(ValidateSessionResponse {
            valid: true,
            user_id: c.sub,
            user_email: c.email,
            denied_reason: String::new(),
            peer_group_ids: c.groups,
            peer_group_names: c.group_names,
        }),
        Err(_) => Ok(denied("invalid_token")),
    }
}

/// Longest text kept per field: logs are evidence, not a place to store payloads.
const MAX_FIELD: usize = 2048;

fn clip(s: String) -> String {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

pub async fn send_access_log(
    svc: &ProxyServiceImpl,
    token: &ProxyToken,
    log: Option<AccessLog>,
) -> Result<(), Status> {
    let log = log.ok_or_else(|| Status::invalid_argument("log is required"))?;
    check_scope(token, &log.account_id)?;
    // The service must be the account's: a proxy cannot write into another account's logs.
    svc.store
        .service(&log.account_id, &log.service_id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| Status::not_found(format!("service {} not found", log.service_id)))?;
    let timestamp_ms = log
        .timestamp
        .map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
        .unwrap_or_else(|| now() * 1000);
    let metadata = serde_json::to_string(&log.metadata).unwrap_or_else(|_| "{}".into());
    let row = AccessLogRow {
        id: crate::secrets::new_id(),
        account_id: log.account_id,
        service_id: log.service_id,
        timestamp_ms,
        method: clip(log.method),
        host: clip(log.host.to_ascii_lowercase()),
        path: clip(log.path),
        duration_ms: log.duration_ms.max(0),
        status_code: i64::from(log.response_code),
        source_ip: clip(log.source_ip),
        auth_method: clip(log.auth_mechanism),
        user_id: clip(log.user_id),
        auth_success: log.auth_success,
        bytes_upload: log.bytes_upload.max(0),
        bytes_download: log.bytes_download.max(0),
        protocol: clip(log.protocol),
        metadata: clip(metadata),
    };
    svc.store.insert_access_log(&row).await.map_err(store_error)
}
