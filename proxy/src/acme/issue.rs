//! One certificate order against the ACME CA: account, order, challenge, CSR, download.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use instant_acme::{
    Account, AuthorizationStatus, BodyWrapper, ChallengeType, ExternalAccountKey, HttpClient,
    Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use tokio::sync::OnceCell;

use super::challenges::{Challenges, alpn_certificate, valid_token};
use super::lock::CertLock;
use super::settings::{AcmeSettings, ChallengeKind};
use super::storage::{AcmeDir, Validity, validity_of_pem};
use super::{AcmeError, LOCK_WAIT};

/// Time other replicas get to load a challenge from the shared directory before the CA is
/// told to validate (they poll it every `CHALLENGE_POLL`).
const PEER_PROPAGATION: Duration = Duration::from_millis(600);
/// How long the CA gets to validate and to issue.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(90);
/// Connect timeout towards the CA.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RATE_LIMITED: &str = "urn:ietf:params:acme:error:rateLimited";

pub struct Issuer {
    settings: AcmeSettings,
    dir: AcmeDir,
    challenges: Arc<Challenges>,
    lock: Arc<CertLock>,
    account: OnceCell<Account>,
}

/// What a replica published for one order, withdrawn when the order is done either way, also
/// when the order is dropped half-way (its timeout).
struct Published<'a> {
    challenges: &'a Challenges,
    dir: &'a AcmeDir,
    tokens: Vec<String>,
    domains: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.challenges.remove_http(token);
            self.dir.remove_http_challenge(token);
        }
        for d in &self.domains {
            self.challenges.remove_alpn(d);
            self.dir.remove_alpn_challenge(d);
        }
    }
}

impl Issuer {
    pub fn new(
        settings: AcmeSettings,
        dir: AcmeDir,
        challenges: Arc<Challenges>,
        lock: Arc<CertLock>,
    ) -> Self {
        Self {
            settings,
            dir,
            challenges,
            lock,
            account: OnceCell::new(),
        }
    }

    /// Orders, validates and stores a certificate for `domain`.
    pub async fn issue(&self, domain: &str) -> Result<Validity, AcmeError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(domain.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(from_acme)?;
        tracing::info!(%domain, order = order.url(), "ACME order created");
        let mut published = Published {
            challenges: &self.challenges,
            dir: &self.dir,
            tokens: Vec::new(),
            domains: Vec::new(),
        };
        let solved = self.solve(&mut order, domain, &mut published).await;
        drop(published);
        solved?;

        let key = rcgen::KeyPair::generate().map_err(|e| AcmeError::Key(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        order.finalize_csr(csr.der()).await.map_err(from_acme)?;
        let chain = order
            .poll_certificate(&retry_policy())
            .await
            .map_err(from_acme)?;
        let validity = validity_of_pem(chain.as_bytes()).ok_or_else(|| {
            AcmeError::Acme("the CA sent a certificate chain that does not parse".to_string())
        })?;
        self.dir.store(domain, &chain, &key.serialize_pem())?;
        Ok(validity)
    }

    async fn solve(
        &self,
        order: &mut Order,
        domain: &str,
        published: &mut Published<'_>,
    ) -> Result<(), AcmeError> {
        let kind = match self.settings.challenge {
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            ChallengeKind::Http01 => ChallengeType::Http01,
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(from_acme)?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                // Reused from an earlier order of this account.
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Challenge(format!(
                        "authorization for {domain} is {other:?}"
                    )));
                }
            }
            let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                AcmeError::Challenge(format!(
                    "the CA offers no {} challenge for {domain}",
                    self.settings.challenge.name()
                ))
            })?;
            let key_auth = challenge.key_authorization();
            match self.settings.challenge {
                ChallengeKind::Http01 => {
                    let token = challenge.token.clone();
                    if !valid_token(&token) {
                        return Err(AcmeError::Challenge(format!(
                            "the CA sent an unusable http-01 token {token:?}"
                        )));
                    }
                    self.challenges
                        .add_http(token.clone(), key_auth.as_str().to_string());
                    published.tokens.push(token.clone());
                    self.dir.write_http_challenge(&token, key_auth.as_str())?;
                }
                ChallengeKind::TlsAlpn01 => {
                    let (cert, pem) = alpn_certificate(domain, key_auth.digest().as_ref())
                        .map_err(|e| AcmeError::Key(e.to_string()))?;
                    self.challenges.add_alpn(domain.to_string(), cert);
                    published.domains.push(domain.to_string());
                    self.dir.write_alpn_challenge(domain, &pem)?;
                }
            }
            tokio::time::sleep(PEER_PROPAGATION).await;
            challenge.set_ready().await.map_err(from_acme)?;
        }
        let status = order.poll_ready(&retry_policy()).await.map_err(from_acme)?;
        if status == OrderStatus::Ready {
            return Ok(());
        }
        Err(AcmeError::Challenge(failure_reason(order, domain).await))
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        self.account
            .get_or_try_init(|| async {
                let file = self.dir.account_file(&self.settings.directory);
                if let Some(account) = self.load_account(&file).await? {
                    return Ok(account);
                }
                // Replicas starting together must not each register an account.
                let held = self.lock.acquire("account", LOCK_WAIT).await?;
                let result = match self.load_account(&file).await {
                    Ok(Some(account)) => Ok(account),
                    Ok(None) => self.create_account(&file).await,
                    Err(e) => Err(e),
                };
                held.release().await;
                result
            })
            .await
            .cloned()
    }

    async fn load_account(&self, file: &std::path::Path) -> Result<Option<Account>, AcmeError> {
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AcmeError::storage(file, e)),
        };
        let credentials = serde_json::from_slice(&bytes).map_err(|e| AcmeError::Storage {
            path: file.display().to_string(),
            message: format!("not ACME account credentials: {e}"),
        })?;
        let account = Account::builder_with_http(self.http_client()?)
            .from_credentials(credentials)
            .await
            .map_err(from_acme)?;
        tracing::info!(file = %file.display(), "ACME account loaded");
        Ok(Some(account))
    }

    async fn create_account(&self, file: &std::path::Path) -> Result<Account, AcmeError> {
        let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let eab = self
            .settings
            .eab
            .as_ref()
            .map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
        let (account, credentials) = Account::builder_with_http(self.http_client()?)
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                eab.as_ref(),
            )
            .await
            .map_err(from_acme)?;
        let json = serde_json::to_vec_pretty(&credentials).map_err(|e| AcmeError::Storage {
            path: file.display().to_string(),
            message: e.to_string(),
        })?;
        super::storage::write_private(file, &json)?;
        tracing::info!(id = account.id(), "ACME account created");
        Ok(account)
    }

    /// HTTPS towards the CA: the configured CA bundle, or the system roots.
    fn http_client(&self) -> Result<Box<dyn HttpClient>, AcmeError> {
        let roots = match &self.settings.ca_file {
            Some(path) => {
                crate::tls::roots_from_pem_file(path).map_err(|e| AcmeError::Storage {
                    path: path.display().to_string(),
                    message: format!("NB_PROXY_ACME_CA_FILE: {e}"),
                })?
            }
            None => crate::tls::native_roots(),
        };
        let tls = crate::tls::verifying_client_config(roots)
            .map_err(|e| AcmeError::Acme(e.to_string()))?;
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client: hyper_util::client::legacy::Client<_, BodyWrapper<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Ok(Box::new(client))
    }
}

impl ChallengeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Http01 => "http-01",
        }
    }
}

fn retry_policy() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(VALIDATION_TIMEOUT)
}

/// The CA's own words for why an order failed: the failed challenge's error.
async fn failure_reason(order: &mut Order, domain: &str) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await {
            for c in &state.challenges {
                if let Some(problem) = &c.error {
                    reasons.push(problem_text(problem));
                }
            }
        }
    }
    if reasons.is_empty() {
        format!("the CA refused the order for {domain} without saying why")
    } else {
        reasons.join("; ")
    }
}

fn problem_text(p: &instant_acme::Problem) -> String {
    match (&p.detail, &p.r#type) {
        (Some(detail), Some(t)) => format!("{detail} ({t})"),
        (Some(detail), None) => detail.clone(),
        (None, Some(t)) => t.clone(),
        (None, None) => "unspecified ACME problem".to_string(),
    }
}

fn from_acme(e: instant_acme::Error) -> AcmeError {
    match e {
        instant_acme::Error::Api(p) if p.r#type.as_deref() == Some(RATE_LIMITED) => {
            AcmeError::RateLimited {
                message: problem_text(&p),
                // instant-acme does not pass Retry-After on; the caller waits its own while.
                retry_after: None::<SystemTime>,
            }
        }
        instant_acme::Error::Api(p) => AcmeError::Acme(problem_text(&p)),
        other => AcmeError::Acme(other.to_string()),
    }
}
