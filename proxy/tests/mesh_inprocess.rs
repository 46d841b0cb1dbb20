//! The in-process mesh (boringtun + smoltcp) against a real `wireguard-go` peer.
//!
//! Each testbed is a network namespace joined to ours by a veth pair (10.213.X.0/24), with
//! `wireguard-go` inside it (tunnel address 100.64.0.2, our mesh is 100.64.0.1) and a TCP echo
//! server bound to the tunnel address. The mesh runs in the test process, in our namespace.
//! Needs root (namespaces, veth) and wireguard-go/wg/ip; skips with a reason otherwise.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use portcullis::mesh::inprocess::{
    InProcessError, InProcessMesh, InProcessPeer, InProcessPeerStatus, InProcessSpec,
};
use wireguard_control::Key;

const MESH_ADDR: &str = "100.64.0.1/10";
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const ECHO_PORT: u16 = 7000;
const WG_PORT: u16 = 51820;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn skip_reason() -> Option<String> {
    if nix::unistd::geteuid().as_raw() != 0 {
        return Some("needs root for network namespaces and veth pairs".into());
    }
    for tool in ["wireguard-go", "wg", "ip"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

macro_rules! require_testbed {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("skipping: {reason}");
            return;
        }
    };
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// === Testbed ===

/// A namespace with wireguard-go and an echo server; everything is torn down on drop.
struct Testbed {
    ns: String,
    veth: String,
    key_file: std::path::PathBuf,
    wireguard: Option<Child>,
    echo: Option<EchoServer>,
    wg_public: Key,
    endpoint: SocketAddr,
}

impl Testbed {
    fn new(mesh_public: &Key) -> Testbed {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let octet = (pid.wrapping_mul(7).wrapping_add(n) % 250) + 1;
        let mut bed = Testbed {
            ns: format!("pcmesh-{pid}-{n}"),
            veth: format!("pcv{}{n}", pid % 1_000_000),
            key_file: std::env::temp_dir().join(format!("pcmesh-{pid}-{n}.key")),
            wireguard: None,
            echo: None,
            wg_public: Key::zero(),
            endpoint: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 213, octet as u8, 2)), WG_PORT),
        };
        // On failure `bed` is dropped by the panic and cleans up what was created.
        bed.setup(mesh_public, octet as u8).expect("testbed setup");
        bed
    }

    fn setup(&mut self, mesh_public: &Key, octet: u8) -> Result<(), String> {
        let ns = self.ns.clone();
        let peer_veth = format!("{}p", self.veth);
        let wg_iface = format!("pcw{}", &self.veth[3..]);
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &[
                "link", "add", &self.veth, "type", "veth", "peer", "name", &peer_veth, "netns", &ns,
            ],
        )?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.213.{octet}.1/24"),
                "dev",
                &self.veth,
            ],
        )?;
        run("ip", &["link", "set", &self.veth, "up"])?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.213.{octet}.2/24"),
                "dev",
                &peer_veth,
            ],
        )?;
        run("ip", &["-n", &ns, "link", "set", &peer_veth, "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;

        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "wireguard-go", "-f", &wg_iface])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("wireguard-go: {e}"))?;
        self.wireguard = Some(child);

        let private = Key::generate_private();
        self.wg_public = private.get_public();
        std::fs::write(&self.key_file, private.to_base64()).map_err(|e| e.to_string())?;
        let key_file = self.key_file.to_string_lossy().into_owned();
        let port = WG_PORT.to_string();
        let peer = mesh_public.to_base64();
        let wg_args = [
            "netns",
            "exec",
            &ns,
            "wg",
            "set",
            &wg_iface,
            "listen-port",
            &port,
            "private-key",
            &key_file,
            "peer",
            &peer,
            "allowed-ips",
            "100.64.0.1/32",
        ];
        // wireguard-go creates its interface and UAPI socket shortly after starting.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match run("ip", &wg_args) {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        run(
            "ip",
            &["-n", &ns, "addr", "add", "100.64.0.2/10", "dev", &wg_iface],
        )?;
        run("ip", &["-n", &ns, "link", "set", &wg_iface, "up"])?;
        self.echo = Some(EchoServer::start(
            &ns,
            SocketAddr::new(IpAddr::V4(TARGET_IP), ECHO_PORT),
        )?);
        Ok(())
    }

    fn peer(&self) -> InProcessPeer {
        InProcessPeer {
            public_key: self.wg_public.clone(),
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            endpoint: Some(self.endpoint),
            persistent_keepalive: None,
            preshared_key: None,
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Some(echo) = self.echo.take() {
            echo.stop();
        }
        if let Some(mut child) = self.wireguard.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run("ip", &["link", "del", &self.veth]);
        let _ = run("ip", &["netns", "del", &self.ns]);
        let _ = std::fs::remove_file(&self.key_file);
    }
}

/// A TCP echo server whose listener lives in the namespace: it is bound from a thread that
/// entered the namespace, and a socket stays in the namespace it was created in.
struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl EchoServer {
    fn start(ns: &str, addr: SocketAddr) -> Result<EchoServer, String> {
        let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
            let rc = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
            let listener = if rc == 0 {
                TcpListener::bind(addr).map_err(|e| e.to_string())
            } else {
                Err(format!("setns: {}", std::io::Error::last_os_error()))
            };
            let listener = match listener.and_then(|l| {
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok(l)
            }) {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || echo(stream));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => break,
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| e.to_string())??;
        Ok(EchoServer { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Echoes until the client half-closes, then half-closes too: exercises FIN both ways.
fn echo(stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = &stream;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if (&stream).write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

// === helpers ===

fn mesh_spec() -> InProcessSpec {
    InProcessSpec {
        private_key: Key::generate_private(),
        listen_port: 0,
        address: MESH_ADDR.parse().unwrap(),
    }
}

fn echo_target() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(TARGET_IP), ECHO_PORT)
}

/// FNV-1a: enough to tell two byte streams apart in a test.
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Sends `len` pseudo-random bytes through `addr` and checks the echo; returns the elapsed
/// time from connect to the echo's end.
fn echo_through(addr: SocketAddr, len: usize) -> Duration {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).expect("connect to the bridge");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            for b in &mut chunk[..n] {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            fnv(&mut hash, &chunk[..n]);
            writer
                .write_all(&chunk[..n])
                .expect("send through the bridge");
            left -= n;
        }
        writer.shutdown(Shutdown::Write).unwrap();
        hash
    });
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = &stream;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                fnv(&mut hash, &buf[..n]);
                got += n;
            }
            // A signal landing on this thread interrupts a read that has a timeout even
            // under SA_RESTART; that is not a failure of the tunnel.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("reading the echo after {got} bytes: {e}"),
        }
    }
    let sent = sender.join().expect("sender thread");
    assert_eq!(got, len, "echoed length");
    assert_eq!(hash, sent, "echoed content hash");
    started.elapsed()
}

fn mbit_per_s(bytes: usize, took: Duration) -> f64 {
    (bytes * 8) as f64 / took.as_secs_f64() / 1e6
}

// === tests ===

#[test]
fn echoes_8_mib_through_wireguard_go_and_reports_the_handshake() {
    require_testbed!();
    let spec = mesh_spec();
    let bed = Testbed::new(&spec.private_key.get_public());
    let mesh = InProcessMesh::start(&spec).expect("start mesh");
    mesh.set_peers(&[bed.peer()]).unwrap();
    let local = mesh.bridge(echo_target()).expect("bridge");
    assert!(local.ip().is_loopback());
    assert_eq!(
        mesh.bridge(echo_target()).unwrap(),
        local,
        "bridge is idempotent"
    );

    let len = 8 * 1024 * 1024;
    let took = echo_through(local, len);
    eprintln!(
        "8 MiB echoed in {took:?}: {:.0} Mbit/s each way (unoptimized builds are ~5x slower)",
        mbit_per_s(len, took)
    );

    // Status is published every 100 ms; allow a few ticks.
    let deadline = Instant::now() + Duration::from_secs(2);
    let status = loop {
        let peers = mesh.peers();
        let done = |p: &InProcessPeerStatus| p.rx_bytes >= len as u64 && p.tx_bytes >= len as u64;
        if peers.first().is_some_and(done) || Instant::now() > deadline {
            break peers;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.len(), 1);
    let peer = &status[0];
    assert_eq!(peer.public_key, bed.wg_public);
    assert!(peer.last_handshake.is_some(), "handshake seen: {peer:?}");
    assert!(
        peer.rx_bytes >= len as u64 && peer.tx_bytes >= len as u64,
        "{peer:?}"
    );
    assert_eq!(peer.endpoint, Some(bed.endpoint));

    // A second connection reuses the session.
    echo_through(local, 64 * 1024);
    mesh.close_bridge(echo_target());
}

#[test]
fn refuses_targets_outside_allowed_ips() {
    // Needs no namespace: the check is against the configured peers alone.
    let mesh = InProcessMesh::start(&mesh_spec()).expect("start mesh");
    let target: SocketAddr = "100.64.0.2:80".parse().unwrap();
    assert!(matches!(
        mesh.bridge(target),
        Err(InProcessError::NoRoute(_))
    ));
    mesh.set_peers(&[InProcessPeer {
        public_key: Key::generate_private().get_public(),
        allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
        endpoint: None,
        persistent_keepalive: None,
        preshared_key: None,
    }])
    .unwrap();
    assert!(mesh.bridge(target).is_ok());
    let outside: SocketAddr = "100.64.0.3:80".parse().unwrap();
    assert!(matches!(
        mesh.bridge(outside),
        Err(InProcessError::NoRoute(_))
    ));
    let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
    assert!(matches!(
        mesh.bridge(v6),
        Err(InProcessError::FamilyMismatch { .. })
    ));
    // The private key never shows in Debug output.
    let spec = mesh_spec();
    assert!(!format!("{spec:?}").contains(&spec.private_key.to_base64()));
}

#[test]
fn a_dead_target_port_is_refused_promptly() {
    require_testbed!();
    let spec = mesh_spec();
    let bed = Testbed::new(&spec.private_key.get_public());
    let mesh = InProcessMesh::start(&spec).expect("start mesh");
    mesh.set_peers(&[bed.peer()]).unwrap();
    let dead = SocketAddr::new(IpAddr::V4(TARGET_IP), 1);
    let local = mesh.bridge(dead).unwrap();
    let started = Instant::now();
    let mut stream = TcpStream::connect(local).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} bytes from a dead port"),
        Err(e) => assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "no refusal within 8 s: {e}"
        ),
    }
    eprintln!("dead target refused after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn two_meshes_with_the_same_address_coexist() {
    require_testbed!();
    let (spec_a, spec_b) = (mesh_spec(), mesh_spec());
    let bed_a = Testbed::new(&spec_a.private_key.get_public());
    let bed_b = Testbed::new(&spec_b.private_key.get_public());
    let mesh_a = InProcessMesh::start(&spec_a).unwrap();
    let mesh_b = InProcessMesh::start(&spec_b).unwrap();
    assert_ne!(mesh_a.listen_port(), mesh_b.listen_port());
    mesh_a.set_peers(&[bed_a.peer()]).unwrap();
    mesh_b.set_peers(&[bed_b.peer()]).unwrap();
    let local_a = mesh_a.bridge(echo_target()).unwrap();
    let local_b = mesh_b.bridge(echo_target()).unwrap();
    assert_ne!(local_a, local_b);
    let a = std::thread::spawn(move || echo_through(local_a, 1024 * 1024));
    echo_through(local_b, 1024 * 1024);
    a.join().unwrap();
    assert_eq!(mesh_a.peers()[0].public_key, bed_a.wg_public);
    assert_eq!(mesh_b.peers()[0].public_key, bed_b.wg_public);
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability of the calling thread only (the raw syscall is per-thread; glibc
/// wrappers would not be, but there is none for capset).
fn drop_thread_capabilities() {
    let mut header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and two data structs, as capset(2) version 3 expects.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            std::ptr::from_mut(&mut header),
            data.as_ptr(),
        )
    };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

fn effective_caps(status_path: &str) -> Option<String> {
    std::fs::read_to_string(status_path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
}

fn find_thread_caps(name: &str) -> Option<String> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .find(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .and_then(|task| effective_caps(&task.path().join("status").to_string_lossy()))
}

#[test]
fn the_mesh_needs_no_capabilities() {
    require_testbed!();
    let spec = mesh_spec();
    let bed = Testbed::new(&spec.private_key.get_public());
    let peer = bed.peer();
    let worker = std::thread::spawn(move || {
        drop_thread_capabilities();
        assert_eq!(
            effective_caps("/proc/thread-self/status").as_deref(),
            Some("0000000000000000")
        );
        let mesh = InProcessMesh::start(&spec).expect("start mesh without capabilities");
        // The mesh thread inherits this thread's (empty) capability sets.
        let name = format!("wg-inproc-{}", mesh.listen_port());
        // The thread names itself once it runs, so look for it a few times.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mesh_thread_caps = loop {
            let found = find_thread_caps(&name);
            if found.is_some() || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(mesh_thread_caps.as_deref(), Some("0000000000000000"));
        mesh.set_peers(&[peer]).unwrap();
        let local = mesh.bridge(echo_target()).unwrap();
        echo_through(local, 1024 * 1024);
    });
    worker.join().expect("unprivileged mesh thread");
    drop(bed);
}

/// The proxy's side of the mesh only answers: the peer dials in (it knows the endpoint from
/// management), the mesh learns its endpoint from the handshake and reports it.
#[test]
fn a_peer_that_dials_in_is_answered_and_reported() {
    require_testbed!();
    let spec = mesh_spec();
    let bed = Testbed::new(&spec.private_key.get_public());
    let mesh = InProcessMesh::start(&spec).expect("start mesh");
    let mut peer = bed.peer();
    peer.endpoint = None;
    mesh.set_peers(std::slice::from_ref(&peer)).unwrap();
    let wg_iface = format!("pcw{}", &bed.veth[3..]);
    let IpAddr::V4(far) = bed.endpoint.ip() else {
        panic!("IPv4 testbed")
    };
    let [a, b, c, _] = far.octets();
    let mesh_endpoint = format!("{a}.{b}.{c}.1:{}", mesh.listen_port());
    let mesh_public = spec.private_key.get_public().to_base64();
    run(
        "ip",
        &[
            "netns",
            "exec",
            &bed.ns,
            "wg",
            "set",
            &wg_iface,
            "peer",
            &mesh_public,
            "endpoint",
            &mesh_endpoint,
            "persistent-keepalive",
            "1",
        ],
    )
    .expect("point wireguard-go at the mesh");
    // A repeated, unchanged peer set (management resends) must not drop the session.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        mesh.set_peers(std::slice::from_ref(&peer)).unwrap();
        let peers = mesh.peers();
        if peers
            .first()
            .is_some_and(|p| p.last_handshake.is_some() && p.rx_bytes > 0)
            || Instant::now() > deadline
        {
            break peers;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let reported = status.first().expect("one peer");
    assert!(
        reported.last_handshake.is_some(),
        "handshake seen: {reported:?}"
    );
    assert_eq!(reported.endpoint.map(|e| e.ip()), Some(bed.endpoint.ip()));
    let local = mesh.bridge(echo_target()).expect("bridge");
    echo_through(local, 256 * 1024);
}
