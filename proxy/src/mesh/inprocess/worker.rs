//! The mesh thread: one loop that owns the stack, the sessions and every bridged socket.
//!
//! Each round: apply commands, wait (poll(2)) on the UDP socket, the wake-up socket, the
//! bridge listeners and the loopback streams, then move packets and bytes, and run timers.
//! The wait is zero while anything moved and otherwise at most [`TICK`], so the loop neither
//! spins when idle nor sleeps past a timer or a stop request.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::bridge::Conn;
use super::device::WgDevice;
use super::peers::PeerTable;
use super::poller::{Poller, READ};
use super::ports::PortAllocator;
use super::{Command, InProcessSpec, MAX_CONNECTIONS, Shared, TCP_BUFFER, TCP_SEND_BUFFER, lock};

/// WireGuard timers and status publication run this often; also the longest wait.
const TICK: Duration = Duration::from_millis(100);
/// Datagrams read per round before the stack gets to run.
const DATAGRAM_BUDGET: usize = 256;
/// Connections accepted per listener per round.
const ACCEPT_BUDGET: usize = 64;
/// Commands applied per round.
const COMMAND_BUDGET: usize = 64;
/// An established connection whose data goes unacknowledged this long is aborted. Generous:
/// under loss smoltcp's retransmissions back off, and a live connection must survive that.
const UNACKED_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);
/// A connection whose bytes have waited this long for an acknowledgement while its peer sent
/// nothing at all (a live peer acknowledges, or at least sends its keepalive) is given up at
/// once: a peer that went away must turn into an error (502) quickly, not a request hanging
/// for a minute. Matches the device backends' TCP_USER_TIMEOUT.
const PEER_GONE_AFTER: Duration = Duration::from_secs(5);
/// Kernel socket buffers for the WireGuard UDP socket: bursts wait here, not in our memory.
const UDP_BUFFER: usize = 4 * 1024 * 1024;
/// A listener whose accept failed (e.g. out of descriptors) rests this long: it stays readable,
/// and polling it again at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(super) struct Worker {
    iface: Interface,
    device: WgDevice,
    sockets: SocketSet<'static>,
    address: IpAddr,
    bridges: HashMap<SocketAddr, Listener>,
    /// Kept apart from `bridges`: cooling ports must outlive a closed and reopened bridge.
    ports: HashMap<SocketAddr, PortAllocator>,
    conns: Vec<Conn>,
    commands: Receiver<Command>,
    wake: UnixDatagram,
    shared: Arc<Shared>,
    poller: Poller,
    epoch: Instant,
    next_tick: Instant,
    seed: u64,
}

impl Worker {
    pub(super) fn new(
        spec: &InProcessSpec,
        udp: UdpSocket,
        wake: UnixDatagram,
        commands: Receiver<Command>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Worker> {
        udp.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        let sock = socket2::SockRef::from(&udp);
        // Best effort: the kernel caps these at rmem_max/wmem_max, which is still fine.
        let _ = sock.set_recv_buffer_size(UDP_BUFFER);
        let _ = sock.set_send_buffer_size(UDP_BUFFER);

        let seed = random_seed();
        let mut device = WgDevice::new(PeerTable::new(&spec.private_key, seed), udp);
        let epoch = Instant::now();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut device, NetInstant::ZERO);
        let address = spec.address.addr();
        let cidr = IpCidr::new(IpAddress::from(address), spec.address.prefix_len());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(cidr);
        });
        // With Medium::Ip the device takes every packet; the gateway is never looked at, but
        // smoltcp needs a route to consider targets outside our own prefix reachable.
        let routed = match address {
            IpAddr::V4(v4) => iface.routes_mut().add_default_ipv4_route(v4).is_ok(),
            IpAddr::V6(v6) => iface.routes_mut().add_default_ipv6_route(v6).is_ok(),
        };
        if !routed {
            return Err(std::io::Error::other(
                "cannot add the default route to the stack",
            ));
        }
        Ok(Worker {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            address,
            bridges: HashMap::new(),
            ports: HashMap::new(),
            conns: Vec::new(),
            commands,
            wake,
            shared,
            poller: Poller::default(),
            epoch,
            next_tick: epoch,
            seed,
        })
    }

    pub(super) fn run(mut self) {
        let mut busy = true;
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            self.apply_commands();
            let timeout = if busy {
                Duration::ZERO
            } else {
                self.wait_time(now)
            };
            let slots = self.register(now);
            self.poller.wait(timeout);
            let now = Instant::now();
            busy = self.round(&slots, now);
            if now >= self.next_tick {
                self.device.tick();
                self.abort_where_the_peer_is_gone(now);
                self.publish_status();
                self.ports.retain(|_, ports| !ports.is_idle(now));
                self.next_tick = now + TICK;
            }
        }
        // Dropping the worker closes every listener and loopback stream.
        tracing::debug!(connections = self.conns.len(), "mesh worker stopping");
    }

    fn round(&mut self, slots: &Slots, now: Instant) -> bool {
        let mut busy = false;
        if self.poller.readable(slots.wake) {
            let mut drain = [0u8; 64];
            for _ in 0..COMMAND_BUDGET {
                if self.wake.recv(&mut drain).is_err() {
                    break;
                }
            }
            busy = true;
        }
        if self.poller.readable(slots.udp) {
            busy |= self.device.receive_datagrams(DATAGRAM_BUDGET) > 0;
        }
        for (target, slot) in &slots.listeners {
            if self.poller.readable(*slot) {
                busy |= self.accept(*target, now);
            }
        }
        self.poll_stack(now);
        for (i, conn) in self.conns.iter_mut().enumerate() {
            let readable = slots
                .conns
                .get(i)
                .is_some_and(|slot| slot.is_some_and(|s| self.poller.readable(s)));
            let sock = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            busy |= conn.pump(sock, readable, now);
        }
        self.poll_stack(now);
        self.reap(now);
        busy
    }

    fn poll_stack(&mut self, now: Instant) {
        let at = self.net_now(now);
        self.iface.poll(at, &mut self.device, &mut self.sockets);
    }

    fn net_now(&self, now: Instant) -> NetInstant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        NetInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn wait_time(&mut self, now: Instant) -> Duration {
        let until_tick = self.next_tick.saturating_duration_since(now);
        let at = self.net_now(now);
        let stack = self
            .iface
            .poll_delay(at, &self.sockets)
            .map_or(TICK, |d| Duration::from_micros(d.total_micros()));
        until_tick.min(stack).min(TICK)
    }

    /// Registers every descriptor with the poller; the slots say which is which.
    fn register(&mut self, now: Instant) -> Slots {
        self.poller.clear();
        let wake = self.poller.add(&self.wake, READ);
        let udp = self.poller.add(&self.device.wire.udp, READ);
        let listeners = self
            .bridges
            .iter()
            .filter(|(_, l)| l.paused_until.is_none_or(|until| now >= until))
            .map(|(target, l)| (*target, self.poller.add(&l.listener, READ)))
            .collect();
        let conns = self
            .conns
            .iter()
            .map(|conn| {
                let sock = self.sockets.get::<tcp::Socket>(conn.handle);
                let events = conn.interest(sock);
                (events != 0).then(|| self.poller.add(conn.stream(), events))
            })
            .collect();
        Slots {
            wake,
            udp,
            listeners,
            conns,
        }
    }

    fn apply_commands(&mut self) {
        for _ in 0..COMMAND_BUDGET {
            let Ok(command) = self.commands.try_recv() else {
                return;
            };
            match command {
                Command::SetPeers(peers) => {
                    self.device.wire.peers.set(&peers);
                    self.publish_status();
                    tracing::debug!(peers = peers.len(), "mesh peers updated");
                }
                Command::AddBridge(target, listener) => {
                    let listener = Listener {
                        listener,
                        paused_until: None,
                    };
                    self.bridges.insert(target, listener);
                }
                Command::CloseBridge(target) => self.close_bridge(target),
            }
        }
    }

    fn abort_where_the_peer_is_gone(&mut self, now: Instant) {
        for conn in self.conns.iter_mut().filter(|c| !c.finished) {
            let sock = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            if sock.send_queue() == 0 {
                conn.unacked_since = None;
                continue;
            }
            let waiting = *conn.unacked_since.get_or_insert(now);
            let silent = self.device.wire.peers.silent_for(conn.target.ip(), now);
            if now.saturating_duration_since(waiting) >= PEER_GONE_AFTER
                && silent.is_none_or(|s| s >= PEER_GONE_AFTER)
            {
                tracing::debug!(target = %conn.target, "the target's peer went silent; connection aborted");
                sock.abort();
                conn.reset_client();
            }
        }
    }

    fn close_bridge(&mut self, target: SocketAddr) {
        self.bridges.remove(&target);
        for conn in self.conns.iter_mut().filter(|c| c.target == target) {
            self.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
            conn.reset_client();
        }
        tracing::debug!(%target, "mesh bridge closed");
    }

    /// Accepts waiting clients of one bridge and starts their connections to the target.
    fn accept(&mut self, target: SocketAddr, now: Instant) -> bool {
        let mut accepted = false;
        for _ in 0..ACCEPT_BUDGET {
            let Some(listener) = self.bridges.get_mut(&target) else {
                break;
            };
            let stream = match listener.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // EMFILE and friends: the client stays in the backlog until we recover.
                    tracing::warn!(%target, error = %e, "mesh bridge accept failed");
                    listener.paused_until = Some(now + ACCEPT_BACKOFF);
                    break;
                }
            };
            accepted = true;
            if let Err(reason) = self.connect(target, stream, now) {
                tracing::warn!(%target, reason, "mesh bridge connection refused");
            }
        }
        accepted
    }

    fn connect(
        &mut self,
        target: SocketAddr,
        stream: TcpStream,
        now: Instant,
    ) -> Result<(), &'static str> {
        let refuse = |stream: TcpStream, reason| {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            Err(reason)
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            return refuse(stream, "too many bridged connections");
        }
        if self.device.wire.peers.route(target.ip()).is_none() {
            return refuse(stream, "no peer routes the target");
        }
        if stream.set_nonblocking(true).is_err() {
            return refuse(stream, "cannot make the client socket non-blocking");
        }
        let _ = stream.set_nodelay(true);
        let seed = self.seed ^ hash_target(target);
        let ports = self
            .ports
            .entry(target)
            .or_insert_with(|| PortAllocator::new(seed));
        let Some(port) = ports.allocate(now) else {
            return refuse(stream, "no free local port for the target");
        };
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_SEND_BUFFER]),
        );
        // The client's own stack already coalesces; Nagle here would only add latency.
        sock.set_nagle_enabled(false);
        sock.set_timeout(Some(UNACKED_TIMEOUT));
        let local = (IpAddress::from(self.address), port);
        if sock.connect(self.iface.context(), target, local).is_err() {
            ports.release(port, now);
            return refuse(stream, "the stack cannot connect to the target");
        }
        let handle = self.sockets.add(sock);
        self.conns
            .push(Conn::new(target, port, handle, stream, now));
        Ok(())
    }

    /// Removes finished connections (after the stack had a poll to send their RST or FIN).
    fn reap(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.conns.len() {
            if self.conns[i].finished {
                let conn = self.conns.swap_remove(i);
                self.sockets.remove(conn.handle);
                if let Some(ports) = self.ports.get_mut(&conn.target) {
                    ports.release(conn.port, now);
                }
            } else {
                i += 1;
            }
        }
    }

    fn publish_status(&self) {
        *lock(&self.shared.status) = self.device.wire.peers.status();
    }
}

struct Listener {
    listener: TcpListener,
    paused_until: Option<Instant>,
}

/// Which poll slot belongs to which descriptor in this round.
struct Slots {
    wake: usize,
    udp: usize,
    listeners: Vec<(SocketAddr, usize)>,
    /// Per connection, in `conns` order; None when it waits for nothing this round.
    conns: Vec<Option<usize>>,
}

/// A per-start random value (ISNs, session indexes, first local ports) without a crypto RNG
/// dependency: std seeds `RandomState` from the OS once per process, and the clock varies it
/// per start. None of these values need to be secret, only unpredictable enough to not collide.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

fn hash_target(target: SocketAddr) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    std::hash::Hash::hash(&target, &mut hasher);
    hasher.finish()
}
