//! The kernel fast path through the real proxy: the XDP filter drops a blocked source before
//! the stack sees it and passes an allowed one on the same port (checked on what the target
//! got and on the per-port counters), and a spliced TCP connection carries 100 MiB correctly
//! while the proxy's user-space byte counter stays near zero.
//!
//! Needs root (network namespaces, CAP_BPF) and a binary built with the eBPF object
//! (`cargo xtask build-ebpf`); without either it says why and skips, except in CI, where the
//! test command builds the object and runs as root, so a missing fast path fails.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tests::l4_client::{echo_round_trip, tcp_from, udp_from};
use tests::l4_targets::Target;
use tests::netns::{Net, is_root};
use tests::proxy::{Proxy, ProxyOptions};

fn start(net: &Net, mappings: &str) -> Option<Proxy> {
    let mut opts = ProxyOptions::new(mappings);
    opts.netns = net.proxy_ns();
    opts.listen_ip = "0.0.0.0".into();
    let opts = opts
        .env(
            "PORTCULLIS_XDP_INTERFACES",
            net.proxy_interface().expect("namespaced"),
        )
        .env("PORTCULLIS_L4_SPLICE", "on");
    let proxy = Proxy::start(opts);
    proxy.fast_path_on().then_some(proxy)
}

fn namespaces(label: &str) -> Option<Net> {
    if !is_root() {
        eprintln!("{label}: skipping, needs root for network namespaces and eBPF");
        return None;
    }
    Some(Net::namespaces().unwrap_or_else(|e| panic!("{label}: {e}")))
}

fn service(id: &str, mode: &str, port: u16, target: SocketAddr, extra: &str) -> String {
    format!(
        "[[service]]\nid = \"{id}\"\ndomain = \"{id}.fp.test\"\nmode = \"{mode}\"\nlisten_port = {port}\n\
         {extra}\n[[service.path]]\ntarget = \"{target}\"\n"
    )
}

fn counters(h: &Value, key: &str) -> (u64, u64) {
    let c = &h["l4"]["xdp"][key];
    (
        c["passed_packets"].as_u64().unwrap_or(0),
        c["dropped_packets"].as_u64().unwrap_or(0),
    )
}

#[test]
fn xdp_drops_a_blocked_source_and_passes_an_allowed_one() {
    let Some(net) = namespaces("xdp") else { return };
    let udp = net.in_proxy_ns(Target::udp_echo);
    let tcp = net.in_proxy_ns(|| Target::tcp_echo(false));
    let blocked = format!("blocked_cidrs = [\"{}/32\"]", net.client_ips[1]);
    let mappings = service("u", "udp", 7003, udp.addr, &blocked)
        + &service("t", "tcp", 7001, tcp.addr, &blocked);
    let Some(proxy) = start(&net, &mappings) else {
        return;
    };
    proxy.wait_health("ports in the XDP map", |h| {
        h["l4"]["xdp"]["7003/udp"].is_object() && h["l4"]["xdp"]["7001/tcp"].is_object()
    });

    let dst = SocketAddr::V4(SocketAddrV4::new(net.proxy_ip, 7003));
    let [allowed, blocked_ip] = net.client_ips;
    let (echoed, lost) = net.in_client_ns(move || {
        let good = udp_from(allowed);
        let bad = udp_from(blocked_ip);
        let (mut echoed, mut lost) = (0, 0);
        let mut buf = [0u8; 64];
        for i in 0..20 {
            good.send_to(format!("ok {i}").as_bytes(), dst)
                .expect("send");
            if good.recv_from(&mut buf).is_ok() {
                echoed += 1;
            }
            bad.send_to(format!("no {i}").as_bytes(), dst)
                .expect("send");
        }
        // One wait covers every blocked datagram: none may come back.
        bad.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        while bad.recv_from(&mut buf).is_ok() {
            lost += 1;
        }
        (echoed, lost)
    });
    assert_eq!(echoed, 20, "the allowed source is served");
    assert_eq!(lost, 0, "nothing reaches the blocked source");
    assert_eq!(
        udp.datagrams.load(Ordering::SeqCst),
        20,
        "the target got exactly the allowed datagrams"
    );
    let h = proxy.health();
    let (passed, dropped) = counters(&h, "7003/udp");
    assert!(passed >= 20, "allowed datagrams counted as passed: {h}");
    assert!(dropped >= 20, "blocked datagrams counted as dropped: {h}");
    assert_eq!(
        h["l4"]["denied"], 0,
        "user space never saw the blocked source: XDP dropped it first"
    );

    // TCP: the blocked source's SYN never arrives, so its connect times out (not refused).
    let tdst = SocketAddr::V4(SocketAddrV4::new(net.proxy_ip, 7001));
    let (refused, served) = net.in_client_ns(move || {
        let refused = tcp_from(blocked_ip, tdst, Duration::from_secs(1)).err();
        let served =
            tcp_from(allowed, tdst, Duration::from_secs(3)).map(|s| echo_round_trip(s, 64 * 1024));
        (refused, served)
    });
    let err = refused.expect("the blocked source cannot connect");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    let (a, b, n) = served.expect("the allowed source connects");
    assert_eq!((a, n), (b, 64 * 1024));
    let (_, dropped) = counters(&proxy.health(), "7001/tcp");
    assert!(dropped >= 1, "the SYN was dropped in XDP");
}

#[test]
fn a_spliced_connection_carries_100_mib_outside_user_space() {
    let Some(net) = namespaces("splice") else {
        return;
    };
    let echo = net.in_proxy_ns(|| Target::tcp_echo(false));
    let Some(proxy) = start(&net, &service("s", "tcp", 7010, echo.addr, "")) else {
        return;
    };
    proxy.wait_health("port open", |h| h["l4"]["ports"][0] == "7010/tcp");
    let dst = SocketAddr::V4(SocketAddrV4::new(net.proxy_ip, 7010));
    let src = net.client_ips[0];
    // A request sent at once, then a wait for its answer: the bytes queued before the splice
    // was set up must still go through.
    let (answer, first) = net.in_client_ns(move || {
        use std::io::{Read, Write};
        let mut s = tcp_from(src, dst, Duration::from_secs(3)).expect("connect");
        s.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        (s.read_exact(&mut buf).map(|_| buf), s)
    });
    assert_eq!(
        &answer.expect("answer to a request sent before the splice"),
        b"ping"
    );
    // Both of the proxy's sockets of the spliced pair got the large send buffer (a full one
    // makes the kernel's splice wait a whole tick, which capped one stream near 4 Gbit/s).
    let filter = format!(
        "( sport = :7010 or dport = :{} ) and not sport = :{}",
        echo.addr.port(),
        echo.addr.port()
    );
    let buffers = net.in_proxy_ns(move || send_buffers(&filter));
    assert_eq!(buffers.len(), 2, "the proxy's two sockets: {buffers:?}");
    for b in &buffers {
        assert!(*b >= 16 << 20, "spliced send buffers: {buffers:?}");
    }
    drop(first);

    const TOTAL: usize = 100 << 20;
    let (sent, got, n) = net.in_client_ns(move || {
        echo_round_trip(
            tcp_from(src, dst, Duration::from_secs(3)).expect("connect"),
            TOTAL,
        )
    });
    if n != TOTAL {
        // The proxy's view of the connection once it has ended, for the failure message.
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(
        n,
        TOTAL,
        "all of it came back; /healthz {}; log:\n{}",
        proxy.health(),
        proxy.log_text()
    );
    assert_eq!(sent, got, "checksums match");
    let h = proxy.health();
    assert!(
        h["l4"]["spliced"].as_u64().unwrap_or(0) >= 2,
        "both connections spliced: {h}"
    );
    let user = h["l4"]["user_space_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        user < 64 * 1024,
        "user space copied {user} bytes of {} (should be near zero)",
        2 * TOTAL
    );
}

/// Send buffer sizes (`tb` of `ss -m`) of the established TCP sockets `filter` selects, in this
/// thread's network namespace.
fn send_buffers(filter: &str) -> Vec<u64> {
    let out = std::process::Command::new("ss")
        .args(["-Htnm", "state", "established", filter])
        .output()
        .expect("ss runs");
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split(",tb")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}
