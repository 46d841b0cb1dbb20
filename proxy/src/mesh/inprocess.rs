//! In-process WireGuard (boringtun) with a userspace TCP/IP stack (smoltcp): needs no privilege
//! and no TUN device.
//!
//! The data plane never sees these internals. It reaches a mesh target through a **loopback
//! bridge** (the onetun/wireproxy idea): [`InProcessMesh::bridge`] opens a TCP listener on
//! `127.0.0.1:<ephemeral>` for one target, and every connection accepted there is carried as a
//! TCP connection from the tunnel address to the target over WireGuard, bytes both ways,
//! half-close propagated.
//!
//! One OS thread per mesh ([`worker`]) owns everything: the smoltcp interface, the WireGuard
//! sessions, the UDP socket and the bridged sockets. Handles talk to it through a bounded
//! command queue plus a wake-up socket, so no caller ever waits on the thread.
//!
//! Limits: [`MAX_CONNECTIONS`] bridged connections per mesh; per connection [`TCP_BUFFER`]
//! bytes to receive and [`TCP_SEND_BUFFER`] to send; [`RX_QUEUE`] decrypted packets waiting
//! for the stack. Only TCP is bridged.

mod bridge;
mod device;
mod peers;
mod poller;
mod ports;
mod worker;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use ipnet::IpNet;
use wireguard_control::Key;

use super::preshared_key::PresharedKey;

/// Upper bound on bridged connections alive at once, per mesh. Each holds two smoltcp buffers
/// (allocated zeroed, so pages are only touched as data flows) and one loopback socket.
pub const MAX_CONNECTIONS: usize = 4096;
/// Bytes of smoltcp receive buffer per connection: the window we offer the target.
pub const TCP_BUFFER: usize = 256 * 1024;
/// Bytes of smoltcp send buffer per connection. smoltcp is built without congestion control
/// here, so this also caps the bytes in flight: a bigger burst overflows the UDP receive
/// buffer of a userspace peer (wireguard-go in a fresh namespace gets 208 KiB) and the losses
/// then cost whole retransmission timeouts.
pub const TCP_SEND_BUFFER: usize = 64 * 1024;
/// Decrypted packets queued between WireGuard and smoltcp; UDP reading pauses when full, so
/// the kernel's socket buffer (and then the peer) absorbs bursts instead of our memory.
pub const RX_QUEUE: usize = 512;
/// The IP MTU of the tunnel: 1500 minus the WireGuard/UDP/IPv6 overhead, as wg-quick uses.
pub const TUNNEL_MTU: usize = 1420;
/// Commands (peer updates, bridge changes) that may wait for the worker at once.
const COMMAND_QUEUE: usize = 1024;

/// What [`InProcessMesh::start`] needs: our identity and tunnel address.
#[derive(Clone)]
pub struct InProcessSpec {
    pub private_key: Key,
    /// UDP port for WireGuard on 0.0.0.0; 0 picks a free one.
    pub listen_port: u16,
    /// Our address inside the mesh with its prefix, e.g. `100.64.0.1/10`.
    pub address: IpNet,
}

// By hand: `Key`'s own Debug prints the key, and this one holds a private key.
impl std::fmt::Debug for InProcessSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessSpec")
            .field("private_key", &"<redacted>")
            .field("listen_port", &self.listen_port)
            .field("address", &self.address)
            .finish()
    }
}

/// One WireGuard peer as the mesh should know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InProcessPeer {
    pub public_key: Key,
    pub allowed_ips: Vec<IpNet>,
    /// Where to send to first; replaced by wherever the peer's valid packets come from.
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<PresharedKey>,
}

/// A peer's state as last published by the worker (refreshed every timer tick).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InProcessPeerStatus {
    pub public_key: Key,
    pub last_handshake: Option<SystemTime>,
    /// Wire bytes of authenticated datagrams from the peer, keepalives included.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum InProcessError {
    #[error(
        "cannot bind the WireGuard UDP socket on 0.0.0.0:{port}: {source} — pick another port or 0"
    )]
    BindUdp { port: u16, source: std::io::Error },
    #[error("cannot open a loopback listener for mesh target {target}: {source}")]
    BindBridge {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the mesh worker: {0}")]
    Setup(std::io::Error),
    #[error("mesh target {0} is inside no peer's allowed IPs — add a peer that routes it first")]
    NoRoute(SocketAddr),
    #[error("mesh target {target} is {family}, but the tunnel address {address} is not")]
    FamilyMismatch {
        target: SocketAddr,
        family: &'static str,
        address: IpNet,
    },
    #[error("peer {0} is listed twice — every public key may appear once")]
    DuplicatePeer(String),
    #[error("the mesh worker has stopped — start the mesh again")]
    Stopped,
    #[error("the mesh worker is {0} commands behind — retry shortly")]
    Busy(usize),
}

/// A handle to a running in-process mesh. Cheap to clone; when the last clone is dropped the
/// worker thread stops and every bridge (listener and connection) is closed.
#[derive(Clone)]
pub struct InProcessMesh {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for InProcessMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessMesh")
            .field("address", &self.inner.address)
            .field("listen_port", &self.inner.listen_port)
            .finish_non_exhaustive()
    }
}

/// What the worker is asked to do. Applied in order.
enum Command {
    SetPeers(Vec<InProcessPeer>),
    AddBridge(SocketAddr, TcpListener),
    CloseBridge(SocketAddr),
}

/// State shared between handles and the worker.
struct Shared {
    stop: AtomicBool,
    status: Mutex<Vec<InProcessPeerStatus>>,
}

struct Inner {
    address: IpNet,
    listen_port: u16,
    commands: SyncSender<Command>,
    wake: UnixDatagram,
    shared: Arc<Shared>,
    /// The peer set as last given, to check bridge targets without asking the worker.
    routes: Mutex<Vec<IpNet>>,
    /// target → loopback listener address, so `bridge` is idempotent.
    bridges: Mutex<HashMap<SocketAddr, SocketAddr>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

// === impl InProcessMesh ===

impl InProcessMesh {
    /// Binds the WireGuard UDP socket on `0.0.0.0:listen_port` and starts the worker thread.
    pub fn start(spec: &InProcessSpec) -> Result<InProcessMesh, InProcessError> {
        let udp = UdpSocket::bind(("0.0.0.0", spec.listen_port)).map_err(|source| {
            InProcessError::BindUdp {
                port: spec.listen_port,
                source,
            }
        })?;
        let listen_port = udp.local_addr().map_err(InProcessError::Setup)?.port();
        let (wake_tx, wake_rx) = UnixDatagram::pair().map_err(InProcessError::Setup)?;
        wake_tx
            .set_nonblocking(true)
            .map_err(InProcessError::Setup)?;
        let (commands, command_rx) = sync_channel(COMMAND_QUEUE);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            status: Mutex::new(Vec::new()),
        });
        let worker = worker::Worker::new(spec, udp, wake_rx, command_rx, Arc::clone(&shared))
            .map_err(InProcessError::Setup)?;
        let thread = std::thread::Builder::new()
            // "wg-inproc-65535" is exactly the 15 bytes Linux keeps of a thread name.
            .name(format!("wg-inproc-{listen_port}"))
            .spawn(move || worker.run())
            .map_err(InProcessError::Setup)?;
        tracing::info!(address = %spec.address, listen_port, "in-process mesh started");
        Ok(InProcessMesh {
            inner: Arc::new(Inner {
                address: spec.address,
                listen_port,
                commands,
                wake: wake_tx,
                shared,
                routes: Mutex::new(Vec::new()),
                bridges: Mutex::new(HashMap::new()),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The UDP port WireGuard listens on (the chosen one when the spec said 0).
    pub fn listen_port(&self) -> u16 {
        self.inner.listen_port
    }

    /// Replaces the peer set. Peers whose key stays keep their session; a changed keepalive
    /// re-creates that peer's session (boringtun cannot change it in place).
    pub fn set_peers(&self, peers: &[InProcessPeer]) -> Result<(), InProcessError> {
        let mut seen = std::collections::HashSet::new();
        for peer in peers {
            if !seen.insert(peer.public_key.0) {
                return Err(InProcessError::DuplicatePeer(peer.public_key.to_base64()));
            }
        }
        let routes = peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect();
        self.inner.send(Command::SetPeers(peers.to_vec()))?;
        *lock(&self.inner.routes) = routes;
        Ok(())
    }

    /// The peers as the worker last published them (at most one timer tick old).
    pub fn peers(&self) -> Vec<InProcessPeerStatus> {
        lock(&self.inner.shared.status).clone()
    }

    /// The loopback address whose connections reach `target` through the mesh; the listener is
    /// opened on the first call for a target and reused after.
    pub fn bridge(&self, target: SocketAddr) -> Result<SocketAddr, InProcessError> {
        let mut bridges = lock(&self.inner.bridges);
        if let Some(local) = bridges.get(&target) {
            return Ok(*local);
        }
        self.check_target(target)?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| InProcessError::BindBridge { target, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| InProcessError::BindBridge { target, source })?;
        self.inner.send(Command::AddBridge(target, listener))?;
        bridges.insert(target, local);
        tracing::debug!(%target, %local, "mesh bridge opened");
        Ok(local)
    }

    /// Closes the listener for `target` and aborts the connections it carries.
    pub fn close_bridge(&self, target: SocketAddr) {
        let removed = lock(&self.inner.bridges).remove(&target).is_some();
        if removed && let Err(e) = self.inner.send(Command::CloseBridge(target)) {
            // The worker is gone (then its listeners are too) or swamped; the listener would
            // stay open only until the worker catches up with a later close or stops.
            tracing::warn!(%target, error = %e, "mesh bridge close not delivered");
        }
    }

    fn check_target(&self, target: SocketAddr) -> Result<(), InProcessError> {
        let ip = target.ip();
        let same_family = matches!(
            (ip, self.inner.address.addr()),
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_))
        );
        if !same_family {
            return Err(InProcessError::FamilyMismatch {
                target,
                family: if ip.is_ipv4() { "IPv4" } else { "IPv6" },
                address: self.inner.address,
            });
        }
        if lock(&self.inner.routes).iter().any(|net| net.contains(&ip)) {
            Ok(())
        } else {
            Err(InProcessError::NoRoute(target))
        }
    }
}

// === impl Inner ===

impl Inner {
    fn send(&self, command: Command) -> Result<(), InProcessError> {
        match self.commands.try_send(command) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(InProcessError::Busy(COMMAND_QUEUE)),
            Err(TrySendError::Disconnected(_)) => return Err(InProcessError::Stopped),
        }
        self.wake_worker();
        Ok(())
    }

    fn wake_worker(&self) {
        // A full wake socket already holds a pending wake-up, so losing this one is harmless.
        let _ = self.wake.send(&[1]);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake_worker();
        if let Some(thread) = lock(&self.thread).take() {
            // Bounded: the worker checks `stop` at least every timer tick.
            if thread.join().is_err() {
                tracing::error!(listen_port = self.listen_port, "mesh worker panicked");
            }
        }
        tracing::info!(listen_port = self.listen_port, "in-process mesh stopped");
    }
}

/// Locks, ignoring poisoning: every value behind these mutexes is replaced whole, so a panic
/// elsewhere cannot leave one half-written.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
