//! The lease lock against a fake Kubernetes API server that keeps Leases in memory.

use std::convert::Infallible;

use http::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use super::*;

const TOKEN: &str = "test-token";
const NAMESPACE: &str = "portcullis";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/portcullis/leases";
const DOMAIN: &str = "example.com";
const NAME: &str = "portcullis-cert-example-com";

/// A request as the fake API server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    accept: Option<String>,
    body: Option<Value>,
}

#[derive(Default)]
struct FakeState {
    leases: HashMap<String, Value>,
    version: u64,
    requests: Vec<Seen>,
    /// The next this-many PUTs meet a concurrent writer and get 409.
    conflicts: usize,
}

/// Answers like the API server: 404 for a missing lease, 201 on create, 200 on update,
/// 409 when the resourceVersion is stale or the object exists already.
impl FakeState {
    fn answer(&mut self, seen: &Seen) -> (StatusCode, Value) {
        if seen.authorization.as_deref() != Some("Bearer test-token") {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
        let Some(rest) = seen.path.strip_prefix(LEASES) else {
            return status(
                StatusCode::NOT_FOUND,
                "the server could not find the resource",
            );
        };
        match (&seen.method, rest.strip_prefix('/')) {
            (&Method::GET, Some(name)) => match self.leases.get(name) {
                Some(lease) => (StatusCode::OK, lease.clone()),
                None => not_found(name),
            },
            (&Method::POST, None) => self.create(seen.body.clone().unwrap_or_default()),
            (&Method::PUT, Some(name)) => self.update(name, seen.body.clone().unwrap_or_default()),
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        }
    }

    fn create(&mut self, lease: Value) -> (StatusCode, Value) {
        let name = lease["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if self.leases.contains_key(&name) {
            return status(
                StatusCode::CONFLICT,
                &format!("leases.coordination.k8s.io \"{name}\" already exists"),
            );
        }
        let lease = self.stamp(lease);
        self.leases.insert(name, lease.clone());
        (StatusCode::CREATED, lease)
    }

    fn update(&mut self, name: &str, lease: Value) -> (StatusCode, Value) {
        let Some(stored) = self.leases.get(name).cloned() else {
            return not_found(name);
        };
        if self.conflicts > 0 {
            // Another writer got there first: the stored version moves on.
            self.conflicts -= 1;
            let touched = self.stamp(stored);
            self.leases.insert(name.to_owned(), touched);
            return modified(name);
        }
        if lease["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
            return modified(name);
        }
        let lease = self.stamp(lease);
        self.leases.insert(name.to_owned(), lease.clone());
        (StatusCode::OK, lease)
    }

    fn stamp(&mut self, mut lease: Value) -> Value {
        self.version += 1;
        lease["metadata"]["resourceVersion"] = json!(self.version.to_string());
        lease
    }
}

fn status(code: StatusCode, message: &str) -> (StatusCode, Value) {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message, "code": code.as_u16(),
    });
    (code, body)
}

fn not_found(name: &str) -> (StatusCode, Value) {
    status(
        StatusCode::NOT_FOUND,
        &format!("leases.coordination.k8s.io \"{name}\" not found"),
    )
}

fn modified(name: &str) -> (StatusCode, Value) {
    status(
        StatusCode::CONFLICT,
        &format!(
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the \
             object has been modified; please apply your changes to the latest version and \
             try again"
        ),
    )
}

struct FakeApi {
    base: String,
    state: Arc<Mutex<FakeState>>,
}

impl FakeApi {
    async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(FakeState {
            version: 100,
            ..FakeState::default()
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                let service = service_fn(move |request| serve(state.clone(), request));
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        FakeApi { base, state }
    }

    fn lock(&self, identity: &str, lease_duration: Duration) -> LeaseLock {
        LeaseLock::new(
            &self.base,
            NAMESPACE,
            TOKEN.to_owned(),
            None,
            identity.to_owned(),
            lease_duration,
        )
        .unwrap()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    fn lease(&self, name: &str) -> Value {
        self.state()
            .leases
            .get(name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn requests(&self) -> Vec<Seen> {
        self.state().requests.clone()
    }

    /// Method and path of every request so far, e.g. "GET .../leases/x" minus the prefix.
    fn calls(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|seen| format!("{} {}", seen.method, seen.path.trim_start_matches(LEASES)))
            .collect()
    }
}

async fn serve(
    state: Arc<Mutex<FakeState>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name| {
        parts
            .headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let seen = Seen {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        authorization: header(AUTHORIZATION),
        content_type: header(CONTENT_TYPE),
        accept: header(ACCEPT),
        body: serde_json::from_slice(&body).ok(),
    };
    let (code, answer) = {
        let mut state = state.lock().unwrap();
        state.requests.push(seen.clone());
        state.answer(&seen)
    };
    Ok(Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(answer.to_string())))
        .unwrap())
}

fn seeded_lease(holder: &str, renew_time: &str, version: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": NAME, "namespace": NAMESPACE, "resourceVersion": version,
            "labels": {"app": "portcullis"},
        },
        "spec": {
            "holderIdentity": holder, "leaseDurationSeconds": 15,
            "acquireTime": renew_time, "renewTime": renew_time, "leaseTransitions": 4,
        },
    })
}

fn assert_micro_time(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    assert_eq!(text.len(), "2026-11-23T10:00:00.000000Z".len(), "{text}");
    assert_eq!(&text[19..20], ".", "{text}");
    assert!(text.ends_with('Z'), "{text}");
    humantime::parse_rfc3339(text).unwrap();
}

const LONG: Duration = Duration::from_secs(15);

#[tokio::test]
async fn acquire_creates_the_lease_and_release_frees_it() {
    let api = FakeApi::start().await;
    let held = api
        .lock("replica-a", LONG)
        .acquire(DOMAIN, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(held.name(), NAME);

    let requests = api.requests();
    assert_eq!(api.calls(), [format!("GET /{NAME}"), "POST ".to_owned()]);
    for seen in &requests {
        assert_eq!(seen.authorization.as_deref(), Some("Bearer test-token"));
        assert_eq!(seen.accept.as_deref(), Some("application/json"));
    }
    let create = &requests[1];
    assert_eq!(create.content_type.as_deref(), Some("application/json"));
    let body = create.body.as_ref().unwrap();
    assert_eq!(body["apiVersion"], "coordination.k8s.io/v1");
    assert_eq!(body["kind"], "Lease");
    assert_eq!(body["metadata"]["name"], NAME);
    assert_eq!(body["metadata"]["namespace"], NAMESPACE);
    assert!(body["metadata"].get("resourceVersion").is_none());
    assert_eq!(body["spec"]["holderIdentity"], "replica-a");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(body["spec"]["leaseTransitions"], 0);
    assert_micro_time(&body["spec"]["acquireTime"]);
    assert_micro_time(&body["spec"]["renewTime"]);
    let created_version = api.lease(NAME)["metadata"]["resourceVersion"].clone();

    held.release().await.unwrap();
    let requests = api.requests();
    let release = requests.last().unwrap();
    assert_eq!(release.method, Method::PUT);
    assert_eq!(release.path, format!("{LEASES}/{NAME}"));
    let body = release.body.as_ref().unwrap();
    assert_eq!(body["metadata"]["resourceVersion"], created_version);
    assert!(body["spec"].get("holderIdentity").is_none(), "{body}");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
    assert!(api.lease(NAME)["spec"].get("holderIdentity").is_none());
}

#[tokio::test]
async fn another_holder_makes_acquire_wait_then_time_out() {
    let api = FakeApi::start().await;
    let first = api
        .lock("replica-a", LONG)
        .acquire(DOMAIN, Duration::ZERO)
        .await
        .unwrap();
    let second = api.lock("replica-b", LONG);

    let started = std::time::Instant::now();
    let err = second
        .acquire(DOMAIN, Duration::from_millis(1500))
        .await
        .err()
        .unwrap();
    let waited = started.elapsed();
    assert!(
        matches!(&err, LeaseError::Busy { lease, holder, .. } if lease == NAME && holder == "replica-a"),
        "{err}"
    );
    assert!(err.to_string().contains("replica-a"), "{err}");
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // Polled about once a second, never written.
    let polls = api
        .calls()
        .iter()
        .skip(2)
        .filter(|c| c.starts_with("GET"))
        .count();
    assert!((2..=4).contains(&polls), "{:?}", api.calls());
    assert_eq!(api.lease(NAME)["spec"]["holderIdentity"], "replica-a");

    first.release().await.unwrap();
    let taken = second.acquire(DOMAIN, Duration::ZERO).await.unwrap();
    let lease = api.lease(NAME);
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    taken.release().await.unwrap();
}

#[tokio::test]
async fn a_waiting_acquire_gets_the_lease_once_released() {
    let api = FakeApi::start().await;
    let first = api
        .lock("replica-a", LONG)
        .acquire(DOMAIN, Duration::ZERO)
        .await
        .unwrap();
    let second = api.lock("replica-b", LONG);
    let waiting =
        tokio::spawn(async move { second.acquire(DOMAIN, Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.release().await.unwrap();
    let held = waiting.await.unwrap().unwrap();
    assert_eq!(api.lease(NAME)["spec"]["holderIdentity"], "replica-b");
    held.release().await.unwrap();
}

#[tokio::test]
async fn an_expired_lease_is_taken_over() {
    let api = FakeApi::start().await;
    api.state().leases.insert(
        NAME.to_owned(),
        seeded_lease("crashed", "2001-01-01T00:00:00.000000Z", "42"),
    );
    let held = api
        .lock("replica-a", LONG)
        .acquire(DOMAIN, Duration::ZERO)
        .await
        .unwrap();

    assert_eq!(
        api.calls(),
        [format!("GET /{NAME}"), format!("PUT /{NAME}")]
    );
    let requests = api.requests();
    let body = requests[1].body.as_ref().unwrap();
    assert_eq!(body["metadata"]["resourceVersion"], "42");
    assert_eq!(
        body["metadata"]["labels"]["app"], "portcullis",
        "other fields kept"
    );
    assert_eq!(body["spec"]["holderIdentity"], "replica-a");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(body["spec"]["leaseTransitions"], 5);
    assert_micro_time(&body["spec"]["renewTime"]);
    assert_ne!(body["spec"]["renewTime"], "2001-01-01T00:00:00.000000Z");
    held.release().await.unwrap();
}

#[tokio::test]
async fn an_unexpired_lease_of_another_holder_is_left_alone() {
    let api = FakeApi::start().await;
    let now = micro_time(SystemTime::now());
    api.state()
        .leases
        .insert(NAME.to_owned(), seeded_lease("replica-z", &now, "42"));
    let err = api
        .lock("replica-a", LONG)
        .acquire(DOMAIN, Duration::ZERO)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, LeaseError::Busy { .. }), "{err}");
    assert_eq!(api.calls(), [format!("GET /{NAME}")]);
}

#[tokio::test]
async fn a_conflict_on_update_is_retried() {
    let api = FakeApi::start().await;
    {
        let mut state = api.state();
        state.leases.insert(
            NAME.to_owned(),
            seeded_lease("crashed", "2001-01-01T00:00:00.000000Z", "42"),
        );
        state.conflicts = 1;
    }
    let held = api
        .lock("replica-a", LONG)
        .acquire(DOMAIN, Duration::from_secs(5))
        .await
        .unwrap();

    let get = format!("GET /{NAME}");
    let put = format!("PUT /{NAME}");
    assert_eq!(api.calls(), [&*get, &*put, &*get, &*put]);
    let requests = api.requests();
    let retried = requests[3].body.as_ref().unwrap();
    // The retry carries the version written by the concurrent writer, not the first one read.
    assert_eq!(
        requests[1].body.as_ref().unwrap()["metadata"]["resourceVersion"],
        "42"
    );
    assert_eq!(retried["metadata"]["resourceVersion"], "101");
    assert_eq!(api.lease(NAME)["spec"]["holderIdentity"], "replica-a");
    held.release().await.unwrap();
}

#[tokio::test]
async fn the_lease_is_renewed_while_held() {
    let api = FakeApi::start().await;
    let held = api
        .lock("replica-a", Duration::from_secs(3))
        .acquire(DOMAIN, Duration::ZERO)
        .await
        .unwrap();
    let created = api.lease(NAME);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let renewed = api.lease(NAME);
    let renewals: Vec<_> = api.requests().into_iter().skip(2).collect();
    // Every second (duration / 3); a loaded machine may delay the second one.
    assert!(
        (1..=3).contains(&renewals.len()),
        "renewed every second: {:?}",
        api.calls()
    );
    assert!(renewals.iter().all(|seen| seen.method == Method::PUT));
    assert_ne!(
        created["metadata"]["resourceVersion"],
        renewed["metadata"]["resourceVersion"]
    );
    assert_eq!(renewed["spec"]["holderIdentity"], "replica-a");
    assert_eq!(
        renewed["spec"]["acquireTime"],
        created["spec"]["acquireTime"]
    );
    let renew_time = |lease: &Value| {
        humantime::parse_rfc3339(lease["spec"]["renewTime"].as_str().unwrap()).unwrap()
    };
    assert!(renew_time(&renewed) > renew_time(&created));

    // Renewed, so not expired to another replica even past the original duration.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let other = api.lock("replica-b", Duration::from_secs(3));
    assert!(other.acquire(DOMAIN, Duration::ZERO).await.is_err());
    held.release().await.unwrap();
}

#[tokio::test]
async fn dropping_the_held_lease_releases_it() {
    let api = FakeApi::start().await;
    let held = api
        .lock("replica-a", LONG)
        .acquire(DOMAIN, Duration::ZERO)
        .await
        .unwrap();
    drop(held);
    for _ in 0..50 {
        if api.lease(NAME)["spec"].get("holderIdentity").is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not released: {}", api.lease(NAME));
}

#[tokio::test]
async fn a_lease_taken_over_while_held_is_reported_lost() {
    let api = FakeApi::start().await;
    let held = api
        .lock("replica-a", Duration::from_secs(3))
        .acquire(DOMAIN, Duration::ZERO)
        .await
        .unwrap();
    {
        let mut state = api.state();
        let mut lease = state.leases[NAME].clone();
        lease["spec"]["holderIdentity"] = json!("intruder");
        let lease = state.stamp(lease);
        state.leases.insert(NAME.to_owned(), lease);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let err = held.release().await.err().unwrap();
    assert!(matches!(err, LeaseError::Lost { .. }), "{err}");
    assert_eq!(api.lease(NAME)["spec"]["holderIdentity"], "intruder");
}

#[tokio::test]
async fn tasks_of_one_process_exclude_each_other() {
    let api = FakeApi::start().await;
    let lock = api.lock("replica-a", LONG);
    let held = lock.acquire(DOMAIN, Duration::ZERO).await.unwrap();
    let err = lock
        .acquire(DOMAIN, Duration::from_millis(200))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, LeaseError::Busy { .. }), "{err}");
    // Other domains are independent.
    let other = lock.acquire("other.example", Duration::ZERO).await.unwrap();
    held.release().await.unwrap();
    let again = lock.acquire(DOMAIN, Duration::ZERO).await.unwrap();
    again.release().await.unwrap();
    other.release().await.unwrap();
}

#[tokio::test]
async fn api_errors_name_the_lease_status_and_message() {
    let api = FakeApi::start().await;
    let lock = LeaseLock::new(
        &api.base,
        NAMESPACE,
        "wrong".to_owned(),
        None,
        "replica-a".to_owned(),
        LONG,
    )
    .unwrap();
    let err = lock
        .acquire(DOMAIN, Duration::from_secs(5))
        .await
        .err()
        .unwrap();
    // Not retried: a bad token does not get better.
    assert_eq!(api.requests().len(), 1);
    let text = err.to_string();
    assert!(text.contains(NAME), "{text}");
    assert!(text.contains("401"), "{text}");
    assert!(text.contains("Unauthorized"), "{text}");
}

#[tokio::test]
async fn an_unreachable_api_server_is_retried_within_max_wait() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let lock = LeaseLock::new(
        &base,
        NAMESPACE,
        TOKEN.to_owned(),
        None,
        "a".to_owned(),
        LONG,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let err = lock
        .acquire(DOMAIN, Duration::from_millis(1200))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, LeaseError::Transport { .. }), "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(1100));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn lease_names_are_valid_kubernetes_names() {
    assert_eq!(lease_name("Example.COM"), "portcullis-cert-example-com");
    assert_eq!(lease_name("*.example.com"), "portcullis-cert---example-com");
    assert_eq!(
        lease_name("bücher.example"),
        "portcullis-cert-b-cher-example"
    );
    assert_eq!(lease_name("example.com."), "portcullis-cert-example-com");

    let long = format!("{}.example.com", "a".repeat(80));
    let name = lease_name(&long);
    assert_eq!(name.len(), MAX_NAME_LEN, "{name}");
    assert!(is_dns_label(&name), "{name}");
    assert_eq!(name, lease_name(&long), "deterministic");
    let other = lease_name(&format!("{}.example.org", "a".repeat(80)));
    assert_ne!(name, other);
    assert_eq!(name[..50], other[..50]);

    for key in ["x", "-", "a.b.c", "ÄÖÜ", &"-".repeat(100), &"é".repeat(70)] {
        let name = lease_name(key);
        assert!(is_dns_label(&name), "{key:?} -> {name:?}");
    }
}

#[test]
fn expiry_uses_renew_time_and_local_observation() {
    let now = SystemTime::now();
    let spec = |renewed: SystemTime| LeaseSpec {
        holder_identity: Some("x".to_owned()),
        lease_duration_seconds: Some(10),
        renew_time: Some(micro_time(renewed)),
        ..LeaseSpec::default()
    };
    let fallback = Duration::from_secs(30);
    let ago = |secs| now - Duration::from_secs(secs);
    assert!(!expired(&spec(ago(5)), fallback, Duration::ZERO, now));
    assert!(expired(&spec(ago(11)), fallback, Duration::ZERO, now));
    // A holder clock far ahead cannot pin the lease once we saw no renewal for a duration.
    let future = now + Duration::from_secs(3600);
    assert!(!expired(
        &spec(future),
        fallback,
        Duration::from_secs(9),
        now
    ));
    assert!(expired(
        &spec(future),
        fallback,
        Duration::from_secs(10),
        now
    ));
    // Unreadable times are not proof of death.
    let garbled = LeaseSpec {
        renew_time: Some("yesterday".to_owned()),
        ..spec(now)
    };
    assert!(!expired(&garbled, fallback, Duration::ZERO, now));
}

#[test]
fn configuration_is_validated() {
    let new = |base: &str, ns: &str, identity: &str, ca: Option<&[u8]>| {
        LeaseLock::new(base, ns, TOKEN.to_owned(), ca, identity.to_owned(), LONG).err()
    };
    assert!(new("http://127.0.0.1:1", NAMESPACE, "a", None).is_none());
    assert!(new("https://10.0.0.1:443/", NAMESPACE, "a", None).is_none());
    assert!(matches!(
        new("ftp://x", NAMESPACE, "a", None),
        Some(LeaseError::InvalidApiUrl { .. })
    ));
    assert!(matches!(
        new("https://10.0.0.1/api", NAMESPACE, "a", None),
        Some(LeaseError::InvalidApiUrl { .. })
    ));
    assert!(matches!(
        new("https://10.0.0.1", "../kube-system", "a", None),
        Some(LeaseError::InvalidNamespace(_))
    ));
    assert!(matches!(
        new("https://10.0.0.1", NAMESPACE, "", None),
        Some(LeaseError::EmptyIdentity)
    ));
    assert!(matches!(
        new("https://10.0.0.1", NAMESPACE, "a", Some(b"not a pem")),
        Some(LeaseError::NoCaCertificate)
    ));
    assert!(matches!(
        LeaseLock::new(
            "http://x",
            NAMESPACE,
            "a\nb".to_owned(),
            None,
            "a".to_owned(),
            LONG
        )
        .err(),
        Some(LeaseError::InvalidToken)
    ));
}

#[test]
fn in_cluster_base_brackets_ipv6_hosts() {
    assert_eq!(in_cluster_base("10.96.0.1", "443"), "https://10.96.0.1:443");
    assert_eq!(in_cluster_base("fd00::1", "443"), "https://[fd00::1]:443");
}

#[test]
fn api_messages_come_from_status_objects() {
    let body = br#"{"kind":"Status","message":"leases.coordination.k8s.io \"x\" is forbidden"}"#;
    assert_eq!(
        api_message(body),
        r#"leases.coordination.k8s.io "x" is forbidden"#
    );
    assert_eq!(api_message(b"  bad gateway \n"), "bad gateway");
    assert_eq!(api_message(b""), "no message");
}
