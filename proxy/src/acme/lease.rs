//! Kubernetes Lease lock (`NB_PROXY_CERT_LOCK_METHOD=k8s-lease`): replicas sharing a certificate
//! directory take a per-domain `coordination.k8s.io/v1` Lease before ordering a certificate, so
//! that only one of them asks the ACME CA for it.
//!
//! Writes use optimistic concurrency: each PUT carries the resourceVersion that was read and the
//! API server answers 409 Conflict when another replica wrote in between, so two replicas can
//! never both believe they took the lease. While held, a background task renews it every third
//! of its duration; another replica takes it over only once it has gone a whole duration without
//! renewal (the holder died).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{OwnedMutexGuard, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const API_VERSION: &str = "coordination.k8s.io/v1";
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How long other replicas wait for a holder that died before taking its lease over.
const IN_CLUSTER_LEASE_DURATION: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts while the lease is held elsewhere or the API server misbehaves.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// A Lease is a few kilobytes even with managedFields; anything far larger is not one.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Projected service account tokens are rotated by the kubelet, so the file is read again.
const TOKEN_RELOAD_INTERVAL: Duration = Duration::from_secs(60);
const NAME_PREFIX: &str = "portcullis-cert-";
/// A DNS label: valid as an object name and also as a label value should anyone select on it.
const MAX_NAME_LEN: usize = 63;
/// Writes to a lease we hold that keep meeting conflicts give up after this many tries.
const OWN_UPDATE_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("not running in a Kubernetes pod: {0} is not set")]
    NotInCluster(&'static str),
    #[error("could not read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid Kubernetes API server URL {url:?}: {reason}")]
    InvalidApiUrl { url: String, reason: &'static str },
    #[error("invalid Kubernetes namespace {0:?}: must be a lowercase RFC 1123 label")]
    InvalidNamespace(String),
    #[error("the lease holder identity must not be empty")]
    EmptyIdentity,
    #[error("the Kubernetes API token is not usable in an HTTP header")]
    InvalidToken,
    #[error("invalid CA certificate PEM for the Kubernetes API server: {0}")]
    CaPem(#[from] rustls::pki_types::pem::Error),
    #[error("the CA PEM for the Kubernetes API server holds no certificate")]
    NoCaCertificate,
    #[error("TLS setup for the Kubernetes API client failed: {0}")]
    Tls(#[from] rustls::Error),
    /// `reason` is the whole cause chain: hyper's top-level error alone ("client error
    /// (Connect)") does not say what went wrong.
    #[error("{method} lease {lease}: no answer from the Kubernetes API server: {reason}")]
    Transport {
        lease: String,
        method: Method,
        reason: String,
    },
    #[error("{method} lease {lease}: the Kubernetes API server did not answer within {timeout:?}")]
    Timeout {
        lease: String,
        method: Method,
        timeout: Duration,
    },
    #[error("{method} lease {lease}: the Kubernetes API server answered {status}: {message}")]
    Api {
        lease: String,
        method: Method,
        status: StatusCode,
        message: String,
    },
    #[error("{method} lease {lease}: unusable JSON: {source}")]
    Json {
        lease: String,
        method: Method,
        source: serde_json::Error,
    },
    #[error("lease {lease} is held by {holder:?}; gave up after waiting {waited:?}")]
    Busy {
        lease: String,
        holder: String,
        waited: Duration,
    },
    #[error("lease {lease} was taken over by another holder while held")]
    Lost { lease: String },
    #[error("lease {lease}: the renewal task failed: {source}")]
    Task {
        lease: String,
        source: tokio::task::JoinError,
    },
}

impl LeaseError {
    /// Whether another attempt may succeed: the lease is busy, someone wrote concurrently, or the
    /// API server is unreachable or overloaded. Authorisation and validation errors are final.
    fn is_retryable(&self) -> bool {
        match self {
            Self::Busy { .. } | Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::Api { status, .. } => {
                // 404 on PUT: deleted between our GET and PUT; the next GET creates it again.
                matches!(
                    *status,
                    StatusCode::NOT_FOUND | StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS
                ) || status.is_server_error()
            }
            _ => false,
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, Self::Api { status, .. } if *status == StatusCode::CONFLICT)
    }
}

/// Per-domain lock over Kubernetes Leases. Cheap to clone; use one per process so that tasks of
/// this process also exclude each other (they share the holder identity).
#[derive(Clone)]
pub struct LeaseLock {
    shared: Arc<Shared>,
}

impl LeaseLock {
    /// In-cluster configuration: KUBERNETES_SERVICE_HOST / KUBERNETES_SERVICE_PORT, the service
    /// account token, namespace and CA under /var/run/secrets/kubernetes.io/serviceaccount.
    /// `identity` must be unique per replica (the pod name).
    pub fn in_cluster(identity: String) -> Result<LeaseLock, LeaseError> {
        let host = env_var("KUBERNETES_SERVICE_HOST")?;
        let port = env_var("KUBERNETES_SERVICE_PORT")?;
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        let token_path = dir.join("token");
        let token = bearer(&read_file(&token_path)?)?;
        let namespace = read_file(&dir.join("namespace"))?;
        let ca_path = dir.join("ca.crt");
        let ca = std::fs::read(&ca_path).map_err(|source| LeaseError::ReadFile {
            path: ca_path,
            source,
        })?;
        Self::build(
            &in_cluster_base(&host, &port),
            namespace.trim(),
            Token::File {
                path: token_path,
                cached: Mutex::new((token, Instant::now())),
            },
            Some(&ca),
            identity,
            IN_CLUSTER_LEASE_DURATION,
        )
    }

    /// Explicit configuration. `api_base` is like `https://10.0.0.1:443` (or plain `http://` for
    /// tests); `ca_pem` replaces the system roots when given. The duration is rounded up to
    /// whole seconds, at least one.
    pub fn new(
        api_base: &str,
        namespace: &str,
        token: String,
        ca_pem: Option<&[u8]>,
        identity: String,
        lease_duration: Duration,
    ) -> Result<LeaseLock, LeaseError> {
        let token = Token::Fixed(bearer(&token)?);
        Self::build(api_base, namespace, token, ca_pem, identity, lease_duration)
    }

    fn build(
        api_base: &str,
        namespace: &str,
        token: Token,
        ca_pem: Option<&[u8]>,
        identity: String,
        lease_duration: Duration,
    ) -> Result<LeaseLock, LeaseError> {
        let base = validated_base(api_base)?;
        if !is_dns_label(namespace) {
            return Err(LeaseError::InvalidNamespace(namespace.to_owned()));
        }
        // An empty holder means "free" to every client, so it would let everyone in at once.
        if identity.is_empty() {
            return Err(LeaseError::EmptyIdentity);
        }
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(client_tls(ca_pem)?)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        let whole_seconds = lease_duration.as_secs() + u64::from(lease_duration.subsec_nanos() > 0);
        Ok(LeaseLock {
            shared: Arc::new(Shared {
                api: Api {
                    client,
                    base,
                    namespace: namespace.to_owned(),
                    token,
                },
                identity,
                lease_duration: Duration::from_secs(whole_seconds.max(1)),
                local: Mutex::default(),
            }),
        })
    }

    /// Takes the lease for `key` (a domain; the object is named by [`lease_name`]), waiting up to
    /// `max_wait` while another holder's unexpired lease stands. While held, the lease is renewed
    /// in the background until [`HeldLease::release`] or drop.
    pub async fn acquire(&self, key: &str, max_wait: Duration) -> Result<HeldLease, LeaseError> {
        let name = lease_name(key);
        let started = Instant::now();
        let deadline = started + max_wait;
        let local = self.claim_locally(&name, started, deadline).await?;
        let mut seen = Observation::new();
        loop {
            let err = match self.shared.try_take(&name, &mut seen).await {
                Ok(lease) => {
                    tracing::info!(lease = %name, identity = %self.shared.identity, "lease acquired");
                    return Ok(HeldLease::start(self.shared.clone(), name, lease, local));
                }
                Err(err) if err.is_retryable() => err,
                Err(err) => return Err(err),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(with_waited(err, started.elapsed()));
            }
            tracing::debug!(lease = %name, reason = %err, "lease not taken yet; retrying");
            tokio::time::sleep(RETRY_INTERVAL.min(deadline - now)).await;
        }
    }

    /// Tasks of this process share the holder identity, so the API server cannot tell them
    /// apart ("already ours" would let both in); an in-process mutex per lease does.
    async fn claim_locally(
        &self,
        name: &str,
        started: Instant,
        deadline: Instant,
    ) -> Result<OwnedMutexGuard<()>, LeaseError> {
        // One entry per domain ever locked: small, so entries are never removed.
        let slot = {
            let mut local = self
                .shared
                .local
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            local.entry(name.to_owned()).or_default().clone()
        };
        tokio::time::timeout_at(deadline, slot.lock_owned())
            .await
            .map_err(|_| LeaseError::Busy {
                lease: name.to_owned(),
                holder: format!("{} (another task of this process)", self.shared.identity),
                waited: started.elapsed(),
            })
    }
}

impl std::fmt::Debug for LeaseLock {
    // The token stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("api", &self.shared.api.base)
            .field("namespace", &self.shared.api.namespace)
            .field("identity", &self.shared.identity)
            .field("lease_duration", &self.shared.lease_duration)
            .finish()
    }
}

/// A lease taken by [`LeaseLock::acquire`]. Dropping it stops renewal and releases the lease in
/// the background; [`HeldLease::release`] does the same and reports the outcome.
#[derive(Debug)]
pub struct HeldLease {
    name: String,
    /// Dropping the sender is the stop signal.
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), LeaseError>>,
}

impl HeldLease {
    fn start(shared: Arc<Shared>, name: String, lease: Lease, local: OwnedMutexGuard<()>) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep(shared, name.clone(), lease, stopped, local));
        Self { name, stop, task }
    }

    /// The Kubernetes object name of the lease.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops renewal and gives the lease up (holderIdentity removed), best effort. Fails with
    /// [`LeaseError::Lost`] if another holder took it over meanwhile.
    pub async fn release(self) -> Result<(), LeaseError> {
        let Self { name, stop, task } = self;
        drop(stop);
        task.await.map_err(|source| LeaseError::Task {
            lease: name,
            source,
        })?
    }
}

/// Renews the lease until told to stop, then releases it. The in-process claim is held until the
/// release is done, so a task of this process cannot take the lease while it is being given up.
async fn keep(
    shared: Arc<Shared>,
    name: String,
    mut lease: Lease,
    mut stop: oneshot::Receiver<()>,
    _local: OwnedMutexGuard<()>,
) -> Result<(), LeaseError> {
    let period = shared.lease_duration / 3;
    let mut delay = period;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(delay) => {}
        }
        let renewed = shared
            .update_own(&name, lease.clone(), |spec| {
                spec.renew_time = Some(micro_time(SystemTime::now()));
            })
            .await;
        match renewed {
            Ok(Some(current)) => {
                lease = current;
                delay = period;
                tracing::trace!(lease = %name, "lease renewed");
            }
            Ok(None) => {
                tracing::error!(lease = %name, "lease taken over by another holder; renewal stopped");
                return Err(LeaseError::Lost { lease: name });
            }
            Err(err) => {
                // Retry sooner: the lease expires for others after a whole duration.
                tracing::warn!(lease = %name, error = %err, "could not renew the lease");
                delay = RETRY_INTERVAL.min(period);
            }
        }
    }
    let released = shared
        .update_own(&name, lease, |spec| spec.holder_identity = None)
        .await;
    match &released {
        Ok(Some(_)) => tracing::info!(lease = %name, "lease released"),
        Ok(None) => tracing::warn!(lease = %name, "lease was taken over before its release"),
        Err(err) => tracing::warn!(lease = %name, error = %err, "could not release the lease"),
    }
    match released? {
        Some(_) => Ok(()),
        None => Err(LeaseError::Lost { lease: name }),
    }
}

fn with_waited(err: LeaseError, waited: Duration) -> LeaseError {
    match err {
        LeaseError::Busy { lease, holder, .. } => LeaseError::Busy {
            lease,
            holder,
            waited,
        },
        other => other,
    }
}

struct Shared {
    api: Api,
    identity: String,
    lease_duration: Duration,
    local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Where a lease stands from this replica's point of view.
enum Standing {
    Free,
    /// Our identity: left behind by an earlier run of this replica (same pod name).
    Ours,
    Expired(String),
    Held(String),
}

impl Shared {
    /// One attempt: create the lease if absent, take it over if free, expired or ours.
    async fn try_take(&self, name: &str, seen: &mut Observation) -> Result<Lease, LeaseError> {
        let Some(current) = self.api.get(name).await? else {
            return self.api.create(name, self.fresh_lease(name)).await;
        };
        match self.standing(&current, seen.unchanged_for(&current)) {
            Standing::Held(holder) => Err(LeaseError::Busy {
                lease: name.to_owned(),
                holder,
                waited: Duration::ZERO,
            }),
            standing => {
                if let Standing::Expired(holder) = standing {
                    tracing::info!(lease = %name, previous = %holder, "taking over an expired lease");
                }
                self.api.replace(name, self.claim(current)).await
            }
        }
    }

    fn standing(&self, lease: &Lease, unchanged_for: Duration) -> Standing {
        let holder = match lease.spec.holder_identity.as_deref() {
            None | Some("") => return Standing::Free,
            Some(holder) => holder,
        };
        if holder == self.identity {
            Standing::Ours
        } else if expired(
            &lease.spec,
            self.lease_duration,
            unchanged_for,
            SystemTime::now(),
        ) {
            Standing::Expired(holder.to_owned())
        } else {
            Standing::Held(holder.to_owned())
        }
    }

    fn fresh_lease(&self, name: &str) -> Lease {
        let now = micro_time(SystemTime::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.api.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.lease_seconds()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            },
            ..Lease::default()
        }
    }

    /// The lease as read, now held by us; its resourceVersion stays so the write is conditional.
    fn claim(&self, mut lease: Lease) -> Lease {
        let now = micro_time(SystemTime::now());
        let spec = &mut lease.spec;
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.lease_duration_seconds = Some(self.lease_seconds());
        spec.renew_time = Some(now);
        lease
    }

    fn lease_seconds(&self) -> i64 {
        // The API field is an int32.
        i64::try_from(self.lease_duration.as_secs())
            .unwrap_or(i64::MAX)
            .min(i64::from(i32::MAX))
    }

    /// Writes `edit` onto a lease we hold. A conflict is re-read: if the lease is still ours (say
    /// an earlier write of ours landed but its answer was lost) the edit is applied to the fresh
    /// version; if it is no longer ours, `None`.
    async fn update_own(
        &self,
        name: &str,
        mut lease: Lease,
        edit: impl Fn(&mut LeaseSpec),
    ) -> Result<Option<Lease>, LeaseError> {
        let mut attempt = 1;
        loop {
            edit(&mut lease.spec);
            match self.api.replace(name, lease).await {
                Err(err) if err.is_conflict() && attempt < OWN_UPDATE_ATTEMPTS => attempt += 1,
                other => return other.map(Some),
            }
            match self.api.get(name).await? {
                Some(current)
                    if current.spec.holder_identity.as_deref() == Some(&self.identity) =>
                {
                    lease = current;
                }
                _ => return Ok(None),
            }
        }
    }
}

/// Whether the holder has gone a whole lease duration without renewing.
fn expired(spec: &LeaseSpec, fallback: Duration, unchanged_for: Duration, now: SystemTime) -> bool {
    let duration = spec
        .lease_duration_seconds
        .and_then(|secs| u64::try_from(secs).ok())
        .filter(|secs| *secs > 0)
        .map_or(fallback, Duration::from_secs);
    // Measured on our own monotonic clock, so a holder whose clock runs ahead (renewTime in the
    // future) cannot keep a dead lease forever.
    if unchanged_for >= duration {
        return true;
    }
    let last = spec
        .renew_time
        .as_deref()
        .or(spec.acquire_time.as_deref())
        .and_then(|time| humantime::parse_rfc3339(time).ok());
    // An unreadable time is not proof of death; the observation above still bounds the wait.
    last.and_then(|time| time.checked_add(duration))
        .is_some_and(|end| end <= now)
}

/// How long the lease has stayed at the same resourceVersion while we watched it.
struct Observation {
    version: Option<String>,
    since: Instant,
}

impl Observation {
    fn new() -> Self {
        Self {
            version: None,
            since: Instant::now(),
        }
    }

    fn unchanged_for(&mut self, lease: &Lease) -> Duration {
        let now = Instant::now();
        let version = &lease.metadata.resource_version;
        if version.is_none() || *version != self.version {
            self.version.clone_from(version);
            self.since = now;
        }
        now - self.since
    }
}

/// The Kubernetes object name for a lock key: `portcullis-cert-` + the key, lowercased, with
/// every character outside `[a-z0-9-]` replaced by `-`. Keys that would exceed 63 characters
/// are cut and end in a hash of the whole key so that they stay distinct. Distinct keys may
/// still share a name (`a.b` and `a-b`); that only serialises their issuance.
pub fn lease_name(key: &str) -> String {
    let mut name = String::from(NAME_PREFIX);
    name.extend(key.chars().map(|c| match c.to_ascii_lowercase() {
        c @ ('a'..='z' | '0'..='9' | '-') => c,
        _ => '-',
    }));
    if name.len() > MAX_NAME_LEN {
        // Every character is ASCII by now, so cutting at a byte index is safe.
        name.truncate(MAX_NAME_LEN - 9);
        name.truncate(name.trim_end_matches('-').len());
        name.push_str(&format!("-{:08x}", fnv1a(key.as_bytes())));
    }
    // A name must end alphanumeric; it always starts with the prefix.
    name.truncate(name.trim_end_matches('-').len());
    name
}

/// FNV-1a: stable across Rust versions and replicas, unlike `DefaultHasher`, which matters when
/// replicas of different builds must agree on a name.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Kubernetes `MicroTime`: RFC 3339 in UTC with microseconds, e.g. `2026-11-23T10:00:00.000000Z`.
fn micro_time(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

fn env_var(name: &'static str) -> Result<String, LeaseError> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.is_empty())
        .ok_or(LeaseError::NotInCluster(name))
}

fn in_cluster_base(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

fn read_file(path: &Path) -> Result<String, LeaseError> {
    std::fs::read_to_string(path).map_err(|source| LeaseError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

fn bearer(token: &str) -> Result<HeaderValue, LeaseError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
        .map_err(|_| LeaseError::InvalidToken)?;
    value.set_sensitive(true);
    Ok(value)
}

/// The base URL without a trailing slash; it must be http(s) with a host and nothing after it.
fn validated_base(url: &str) -> Result<String, LeaseError> {
    let invalid = |reason| LeaseError::InvalidApiUrl {
        url: url.to_owned(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid("the scheme must be http or https"));
    }
    if uri.authority().is_none() {
        return Err(invalid("no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid("must not have a path or query"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Trusts `ca_pem` alone when given (the cluster CA), the system roots otherwise.
fn client_tls(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, LeaseError> {
    let roots = match ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert?)?;
            }
            if roots.is_empty() {
                return Err(LeaseError::NoCaCertificate);
            }
            roots
        }
        None => crate::tls::native_roots(),
    };
    Ok(crate::tls::verifying_client_config(roots)?)
}

enum Token {
    Fixed(HeaderValue),
    File {
        path: PathBuf,
        cached: Mutex<(HeaderValue, Instant)>,
    },
}

impl Token {
    fn header(&self) -> HeaderValue {
        let (path, cached) = match self {
            Token::Fixed(value) => return value.clone(),
            Token::File { path, cached } => (path, cached),
        };
        let mut cached = cached.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.1.elapsed() >= TOKEN_RELOAD_INTERVAL {
            // A tiny file read once a minute: not worth a blocking-pool hop.
            match read_file(path).and_then(|token| bearer(&token)) {
                Ok(value) => cached.0 = value,
                Err(err) => tracing::warn!(error = %err, "keeping the previous API token"),
            }
            cached.1 = Instant::now();
        }
        cached.0.clone()
    }
}

/// The few Lease calls this lock makes.
struct Api {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    namespace: String,
    token: Token,
}

impl Api {
    fn collection_url(&self) -> String {
        format!(
            "{}/apis/{API_VERSION}/namespaces/{}/leases",
            self.base, self.namespace
        )
    }

    fn lease_url(&self, name: &str) -> String {
        format!("{}/{name}", self.collection_url())
    }

    async fn get(&self, name: &str) -> Result<Option<Lease>, LeaseError> {
        let (status, body) = self
            .call(Method::GET, self.lease_url(name), name, None)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        decoded(Method::GET, name, status, &body).map(Some)
    }

    async fn create(&self, name: &str, lease: Lease) -> Result<Lease, LeaseError> {
        let (status, body) = self
            .call(Method::POST, self.collection_url(), name, Some(lease))
            .await?;
        decoded(Method::POST, name, status, &body)
    }

    async fn replace(&self, name: &str, lease: Lease) -> Result<Lease, LeaseError> {
        let (status, body) = self
            .call(Method::PUT, self.lease_url(name), name, Some(lease))
            .await?;
        decoded(Method::PUT, name, status, &body)
    }

    /// One request, bounded by REQUEST_TIMEOUT from connecting to the last body byte.
    async fn call(
        &self,
        method: Method,
        url: String,
        name: &str,
        lease: Option<Lease>,
    ) -> Result<(StatusCode, Bytes), LeaseError> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(url)
            .header(AUTHORIZATION, self.token.header())
            .header(ACCEPT, "application/json");
        let mut payload = Bytes::new();
        if let Some(mut lease) = lease {
            lease.api_version = Some(API_VERSION.to_owned());
            lease.kind = Some("Lease".to_owned());
            payload = serde_json::to_vec(&lease)
                .map_err(|source| LeaseError::Json {
                    lease: name.to_owned(),
                    method: method.clone(),
                    source,
                })?
                .into();
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let transport = |err: BoxError| LeaseError::Transport {
            lease: name.to_owned(),
            method: method.clone(),
            reason: error_chain(&*err),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|err| transport(err.into()))?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, BoxError>((status, body))
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| LeaseError::Timeout {
                lease: name.to_owned(),
                method: method.clone(),
                timeout: REQUEST_TIMEOUT,
            })?
            .map_err(transport)?;
        tracing::trace!(lease = %name, %method, status = %answer.0, "Kubernetes API call");
        Ok(answer)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `error: cause: cause…`, skipping causes already spelled out by the error before them.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = err.source();
    }
    text
}

/// A Lease from a 2xx answer, or the API server's complaint.
fn decoded(
    method: Method,
    name: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<Lease, LeaseError> {
    if !status.is_success() {
        return Err(LeaseError::Api {
            lease: name.to_owned(),
            method,
            status,
            message: api_message(body),
        });
    }
    serde_json::from_slice(body).map_err(|source| LeaseError::Json {
        lease: name.to_owned(),
        method,
        source,
    })
}

/// The `message` of a Kubernetes Status object, else the start of the body as text.
fn api_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Status {
        message: Option<String>,
    }
    if let Ok(Status {
        message: Some(message),
    }) = serde_json::from_slice(body)
        && !message.is_empty()
    {
        return message;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "no message".to_owned()
    } else {
        text.chars().take(200).collect()
    }
}

/// The parts of a Lease this lock reads or writes; everything else (labels, managedFields, newer
/// spec fields) is carried through `other` so an update does not erase it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Lease {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: LeaseSpec,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resource_version: Option<String>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holder_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_duration_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    acquire_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    renew_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_transitions: Option<i64>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[cfg(test)]
mod tests;
