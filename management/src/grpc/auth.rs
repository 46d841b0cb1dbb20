//! The calls a proxy makes while it answers a request: `Authenticate` (a password, PIN or header
//! value entered at the proxy), `ValidateSession` and `GetOIDCURL`.

use proto::session::{SessionClaims, SessionGrant, SessionVerifier};
use proto::{
    AuthenticateRequest, AuthenticateResponse, GetOidcurlRequest, GetOidcurlResponse,
    ValidateSessionRequest, ValidateSessionResponse, authenticate_request,
};
use tonic::Status;

use super::ProxyServiceImpl;
use crate::credentials;
use crate::oidc::sign_in::{self, SignInError};
use crate::store::{ProxyToken, ServiceAuthRow, ServiceRecord, now};

/// An account-scoped proxy token may only act on its own account.
pub(super) fn check_scope(token: &ProxyToken, account_id: &str) -> Result<(), Status> {
    match token.account_id.as_deref() {
        Some(own) if own != account_id => Err(Status::permission_denied(
            "this proxy token cannot act on another account's services",
        )),
        _ => Ok(()),
    }
}

pub(super) fn store_error(e: impl std::fmt::Display) -> Status {
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
    let token = sign_session(&record.id, &grant, &auth)?;
    Ok(AuthenticateResponse {
        success: true,
        session_token: token,
    })
}

/// A session token for `grant`, signed with the service's private key.
pub(super) fn sign_session(
    service_id: &str,
    grant: &SessionGrant,
    auth: &ServiceAuthRow,
) -> Result<String, Status> {
    proto::session::sign(&SessionClaims::new(grant, now()), &auth.session_private_key).map_err(
        |e| {
            tracing::error!(service = %service_id, error = %e, "session not signed");
            Status::internal("cannot sign the session")
        },
    )
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
        Err(_) => {
            // Signed in at the provider but outside the service's groups (see `oidc::sign_in`).
            let outside = sign_in::denied_audience(&record.domain);
            match verifier.verify(&req.session_token, &outside, now()) {
                Ok(c) => Ok(ValidateSessionResponse {
                    user_id: c.sub,
                    user_email: c.email,
                    ..denied("not_in_group")
                }),
                Err(_) => Ok(denied("invalid_token")),
            }
        }
    }
}

/// `GetOIDCURL`: where the proxy sends a browser to sign in to service `id`.
pub async fn oidc_url(
    svc: &ProxyServiceImpl,
    token: &ProxyToken,
    req: GetOidcurlRequest,
) -> Result<GetOidcurlResponse, Status> {
    check_scope(token, &req.account_id)?;
    match svc
        .sso
        .begin(&svc.store, &req.account_id, &req.id, &req.redirect_url)
        .await
    {
        Ok(url) => Ok(GetOidcurlResponse { url }),
        Err(e) => {
            tracing::warn!(service = %req.id, error = %e, "single sign-on not started");
            Err(match e {
                SignInError::ServiceNotFound => Status::not_found(e.to_string()),
                SignInError::NotEnabled | SignInError::NoProvider => {
                    Status::failed_precondition(e.to_string())
                }
                SignInError::BadRedirect(_) => Status::invalid_argument(e.to_string()),
                SignInError::Oidc(_) => Status::unavailable(e.to_string()),
                _ => Status::internal(e.to_string()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::{HeaderAuthRequest, PasswordRequest, PinRequest};
    use tonic::Code;

    use super::*;
    use crate::model::auth::AuthInput;
    use crate::store::{Store, test_store};

    struct World {
        svc: ProxyServiceImpl,
        account: String,
        service: ServiceRecord,
        own: ProxyToken,
        other: ProxyToken,
        shared: ProxyToken,
    }

    async fn world() -> World {
        let store: Store = test_store().await;
        let a = store.create_account("a").await.unwrap().id;
        let b = store.create_account("b").await.unwrap().id;
        let service = ServiceRecord::for_tests(&a, "{}");
        store.insert_service(&service).await.unwrap();
        let row = credentials::prepare(
            AuthInput {
                password: Some("correct horse".into()),
                pin: Some("1234".into()),
                headers: vec![
                    ("X-API-Key".into(), "first".into()),
                    ("Authorization".into(), "Bearer t0k".into()),
                    ("X-API-Key".into(), "second".into()),
                ],
                max_session_age_secs: Some(120),
                sso_groups: None,
            },
            None,
        )
        .await
        .unwrap();
        store
            .put_service_auth(&service.id, Some(&row))
            .await
            .unwrap();
        let (own, other, shared) = crate::grpc::test_tokens(&store, &a, &b).await;
        World {
            svc: ProxyServiceImpl::for_tests(store),
            account: a,
            service,
            own,
            other,
            shared,
        }
    }

    fn req(w: &World, r: authenticate_request::Request) -> AuthenticateRequest {
        AuthenticateRequest {
            id: w.service.id.clone(),
            account_id: w.account.clone(),
            request: Some(r),
        }
    }

    fn password(p: &str) -> authenticate_request::Request {
        authenticate_request::Request::Password(PasswordRequest { password: p.into() })
    }

    fn header(name: &str, value: &str) -> authenticate_request::Request {
        authenticate_request::Request::HeaderAuth(HeaderAuthRequest {
            header_name: name.into(),
            header_value: value.into(),
        })
    }

    #[tokio::test]
    async fn authenticate_signs_sessions_for_right_credentials_only() {
        let w = world().await;
        let public = w
            .svc
            .store
            .service_auth(&w.service.id)
            .await
            .unwrap()
            .unwrap()
            .session_public_key;
        let verifier = SessionVerifier::from_base64(&public).unwrap();
        let pin = authenticate_request::Request::Pin(PinRequest { pin: "1234".into() });
        for (token, r, method, user) in [
            (
                &w.own,
                password("correct horse"),
                "password",
                "password-user",
            ),
            (&w.shared, pin, "pin", "pin-user"),
            (
                &w.own,
                header("x-api-key", "second"),
                "header",
                "header-user",
            ),
            (
                &w.own,
                header("AUTHORIZATION", "Bearer t0k"),
                "header",
                "header-user",
            ),
        ] {
            let ok = authenticate(&w.svc, token, req(&w, r)).await.unwrap();
            assert!(ok.success, "{method}");
            let claims = verifier
                .verify(&ok.session_token, "app.proxy.example", now())
                .unwrap();
            assert_eq!(
                (claims.method.as_str(), claims.sub.as_str()),
                (method, user)
            );
            assert!(claims.exp > now() + 100 && claims.exp <= now() + 121);
            // Not valid for another domain.
            assert!(
                verifier
                    .verify(&ok.session_token, "other.example", now())
                    .is_err()
            );
        }
        for r in [
            password("wrong"),
            password(""),
            authenticate_request::Request::Pin(PinRequest { pin: "4321".into() }),
            // The value of one header does not open another.
            header("Authorization", "first"),
            header("X-Other", "first"),
        ] {
            let no = authenticate(&w.svc, &w.own, req(&w, r)).await.unwrap();
            assert!(!no.success && no.session_token.is_empty());
        }
        let no = authenticate(
            &w.svc,
            &w.own,
            AuthenticateRequest {
                request: None,
                ..req(&w, password("x"))
            },
        )
        .await
        .unwrap();
        assert!(!no.success);
        // Another account's token, and unknown services.
        let e = authenticate(&w.svc, &w.other, req(&w, password("correct horse")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = authenticate(
            &w.svc,
            &w.own,
            AuthenticateRequest {
                id: "nope".into(),
                ..req(&w, password("correct horse"))
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        // Without protection nothing is granted.
        w.svc
            .store
            .put_service_auth(&w.service.id, None)
            .await
            .unwrap();
        let no = authenticate(&w.svc, &w.own, req(&w, password("correct horse")))
            .await
            .unwrap();
        assert!(!no.success);
    }

    #[tokio::test]
    async fn validate_session_checks_signature_domain_and_account() {
        let w = world().await;
        let ok = authenticate(&w.svc, &w.own, req(&w, password("correct horse")))
            .await
            .unwrap();
        let ask = |domain: &str, token: &str| ValidateSessionRequest {
            domain: domain.into(),
            session_token: token.into(),
        };
        let v = validate_session(&w.svc, &w.own, ask("App.Proxy.Example", &ok.session_token))
            .await
            .unwrap();
        assert!(v.valid, "{}", v.denied_reason);
        assert_eq!(v.user_id, "password-user");
        assert!(v.denied_reason.is_empty());
        let v = validate_session(&w.svc, &w.shared, ask("app.proxy.example", "garbage"))
            .await
            .unwrap();
        assert_eq!(
            (v.valid, v.denied_reason.as_str()),
            (false, "invalid_token")
        );
        let v = validate_session(&w.svc, &w.own, ask("nope.example", &ok.session_token))
            .await
            .unwrap();
        assert_eq!(v.denied_reason, "service_not_found");
        let e = validate_session(
            &w.svc,
            &w.other,
            ask("app.proxy.example", &ok.session_token),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        // A token signed with another service's key is refused.
        let foreign = proto::session::key_pair_from_seed(&[7; 32]);
        let forged = proto::session::sign(
            &SessionClaims::new(
                &SessionGrant {
                    user_id: "x".into(),
                    domain: "app.proxy.example".into(),
                    method: "password".into(),
                    max_age_secs: 60,
                    ..Default::default()
                },
                now(),
            ),
            &foreign.private_key,
        )
        .unwrap();
        let v = validate_session(&w.svc, &w.own, ask("app.proxy.example", &forged))
            .await
            .unwrap();
        assert_eq!(v.denied_reason, "invalid_token");
        // Single sign-on outside the service's groups: a token for the denial audience, which
        // the proxy's own check refuses and ValidateSession names.
        let stored = w.svc.store.service_auth("svc1").await.unwrap().unwrap();
        let outside = proto::session::sign(
            &SessionClaims::new(
                &SessionGrant {
                    user_id: "u1".into(),
                    email: "bob@example.com".into(),
                    domain: sign_in::denied_audience("app.proxy.example"),
                    method: "oidc".into(),
                    max_age_secs: 60,
                    ..Default::default()
                },
                now(),
            ),
            &stored.session_private_key,
        )
        .unwrap();
        let v = validate_session(&w.svc, &w.own, ask("app.proxy.example", &outside))
            .await
            .unwrap();
        assert!(!v.valid);
        assert_eq!(v.denied_reason, "not_in_group");
        assert_eq!(v.user_email, "bob@example.com");
        let verifier = SessionVerifier::from_base64(&stored.session_public_key).unwrap();
        assert!(
            verifier
                .verify(&outside, "app.proxy.example", now())
                .is_err()
        );
    }
}
