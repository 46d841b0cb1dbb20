//! Certificates and the mappings file reload while the proxy serves, without dropping anything.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tests::backend::Backend;
use tests::certs::atomic_write;
use tests::client::{peer_cert, read_response, tls_connect, try_tls_connect};
use tests::proxy::{Proxy, ProxyOptions};

fn get(
    stream: &mut tests::client::TlsStream,
    host: &str,
    path: &str,
) -> tests::client::CurlResponse {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("send");
    stream.flush().expect("flush");
    read_response(stream).expect("response on the keep-alive connection")
}

fn wait_for_cert(proxy: &Proxy, host: &str, der: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Until the new certificate is loaded, a name the old one does not cover fails the
        // handshake: that is expected here.
        if let Ok(s) = try_tls_connect(&proxy.ca.pem, host, proxy.https_port)
            && peer_cert(&s) == der
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "new certificate for {host} never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn certificates_reload_without_breaking_open_connections() {
    let t = Backend::start("t");
    let wildcard_dir = tests::proxy::TestDir::new("wildcard");
    let mappings = format!(
        "[[service]]\nid='s'\ndomain='s.test.internal'\n[[service.path]]\ntarget='http://127.0.0.1:{}'\n",
        t.port()
    );
    let proxy = Proxy::start(ProxyOptions::new(mappings).env(
        "NB_PROXY_WILDCARD_CERT_DIR",
        &wildcard_dir.0.display().to_string(),
    ));

    // A keep-alive connection opened before the change.
    let mut old = tls_connect(&proxy.ca.pem, "s.test.internal", proxy.https_port);
    let old_cert = peer_cert(&old);
    assert_eq!(get(&mut old, "s.test.internal", "/one").status, 200);

    // Replace the default certificate.
    let new_leaf = proxy.ca.leaf(&["*.test.internal", "localhost"]);
    assert_ne!(new_leaf.der, old_cert);
    proxy.ca.write_leaf(&proxy.cert_dir(), "tls", &new_leaf);
    wait_for_cert(&proxy, "s.test.internal", &new_leaf.der);

    // The old connection still works and still uses the certificate it was opened with.
    assert_eq!(get(&mut old, "s.test.internal", "/two").status, 200);
    assert_eq!(peer_cert(&old), old_cert);

    // An exact-name certificate is picked by SNI; a wildcard one from the wildcard directory.
    let special = proxy.ca.leaf(&["special.test.internal"]);
    proxy.ca.write_leaf(&proxy.cert_dir(), "special", &special);
    wait_for_cert(&proxy, "special.test.internal", &special.der);
    let wild = proxy.ca.leaf(&["*.wild.internal"]);
    proxy.ca.write_leaf(&wildcard_dir.0, "wild", &wild);
    wait_for_cert(&proxy, "x.wild.internal", &wild.der);
    let other = tls_connect(&proxy.ca.pem, "other.test.internal", proxy.https_port);
    assert_eq!(
        peer_cert(&other),
        new_leaf.der,
        "others still get the default"
    );

    // A broken certificate file keeps the previous certificate.
    atomic_write(
        &proxy.cert_dir().join("tls.crt"),
        b"-----BEGIN CERTIFICATE-----\ngarbage\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy
        .log_text()
        .contains("keeping the previous certificate")
    {
        assert!(
            Instant::now() < deadline,
            "bad certificate was not reported"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = tls_connect(&proxy.ca.pem, "s.test.internal", proxy.https_port);
    assert_eq!(peer_cert(&s), new_leaf.der);
}

fn mapping_to(port: u16) -> String {
    format!(
        "[[service]]\nid='svc'\ndomain='svc.test.internal'\n[[service.path]]\ntarget='http://127.0.0.1:{port}'\n"
    )
}

#[test]
fn mappings_reload_with_no_failed_request() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let proxy = Arc::new(Proxy::start(ProxyOptions::new(mapping_to(a.port()))));
    let stop = Arc::new(AtomicBool::new(false));

    // Two clients hammer the service during the swaps: one keep-alive, one new connection each
    // time. Every answer must be a 200 from one of the two backends.
    let mut clients = Vec::new();
    for keep_alive in [true, false] {
        let proxy = proxy.clone();
        let stop = stop.clone();
        clients.push(std::thread::spawn(move || {
            let mut seen = std::collections::HashSet::new();
            let mut count = 0u32;
            let mut conn = tls_connect(&proxy.ca.pem, "svc.test.internal", proxy.https_port);
            while !stop.load(Ordering::Relaxed) && count < 20_000 {
                if !keep_alive {
                    conn = tls_connect(&proxy.ca.pem, "svc.test.internal", proxy.https_port);
                }
                let r = get(&mut conn, "svc.test.internal", "/x");
                assert_eq!(
                    r.status,
                    200,
                    "request {count} failed during reload: {}",
                    r.text()
                );
                seen.insert(r.json()["backend"].as_str().unwrap_or_default().to_string());
                count += 1;
            }
            (count, seen)
        }));
    }

    let mut generation = proxy.health()["route_table_generation"]
        .as_u64()
        .unwrap_or(0);
    for i in 0..10 {
        let port = if i % 2 == 0 { b.port() } else { a.port() };
        proxy.write_mappings(&mapping_to(port));
        proxy.wait_table_generation_above(generation);
        generation = proxy.health()["route_table_generation"]
            .as_u64()
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken file is refused and the current services stay.
    proxy.write_mappings("[[service]]\nid = 'broken'\n");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        proxy.health()["route_table_generation"].as_u64(),
        Some(generation)
    );
    assert!(proxy.log_text().contains("mappings file not applied"));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let (count, seen) = c.join().expect("client thread");
        assert!(count > 10, "only {count} requests ran");
        assert!(seen.contains("a") && seen.contains("b"), "saw {seen:?}");
    }
}
