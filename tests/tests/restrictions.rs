//! Access restrictions end to end with real clients: CIDR and country rules (a real
//! GeoLite2-format database) on the client address, which a trusted proxy may name with
//! `X-Forwarded-For` or a PROXY protocol header (curl's `--haproxy-clientip`), for HTTP and for
//! an L4 port. Loopback only: 127.0.0.2 is "DE" and 127.0.0.3 "US" in the test database.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tests::backend::Backend;
use tests::client::curl;
use tests::l4_client::tcp_from;
use tests::l4_targets::Target;
use tests::proxy::{Proxy, ProxyOptions, free_port};

fn geo_dir() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../proxy/tests/fixtures")
        .display()
        .to_string()
}

fn mappings(backend: u16, echo: SocketAddr, l4_port: u16) -> String {
    format!(
        "[[service]]\nid = \"nogermany\"\ndomain = \"geo.test.internal\"\nblocked_countries = [\"DE\"]\n\
         [[service.path]]\ntarget = \"http://127.0.0.1:{backend}\"\n\n\
         [[service]]\nid = \"usonly\"\ndomain = \"us.test.internal\"\nallowed_countries = [\"US\"]\n\
         [[service.path]]\ntarget = \"http://127.0.0.1:{backend}\"\n\n\
         [[service]]\nid = \"cidr\"\ndomain = \"cidr.test.internal\"\nblocked_cidrs = [\"203.0.113.0/24\"]\n\
         [[service.path]]\ntarget = \"http://127.0.0.1:{backend}\"\n\n\
         [[service]]\nid = \"l4\"\ndomain = \"l4.test.internal\"\nmode = \"tcp\"\nlisten_port = {l4_port}\n\
         blocked_countries = [\"DE\"]\n[[service.path]]\ntarget = \"{echo}\"\n"
    )
}

fn status(p: &Proxy, host: &str, extra: &[&str]) -> u16 {
    curl(&p.ca_path(), host, p.https_port, "/", extra).status
}

fn start(backend: &Backend, echo: &Target, l4_port: u16, proxy_protocol: bool) -> Proxy {
    let opts = ProxyOptions::new(mappings(backend.port(), echo.addr, l4_port))
        .env("NB_PROXY_GEO_DATA_DIR", &geo_dir())
        .env("NB_PROXY_TRUSTED_PROXIES", "127.0.0.1/32")
        .env(
            "NB_PROXY_PROXY_PROTOCOL",
            if proxy_protocol { "true" } else { "false" },
        )
        .env("PORTCULLIS_EBPF", "off");
    let p = Proxy::start(opts);
    p.wait_health("four services", |h| h["services"] == 4);
    p
}

#[test]
fn countries_and_cidrs_through_trusted_forwarded_for() {
    let backend = Backend::start("geo");
    let echo = Target::tcp_echo(false);
    let l4_port = free_port();
    let p = start(&backend, &echo, l4_port, false);

    // The socket address: 127.0.0.1 has no country, 127.0.0.2 is DE, 127.0.0.3 is US.
    assert_eq!(status(&p, "geo.test.internal", &[]), 200);
    assert_eq!(
        status(&p, "geo.test.internal", &["--interface", "127.0.0.2"]),
        403
    );
    assert_eq!(
        status(&p, "geo.test.internal", &["--interface", "127.0.0.3"]),
        200
    );
    assert_eq!(
        status(&p, "us.test.internal", &["--interface", "127.0.0.3"]),
        200
    );
    assert_eq!(
        status(&p, "us.test.internal", &["--interface", "127.0.0.2"]),
        403
    );
    // Unknown country and an allowlist: refused.
    assert_eq!(status(&p, "us.test.internal", &[]), 403);

    // 127.0.0.1 is a trusted proxy: its X-Forwarded-For names the client.
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}");
    assert_eq!(
        status(&p, "geo.test.internal", &["-H", &xff("203.0.113.5")]),
        403
    );
    assert_eq!(
        status(&p, "geo.test.internal", &["-H", &xff("198.51.100.5")]),
        200
    );
    assert_eq!(
        status(&p, "cidr.test.internal", &["-H", &xff("203.0.113.5")]),
        403
    );
    assert_eq!(
        status(&p, "cidr.test.internal", &["-H", &xff("198.51.100.5")]),
        200
    );
    // A forged entry on the left does not help: the right-most untrusted one counts.
    assert_eq!(
        status(
            &p,
            "us.test.internal",
            &["-H", &xff("198.51.100.5, 203.0.113.5")]
        ),
        403
    );
    // An untrusted sender's X-Forwarded-For is ignored: 127.0.0.3 (US) stays US.
    assert_eq!(
        status(
            &p,
            "geo.test.internal",
            &["--interface", "127.0.0.3", "-H", &xff("203.0.113.5")]
        ),
        200
    );
    assert_eq!(
        status(
            &p,
            "us.test.internal",
            &["--interface", "127.0.0.2", "-H", &xff("198.51.100.5")]
        ),
        403
    );

    // The L4 port: a German source is cut, an American one gets its echo.
    let dst: SocketAddr = format!("127.0.0.1:{l4_port}").parse().unwrap();
    let mut us =
        tcp_from(Ipv4Addr::new(127, 0, 0, 3), dst, Duration::from_secs(5)).expect("connect");
    us.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    us.read_exact(&mut buf)
        .expect("echo for an allowed country");
    assert_eq!(&buf, b"ping");
    let mut de =
        tcp_from(Ipv4Addr::new(127, 0, 0, 2), dst, Duration::from_secs(5)).expect("connect");
    let _ = de.write_all(b"ping");
    let got = de.read(&mut buf);
    assert!(
        matches!(got, Ok(0) | Err(_)),
        "a blocked country got an answer: {got:?}"
    );
    let h = p.health();
    assert!(h["l4"]["denied"].as_u64().unwrap_or(0) >= 1, "{h}");
}

/// One HTTPS request on a connection that starts with `preface` (a PROXY header); the status,
/// or `None` when the proxy closed the connection.
fn status_after(p: &Proxy, host: &str, preface: &[u8]) -> Option<u16> {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", p.https_port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(preface).unwrap();
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    let conn =
        rustls::ClientConnection::new(tests::client::tls_config(&p.ca.pem), name).expect("client");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn proxy_protocol_from_trusted_balancers_only() {
    let backend = Backend::start("geo-pp");
    let echo = Target::tcp_echo(false);
    let p = start(&backend, &echo, free_port(), true);
    let v1 = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 443\r\n").into_bytes();
    assert_eq!(
        status_after(&p, "geo.test.internal", &v1("203.0.113.5")),
        Some(403)
    );
    assert_eq!(
        status_after(&p, "geo.test.internal", &v1("198.51.100.5")),
        Some(200)
    );
    assert_eq!(
        status_after(&p, "us.test.internal", &v1("198.51.100.5")),
        Some(200)
    );
    let v2 = |client: &str| {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        let ip: Ipv4Addr = client.parse().unwrap();
        h.extend(ip.octets());
        h.extend([127, 0, 0, 1]);
        h.extend(40000u16.to_be_bytes());
        h.extend(443u16.to_be_bytes());
        h
    };
    assert_eq!(
        status_after(&p, "us.test.internal", &v2("203.0.113.5")),
        Some(403)
    );
    assert_eq!(
        status_after(&p, "us.test.internal", &v2("198.51.100.9")),
        Some(200)
    );
    // From a trusted address the header is required: a plain TLS hello is refused.
    assert_eq!(status_after(&p, "geo.test.internal", b""), None);
    // An untrusted sender is taken at its socket address (curl binds 127.0.0.2 / .3).
    assert_eq!(
        status(&p, "geo.test.internal", &["--interface", "127.0.0.3"]),
        200
    );
    assert_eq!(
        status(&p, "geo.test.internal", &["--interface", "127.0.0.2"]),
        403
    );
}

#[test]
fn proxy_protocol_on_l4_ports() {
    let echo = Target::tcp_echo(true);
    let l4_port = free_port();
    let mappings = format!(
        "[[service]]\nid = \"l4pp\"\ndomain = \"l4pp.test.internal\"\nmode = \"tcp\"\n\
         listen_port = {l4_port}\nblocked_countries = [\"DE\"]\n\
         [[service.path]]\ntarget = \"{}\"\nproxy_protocol = true\n",
        echo.addr
    );
    let p = Proxy::start(
        ProxyOptions::new(mappings)
            .env("NB_PROXY_GEO_DATA_DIR", &geo_dir())
            .env("NB_PROXY_TRUSTED_PROXIES", "127.0.0.1/32")
            .env("NB_PROXY_PROXY_PROTOCOL", "true")
            .env("PORTCULLIS_EBPF", "off"),
    );
    p.wait_health("one service", |h| h["services"] == 1);
    let dst: SocketAddr = format!("127.0.0.1:{l4_port}").parse().unwrap();
    // What comes back of `preface` + "ping" sent from `source`: "ping" when the proxy took the
    // preface as a PROXY header, all of it when it forwarded it, nothing when it closed.
    let echoed = |source: Ipv4Addr, preface: &[u8]| -> Vec<u8> {
        let mut s = tcp_from(source, dst, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&[preface, b"ping"].concat());
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    let v1 = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 {l4_port}\r\n");
    let local = Ipv4Addr::LOCALHOST;
    // From the trusted balancer, the header's source is the client: US passes, DE is cut.
    assert_eq!(echoed(local, v1("198.51.100.5").as_bytes()), b"ping");
    assert_eq!(echoed(local, v1("203.0.113.5").as_bytes()), b"");
    // The target's own PROXY header names that client, not the balancer.
    let headers = echo.proxy_headers.lock().unwrap().clone();
    assert_eq!(headers.len(), 1, "{headers:?}");
    assert_eq!(headers[0][13], 0x11, "IPv4 stream");
    assert_eq!(&headers[0][16..20], &[198, 51, 100, 5]);
    assert_eq!(u16::from_be_bytes([headers[0][24], headers[0][25]]), 40000);
    // A trusted sender without the header is refused.
    assert_eq!(echoed(local, b""), b"");
    // An untrusted sender is its socket address (127.0.0.3 is US, 127.0.0.2 DE), and a header it
    // sends is not believed: it reaches the target as data.
    assert_eq!(echoed(Ipv4Addr::new(127, 0, 0, 3), b""), b"ping");
    assert_eq!(echoed(Ipv4Addr::new(127, 0, 0, 2), b""), b"");
    let forged = v1("203.0.113.5");
    assert_eq!(
        echoed(Ipv4Addr::new(127, 0, 0, 3), forged.as_bytes()),
        [forged.as_bytes(), b"ping"].concat()
    );
    assert_eq!(
        echoed(Ipv4Addr::new(127, 0, 0, 2), v1("198.51.100.5").as_bytes()),
        b""
    );
}
