//! `ValidateTunnelPeer`: a request reached a proxy over the mesh from a tunnel address; is the
//! peer there (or its user) in a group the service lets in? If so, the answer carries a
//! session token like a sign-in would, so a proxy can skip the login page.

use std::net::IpAddr;

use proto::session::SessionGrant;
use proto::{ValidateTunnelPeerRequest, ValidateTunnelPeerResponse};
use tonic::Status;

use super::ProxyServiceImpl;
use super::auth::store_error;
use crate::model;
use crate::store::ProxyToken;

fn denied(reason: &str) -> ValidateTunnelPeerResponse {
    ValidateTunnelPeerResponse {
        valid: false,
        denied_reason: reason.to_string(),
        ..Default::default()
    }
}

pub async fn validate_tunnel_peer(
    svc: &ProxyServiceImpl,
    token: &ProxyToken,
    req: ValidateTunnelPeerRequest,
) -> Result<ValidateTunnelPeerResponse, Status> {
    let Ok(tunnel_ip) = req.tunnel_ip.trim().parse::<IpAddr>() else {
        return Ok(denied("invalid_tunnel_ip"));
    };
    let tunnel_ip = tunnel_ip.to_canonical();
    let domain = req.domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let found = svc
        .store
        .service_auth_by_domain(&domain)
        .await
        .map_err(store_error)?;
    let Some((record, auth)) = found else {
        return Ok(denied("service_not_found"));
    };
    // The account comes from the token: a proxy of one account never learns about another's.
    if token
        .account_id
        .as_deref()
        .is_some_and(|own| own != record.account_id)
    {
        return Ok(denied("account_mismatch"));
    }
    let spec = model::spec_of(&record).map_err(store_error)?;
    // Private services let in their access groups; an SSO service its sign-in groups (the
    // mesh stands in for the sign-in). Nothing else is opened to mesh peers by this call.
    let allowed: Option<&[String]> = if spec.private {
        Some(&spec.access_groups)
    } else {
        auth.as_ref().and_then(|a| a.sso_groups.as_deref())
    };
    let Some(peer) = svc
        .store
        .tunnel_peer(&record.account_id, tunnel_ip)
        .await
        .map_err(store_error)?
    else {
        return Ok(denied("peer_not_found"));
    };
    let (principal, display) = match &peer.user {
        Some(None) => return Ok(denied("no_user")),
        Some(Some(user)) => (user.id.clone(), user.email.clone()),
        // Machines are let into private services by their groups; a session that stands in
        // for a person's single sign-on needs a person.
        None if !spec.private => return Ok(denied("no_user")),
        None => (peer.peer_id.clone(), peer.peer_name.clone()),
    };
    let group_ids: Vec<String> = peer.groups.iter().map(|g| g.id.clone()).collect();
    let group_names: Vec<String> = peer.groups.iter().map(|g| g.name.clone()).collect();
    let let_in = match allowed {
        // A private service always names groups (REST refuses one without); an empty list
        // here is a damaged record and lets nobody in.
        Some(groups) if spec.private => group_ids.iter().any(|g| groups.contains(g)),
        Some(groups) => groups.is_empty() || group_ids.iter().any(|g| groups.contains(g)),
        None => false,
    };
    if !let_in {
        tracing::debug!(%domain, %tunnel_ip, peer = %peer.peer_id, "tunnel peer not in the service's groups");
        return Ok(ValidateTunnelPeerResponse {
            user_id: principal,
            user_email: display,
            peer_group_ids: group_ids,
            peer_group_names: group_names,
            ..denied("not_in_group")
        });
    }
    let Some(auth) = auth else {
        tracing::error!(service = %record.id, "a service open to mesh peers has no session key");
        return Err(Status::internal("the service has no session key"));
    };
    let grant = SessionGrant {
        user_id: principal.clone(),
        email: display.clone(),
        domain: record.domain.clone(),
        method: "oidc".into(),
        groups: group_ids.clone(),
        group_names: group_names.clone(),
        max_age_secs: auth.max_session_age,
    };
    let session_token = super::auth::sign_session(&record.id, &grant, &auth)?;
    tracing::debug!(%domain, %tunnel_ip, peer = %peer.peer_id, "tunnel peer let in");
    Ok(ValidateTunnelPeerResponse {
        valid: true,
        user_id: principal,
        user_email: display,
        denied_reason: String::new(),
        session_token,
        peer_group_ids: group_ids,
        peer_group_names: group_names,
    })
}

#[cfg(test)]
mod tests {
    use proto::session::SessionVerifier;

    use super::*;
    use crate::model::auth::AuthInput;
    use crate::store::{
        NewPeer, PeerAccess, PeerKind, Role, ServiceRecord, Store, generate_wg_keypair, test_store,
    };

    async fn ask(
        svc: &ProxyServiceImpl,
        token: &ProxyToken,
        ip: &str,
        domain: &str,
    ) -> ValidateTunnelPeerResponse {
        let req = ValidateTunnelPeerRequest {
            tunnel_ip: ip.into(),
            domain: domain.into(),
        };
        validate_tunnel_peer(svc, token, req).await.unwrap()
    }

    async fn set_access(
        store: &Store,
        account: &str,
        peer: &str,
        user: Option<&str>,
        groups: &[&str],
    ) {
        let access = PeerAccess {
            user_id: user.map(str::to_string),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        assert!(store.set_peer_access(account, peer, &access).await.unwrap());
    }

    async fn agent(store: &Store, account: &str, name: &str) -> crate::store::MeshPeer {
        let key = generate_wg_keypair().1;
        let peer = NewPeer {
            account_id: account,
            name,
            public_key: &key,
            kind: PeerKind::Agent,
            proxy_id: None,
            cluster_address: None,
            hashed_token: None,
            setup_key_id: None,
        };
        store.insert_mesh_peer(&peer).await.unwrap()
    }

    #[tokio::test]
    async fn peers_are_let_in_by_their_own_or_their_users_groups() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap().id;
        let b = store.create_account("b").await.unwrap().id;
        let staff = store.create_group(&a, "staff", "api").await.unwrap().id;
        let ops = store.create_group(&a, "ops", "api").await.unwrap().id;
        let spec = serde_json::json!({"mode": "http", "listen_port": 0, "targets": [],
            "pass_host_header": false, "rewrite_redirects": false,
            "private": true, "access_groups": [staff]});
        let service = ServiceRecord::for_tests(&a, &spec.to_string());
        store.insert_service(&service).await.unwrap();
        let keys = crate::credentials::prepare(AuthInput::default(), None)
            .await
            .unwrap();
        store
            .put_service_auth(&service.id, Some(&keys))
            .await
            .unwrap();
        let user = store
            .create_user(&a, "u@example.test", Role::User)
            .await
            .unwrap();
        let laptop = agent(&store, &a, "laptop").await;
        let server = agent(&store, &a, "server").await;
        let (own, _) = store.create_proxy_token(Some(&a), "a", None).await.unwrap();
        let (other, _) = store.create_proxy_token(Some(&b), "b", None).await.unwrap();
        let svc = ProxyServiceImpl::for_tests(store);
        let (laptop_ip, server_ip) = (laptop.tunnel_ip.to_string(), server.tunnel_ip.to_string());
        let domain = "app.proxy.example";
        let r = ask(&svc, &own, &laptop_ip, domain).await;
        assert_eq!((r.valid, r.denied_reason.as_str()), (false, "not_in_group"));
        assert_eq!(
            r.user_email, "laptop",
            "a peer without a user is named by itself"
        );

        // The laptop's user is in the group: let in as that user, with a token for the domain.
        set_access(&svc.store, &a, &laptop.id, Some(&user.id), &[]).await;
        assert!(
            svc.store
                .set_user_auto_groups(&a, &user.id, std::slice::from_ref(&staff))
                .await
                .unwrap()
        );
        let r = ask(&svc, &own, &laptop_ip, "APP.proxy.example.").await;
        assert!(r.valid, "{r:?}");
        assert_eq!(
            (r.user_id.as_str(), r.user_email.as_str()),
            (user.id.as_str(), "u@example.test")
        );
        assert_eq!(r.peer_group_names, ["staff"]);
        let verifier = SessionVerifier::from_base64(&keys.session_public_key).unwrap();
        let claims = verifier
            .verify(&r.session_token, domain, crate::store::now())
            .expect("a session for the service");
        assert_eq!(claims.email, "u@example.test");

        // A machine peer in another group; then in the group itself.
        set_access(&svc.store, &a, &server.id, None, &[&ops]).await;
        assert_eq!(
            ask(&svc, &own, &server_ip, domain).await.denied_reason,
            "not_in_group"
        );
        set_access(&svc.store, &a, &server.id, None, &[&staff]).await;
        let r = ask(&svc, &own, &server_ip, domain).await;
        assert!(r.valid && r.user_id == server.id, "{r:?}");

        // Refusals: unknown address, unknown domain, another account's token, a vanished user.
        let refusals = [
            (&own, "100.64.9.9", domain, "peer_not_found"),
            (&own, "nonsense", domain, "invalid_tunnel_ip"),
            (&own, &laptop_ip, "nope.proxy.example", "service_not_found"),
            (&other, &laptop_ip, domain, "account_mismatch"),
        ];
        for (token, ip, d, want) in refusals {
            assert_eq!(
                ask(&svc, token, ip, d).await.denied_reason,
                want,
                "{ip} {d}"
            );
        }
        set_access(&svc.store, &a, &laptop.id, Some("gone"), &[&staff]).await;
        assert_eq!(
            ask(&svc, &own, &laptop_ip, domain).await.denied_reason,
            "no_user"
        );
    }
}
