//! The single sign-on flow between a proxy, the browser and the identity provider:
//! [`Sso::begin`] answers `GetOIDCURL` (a pending sign-in with state, nonce and a PKCE
//! verifier; the provider's authorization URL), [`Sso::finish`] answers the provider's
//! callback (code exchange, ID token check, the user and groups, a session token for the
//! proxy's URL). A user outside the service's groups gets a token for [`denied_audience`],
//! which no proxy accepts as a session but `ValidateSession` turns into `not_in_group`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use proto::session::{SessionClaims, SessionGrant};
use serde_json::Value;

use super::discovery::DiscoveryCache;
use super::http::json_answer;
use super::id_token::{self, Expected};
use super::{HttpClient, OidcError, form_encode};
use crate::model;
use crate::secrets;
use crate::store::{PendingSignIn, SignedInUser, Store, StoreError, now};

/// Where the provider sends the browser back, under the management's public URL.
pub const CALLBACK_PATH: &str = "/oauth2/callback";
/// How long a browser may take at the provider.
const SIGN_IN_WINDOW_SECS: i64 = 600;
/// A denial token only has to reach the proxy.
const DENIAL_AGE_SECS: i64 = 300;
const MAX_GROUPS: usize = 64;
const MAX_NAME: usize = 256;

/// The audience of a token that says "signed in, but not in the service's groups".
pub fn denied_audience(domain: &str) -> String {
    format!("denied:not_in_group:{domain}")
}

#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("service not found")]
    ServiceNotFound,
    #[error("single sign-on is not enabled for this service")]
    NotEnabled,
    #[error("the account has no identity provider (PUT /api/identity-provider)")]
    NoProvider,
    #[error("redirect_url {0:?} is not a URL on the service's domain")]
    BadRedirect(String),
    #[error("this sign-in is unknown, used or expired; open the page you wanted again")]
    UnknownState,
    #[error("the identity provider did not sign you in: {0}")]
    Provider(String),
    #[error("the identity provider's answer has no usable {0}")]
    Claim(&'static str),
    #[error(transparent)]
    Oidc(#[from] OidcError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot sign the session: {0}")]
    Sign(String),
}

/// What the provider's callback carries.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Callback {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub error_description: Option<String>,
}

pub struct Sso {
    http: HttpClient,
    discovery: DiscoveryCache,
    /// Management's address as browsers reach it, e.g. `https://mgmt.example.com`.
    public_url: String,
}

impl Sso {
    pub fn new(public_url: &str) -> Result<Self, OidcError> {
        Ok(Self {
            http: HttpClient::new()?,
            discovery: DiscoveryCache::default(),
            public_url: public_url.trim_end_matches('/').to_string(),
        })
    }

    #[cfg(test)]
    pub fn for_tests() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self::new("http://127.0.0.1:1").expect("TLS roots"))
    }

    pub fn redirect_uri(&self) -> String {
        format!("{}{CALLBACK_PATH}", self.public_url)
    }

    /// Checks that the provider answers discovery (when it is configured, so mistakes show at
    /// once rather than at the first sign-in).
    pub async fn probe(&self, issuer: &str) -> Result<(), OidcError> {
        self.discovery.forget(issuer);
        self.discovery.get(&self.http, issuer).await.map(|_| ())
    }

    /// The provider URL to send the browser to for signing in to `service_id`.
    pub async fn begin(
        &self,
        store: &Store,
        account_id: &str,
        service_id: &str,
        redirect_url: &str,
    ) -> Result<String, SignInError> {
        let record = store
            .service(account_id, service_id)
            .await?
            .ok_or(SignInError::ServiceNotFound)?;
        let enabled = store
            .service_auth(&record.id)
            .await?
            .is_some_and(|a| a.sso_groups.is_some());
        if !enabled {
            return Err(SignInError::NotEnabled);
        }
        if !on_domain(redirect_url, &record.domain) {
            return Err(SignInError::BadRedirect(clip(redirect_url, 200)));
        }
        let provider = store
            .identity_provider(account_id)
            .await?
            .ok_or(SignInError::NoProvider)?;
        let meta = self.discovery.get(&self.http, &provider.issuer).await?;
        let state = secrets::random_base62(43);
        let nonce = secrets::random_base62(32);
        let verifier = secrets::random_base62(64);
        let challenge = URL_SAFE_NO_PAD
            .encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
        store
            .insert_pending_sign_in(
                &secrets::hash_token(&state),
                &PendingSignIn {
                    account_id: account_id.to_string(),
                    service_id: record.id.clone(),
                    redirect_url: redirect_url.to_string(),
                    nonce: nonce.clone(),
                    code_verifier: verifier,
                    expires_at: now() + SIGN_IN_WINDOW_SECS,
                },
            )
            .await?;
        // Scopes the provider lists; without a list, the ones every provider knows.
        let mut scope = vec!["openid"];
        for s in ["email", "profile", "groups"] {
            let listed = meta.scopes_supported.iter().any(|x| x == s);
            if listed || (meta.scopes_supported.is_empty() && s != "groups") {
                scope.push(s);
            }
        }
        let sep = if meta.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!(
            "{}{sep}response_type=code&client_id={}&redirect_uri={}&scope={}&state={state}\
             &nonce={nonce}&code_challenge={challenge}&code_challenge_method=S256",
            meta.authorization_endpoint,
            form_encode(&provider.client_id),
            form_encode(&self.redirect_uri()),
            form_encode(&scope.join(" ")),
        ))
    }

    /// Handles the provider's callback; the URL (on the proxy) to send the browser on to.
    pub async fn finish(&self, store: &Store, cb: &Callback) -> Result<String, SignInError> {
        let state = cb.state.as_deref().ok_or(SignInError::UnknownState)?;
        let pending = store
            .take_pending_sign_in(&secrets::hash_token(state))
            .await?
            .filter(|p| p.expires_at >= now())
            .ok_or(SignInError::UnknownState)?;
        if let Some(error) = &cb.error {
            let detail = cb.error_description.as_deref().unwrap_or_default();
            return Err(SignInError::Provider(clip(
                &format!("{error} {detail}"),
                300,
            )));
        }
        let code = cb
            .code
            .as_deref()
            .ok_or_else(|| SignInError::Provider("no code in the callback".into()))?;
        let provider = store
            .identity_provider(&pending.account_id)
            .await?
            .ok_or(SignInError::NoProvider)?;
        let meta = self.discovery.get(&self.http, &provider.issuer).await?;
        let id_token = self
            .redeem(&meta.token_endpoint, &provider, code, &pending)
            .await?;
        let jwks = self.http.get_json(&meta.jwks_uri).await?;
        let claims = id_token::verify(
            &id_token,
            &jwks,
            &Expected {
                issuer: &provider.issuer,
                client_id: &provider.client_id,
                nonce: &pending.nonce,
                now_unix: now(),
            },
        )?;
        let who = signed_in_user(&claims, &provider.groups_claim)?;
        let user = store.sign_in_user(&pending.account_id, &who).await?;
        let groups = store
            .ensure_groups(&pending.account_id, &who.group_names)
            .await?;
        let record = store
            .service(&pending.account_id, &pending.service_id)
            .await?
            .ok_or(SignInError::ServiceNotFound)?;
        let auth = store
            .service_auth(&record.id)
            .await?
            .ok_or(SignInError::NotEnabled)?;
        let allowed_groups = auth.sso_groups.as_ref().ok_or(SignInError::NotEnabled)?;
        let allowed =
            allowed_groups.is_empty() || groups.iter().any(|g| allowed_groups.contains(&g.id));
        tracing::info!(
            account = %pending.account_id,
            service = %record.id,
            user = %user.id,
            allowed,
            "single sign-on"
        );
        let grant = SessionGrant {
            user_id: user.id,
            email: who.email,
            domain: if allowed {
                record.domain.clone()
            } else {
                denied_audience(&record.domain)
            },
            method: "oidc".into(),
            groups: groups.iter().map(|g| g.id.clone()).collect(),
            group_names: groups.iter().map(|g| g.name.clone()).collect(),
            max_age_secs: if allowed {
                auth.max_session_age
            } else {
                DENIAL_AGE_SECS
            },
        };
        let token = proto::session::sign(
            &SessionClaims::new(&grant, now()),
            &auth.session_private_key,
        )
        .map_err(|e| SignInError::Sign(e.to_string()))?;
        let sep = if pending.redirect_url.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!(
            "{}{sep}session_token={}",
            pending.redirect_url,
            form_encode(&token)
        ))
    }

    /// The authorization code for an ID token at the token endpoint (client_secret_basic).
    async fn redeem(
        &self,
        token_endpoint: &str,
        provider: &crate::store::IdentityProvider,
        code: &str,
        pending: &PendingSignIn,
    ) -> Result<String, SignInError> {
        // RFC 6749 §2.3.1: id and secret are form-encoded before they go into Basic.
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            form_encode(&provider.client_id),
            form_encode(&provider.client_secret)
        ));
        let form = format!(
            "grant_type=authorization_code&code={}&redirect_uri={}&code_verifier={}",
            form_encode(code),
            form_encode(&self.redirect_uri()),
            form_encode(&pending.code_verifier)
        );
        let req = ::http::Request::post(token_endpoint)
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| OidcError::Fetch {
                url: token_endpoint.to_string(),
                reason: e.to_string(),
            })?;
        let (status, body) = self.http.send(req).await?;
        let answer = json_answer(token_endpoint, status, &body)?;
        answer["id_token"]
            .as_str()
            .map(str::to_string)
            .ok_or(SignInError::Claim("id_token"))
    }
}

/// The user in verified ID token claims: subject, email (else the preferred user name), and
/// the group names of `groups_claim` (an array of names or one name), bounded.
fn signed_in_user(
    claims: &serde_json::Map<String, Value>,
    groups_claim: &str,
) -> Result<SignedInUser, SignInError> {
    let text = |name: &str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_NAME && !model::has_control_chars(s))
    };
    let subject = text("sub").ok_or(SignInError::Claim("sub"))?;
    let email = text("email")
        .or_else(|| text("preferred_username"))
        .ok_or(SignInError::Claim("email"))?;
    let mut group_names: Vec<String> = Vec::new();
    let raw = match claims.get(groups_claim) {
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(one)) => vec![one.as_str()],
        _ => Vec::new(),
    };
    for name in raw {
        let name = name.trim();
        if name.is_empty()
            || name.len() > MAX_NAME
            || model::has_control_chars(name)
            || group_names.iter().any(|g| g == name)
        {
            continue;
        }
        if group_names.len() == MAX_GROUPS {
            tracing::warn!(
                claim = groups_claim,
                "the groups claim names more than {MAX_GROUPS} groups; the rest are ignored"
            );
            break;
        }
        group_names.push(name.to_string());
    }
    Ok(SignedInUser {
        subject: subject.to_string(),
        email: email.to_string(),
        group_names,
    })
}

/// True when `url` is an http(s) URL whose host is `domain` (any port).
fn on_domain(url: &str, domain: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return false;
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            authority
        }
    });
    host.eq_ignore_ascii_case(domain)
}

fn clip(s: &str, max: usize) -> String {
    s[..s.floor_char_boundary(max)].to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn redirects_stay_on_the_service_domain() {
        assert!(on_domain(
            "https://app.example.com/x?y=1",
            "app.example.com"
        ));
        assert!(on_domain(
            "https://App.Example.com:8443/",
            "app.example.com"
        ));
        assert!(on_domain("http://app.example.com", "app.example.com"));
        assert!(!on_domain(
            "https://evil.example/app.example.com",
            "app.example.com"
        ));
        assert!(!on_domain(
            "https://app.example.com@evil.example/",
            "app.example.com"
        ));
        assert!(!on_domain(
            "https://app.example.com.evil.example/",
            "app.example.com"
        ));
        assert!(!on_domain("javascript:alert(1)", "app.example.com"));
    }

    #[test]
    fn users_come_from_the_claims() {
        let claims = |v: Value| v.as_object().unwrap().clone();
        let u = signed_in_user(
            &claims(json!({"sub": "s1", "email": "a@example.com", "groups": ["staff", "staff", "", "ops"]})),
            "groups",
        )
        .unwrap();
        assert_eq!(u.email, "a@example.com");
        assert_eq!(u.group_names, ["staff", "ops"]);
        let u = signed_in_user(
            &claims(json!({"sub": "s1", "preferred_username": "al", "roles": "admin"})),
            "roles",
        )
        .unwrap();
        assert_eq!(
            (u.email.as_str(), u.group_names.as_slice()),
            ("al", &["admin".to_string()][..])
        );
        assert!(signed_in_user(&claims(json!({"email": "a@b"})), "groups").is_err());
        let many: Vec<String> = (0..100).map(|i| format!("g{i}")).collect();
        let u = signed_in_user(&claims(json!({"sub": "s", "email": "e", "g": many})), "g").unwrap();
        assert_eq!(u.group_names.len(), MAX_GROUPS);
    }
}
