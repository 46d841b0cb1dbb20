//! The kernel fast path against the real kernel: the XDP source policy and counters on a veth
//! pair, and the sockmap splice of TCP pairs.
//!
//! These need root and a binary built with the eBPF object (`cargo xtask build-ebpf` before
//! building); without either, each test says why and returns. Each test makes its own pair of
//! network namespaces joined by a veth pair, deleted when the test ends (also when it fails),
//! and all traffic stays inside them.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use portcullis::ebpf::{
    EbpfError, FastPath, L4Protocol, PortCounterSnapshot, PortPolicySpec, SpliceMark, XdpAttachMode,
};
use tests::backend::{FNV_OFFSET, fnv1a64};

// === Namespaces ===

fn skipped(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("{test}: skipped: needs root (network namespaces, CAP_BPF, CAP_NET_ADMIN)");
        return true;
    }
    if !portcullis::ebpf::object_built_in() {
        eprintln!(
            "{test}: skipped: this build has no eBPF object (`cargo xtask build-ebpf`, then \
             build again)"
        );
        return true;
    }
    false
}

/// A server-side and a client-side namespace joined by a veth pair, addressed
/// `10.N.0.1` / `fd00:N::1` on the server side and `.2`, `.3`, `.4` / `::2`, `::3`, `::4` on
/// the client side.
struct Net {
    server_ns: String,
    client_ns: String,
    server_if: String,
    subnet: u8,
}

impl Net {
    fn new(subnet: u8) -> Net {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        // Built first, so the guard deletes whatever part of the setup succeeded.
        let net = Net {
            server_ns: format!("pceb-s{tag}"),
            client_ns: format!("pceb-c{tag}"),
            server_if: format!("ebs{tag}"),
            subnet,
        };
        let client_if = format!("ebc{tag}");
        assert!(net.server_if.len() <= 15 && client_if.len() <= 15);
        let (s, c) = (net.server_ns.as_str(), net.client_ns.as_str());
        ip(&["netns", "add", s]);
        ip(&["netns", "add", c]);
        ip(&[
            "link",
            "add",
            &net.server_if,
            "netns",
            s,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            c,
        ]);
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("10.{subnet}.0.1/24"),
            "dev",
            &net.server_if,
        ]);
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("fd00:{subnet}::1/64"),
            "dev",
            &net.server_if,
            "nodad",
        ]);
        for host in 2..=4 {
            ip(&[
                "-n",
                c,
                "addr",
                "add",
                &format!("10.{subnet}.0.{host}/24"),
                "dev",
                &client_if,
            ]);
            ip(&[
                "-n",
                c,
                "addr",
                "add",
                &format!("fd00:{subnet}::{host}/64"),
                "dev",
                &client_if,
                "nodad",
            ]);
        }
        for (ns, dev) in [(s, net.server_if.as_str()), (c, client_if.as_str())] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn v4(&self, host: u8) -> IpAddr {
        IpAddr::from([10, self.subnet, 0, host])
    }

    /// `fd00:N::host`, N written in decimal digits like the IPv4 subnet (so `fd00:201::`).
    fn v6(&self, host: u8) -> IpAddr {
        format!("fd00:{}::{host}", self.subnet)
            .parse()
            .expect("IPv6 address")
    }

    /// What `ip link` says about the server-side interface.
    fn server_link(&self) -> String {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.server_ns,
                "link",
                "show",
                "dev",
                &self.server_if,
            ])
            .output()
            .expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and with it the pair.
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn ip(args: &[&str]) {
    tests::netns::ip(args).unwrap_or_else(|e| panic!("{e}"));
}

/// Runs `f` on a thread that entered namespace `ns`; sockets it creates stay in `ns`.
fn run_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    tests::netns::run_in(Some(ns.to_string()), f)
}

/// Loads the fast path on a thread (inside `ns`, if given) whose effective capabilities are
/// CAP_BPF and CAP_NET_ADMIN and nothing else: what the proxy is documented to need.
/// Capabilities belong to a thread, so the rest of the test keeps root's.
fn load(ns: Option<&str>, interfaces: &[&str], splice: bool) -> Result<FastPath, EbpfError> {
    let interfaces: Vec<String> = interfaces.iter().map(|s| s.to_string()).collect();
    let least_privileged = move || {
        let only: caps::CapsHashSet = [caps::Capability::CAP_BPF, caps::Capability::CAP_NET_ADMIN]
            .into_iter()
            .collect();
        caps::set(None, caps::CapSet::Effective, &only).expect("drop capabilities");
        FastPath::load(&interfaces, splice)
    };
    tests::netns::run_in(ns.map(str::to_string), least_privileged)
}

fn join<T>(handle: JoinHandle<T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

// === XDP ===

const UDP: L4Protocol = L4Protocol::Udp;
const TCP: L4Protocol = L4Protocol::Tcp;
const PAYLOAD: usize = 100;
/// Ethernet + IPv4 + UDP headers, then the payload: what XDP counts per datagram.
const UDP4_FRAME: u64 = (14 + 20 + 8 + PAYLOAD) as u64;
const UDP6_FRAME: u64 = (14 + 40 + 8 + PAYLOAD) as u64;

fn spec(port: u16, protocol: L4Protocol, allowed: &[&str], blocked: &[&str]) -> PortPolicySpec {
    let nets = |list: &[&str]| list.iter().map(|s| s.parse().expect("CIDR")).collect();
    PortPolicySpec {
        port,
        protocol,
        allowed: nets(allowed),
        blocked: nets(blocked),
    }
}

/// A datagram of exactly `PAYLOAD` bytes that names its sender.
fn datagram(label: &str) -> Vec<u8> {
    let mut d = label.as_bytes().to_vec();
    d.resize(PAYLOAD, b'.');
    d
}

fn label(d: &[u8]) -> String {
    String::from_utf8_lossy(d).trim_end_matches('.').to_string()
}

/// Sends `count` datagrams from each source (labelled `<source>#<i>`), then "END" from
/// `end_from`, all from the client namespace.
fn send_udp(net: &Net, port: u16, sources: &[IpAddr], count: usize, end_from: IpAddr) {
    let dst_v4 = SocketAddr::new(net.v4(1), port);
    let dst_v6 = SocketAddr::new(net.v6(1), port);
    let sources = sources.to_vec();
    run_in(&net.client_ns, move || {
        let send = |src: IpAddr, what: &[u8]| {
            let socket = UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind client");
            let dst = if src.is_ipv4() { dst_v4 } else { dst_v6 };
            socket.send_to(what, dst).expect("send");
        };
        for src in &sources {
            for i in 0..count {
                send(*src, &datagram(&format!("{src}#{i}")));
            }
        }
        send(end_from, &datagram("END"));
    });
}

/// The labels of the datagrams `socket` receives up to and including "END".
fn receive_until_end(socket: &UdpSocket) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let (n, _) = socket
            .recv_from(&mut buf)
            .expect("a datagram (the END marker never came)");
        let l = label(&buf[..n]);
        if l == "END" {
            return got;
        }
        got.push(l);
    }
}

fn labels(sources: &[IpAddr], count: usize) -> Vec<String> {
    sources
        .iter()
        .flat_map(|s| (0..count).map(move |i| format!("{s}#{i}")))
        .collect()
}

fn counters_of(fp: &FastPath, port: u16, protocol: L4Protocol) -> Option<PortCounterSnapshot> {
    fp.counters()
        .expect("counters")
        .into_iter()
        .find(|c| c.port == port && c.protocol == protocol)
}

/// Waits (bounded) until the port's counters reach what the test sent: XDP may still be
/// working through a datagram the receiver's END overtook on another CPU.
fn wait_counters(
    fp: &FastPath,
    port: u16,
    protocol: L4Protocol,
    expected: (u64, u64, u64, u64),
) -> PortCounterSnapshot {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = counters_of(fp, port, protocol).expect("counters for a configured port");
        let got = (
            c.passed_packets,
            c.passed_bytes,
            c.dropped_packets,
            c.dropped_bytes,
        );
        if got == expected || Instant::now() > deadline {
            assert_eq!(
                got, expected,
                "port {port}/{protocol}: (passed packets, passed bytes, dropped packets, dropped bytes)"
            );
            return c;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn bind_udp(net: &Net, port: u16) -> UdpSocket {
    // `[::]` takes IPv4 too (as mapped addresses): one socket per port sees both families.
    run_in(&net.server_ns, move || {
        UdpSocket::bind(("::", port)).expect("bind UDP receiver")
    })
}

#[test]
fn xdp_drops_blocked_and_unlisted_sources_and_counts_per_port() {
    if skipped("xdp_drops_blocked_and_unlisted_sources_and_counts_per_port") {
        return;
    }
    let net = Net::new(201);

    // Interface names resolve in the loading thread's namespace: the test's own thread (in the
    // host's namespace) does not see the veth, a thread inside the namespace does.
    match FastPath::load(std::slice::from_ref(&net.server_if), false) {
        Err(EbpfError::UnknownInterface(name)) => assert_eq!(name, net.server_if),
        Err(e) => panic!("expected an unknown interface, got: {e}"),
        Ok(_) => panic!("attached to {} outside its namespace", net.server_if),
    }
    let mut fp = load(Some(&net.server_ns), &[&net.server_if], false)
        .unwrap_or_else(|e| panic!("load: {e}"));
    assert_eq!(
        fp.xdp_attachments(),
        &[(net.server_if.clone(), XdpAttachMode::Driver)],
        "veth runs XDP in driver mode"
    );
    assert_eq!(
        fp.describe(),
        format!("on: xdp driver on {}; splice off", net.server_if)
    );
    assert!(net.server_link().contains("xdp"), "{}", net.server_link());
    assert!(fp.splicer().is_none());

    let (a2, a3, a4) = (net.v4(2), net.v4(3), net.v4(4));
    let (b2, b3, b4) = (net.v6(2), net.v6(3), net.v6(4));
    fp.set_ports(&[
        spec(7001, UDP, &[], &["10.201.0.3/32", "fd00:201::3/128"]),
        spec(7002, TCP, &[], &["10.201.0.0/30"]),
        spec(7003, UDP, &["10.201.0.2/32", "fd00:201::2/127"], &[]),
    ])
    .expect("set ports");

    // Block list: .3 and ::3 dropped, .2 and ::2 pass.
    let rx1 = bind_udp(&net, 7001);
    send_udp(&net, 7001, &[a2, a3, b2, b3], 3, a2);
    assert_eq!(receive_until_end(&rx1), labels(&[a2, b2], 3));
    let c1 = wait_counters(
        &fp,
        7001,
        UDP,
        (
            7,
            4 * UDP4_FRAME + 3 * UDP6_FRAME,
            6,
            3 * UDP4_FRAME + 3 * UDP6_FRAME,
        ),
    );

    // Allow list: only .2 and ::2 (and ::3, inside the /127) pass.
    let rx3 = bind_udp(&net, 7003);
    send_udp(&net, 7003, &[a2, a4, b2, b3, b4], 2, a2);
    assert_eq!(receive_until_end(&rx3), labels(&[a2, b2, b3], 2));
    wait_counters(
        &fp,
        7003,
        UDP,
        (
            7,
            3 * UDP4_FRAME + 4 * UDP6_FRAME,
            4,
            2 * UDP4_FRAME + 2 * UDP6_FRAME,
        ),
    );

    // A port nobody configured: untouched and uncounted, even from a blocked source.
    let rx4 = bind_udp(&net, 7004);
    send_udp(&net, 7004, &[a3, b3], 2, a3);
    assert_eq!(receive_until_end(&rx4), labels(&[a3, b3], 2));
    assert!(counters_of(&fp, 7004, UDP).is_none());
    assert!(
        counters_of(&fp, 7001, TCP).is_none(),
        "the protocol is part of the port"
    );

    // TCP: a SYN from the blocked /30 never reaches the listener; .4 connects and talks.
    let listener = run_in(&net.server_ns, || {
        TcpListener::bind(("0.0.0.0", 7002)).expect("bind TCP")
    });
    let dst = SocketAddr::new(net.v4(1), 7002);
    let (blocked, allowed) = run_in(&net.client_ns, move || {
        let blocked = tcp_connect_from(a3, dst, Duration::from_millis(700));
        let mut allowed = tcp_connect_from(a4, dst, Duration::from_secs(5)).expect("connect");
        allowed.write_all(b"hello").expect("write");
        (blocked, allowed)
    });
    match blocked {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        other => panic!("a blocked source's connect should time out, got {other:?}"),
    }
    let (mut conn, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), a4);
    let mut hello = [0u8; 5];
    conn.read_exact(&mut hello).expect("read");
    assert_eq!(&hello, b"hello");
    listener.set_nonblocking(true).expect("nonblocking");
    assert_eq!(
        listener.accept().map(|(_, p)| p).map_err(|e| e.kind()),
        Err(io::ErrorKind::WouldBlock),
        "nothing from the blocked source got through"
    );
    drop(allowed);
    let c2 = counters_of(&fp, 7002, TCP).expect("TCP counters");
    // At least the SYN, its ACK and the data; dropped: the SYN and any retransmission.
    assert!(c2.passed_packets >= 3, "{c2:?}");
    assert!(c2.dropped_packets >= 1, "{c2:?}");
    assert!(
        c2.dropped_bytes >= c2.dropped_packets * (14 + 20 + 20),
        "{c2:?}"
    );

    // A new set: 7001 loses its block list but keeps its counters, 7003 goes away.
    fp.set_ports(&[
        spec(7001, UDP, &[], &[]),
        spec(7002, TCP, &[], &["10.201.0.0/30"]),
    ])
    .expect("update ports");
    send_udp(&net, 7001, &[a3], 2, a2);
    assert_eq!(receive_until_end(&rx1), labels(&[a3], 2));
    wait_counters(
        &fp,
        7001,
        UDP,
        (
            c1.passed_packets + 3,
            c1.passed_bytes + 3 * UDP4_FRAME,
            c1.dropped_packets,
            c1.dropped_bytes,
        ),
    );
    assert!(counters_of(&fp, 7003, UDP).is_none());
    send_udp(&net, 7003, &[a4], 1, a4);
    assert_eq!(receive_until_end(&rx3), labels(&[a4], 1));

    // A bad set is refused whole.
    match fp.set_ports(&[spec(7001, UDP, &[], &[]), spec(7001, UDP, &[], &[])]) {
        Err(EbpfError::DuplicatePort { port: 7001, .. }) => {}
        other => panic!("expected a duplicate-port error, got {other:?}"),
    }
    assert!(counters_of(&fp, 7002, TCP).is_some());

    // Dropping the fast path detaches XDP.
    drop(fp);
    assert!(!net.server_link().contains("xdp"), "{}", net.server_link());
}

#[test]
fn unknown_interface_is_named() {
    if skipped("unknown_interface_is_named") {
        return;
    }
    match FastPath::load(&["pceb-none0".to_string()], false) {
        Err(e @ EbpfError::UnknownInterface(_)) => {
            assert!(e.to_string().contains("pceb-none0"), "{e}")
        }
        Err(e) => panic!("expected an unknown interface, got: {e}"),
        Ok(_) => panic!("attached to an interface that does not exist"),
    }
}

fn tcp_connect_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let domain = if dst.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(src, 0).into())?;
    socket.connect_timeout(&dst.into(), timeout)?;
    Ok(socket.into())
}

// === Splice ===

/// Echoes one connection until it ends, after sending `banner` first; returns bytes echoed.
fn echo_target(listener: TcpListener, banner: &'static [u8]) -> JoinHandle<u64> {
    thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("target accept");
        s.write_all(banner).expect("banner");
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).expect("target read");
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).expect("target write");
            total += n as u64;
        }
        s.shutdown(Shutdown::Write).expect("target shutdown");
        total
    })
}

/// What the proxy does with one direction of a spliced pair: read `from` until it ends
/// (forwarding whatever user space gets, which should be nothing), wait until the kernel has
/// moved every byte, then pass the end on. Returns the bytes user space saw.
fn watch(
    from: TcpStream,
    to: TcpStream,
    flushed: impl Fn() -> bool + Send + 'static,
) -> JoinHandle<u64> {
    thread::spawn(move || {
        from.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0u64;
        let mut from = from;
        let mut to_w = to.try_clone().expect("clone");
        loop {
            assert!(Instant::now() < deadline, "the stream never ended");
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    seen += n as u64;
                    to_w.write_all(&buf[..n]).expect("forward");
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        let waited = Instant::now();
        while !flushed() {
            assert!(
                waited.elapsed() < Duration::from_secs(60),
                "the kernel never finished moving the spliced bytes"
            );
            thread::sleep(Duration::from_millis(1));
        }
        to.shutdown(Shutdown::Write).expect("shutdown");
        seen
    })
}

fn splice(splicer: &portcullis::ebpf::Splicer, a: &TcpStream, b: &TcpStream) -> SpliceMark {
    splicer
        .splice_marked(a.as_fd(), b.as_fd())
        .unwrap_or_else(|e| panic!("splice: {e}"))
}

/// Watches both directions of a spliced pair like the proxy would.
fn watch_both(mark: SpliceMark, a: TcpStream, b: TcpStream) -> (JoinHandle<u64>, JoinHandle<u64>) {
    let clone = |s: &TcpStream| s.try_clone().expect("clone");
    let (a1, b1, a2, b2) = (clone(&a), clone(&b), clone(&a), clone(&b));
    let a_to_b = watch(clone(&a), clone(&b), move || {
        mark.a_to_b_flushed(a1.as_fd(), b1.as_fd())
            .expect("flushed")
    });
    let b_to_a = watch(b, a, move || {
        mark.b_to_a_flushed(a2.as_fd(), b2.as_fd())
            .expect("flushed")
    });
    (a_to_b, b_to_a)
}

/// Deterministic bytes: xorshift64, so a mistake in the splice cannot go unseen by chance.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

#[test]
fn splice_carries_100_mib_each_way_without_user_space() {
    if skipped("splice_carries_100_mib_each_way_without_user_space") {
        return;
    }
    const TOTAL: u64 = 100 << 20;
    let net = Net::new(202);
    let fp = load(None, &[], true).unwrap_or_else(|e| panic!("load: {e}"));
    assert_eq!(fp.describe(), "on: xdp on no interface; splice on");
    let splicer = fp.splicer().expect("splice on");

    let target_addr = SocketAddr::new(net.v4(4), 9000);
    let target = echo_target(
        run_in(&net.client_ns, move || {
            TcpListener::bind(target_addr).expect("bind target")
        }),
        b"",
    );
    let proxy_addr = SocketAddr::new(net.v4(1), 9001);
    let listener = run_in(&net.server_ns, move || {
        TcpListener::bind(proxy_addr).expect("bind")
    });

    let source = net.v4(2);
    let client = run_in(&net.client_ns, move || {
        tcp_connect_from(source, proxy_addr, Duration::from_secs(5)).expect("client connect")
    });
    let (a, _) = listener.accept().expect("accept");
    let b = run_in(&net.server_ns, move || {
        TcpStream::connect_timeout(&target_addr, Duration::from_secs(5)).expect("connect target")
    });
    let mark = splice(&splicer, &a, &b);
    assert_eq!(splicer.map_entries().expect("entries"), 4);
    let (a_to_b, b_to_a) = watch_both(mark, a, b);

    let mut writer = client.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let (mut state, mut hash, mut sent) = (0x9e37_79b9_7f4a_7c15u64, FNV_OFFSET, 0u64);
        while sent < TOTAL {
            fill(&mut buf, &mut state);
            writer.write_all(&buf).expect("client write");
            hash = fnv1a64(&buf, hash);
            sent += buf.len() as u64;
        }
        writer.shutdown(Shutdown::Write).expect("client shutdown");
        (sent, hash)
    });
    let mut reader = client;
    reader
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let (mut got, mut hash) = (0u64, FNV_OFFSET);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).expect("client read");
        if n == 0 {
            break;
        }
        hash = fnv1a64(&buf[..n], hash);
        got += n as u64;
    }
    let (sent, sent_hash) = join(sender);
    assert_eq!(sent, TOTAL);
    assert_eq!(join(target), TOTAL, "the target got every byte");
    assert_eq!((got, hash), (TOTAL, sent_hash), "the echo came back intact");
    assert_eq!(
        join(a_to_b),
        0,
        "user space read nothing from the client side"
    );
    assert_eq!(
        join(b_to_a),
        0,
        "user space read nothing from the target side"
    );
}

#[test]
fn splice_forwards_bytes_queued_before_it_started() {
    if skipped("splice_forwards_bytes_queued_before_it_started") {
        return;
    }
    let net = Net::new(203);
    let fp = load(None, &[], true).unwrap_or_else(|e| panic!("load: {e}"));
    let splicer = fp.splicer().expect("splice on");
    for (client_ip, proxy_ip, target_ip) in [
        (net.v4(2), net.v4(1), net.v4(4)),
        (net.v6(2), net.v6(1), net.v6(4)),
    ] {
        let target_addr = SocketAddr::new(target_ip, 9100);
        // The target speaks first (a banner), the client too (a request), and neither says
        // more until it hears back: both bytes are queued before the splice exists.
        let target = echo_target(
            run_in(&net.client_ns, move || {
                TcpListener::bind(target_addr).expect("bind target")
            }),
            b"220 ready\n",
        );
        let proxy_addr = SocketAddr::new(proxy_ip, 9101);
        let listener = run_in(&net.server_ns, move || {
            TcpListener::bind(proxy_addr).expect("bind")
        });
        let mut client = run_in(&net.client_ns, move || {
            tcp_connect_from(client_ip, proxy_addr, Duration::from_secs(5)).expect("connect")
        });
        client.write_all(b"PING\n").expect("request");
        let (a, _) = listener.accept().expect("accept");
        let b = run_in(&net.server_ns, move || {
            TcpStream::connect_timeout(&target_addr, Duration::from_secs(5)).expect("connect")
        });
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            assert_eq!(s.peek(&mut [0u8; 1]).expect("bytes queued"), 1);
        }
        let mark = splice(&splicer, &a, &b);
        // Nobody reads `a` or `b` until the answer is in: a read would itself make TCP look at
        // the queue, hiding whether the splice alone forwards what was already waiting.
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let want = b"220 ready\nPING\n";
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).unwrap_or_else(|e| {
            panic!("{client_ip}: no answer to a request sent before the splice: {e}")
        });
        assert_eq!(got, want);
        let (a_to_b, b_to_a) = watch_both(mark, a, b);
        client.shutdown(Shutdown::Write).expect("shutdown");
        assert_eq!(client.read(&mut [0u8; 16]).expect("end"), 0);
        assert_eq!(join(target), 5);
        assert_eq!(join(a_to_b), 0, "{client_ip}: user space read nothing");
        assert_eq!(join(b_to_a), 0, "{client_ip}: user space read nothing");
        assert_eq!(splicer.map_entries().expect("entries"), 0);
    }
}

#[test]
fn splice_refuses_a_half_closed_socket_and_leaves_the_pair_usable() {
    if skipped("splice_refuses_a_half_closed_socket_and_leaves_the_pair_usable") {
        return;
    }
    let net = Net::new(204);
    let fp = load(None, &[], true).unwrap_or_else(|e| panic!("load: {e}"));
    let splicer = fp.splicer().expect("splice on");
    let target_addr = SocketAddr::new(net.v4(4), 9200);
    let target = echo_target(
        run_in(&net.client_ns, move || {
            TcpListener::bind(target_addr).expect("bind target")
        }),
        b"",
    );
    let proxy_addr = SocketAddr::new(net.v4(1), 9201);
    let listener = run_in(&net.server_ns, move || {
        TcpListener::bind(proxy_addr).expect("bind")
    });
    let source = net.v4(2);
    let client = run_in(&net.client_ns, move || {
        tcp_connect_from(source, proxy_addr, Duration::from_secs(5)).expect("connect")
    });
    client.shutdown(Shutdown::Write).expect("half-close");
    let (mut a, _) = listener.accept().expect("accept");
    a.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // The client's FIN has arrived once a read says end of stream.
    assert_eq!(a.read(&mut [0u8; 1]).expect("end"), 0);
    let mut b = run_in(&net.server_ns, move || {
        TcpStream::connect_timeout(&target_addr, Duration::from_secs(5)).expect("connect")
    });
    match splicer.splice(a.as_fd(), b.as_fd()) {
        Err(e @ EbpfError::Splice { .. }) => {
            assert!(
                e.to_string().contains("not an established TCP socket"),
                "{e}"
            )
        }
        other => panic!("expected a splice error, got {other:?}"),
    }
    // Nothing of the failed attempt sticks: the target side still works from user space.
    b.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    b.write_all(b"still here").expect("write");
    let mut echo = [0u8; 10];
    b.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"still here");
    b.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(join(target), 10);
    assert_eq!(
        splicer.map_entries().expect("entries"),
        0,
        "the failed splice left entries"
    );
}
