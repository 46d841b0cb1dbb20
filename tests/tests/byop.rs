//! Bring Your Own Proxy end to end: the real management (SQLite and PostgreSQL), real proxies,
//! real gRPC and REST.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tests::backend::Backend;
use tests::client::curl;
use tests::grpc_peer::StreamObserver;
use tests::management::{Management, StoreKind, TestStore, service_body};
use tests::process::stdout_of;
use tests::proxy::{Proxy, ProxyOptions, TestDir};

/// Runs a scenario once per store.
macro_rules! on_both_stores {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn sqlite() {
                super::$body(super::StoreKind::Sqlite);
            }
            #[test]
            fn postgres() {
                super::$body(super::StoreKind::Postgres);
            }
        }
    };
}

on_both_stores!(
    accounts_clusters_and_isolation,
    accounts_clusters_and_isolation_on
);
on_both_stores!(
    revoked_tokens_disconnect_ha_proxies,
    revoked_tokens_disconnect_ha_proxies_on
);
on_both_stores!(
    management_restart_fails_no_request,
    management_restart_fails_no_request_on
);
on_both_stores!(
    tokens_are_never_stored_or_logged,
    tokens_are_never_stored_or_logged_on
);

fn proxy_for(m: &Management, token: &str, cluster: &str) -> Proxy {
    let mut opts = ProxyOptions::new("")
        .env("NB_PROXY_MANAGEMENT_ADDRESS", &m.grpc_url())
        .env("NB_PROXY_TOKEN", token)
        .env("NB_PROXY_ALLOW_INSECURE", "true")
        .env("NB_PROXY_DOMAIN", cluster);
    // Every test cluster, so that asking one proxy for another cluster's host reaches HTTP
    // (and its 404) instead of failing certificate verification.
    opts.cert_names = [
        "acl.test",
        "bcl.test",
        "shared.test",
        "ha.test",
        "r.test",
        "s.test",
        cluster,
    ]
    .iter()
    .map(|c| format!("*.{c}"))
    .collect();
    let p = Proxy::start(opts);
    p.wait_health("initial sync with management", |h| {
        h["initial_sync_complete"] == true
    });
    p
}

fn status_through(p: &Proxy, host: &str) -> u16 {
    curl(&p.ca_path(), host, p.https_port, "/", &[]).status
}

/// Polls until `host` answers 200 through `p`; returns how long it took.
fn served_within(p: &Proxy, host: &str, budget: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if status_through(p, host) == 200 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < budget,
            "{host} not served through the proxy within {budget:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn accounts_clusters_and_isolation_on(kind: StoreKind) {
    let dir = TestDir::new("byop");
    let Some(store) = TestStore::new(kind, &dir) else {
        return;
    };
    let m = Management::start(&dir, &store.url, "1s");
    let (_acc_a, pat_a) = m.bootstrap("a@example.test");
    let (acc_b, pat_b) = m.bootstrap("b@example.test");
    let (api_a, api_b) = (m.api(&pat_a), m.api(&pat_b));
    let (_, tok_a) = api_a.create_proxy_token("a-proxy");
    let (_, tok_b) = api_b.create_proxy_token("b-proxy");
    let tok_shared = m.shared_token("shared-proxies");

    let proxy_a = proxy_for(&m, &tok_a, "acl.test");
    let proxy_b = proxy_for(&m, &tok_b, "bcl.test");
    let proxy_s = proxy_for(&m, &tok_shared, "shared.test");

    // A cluster address is reserved: B's token and a management-wide token cannot take A's.
    for token in [&tok_b, &tok_shared] {
        let err = StreamObserver::connect(&m.grpc_url(), token, "acl.test", "intruder")
            .err()
            .expect("registration refused");
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        assert_eq!(err.message(), "cluster address acl.test is already in use");
    }

    // Services, each created over REST and served within a second.
    let (ba, bb, sa, sb) = (
        Backend::start("ba"),
        Backend::start("bb"),
        Backend::start("sa"),
        Backend::start("sb"),
    );
    api_a.create_service("app", "app.acl.test", ba.port());
    let took = served_within(&proxy_a, "app.acl.test", Duration::from_secs(1));
    eprintln!("service served {took:?} after the REST call");
    api_b.create_service("app", "app.bcl.test", bb.port());
    served_within(&proxy_b, "app.bcl.test", Duration::from_secs(1));
    api_a.create_service("sa", "sa.shared.test", sa.port());
    api_b.create_service("sb", "sb.shared.test", sb.port());

    // The shared proxy serves every account's services on its domain.
    served_within(&proxy_s, "sa.shared.test", Duration::from_secs(1));
    served_within(&proxy_s, "sb.shared.test", Duration::from_secs(1));
    assert_eq!(
        curl(
            &proxy_s.ca_path(),
            "sa.shared.test",
            proxy_s.https_port,
            "/",
            &[]
        )
        .json()["backend"],
        "sa"
    );

    // B's proxy serves nothing of A's, and B's stream never carries A's services.
    assert_eq!(status_through(&proxy_b, "app.acl.test"), 404);
    let observer =
        StreamObserver::connect(&m.grpc_url(), &tok_b, "bcl.test", "observer").expect("B's stream");
    observer.wait_initial_sync();
    api_a.create_service("late", "late.acl.test", ba.port());
    api_b.create_service("late", "late.bcl.test", bb.port());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !observer.domains().contains(&"late.bcl.test".to_string()) {
        assert!(
            Instant::now() < deadline,
            "B's change did not reach B's stream"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(observer.domains(), vec!["app.bcl.test", "late.bcl.test"]);
    assert!(
        observer.account_ids().iter().all(|a| *a == acc_b),
        "{:?}",
        observer.account_ids()
    );

    // Cluster lists: own account clusters and shared ones, with type, online, count, features.
    let names = |v: &[serde_json::Value]| -> Vec<(String, String)> {
        let mut n: Vec<_> = v
            .iter()
            .map(|c| {
                (
                    c["address"].as_str().unwrap_or_default().to_string(),
                    c["type"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        n.sort();
        n
    };
    let ca = api_a.clusters();
    assert_eq!(
        names(&ca),
        vec![
            ("acl.test".into(), "account".into()),
            ("shared.test".into(), "shared".into())
        ]
    );
    let cb = api_b.clusters();
    // B's observer registered as a second proxy of bcl.test.
    assert_eq!(
        names(&cb),
        vec![
            ("bcl.test".into(), "account".into()),
            ("shared.test".into(), "shared".into())
        ]
    );
    let acl = ca.iter().find(|c| c["address"] == "acl.test").expect("acl");
    assert_eq!(acl["online"], true);
    assert_eq!(acl["connected_proxies"], 1);
    assert_eq!(acl["features"]["supports_custom_ports"], true);
    let bcl = cb.iter().find(|c| c["address"] == "bcl.test").expect("bcl");
    assert_eq!(bcl["connected_proxies"], 2);

    // Deleting: a shared cluster is refused; another account's cluster is not found.
    assert_eq!(
        api_a
            .call("DELETE", "/api/reverse-proxies/clusters/shared.test", None)
            .0,
        403
    );
    assert_eq!(
        api_b
            .call("DELETE", "/api/reverse-proxies/clusters/acl.test", None)
            .0,
        404
    );

    // Validation answers with clear 4xx errors.
    let bad = |body: serde_json::Value, status: u16, needle: &str| {
        let (s, v) = api_a.call("POST", "/api/reverse-proxies/services", Some(&body));
        assert_eq!(s, status, "{v}");
        assert!(
            v["message"].as_str().unwrap_or_default().contains(needle),
            "{v}"
        );
    };
    bad(
        service_body("x", "not a domain", 80),
        422,
        "not a valid DNS name",
    );
    bad(service_body("x", "app.bcl.test", 80), 412, "does not match");
    bad(service_body("x", "app.acl.test", 80), 409, "already taken");
    bad(service_body("x", "z.acl.test", 0), 422, "out of range");
    let mut dup = service_body("x", "dup.acl.test", 80);
    dup["targets"] = serde_json::json!([
        {"target_id": "1", "target_type": "host", "protocol": "http", "host": "127.0.0.1", "port": 80, "path": "/a"},
        {"target_id": "2", "target_type": "host", "protocol": "http", "host": "127.0.0.1", "port": 81, "path": "/a"}]);
    bad(dup, 422, "used by another target");

    // A plain user may not create services or tokens.
    let users = api_a.ok("GET", "/api/users", None);
    let owner_id = users[0]["id"].as_str().expect("owner").to_string();
    let user = api_a.ok(
        "POST",
        "/api/users",
        Some(&serde_json::json!({"email": "u@example.test", "role": "user"})),
    );
    let user_id = user["id"].as_str().expect("user id");
    assert_ne!(user_id, owner_id);
    let pat = api_a.ok(
        "POST",
        &format!("/api/users/{user_id}/tokens"),
        Some(&serde_json::json!({"name": "u"})),
    );
    let api_u = m.api(pat["plain_token"].as_str().expect("pat"));
    assert_eq!(
        api_u
            .call(
                "POST",
                "/api/reverse-proxies/services",
                Some(&service_body("u", "u.acl.test", 80))
            )
            .0,
        403
    );
    assert_eq!(
        api_u
            .call(
                "POST",
                "/api/reverse-proxies/proxy-tokens",
                Some(&serde_json::json!({"name": "u"}))
            )
            .0,
        403
    );

    // Status reported by the proxy shows on the service.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = api_a.ok("GET", "/api/reverse-proxies/services", None);
        let app = list
            .as_array()
            .and_then(|l| l.iter().find(|s| s["domain"] == "app.acl.test").cloned())
            .expect("app");
        if app["meta"]["status"] == "active" {
            assert_eq!(app["meta"]["certificate_issued"], true);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never became active: {app}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((proxy_a, proxy_b, proxy_s));
}

fn revoked_tokens_disconnect_ha_proxies_on(kind: StoreKind) {
    let dir = TestDir::new("revoke");
    let Some(store) = TestStore::new(kind, &dir) else {
        return;
    };
    let m = Management::start(&dir, &store.url, "1s");
    let (_, pat) = m.bootstrap("ha@example.test");
    let api = m.api(&pat);
    let (token_id, token) = api.create_proxy_token("ha");
    // Two proxies, same token, same domain: a highly available cluster.
    let p1 = proxy_for(&m, &token, "ha.test");
    let p2 = proxy_for(&m, &token, "ha.test");
    let t = Backend::start("t");
    api.create_service("svc", "svc.ha.test", t.port());
    served_within(&p1, "svc.ha.test", Duration::from_secs(1));
    served_within(&p2, "svc.ha.test", Duration::from_secs(1));
    let cluster = api
        .clusters()
        .into_iter()
        .find(|c| c["address"] == "ha.test")
        .expect("cluster");
    assert_eq!(cluster["connected_proxies"], 2);

    assert!(
        api.call(
            "DELETE",
            &format!("/api/reverse-proxies/proxy-tokens/{token_id}"),
            None
        )
        .0 == 200
    );
    let revoked_at = Instant::now();
    for p in [&p1, &p2] {
        p.wait_health("management_connected: false after revocation", |h| {
            h["management_connected"] == false
        });
    }
    eprintln!(
        "both proxies disconnected {:?} after the revocation (heartbeat 1 s)",
        revoked_at.elapsed()
    );
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "took {:?}",
        revoked_at.elapsed()
    );
    // They keep serving what they had.
    assert_eq!(status_through(&p1, "svc.ha.test"), 200);
    let listed = api.ok("GET", "/api/reverse-proxies/proxy-tokens", None);
    assert_eq!(listed[0]["revoked"], true);
    assert!(
        p1.log_text().contains("rejected the proxy token"),
        "the proxy says why"
    );
}

fn management_restart_fails_no_request_on(kind: StoreKind) {
    let dir = TestDir::new("restart");
    let Some(store) = TestStore::new(kind, &dir) else {
        return;
    };
    let mut m = Management::start(&dir, &store.url, "1s");
    let (_, pat) = m.bootstrap("r@example.test");
    let (_, token) = m.api(&pat).create_proxy_token("r");
    let proxy = Arc::new(proxy_for(&m, &token, "r.test"));
    let t = Backend::start("t");
    m.api(&pat).create_service("svc", "svc.r.test", t.port());
    served_within(&proxy, "svc.r.test", Duration::from_secs(1));

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut count = 0u32;
            while !stop.load(Ordering::Relaxed) && count < 50_000 {
                let r = curl(&proxy.ca_path(), "svc.r.test", proxy.https_port, "/", &[]);
                assert_eq!(
                    r.status, 200,
                    "request {count} failed while management restarted"
                );
                count += 1;
            }
            count
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    m.restart(&dir);
    proxy.wait_health("reconnected after the restart", |h| {
        h["management_connected"] == true
    });
    // A change made after the restart still arrives.
    let t2 = Backend::start("t2");
    m.api(&pat).create_service("svc2", "svc2.r.test", t2.port());
    served_within(&proxy, "svc2.r.test", Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let count = load.join().expect("load thread");
    assert!(count > 5, "only {count} requests ran");
}

fn tokens_are_never_stored_or_logged_on(kind: StoreKind) {
    let dir = TestDir::new("secrets");
    let Some(store) = TestStore::new(kind, &dir) else {
        return;
    };
    let m = Management::start(&dir, &store.url, "1s");
    let (_, pat) = m.bootstrap("s@example.test");
    let api = m.api(&pat);
    let (_, token) = api.create_proxy_token("s");
    let shared = m.shared_token("s-shared");
    let user = api.ok("GET", "/api/users", None)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let pat2 = api.ok(
        "POST",
        &format!("/api/users/{user}/tokens"),
        Some(&serde_json::json!({"name": "second"})),
    );
    let pat2 = pat2["plain_token"].as_str().expect("pat").to_string();
    let proxy = proxy_for(&m, &token, "s.test");
    // Use every token at least once.
    assert_eq!(
        m.api(&pat2)
            .call("GET", "/api/reverse-proxies/clusters", None)
            .0,
        200
    );
    let _observer = StreamObserver::connect(&m.grpc_url(), &shared, "shared-s.test", "o")
        .expect("shared stream");
    let secrets = [pat.as_str(), token.as_str(), shared.as_str(), pat2.as_str()];
    for s in secrets {
        assert!(
            s.len() == 40 && (s.starts_with("nbx_") || s.starts_with("nbp_")),
            "{s}"
        );
    }
    let dump = store.dump();
    assert!(dump.contains("s@example.test"), "the dump reads the store");
    let logs = format!("{}{}", m.log_text(), proxy.log_text());
    for s in secrets {
        let secret_part = &s[4..34];
        assert!(
            !dump.contains(secret_part),
            "a token is stored in plain text"
        );
        assert!(!logs.contains(secret_part), "a token appears in a log");
    }
}

#[test]
fn proxies_reach_management_over_tls() {
    let dir = TestDir::new("mgmt-tls");
    let store = TestStore::new(StoreKind::Sqlite, &dir).expect("sqlite");
    let ca = tests::certs::TestCa::new();
    ca.write_leaf(&dir.0, "mgmt", &ca.leaf(&["localhost"]));
    std::fs::write(dir.0.join("mgmt-ca.pem"), &ca.pem).expect("ca file");
    let env = [
        (
            "PORTCULLIS_TLS_CERT_FILE".to_string(),
            dir.0.join("mgmt.crt").display().to_string(),
        ),
        (
            "PORTCULLIS_TLS_KEY_FILE".to_string(),
            dir.0.join("mgmt.key").display().to_string(),
        ),
    ];
    let m = Management::start_with_env(&dir, &store.url, "1s", &env);
    let (_, pat) = m.bootstrap("tls@example.test");
    let api = m.api(&pat);
    let (_, token) = api.create_proxy_token("tls");
    let mut opts = ProxyOptions::new("")
        .env(
            "NB_PROXY_MANAGEMENT_ADDRESS",
            &format!("https://localhost:{}", m.grpc_port),
        )
        .env(
            "NB_PROXY_MANAGEMENT_CA_FILE",
            &dir.0.join("mgmt-ca.pem").display().to_string(),
        )
        .env("NB_PROXY_TOKEN", &token)
        .env("NB_PROXY_DOMAIN", "tls.test");
    opts.cert_names = vec!["*.tls.test".to_string()];
    let proxy = Proxy::start(opts);
    proxy.wait_health("initial sync over TLS", |h| {
        h["initial_sync_complete"] == true
    });
    let t = Backend::start("t");
    api.create_service("svc", "svc.tls.test", t.port());
    served_within(&proxy, "svc.tls.test", Duration::from_secs(1));
    // A plaintext dial to the TLS listener does not get in.
    let err = StreamObserver::connect(&m.grpc_url(), &token, "tls.test", "plain").err();
    assert!(err.is_some(), "plaintext gRPC reached a TLS-only listener");
}

#[test]
fn up_prints_a_curl_line_that_works() {
    let dir = TestDir::new("up");
    let ports: Vec<u16> = (0..6).map(|_| tests::proxy::free_port()).collect();
    let log = dir.0.join("up.out");
    let mut child = Command::new(tests::proxy::binary())
        .arg("up")
        .arg("--data-dir")
        .arg(dir.0.join("data"))
        .args([
            "--https-port",
            &ports[0].to_string(),
            "--http-port",
            &ports[1].to_string(),
        ])
        .args(["--health-addr", &format!("127.0.0.1:{}", ports[2])])
        .args(["--api-addr", &format!("127.0.0.1:{}", ports[3])])
        .args(["--grpc-addr", &format!("127.0.0.1:{}", ports[4])])
        .args(["--demo-port", &ports[5].to_string()])
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("portcullis up");
    let result = std::panic::catch_unwind(|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let ready = tests::client::plain_get(("127.0.0.1", ports[2]), "/healthz")
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|h| h["initial_sync_complete"] == true);
            if text.contains("2. Open it") && ready {
                break text;
            }
            assert!(Instant::now() < deadline, "up did not get ready:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let section = |from: &str, to: &str| -> String {
            let start = text.find(from).expect("section") + from.len();
            let end = text[start..].find(to).map_or(text.len(), |e| start + e);
            text[start..end].trim().to_string()
        };
        let create = section(
            "1. Publish the demo service through the proxy:",
            "2. Open it:",
        );
        let out = stdout_of(
            Command::new("sh").arg("-c").arg(&create),
            "the printed create command",
        );
        let created: serde_json::Value = serde_json::from_slice(&out).expect("service JSON");
        assert_eq!(created["domain"], "demo.localhost", "{created}");
        let open = section("2. Open it:", "Data (store");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("{open} -sS -w '\\n%{{http_code}}'"))
                .output()
                .expect("open");
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            if body.trim_end().ends_with("200") {
                assert!(
                    body.contains("Hello from the Portcullis demo service"),
                    "{body}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the printed curl line did not get a 200: {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
