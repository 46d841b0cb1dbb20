//! ACME against a real CA: Pebble on loopback validates the proxy's tls-alpn-01 and http-01
//! answers and issues certificates the proxy then serves. Statuses reach management, stored
//! certificates survive a restart, replicas sharing a directory order once per domain, and a
//! short-lived certificate is renewed under an open connection.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::backend::Backend;
use tests::client::{TlsStream, peer_cert, read_response, try_tls_connect};
use tests::management::{Management, StoreKind, TestStore, service_body};
use tests::pebble::{Pebble, PebbleOptions};
use tests::proxy::{Proxy, ProxyOptions, TestDir, free_port};

fn acme_env(opts: ProxyOptions, pebble: &Pebble) -> ProxyOptions {
    opts.env("NB_PROXY_ACME_CERTIFICATES", "true")
        .env("NB_PROXY_ACME_DIRECTORY", &pebble.directory_url())
        .env(
            "NB_PROXY_ACME_CA_FILE",
            &pebble.directory_ca_file().display().to_string(),
        )
        .env("NB_PROXY_ACME_EMAIL", "ops@example.test")
}

/// Management on SQLite with one account and a proxy token for `cluster`.
struct Cluster {
    _store: TestStore,
    management: Management,
    api: tests::management::Api,
    token: String,
    name: &'static str,
}

impl Cluster {
    fn start(dir: &TestDir, name: &'static str) -> Cluster {
        let store = TestStore::new(StoreKind::Sqlite, dir).expect("sqlite store");
        let management = Management::start(dir, &store.url, "1s");
        let (_, pat) = management.bootstrap(&format!("admin@{name}"));
        let api = management.api(&pat);
        let (_, token) = api.create_proxy_token(&format!("{name}-proxy"));
        Cluster {
            _store: store,
            management,
            api,
            token,
            name,
        }
    }

    /// ACME-enabled proxy options that join this cluster.
    fn proxy_options(&self, pebble: &Pebble) -> ProxyOptions {
        acme_env(ProxyOptions::new(""), pebble)
            .env("NB_PROXY_MANAGEMENT_ADDRESS", &self.management.grpc_url())
            .env("NB_PROXY_TOKEN", &self.token)
            .env("NB_PROXY_ALLOW_INSECURE", "true")
            .env("NB_PROXY_DOMAIN", self.name)
    }

    fn create_service(&self, name: &str, backend: &Backend) -> String {
        let domain = format!("{name}.{}", self.name);
        let created = self.api.ok(
            "POST",
            "/api/reverse-proxies/services",
            Some(&service_body(name, &domain, backend.port())),
        );
        created["id"].as_str().expect("service id").to_string()
    }
}

fn mapping(domain: &str, backend: &Backend) -> String {
    format!(
        "[[service]]\nid='{domain}'\ndomain='{domain}'\n[[service.path]]\ntarget='http://127.0.0.1:{}'\n",
        backend.port()
    )
}

fn get(stream: &mut TlsStream, host: &str, path: &str) -> u16 {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("send");
    stream.flush().expect("flush");
    read_response(stream).expect("response").status
}

/// Waits (bounded) until `host` is served with a certificate Pebble's root verifies and, when
/// `other_than` is given, that differs from it; returns the connection.
fn wait_for_pebble_cert(
    pebble: &Pebble,
    port: u16,
    host: &str,
    other_than: Option<&[u8]>,
    within: Duration,
    log: &dyn Fn() -> String,
) -> TlsStream {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = try_tls_connect(&pebble.issuing_roots_pem(), host, port)
            && other_than.is_none_or(|old| peer_cert(&s) != old)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{host} was never served with a Pebble certificate; proxy log:\n{}\npebble log:\n{}",
            log(),
            pebble.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn issuer_is_pebble(der: &[u8]) -> bool {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).expect("leaf parses");
    cert.tbs_certificate
        .issuer
        .to_string()
        .to_ascii_lowercase()
        .contains("pebble")
}

fn stored_cert(dir: &Path, domain: &str) -> bool {
    dir.join("acme/certs")
        .join(format!("{domain}.crt"))
        .exists()
}

/// Polls a service (bounded); returns every distinct status seen, in order, and the last body.
fn follow_status(
    api: &tests::management::Api,
    id: &str,
    until: &[&str],
    within: Duration,
) -> (Vec<String>, Value) {
    let deadline = Instant::now() + within;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let v = api.ok("GET", &format!("/api/reverse-proxies/services/{id}"), None);
        let status = v["meta"]["status"].as_str().unwrap_or("").to_string();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if until.contains(&status.as_str()) {
            return (seen, v);
        }
        assert!(
            Instant::now() < deadline,
            "status never reached {until:?}; seen {seen:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn tls_alpn_01_through_management_then_restart_without_a_new_order() {
    let dir = TestDir::new("acme-alpn");
    let https_port = free_port();
    let Some(pebble) = Pebble::start(
        &dir,
        PebbleOptions {
            http_port: free_port(),
            tls_port: https_port,
            validity: None,
        },
    ) else {
        return;
    };
    let cluster = Cluster::start(&dir, "acme.test");
    let api = &cluster.api;
    let cert_dir = dir.0.join("certs");
    let backend = Backend::start("acme-app");
    let options = || {
        let mut o = cluster.proxy_options(&pebble);
        o.https_port = Some(https_port);
        o.cert_dir = Some(cert_dir.clone());
        o
    };
    let proxy = Proxy::start(options());
    proxy.wait_health("initial sync", |h| h["initial_sync_complete"] == true);

    let id = cluster.create_service("app", &backend);
    let (seen, v) = follow_status(
        api,
        &id,
        &["active", "certificate_failed"],
        Duration::from_secs(60),
    );
    assert_eq!(
        v["meta"]["status"],
        "active",
        "seen {seen:?}: {v}\n{}",
        proxy.log_text()
    );
    assert!(
        seen.iter().any(|s| s == "certificate_pending"),
        "pending was reported before active: {seen:?}"
    );
    assert_eq!(v["meta"]["certificate_issued"], true, "{v}");

    let mut conn = wait_for_pebble_cert(
        &pebble,
        https_port,
        "app.acme.test",
        None,
        Duration::from_secs(10),
        &|| proxy.log_text(),
    );
    assert!(issuer_is_pebble(&peer_cert(&conn)));
    assert_eq!(get(&mut conn, "app.acme.test", "/hello"), 200);
    assert!(backend.request_count() >= 1);
    assert_eq!(pebble.order_count(), 1, "{}", pebble.log_text());
    assert!(stored_cert(&cert_dir, "app.acme.test"));
    drop(conn);
    drop(proxy);

    // Restart on the same directory: the stored certificate is served, no new order.
    let proxy = Proxy::start(options());
    proxy.wait_health("initial sync", |h| h["initial_sync_complete"] == true);
    let mut conn = wait_for_pebble_cert(
        &pebble,
        https_port,
        "app.acme.test",
        None,
        Duration::from_secs(10),
        &|| proxy.log_text(),
    );
    assert_eq!(get(&mut conn, "app.acme.test", "/again"), 200);
    let (_, v) = follow_status(api, &id, &["active"], Duration::from_secs(10));
    assert_eq!(v["meta"]["certificate_issued"], true);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        pebble.order_count(),
        1,
        "a restart must not order again; proxy log:\n{}",
        proxy.log_text()
    );
}

#[test]
fn http_01_on_the_plain_http_listener() {
    let dir = TestDir::new("acme-http");
    let (https_port, http_port) = (free_port(), free_port());
    let Some(pebble) = Pebble::start(
        &dir,
        PebbleOptions {
            http_port,
            tls_port: free_port(),
            validity: None,
        },
    ) else {
        return;
    };
    let backend = Backend::start("acme-http-app");
    let mut opts = acme_env(
        ProxyOptions::new(mapping("web.acme.test", &backend)),
        &pebble,
    )
    .env("NB_PROXY_ACME_CHALLENGE_TYPE", "http-01")
    .env("NB_PROXY_ACME_ADDRESS", &format!("127.0.0.1:{http_port}"));
    opts.http_listener = true;
    opts.https_port = Some(https_port);
    opts.http_port = Some(http_port);
    let proxy = Proxy::start(opts);
    let mut conn = wait_for_pebble_cert(
        &pebble,
        https_port,
        "web.acme.test",
        None,
        Duration::from_secs(60),
        &|| proxy.log_text(),
    );
    assert!(issuer_is_pebble(&peer_cert(&conn)));
    assert_eq!(get(&mut conn, "web.acme.test", "/"), 200);
    proxy.wait_health("ACME state in /healthz", |h| {
        h["acme"]["web.acme.test"] == "issued"
    });
    assert_eq!(pebble.order_count(), 1);
    // The plain-HTTP listener still redirects everything else, and unknown tokens are 404.
    let status = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", http_port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: web.acme.test\r\n\r\n").unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut raw).expect("response");
        tests::client::status_of(&raw)
    };
    assert_eq!(
        status("/.well-known/acme-challenge/unknown-token"),
        Some(404)
    );
    assert_eq!(status("/page"), Some(301));
}

#[test]
fn a_failing_challenge_ends_in_certificate_failed_with_the_reason() {
    let dir = TestDir::new("acme-fail");
    // The CA validates against a port nobody listens on.
    let dead_port = free_port();
    let Some(pebble) = Pebble::start(
        &dir,
        PebbleOptions {
            http_port: free_port(),
            tls_port: dead_port,
            validity: None,
        },
    ) else {
        return;
    };
    let cluster = Cluster::start(&dir, "fail.test");
    let backend = Backend::start("fail-app");
    let proxy = Proxy::start(cluster.proxy_options(&pebble));
    proxy.wait_health("initial sync", |h| h["initial_sync_complete"] == true);
    let id = cluster.create_service("bad", &backend);
    let (seen, v) = follow_status(
        &cluster.api,
        &id,
        &["certificate_failed", "active"],
        Duration::from_secs(60),
    );
    assert_eq!(
        v["meta"]["status"], "certificate_failed",
        "seen {seen:?}: {v}"
    );
    let message = v["meta"]["status_message"].as_str().unwrap_or("");
    assert!(
        message.contains(&format!("127.0.0.1:{dead_port}")) && message.contains("tls-alpn-01"),
        "the CA's reason is reported: {message:?}"
    );
    assert_eq!(v["meta"]["certificate_issued"], false);
}

#[test]
fn two_proxies_sharing_a_directory_order_each_certificate_once() {
    let dir = TestDir::new("acme-shared");
    let (port_a, port_b) = (free_port(), free_port());
    let Some(pebble) = Pebble::start(
        &dir,
        PebbleOptions {
            http_port: free_port(),
            // The CA only ever reaches proxy A: when B holds the lock and orders, A answers
            // from the challenge B wrote into the shared directory.
            tls_port: port_a,
            validity: None,
        },
    ) else {
        return;
    };
    let shared_dir = dir.0.join("shared-certs");
    let backend = Backend::start("shared-app");
    let domains = ["one.shared.test", "two.shared.test", "three.shared.test"];
    let mappings: String = domains.iter().map(|d| mapping(d, &backend)).collect();
    let start = |port: u16| {
        let mut o = acme_env(ProxyOptions::new(mappings.clone()), &pebble)
            .env("NB_PROXY_CERT_LOCK_METHOD", "flock");
        o.https_port = Some(port);
        o.cert_dir = Some(shared_dir.clone());
        Proxy::start(o)
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| start(port_a));
        let b = s.spawn(|| start(port_b));
        (a.join().expect("proxy a"), b.join().expect("proxy b"))
    });
    for domain in domains {
        for proxy in [&a, &b] {
            let mut conn = wait_for_pebble_cert(
                &pebble,
                proxy.https_port,
                domain,
                None,
                Duration::from_secs(90),
                &|| format!("A:\n{}\nB:\n{}", a.log_text(), b.log_text()),
            );
            assert_eq!(get(&mut conn, domain, "/"), 200);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        pebble.order_count(),
        domains.len(),
        "exactly one order per domain; A:\n{}\nB:\n{}",
        a.log_text(),
        b.log_text()
    );
}

#[test]
fn short_lived_certificates_renew_under_an_open_connection_and_removed_ones_do_not() {
    let dir = TestDir::new("acme-renew");
    let https_port = free_port();
    let Some(pebble) = Pebble::start(
        &dir,
        PebbleOptions {
            http_port: free_port(),
            tls_port: https_port,
            // Renewal starts at two thirds: 20 s after issuance.
            validity: Some(Duration::from_secs(30)),
        },
    ) else {
        return;
    };
    let backend = Backend::start("renew-app");
    let both = format!(
        "{}{}",
        mapping("keep.renew.test", &backend),
        mapping("gone.renew.test", &backend)
    );
    let mut opts = acme_env(ProxyOptions::new(both), &pebble);
    opts.https_port = Some(https_port);
    let proxy = Proxy::start(opts);
    let log = || proxy.log_text();
    let mut open = wait_for_pebble_cert(
        &pebble,
        https_port,
        "keep.renew.test",
        None,
        Duration::from_secs(60),
        &log,
    );
    wait_for_pebble_cert(
        &pebble,
        https_port,
        "gone.renew.test",
        None,
        Duration::from_secs(60),
        &log,
    );
    let first = peer_cert(&open);
    assert_eq!(get(&mut open, "keep.renew.test", "/before"), 200);
    assert_eq!(pebble.order_count(), 2);

    // One service goes away; its certificate must not be renewed.
    let generation = proxy.health()["route_table_generation"]
        .as_u64()
        .unwrap_or(0);
    proxy.write_mappings(&mapping("keep.renew.test", &backend));
    proxy.wait_table_generation_above(generation);

    let mut renewed = wait_for_pebble_cert(
        &pebble,
        https_port,
        "keep.renew.test",
        Some(&first),
        Duration::from_secs(60),
        &log,
    );
    assert_eq!(get(&mut renewed, "keep.renew.test", "/new"), 200);
    // The connection opened on the old certificate still works.
    assert_eq!(get(&mut open, "keep.renew.test", "/after"), 200);
    // gone.renew.test reached its renewal time together with keep.renew.test.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        pebble.order_count(),
        3,
        "only the remaining service was renewed; log:\n{}",
        proxy.log_text()
    );
}

#[test]
fn without_http_01_challenge_paths_are_routed_like_any_request() {
    // A target that runs its own ACME client behind the proxy keeps getting its validations.
    let backend = Backend::start("own-acme");
    let mut opts = ProxyOptions::new(mapping("own.test.internal", &backend))
        .env("NB_PROXY_HTTP_MODE", "serve");
    opts.http_listener = true;
    let proxy = Proxy::start(opts);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.http_port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /.well-known/acme-challenge/abc HTTP/1.1\r\nHost: own.test.internal\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut raw).expect("response");
    assert_eq!(tests::client::status_of(&raw), Some(200));
    assert_eq!(backend.request_count(), 1, "the target answered it");
}
