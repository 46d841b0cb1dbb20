//! L4 services end to end: TCP echo, UDP echo with session reaping, TLS passthrough by SNI,
//! PROXY v2, ports opened and closed at run time, and a port held by another program. As root
//! the proxy and its targets live in one network namespace and the clients in another, joined
//! by a veth pair; without root the same tests run on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use tests::certs::TestCa;
use tests::l4_client::{echo_round_trip, tcp_from, udp_from};
use tests::l4_targets::Target;
use tests::netns::Net;
use tests::proxy::{Proxy, ProxyOptions};

fn start_proxy(net: &Net, mappings: &str) -> Proxy {
    let mut opts = ProxyOptions::new(mappings);
    if net.is_namespaced() {
        opts.netns = net.proxy_ns();
        opts.listen_ip = "0.0.0.0".into();
    }
    Proxy::start(opts)
}

fn service(id: &str, mode: &str, port: u16, target: SocketAddr, extra: &str) -> String {
    format!(
        "[[service]]\nid = \"{id}\"\ndomain = \"{id}.l4.test\"\nmode = \"{mode}\"\nlisten_port = {port}\n\
         [[service.path]]\ntarget = \"{target}\"\n{extra}\n"
    )
}

fn at(net: &Net, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(net.proxy_ip, port))
}

#[test]
fn tcp_echo_and_proxy_protocol_header() {
    let net = Net::new("tcp_echo");
    let echo = net.in_proxy_ns(|| Target::tcp_echo(false));
    let pp = net.in_proxy_ns(|| Target::tcp_echo(true));
    let mappings = service("echo", "tcp", 7001, echo.addr, "")
        + &service("pp", "tcp", 7002, pp.addr, "proxy_protocol = true");
    let proxy = start_proxy(&net, &mappings);
    proxy.wait_health("two L4 ports", |h| {
        h["l4"]["ports"].as_array().map(Vec::len) == Some(2)
    });

    let (src, dst) = (net.client_ips[0], at(&net, 7001));
    let (sent, got, n) = net.in_client_ns(move || {
        let s = tcp_from(src, dst, Duration::from_secs(5)).expect("connect through the proxy");
        echo_round_trip(s, 8 << 20)
    });
    assert_eq!(
        n,
        8 << 20,
        "whole stream echoed; log:\n{}",
        proxy.log_text()
    );
    assert_eq!(sent, got, "echoed bytes equal the sent bytes");

    let (src, dst) = (net.client_ips[1], at(&net, 7002));
    let reply = net.in_client_ns(move || {
        let mut s = tcp_from(src, dst, Duration::from_secs(5)).expect("connect");
        s.write_all(b"hello behind a PROXY header").expect("write");
        let mut buf = [0u8; 27];
        s.read_exact(&mut buf).expect("echo");
        buf.to_vec()
    });
    assert_eq!(reply, b"hello behind a PROXY header");
    let headers = pp.proxy_headers.lock().unwrap().clone();
    assert_eq!(headers.len(), 1, "one header per connection");
    let h = &headers[0];
    assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n", "v2 signature");
    assert_eq!((h[12], h[13]), (0x21, 0x11), "PROXY command, TCP over IPv4");
    assert_eq!(
        &h[16..20],
        &net.client_ips[1].octets(),
        "source is the real client"
    );
    assert_eq!(
        &h[20..24],
        &net.proxy_ip.octets(),
        "destination is the proxy address"
    );
    assert_eq!(u16::from_be_bytes([h[26], h[27]]), 7002);
}

#[test]
fn udp_echo_and_idle_sessions_are_reaped() {
    let net = Net::new("udp_echo");
    let echo = net.in_proxy_ns(Target::udp_echo);
    let mappings = service(
        "dns",
        "udp",
        7003,
        echo.addr,
        "session_idle_timeout = \"1s\"",
    );
    let proxy = start_proxy(&net, &mappings);
    proxy.wait_health("UDP port", |h| h["l4"]["ports"][0] == "7003/udp");

    let dst = at(&net, 7003);
    let clients = net.client_ips;
    let replies = net.in_client_ns(move || {
        let mut replies = Vec::new();
        for (i, src) in clients.iter().enumerate() {
            let s = udp_from(*src);
            for n in 0..5 {
                let msg = format!("datagram {n} from client {i}");
                s.send_to(msg.as_bytes(), dst).expect("send");
                let mut buf = [0u8; 128];
                let (len, from) = s.recv_from(&mut buf).expect("echo within 500 ms");
                assert_eq!(from, dst, "reply comes from the proxy's port");
                replies.push((msg, String::from_utf8_lossy(&buf[..len]).to_string()));
            }
        }
        replies
    });
    for (sent, got) in &replies {
        assert_eq!(sent, got);
    }
    assert_eq!(
        proxy.health()["l4"]["udp_sessions"],
        2,
        "one session per client"
    );
    let idle_since = Instant::now();
    proxy.wait_health("sessions reaped", |h| h["l4"]["udp_sessions"] == 0);
    assert!(
        idle_since.elapsed() >= Duration::from_millis(500),
        "sessions lived until they were idle"
    );
    // A reaped client just starts a new session.
    let src = net.client_ips[0];
    let again = net.in_client_ns(move || {
        let s = udp_from(src);
        s.send_to(b"again", dst).expect("send");
        let mut buf = [0u8; 16];
        let (n, _) = s.recv_from(&mut buf).expect("echo after reaping");
        buf[..n].to_vec()
    });
    assert_eq!(again, b"again");
}

#[test]
fn tls_passthrough_routes_by_sni_without_terminating() {
    let net = Net::new("tls_sni");
    let ca = TestCa::new();
    let leaf_a = ca.leaf(&["a.l4.test"]);
    let leaf_b = ca.leaf(&["b.l4.test"]);
    let (ca_a, ka, cb, kb) = (
        leaf_a.cert_pem.clone(),
        leaf_a.key_pem.clone(),
        leaf_b.cert_pem.clone(),
        leaf_b.key_pem.clone(),
    );
    let a = net.in_proxy_ns(move || Target::tls_named("A", &ca_a, &ka));
    let b = net.in_proxy_ns(move || Target::tls_named("B", &cb, &kb));
    let mappings = service("a", "tls", 7443, a.addr, "") + &service("b", "tls", 7443, b.addr, "");
    let proxy = start_proxy(&net, &mappings);
    proxy.wait_health("TLS port", |h| h["l4"]["ports"][0] == "7443/tcp");

    for (name, expected, der) in [
        ("a.l4.test", "I am A\n", &leaf_a.der),
        ("b.l4.test", "I am B\n", &leaf_b.der),
    ] {
        let (src, dst, pem) = (net.client_ips[0], at(&net, 7443), ca.pem.clone());
        let (text, cert) = net.in_client_ns(move || {
            let tcp = tcp_from(src, dst, Duration::from_secs(5)).expect("connect");
            let mut tls = tls_over(tcp, &pem, name).expect("handshake with the target");
            let cert = tls.conn.peer_certificates().expect("certs")[0].to_vec();
            let mut text = String::new();
            let _ = tls.read_to_string(&mut text);
            (text, cert)
        });
        assert_eq!(text, expected, "SNI {name} reaches its own target");
        assert_eq!(
            &cert, der,
            "the target's certificate: the proxy did not terminate TLS"
        );
    }
    let (src, dst, pem) = (net.client_ips[0], at(&net, 7443), ca.pem.clone());
    let unknown = net.in_client_ns(move || {
        let tcp = tcp_from(src, dst, Duration::from_secs(5)).expect("connect");
        tls_over(tcp, &pem, "c.l4.test").err()
    });
    assert!(unknown.is_some(), "an unknown SNI is not routed anywhere");
}

fn tls_over(
    tcp: std::net::TcpStream,
    ca_pem: &str,
    name: &'static str,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let mut config = (*tests::client::tls_config(ca_pem)).clone();
    config.alpn_protocols.clear();
    let server = rustls_pki_types::ServerName::try_from(name).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server)
        .map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

#[test]
fn ports_open_and_close_at_run_time_and_a_held_port_hurts_no_one() {
    let net = Net::new("ports");
    let echo = net.in_proxy_ns(|| Target::tcp_echo(false));
    let first = service("first", "tcp", 7001, echo.addr, "");
    let mut proxy = start_proxy(&net, &first);
    proxy.wait_health("first port", |h| h["l4"]["ports"][0] == "7001/tcp");
    // Another program holds 7005 in the proxy's namespace.
    let ip = if net.is_namespaced() {
        "0.0.0.0"
    } else {
        "127.0.0.1"
    };
    let held = net.in_proxy_ns(move || std::net::TcpListener::bind((ip, 7005)).expect("hold 7005"));

    let generation = proxy.health()["route_table_generation"].as_u64().unwrap();
    proxy.write_mappings(
        &(first.clone()
            + &service("added", "tcp", 7004, echo.addr, "")
            + &service("blocked", "tcp", 7005, echo.addr, "")),
    );
    proxy.wait_table_generation_above(generation);
    proxy.wait_health("added port", |h| {
        h["l4"]["ports"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x == "7004/tcp"))
    });
    let round = |port: u16| {
        let (src, dst) = (net.client_ips[0], at(&net, port));
        net.in_client_ns(move || {
            tcp_from(src, dst, Duration::from_secs(3)).map(|s| echo_round_trip(s, 64 * 1024))
        })
    };
    let (a, b, n) = round(7004).expect("the added port serves");
    assert_eq!((a, n), (b, 64 * 1024));
    let (a, b, _) = round(7001).expect("the first port still serves");
    assert_eq!(a, b);
    let log = proxy.log_text();
    assert!(
        log.contains("in use by another program") && log.contains("blocked"),
        "the held port is reported for its service; log:\n{log}"
    );
    drop(held);
    // Freed by the other program, the port opens on the proxy's next retry (every 5 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((a, b, _)) = round(7005) {
            assert_eq!(a, b);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed port 7005 was never opened"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let generation = proxy.health()["route_table_generation"].as_u64().unwrap();
    proxy.write_mappings(&first);
    proxy.wait_table_generation_above(generation);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match round(7004) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                Instant::now() < deadline,
                "port 7004 still open after its service left: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (a, b, _) = round(7001).expect("the first port is untouched");
    assert_eq!(a, b);
    proxy.terminate(Duration::from_secs(10));
}

#[test]
fn udp_sessions_end_when_new_rules_refuse_them() {
    let net = Net::new("udp_rules");
    let echo = net.in_proxy_ns(Target::udp_echo);
    let mapping = |blocked: &str| {
        format!(
            "[[service]]\nid = \"dns\"\ndomain = \"dns.l4.test\"\nmode = \"udp\"\nlisten_port = 7003\n\
             blocked_cidrs = [{blocked}]\n[[service.path]]\ntarget = \"{}\"\n\
             session_idle_timeout = \"60s\"\n",
            echo.addr
        )
    };
    let mut opts = ProxyOptions::new(mapping(""));
    if net.is_namespaced() {
        opts.netns = net.proxy_ns();
        opts.listen_ip = "0.0.0.0".into();
    }
    // User space alone: with XDP the kernel would drop the datagrams before a session sees them.
    let proxy = Proxy::start(opts.env("PORTCULLIS_EBPF", "off"));
    proxy.wait_health("UDP port", |h| h["l4"]["ports"][0] == "7003/udp");
    let dst = at(&net, 7003);
    let [a, b] = net.client_ips;
    let (sa, sb) = net.in_client_ns(move || (udp_from(a), udp_from(b)));
    let echoes = |s: &std::net::UdpSocket, msg: &[u8]| {
        s.send_to(msg, dst).expect("send");
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf).is_ok_and(|(n, _)| &buf[..n] == msg)
    };
    assert!(echoes(&sa, b"a before"));
    assert!(echoes(&sb, b"b before"));
    assert_eq!(proxy.health()["l4"]["udp_sessions"], 2);

    let generation = proxy.health()["route_table_generation"].as_u64().unwrap();
    proxy.write_mappings(&mapping(&format!("\"{a}/32\"")));
    proxy.wait_table_generation_above(generation);
    assert!(
        !echoes(&sa, b"a after"),
        "a refused client's session lived on"
    );
    assert!(
        echoes(&sb, b"b after"),
        "an allowed client keeps its session"
    );
    proxy.wait_health("the refused session ended", |h| {
        h["l4"]["udp_sessions"] == 1 && h["l4"]["denied"].as_u64().unwrap_or(0) >= 1
    });
}
