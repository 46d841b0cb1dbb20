//! The smoltcp device: IP packets leave through boringtun and a UDP socket, and arrive from
//! them through a bounded queue.
//!
//! Outgoing packets are encrypted and sent inside the transmit token, so nothing queues on the
//! way out; when the UDP socket's buffer is full the packet is dropped and TCP retransmits it.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::time::Instant as NetInstant;

use super::peers::PeerTable;
use super::{RX_QUEUE, TUNNEL_MTU};

/// Largest UDP datagram we read; WireGuard peers send at most MTU + 32, this leaves headroom
/// for peers configured with a bigger MTU than ours.
const MAX_DATAGRAM: usize = 65535;
/// After a handshake completes boringtun releases the packets it held (at most 256).
const MAX_FLUSH: usize = 300;

pub(super) struct WgDevice {
    rx: RxQueue,
    pub(super) wire: Wire,
    /// Scratch: the datagram being read, and its decrypted content.
    datagram: Box<[u8]>,
    plain: Box<[u8]>,
}

/// Decrypted packets for smoltcp, with spare buffers to avoid an allocation per packet.
struct RxQueue {
    queue: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

/// The sending half: sessions, the socket and the encryption scratch buffer.
pub(super) struct Wire {
    pub(super) peers: PeerTable,
    pub(super) udp: UdpSocket,
    ip: Vec<u8>,
    sealed: Box<[u8]>,
    pub(super) dropped: u64,
}

// === impl WgDevice ===

impl WgDevice {
    pub(super) fn new(peers: PeerTable, udp: UdpSocket) -> Self {
        WgDevice {
            rx: RxQueue {
                queue: VecDeque::with_capacity(RX_QUEUE),
                spare: Vec::with_capacity(RX_QUEUE),
            },
            wire: Wire {
                peers,
                udp,
                ip: Vec::with_capacity(TUNNEL_MTU),
                sealed: vec![0; MAX_DATAGRAM + 64].into_boxed_slice(),
                dropped: 0,
            },
            datagram: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            plain: vec![0; MAX_DATAGRAM].into_boxed_slice(),
        }
    }

    /// Reads up to `budget` datagrams, stopping early when smoltcp's queue is full (the kernel
    /// socket buffer then holds the rest). Returns how many were read.
    pub(super) fn receive_datagrams(&mut self, budget: usize) -> usize {
        let mut read = 0;
        while read < budget && self.rx.queue.len() < RX_QUEUE {
            let (len, from) = match self.wire.udp.recv_from(&mut self.datagram) {
                Ok(got) => got,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they are no reason to stop.
                    tracing::trace!(error = %e, "mesh UDP receive failed");
                    read += 1;
                    continue;
                }
            };
            read += 1;
            self.handle_datagram(len, from);
        }
        read
    }

    fn handle_datagram(&mut self, len: usize, from: SocketAddr) {
        let datagram = &self.datagram[..len];
        let Some(slot) = self.wire.peers.for_datagram(datagram) else {
            tracing::trace!(%from, "mesh datagram from no known peer dropped");
            return;
        };
        let Some(peer) = self.wire.peers.peers.get_mut(slot) else {
            return;
        };
        let udp = &self.wire.udp;
        let wire_len = datagram.len() as u64;
        let (source, packet) =
            match peer
                .tunn
                .decapsulate(Some(from.ip()), datagram, &mut self.plain)
            {
                TunnResult::Done => {
                    peer.received += wire_len;
                    peer.last_received = Some(std::time::Instant::now());
                    peer.endpoint = Some(from);
                    return;
                }
                TunnResult::Err(e) => {
                    tracing::trace!(%from, error = ?e, "mesh datagram rejected");
                    return;
                }
                TunnResult::WriteToNetwork(reply) => {
                    let _ = send(udp, reply, from);
                    // A completed handshake releases the packets boringtun held meanwhile.
                    for _ in 0..MAX_FLUSH {
                        match peer.tunn.decapsulate(None, &[], &mut self.plain) {
                            TunnResult::WriteToNetwork(queued) => {
                                send(udp, queued, from);
                            }
                            _ => break,
                        }
                    }
                    peer.received += wire_len;
                    peer.last_received = Some(std::time::Instant::now());
                    peer.endpoint = Some(from);
                    return;
                }
                TunnResult::WriteToTunnelV4(packet, source) => (IpAddr::V4(source), packet),
                TunnResult::WriteToTunnelV6(packet, source) => (IpAddr::V6(source), packet),
            };
        peer.received += wire_len;
        peer.last_received = Some(std::time::Instant::now());
        peer.endpoint = Some(from);
        if !peer.allows(source) {
            tracing::trace!(%source, "mesh packet from outside the peer's allowed IPs dropped");
            return;
        }
        let mut buf = self.rx.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(packet);
        self.rx.queue.push_back(buf);
    }

    /// Runs boringtun's timers (handshake retries, keepalives, rekeying) for every peer.
    pub(super) fn tick(&mut self) {
        let wire = &mut self.wire;
        for peer in &mut wire.peers.peers {
            match peer.tunn.update_timers(&mut wire.sealed) {
                TunnResult::WriteToNetwork(packet) => {
                    if let Some(endpoint) = peer.endpoint {
                        send(&wire.udp, packet, endpoint);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => tracing::debug!(error = ?e, "mesh timer error"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
    }
}

impl phy::Device for WgDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: NetInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let packet = self.rx.queue.pop_front()?;
        Some((
            RxToken {
                packet,
                spare: &mut self.rx.spare,
            },
            TxToken {
                wire: &mut self.wire,
            },
        ))
    }

    fn transmit(&mut self, _now: NetInstant) -> Option<TxToken<'_>> {
        Some(TxToken {
            wire: &mut self.wire,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = TUNNEL_MTU;
        // WireGuard's AEAD already proved every received packet intact; verifying checksums
        // again would only cost time. Outgoing ones are still computed for the peer's stack.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps
    }
}

pub(super) struct RxToken<'a> {
    packet: Vec<u8>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let RxToken { packet, spare } = self;
        let result = f(&packet);
        if spare.len() < RX_QUEUE {
            spare.push(packet);
        }
        result
    }
}

pub(super) struct TxToken<'a> {
    wire: &'a mut Wire,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut ip = std::mem::take(&mut self.wire.ip);
        ip.clear();
        ip.resize(len, 0);
        let result = f(&mut ip);
        self.wire.seal_and_send(&ip);
        self.wire.ip = ip;
        result
    }
}

// === impl Wire ===

impl Wire {
    fn seal_and_send(&mut self, packet: &[u8]) {
        let Some(slot) = Tunn::dst_address(packet).and_then(|dst| self.peers.route(dst)) else {
            self.dropped += 1;
            return;
        };
        let Some(peer) = self.peers.peers.get_mut(slot) else {
            return;
        };
        match peer.tunn.encapsulate(packet, &mut self.sealed) {
            TunnResult::WriteToNetwork(sealed) => match peer.endpoint {
                Some(endpoint) => {
                    if !send(&self.udp, sealed, endpoint) {
                        self.dropped += 1;
                    }
                }
                // Nowhere to send until the peer reaches us first; boringtun keeps the packet
                // queued and retries the handshake from its timers.
                None => self.dropped += 1,
            },
            TunnResult::Err(e) => tracing::debug!(error = ?e, "mesh encapsulation failed"),
            _ => {}
        }
    }
}

/// Sends one datagram; false when it had to be dropped (full socket buffer, unreachable).
fn send(udp: &UdpSocket, datagram: &[u8], to: SocketAddr) -> bool {
    match udp.send_to(datagram, to) {
        Ok(_) => true,
        Err(e) => {
            tracing::trace!(%to, error = %e, "mesh UDP send failed");
            false
        }
    }
}
