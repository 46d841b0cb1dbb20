//! Bad input gets a clear answer, never a panic or a hang.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tests::backend::Backend;
use tests::client::{curl, raw_exchange, status_of, tls_connect};
use tests::proxy::{Proxy, ProxyOptions, free_port};

fn proxy_for(backend_port: u16, extra: &str) -> Proxy {
    let mappings = format!(
        r#"
[[service]]
id = "s"
domain = "s.test.internal"
[[service.path]]
target = "http://127.0.0.1:{backend_port}"
[[service.path]]
path = "/slow"
target = "http://127.0.0.1:{backend_port}"
path_rewrite = "preserve"
request_timeout = "1s"
{extra}
"#
    );
    Proxy::start(ProxyOptions::new(mappings).env("NB_PROXY_HEADER_TIMEOUT", "1s"))
}

fn raw(proxy: &Proxy, request: &[u8]) -> Vec<u8> {
    raw_exchange(&proxy.ca.pem, "s.test.internal", proxy.https_port, request)
}

#[test]
fn unknown_host_gets_a_404_page_that_names_no_internals() {
    let t = Backend::start("t");
    let proxy = proxy_for(t.port(), "");
    let r = curl(
        &proxy.ca_path(),
        "nobody.test.internal",
        proxy.https_port,
        "/",
        &[],
    );
    assert_eq!(r.status, 404);
    let body = r.text();
    assert!(body.contains("404"));
    assert!(
        !body.contains("127.0.0.1") && !body.contains(&t.port().to_string()),
        "{body}"
    );
    assert_eq!(t.request_count(), 0);
}

#[test]
fn malformed_requests_get_400() {
    let t = Backend::start("t");
    let proxy = proxy_for(t.port(), "");
    let cases: [&[u8]; 6] = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: s.test.internal\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: s.test.internal\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: s.test.internal\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: s.test.internal\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ];
    for case in cases {
        let out = raw(&proxy, case);
        assert_eq!(
            status_of(&out),
            Some(400),
            "{:?} → {:?}",
            String::from_utf8_lossy(case),
            String::from_utf8_lossy(&out)
        );
    }
}

#[test]
fn oversized_headers_get_431() {
    let t = Backend::start("t");
    let proxy = proxy_for(t.port(), "");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: s.test.internal\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let out = raw(&proxy, req.as_bytes());
    assert_eq!(
        status_of(&out),
        Some(431),
        "{:?}",
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
}

#[test]
fn unreachable_target_gets_502_and_slow_target_504() {
    let t = Backend::start("t");
    let closed = free_port();
    let proxy = proxy_for(
        t.port(),
        &format!(
            "[[service]]\nid='dead'\ndomain='dead.test.internal'\n[[service.path]]\ntarget='http://127.0.0.1:{closed}'\n"
        ),
    );
    let r = curl(
        &proxy.ca_path(),
        "dead.test.internal",
        proxy.https_port,
        "/",
        &[],
    );
    assert_eq!(r.status, 502);
    assert!(!r.text().contains(&closed.to_string()));

    let started = Instant::now();
    let r = curl(
        &proxy.ca_path(),
        "s.test.internal",
        proxy.https_port,
        "/slow?ms=5000",
        &[],
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the 1 s request_timeout was not applied"
    );
}

#[test]
fn slow_clients_are_cut_after_the_header_timeout() {
    let t = Backend::start("t");
    let proxy = proxy_for(t.port(), "");

    // Slowloris over TLS: an unfinished head, then silence.
    let mut s = tls_connect(&proxy.ca.pem, "s.test.internal", proxy.https_port);
    s.write_all(b"GET / HTTP/1.1\r\nHost: s.test.internal\r\nX-A: 1\r\n")
        .expect("send");
    s.flush().expect("flush");
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "connection held for {waited:?}"
    );
    assert_eq!(
        status_of(&out),
        Some(408),
        "{:?}",
        String::from_utf8_lossy(&out)
    );

    // A TCP connection that never starts TLS is closed too.
    let mut tcp = TcpStream::connect(("127.0.0.1", proxy.https_port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let started = Instant::now();
    let n = tcp.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[test]
fn connection_count_is_bounded() {
    let t = Backend::start("t");
    let mappings = format!(
        "[[service]]\nid='s'\ndomain='s.test.internal'\n[[service.path]]\ntarget='http://127.0.0.1:{}'\n",
        t.port()
    );
    let proxy = Proxy::start(ProxyOptions::new(mappings).env("NB_PROXY_MAX_CONNECTIONS", "4"));
    let held: Vec<_> = (0..4)
        .map(|_| tls_connect(&proxy.ca.pem, "s.test.internal", proxy.https_port))
        .collect();
    // The fifth is closed at once: the handshake cannot complete.
    let tcp = TcpStream::connect(("127.0.0.1", proxy.https_port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let name = rustls::pki_types::ServerName::try_from("s.test.internal").expect("name");
    let mut conn = rustls::ClientConnection::new(tests::client::tls_config(&proxy.ca.pem), name)
        .expect("client");
    let mut tcp = tcp;
    let mut refused = false;
    for _ in 0..50 {
        if let Err(_e) = conn.complete_io(&mut tcp) {
            refused = true;
            break;
        }
        if !conn.is_handshaking() {
            break;
        }
    }
    assert!(
        refused,
        "a fifth connection was accepted past the limit of 4"
    );
    assert_eq!(
        proxy.health()["connections"]["refused"]
            .as_u64()
            .map(|n| n >= 1),
        Some(true)
    );
    drop(held);
    // Slots are released when connections close.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.health()["connections"]["active"].as_u64() != Some(0) {
        assert!(
            Instant::now() < deadline,
            "connection slots were not released"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = curl(
        &proxy.ca_path(),
        "s.test.internal",
        proxy.https_port,
        "/",
        &[],
    );
    assert_eq!(r.status, 200);
}
