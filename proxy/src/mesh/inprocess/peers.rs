//! The WireGuard peers of one mesh: a boringtun session each, found by public key (handshake
//! initiations), by our receiver index (everything else) and by allowed IPs (outgoing packets).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use wireguard_control::Key;

use super::{InProcessPeer, InProcessPeerStatus};
use crate::mesh::preshared_key::PresharedKey;

/// boringtun puts our index in the top 24 bits of every receiver index it hands out.
const INDEX_MASK: u32 = 0x00ff_ffff;

pub(super) struct Peer {
    pub(super) public_key: Key,
    pub(super) tunn: Box<Tunn>,
    pub(super) allowed_ips: Vec<IpNet>,
    /// Where packets go: the configured endpoint, then wherever valid packets came from.
    pub(super) endpoint: Option<SocketAddr>,
    /// The endpoint as last configured, so an unchanged config does not undo roaming.
    configured_endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    preshared_key: Option<PresharedKey>,
    index: u32,
    /// Bytes of authenticated datagrams from this peer, keepalives included (as the kernel and
    /// wireguard-go count): keepalives carry no payload, so boringtun's own count misses them,
    /// and they are how an idle peer shows it is alive.
    pub(super) received: u64,
    /// When the last authenticated datagram came: a peer that went away falls silent.
    pub(super) last_received: Option<std::time::Instant>,
}

impl Peer {
    /// WireGuard's cryptokey routing: a peer may only send from its allowed IPs.
    pub(super) fn allows(&self, source: IpAddr) -> bool {
        self.allowed_ips.iter().any(|net| net.contains(&source))
    }
}

pub(super) struct PeerTable {
    secret: StaticSecret,
    public: PublicKey,
    pub(super) peers: Vec<Peer>,
    by_index: HashMap<u32, usize>,
    by_key: HashMap<[u8; 32], usize>,
    /// Allowed IPs → peer slot, longest prefix first, so the first hit is the best one.
    routes: Vec<(IpNet, usize)>,
    next_index: u32,
}

// === impl PeerTable ===

impl PeerTable {
    pub(super) fn new(private_key: &Key, seed: u64) -> Self {
        let secret = StaticSecret::from(private_key.0);
        let public = PublicKey::from(&secret);
        PeerTable {
            secret,
            public,
            peers: Vec::new(),
            by_index: HashMap::new(),
            by_key: HashMap::new(),
            routes: Vec::new(),
            next_index: (seed as u32) & INDEX_MASK,
        }
    }

    /// Replaces the peer set, keeping the session (and learned endpoint) of every peer whose
    /// key stays, unless its keepalive or pre-shared key changed: boringtun fixes both at
    /// creation.
    pub(super) fn set(&mut self, wanted: &[InProcessPeer]) {
        let mut old: HashMap<[u8; 32], Peer> =
            self.peers.drain(..).map(|p| (p.public_key.0, p)).collect();
        let mut peers = Vec::with_capacity(wanted.len());
        for want in wanted {
            let peer = match old.remove(&want.public_key.0) {
                Some(mut kept)
                    if kept.keepalive == want.persistent_keepalive
                        && kept.preshared_key == want.preshared_key =>
                {
                    kept.allowed_ips.clone_from(&want.allowed_ips);
                    if kept.configured_endpoint != want.endpoint {
                        kept.configured_endpoint = want.endpoint;
                        if want.endpoint.is_some() {
                            kept.endpoint = want.endpoint;
                        }
                    }
                    kept
                }
                kept => {
                    let learned = kept.and_then(|k| k.endpoint);
                    let mut fresh = self.new_peer(want);
                    fresh.endpoint = want.endpoint.or(learned);
                    fresh
                }
            };
            peers.push(peer);
        }
        self.peers = peers;
        self.reindex();
    }

    fn new_peer(&mut self, want: &InProcessPeer) -> Peer {
        let index = self.free_index();
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(want.public_key.0),
            want.preshared_key.as_ref().map(|k| k.key().0),
            want.persistent_keepalive,
            index,
            None,
        );
        tracing::debug!(peer = %want.public_key.to_base64(), index, "mesh peer session created");
        Peer {
            public_key: want.public_key.clone(),
            tunn: Box::new(tunn),
            allowed_ips: want.allowed_ips.clone(),
            endpoint: want.endpoint,
            configured_endpoint: want.endpoint,
            keepalive: want.persistent_keepalive,
            preshared_key: want.preshared_key.clone(),
            index,
            received: 0,
            last_received: None,
        }
    }

    /// An index no kept peer uses. Bounded: there are far fewer peers than 2^24 indexes.
    fn free_index(&mut self) -> u32 {
        let used: std::collections::HashSet<u32> = self.peers.iter().map(|p| p.index).collect();
        for _ in 0..=used.len() {
            let candidate = self.next_index;
            self.next_index = (self.next_index + 1) & INDEX_MASK;
            if !used.contains(&candidate) {
                return candidate;
            }
        }
        self.next_index
    }

    fn reindex(&mut self) {
        self.by_index.clear();
        self.by_key.clear();
        self.routes.clear();
        for (slot, peer) in self.peers.iter().enumerate() {
            self.by_index.insert(peer.index, slot);
            self.by_key.insert(peer.public_key.0, slot);
            self.routes
                .extend(peer.allowed_ips.iter().map(|net| (net.trunc(), slot)));
        }
        self.routes
            .sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
    }

    /// How long the peer that carries `destination` has been silent; None when it never spoke.
    pub(super) fn silent_for(
        &self,
        destination: IpAddr,
        now: std::time::Instant,
    ) -> Option<std::time::Duration> {
        let peer = self.peers.get(self.route(destination)?)?;
        Some(now.saturating_duration_since(peer.last_received?))
    }

    /// The peer that carries packets to `destination`: longest allowed-IPs prefix wins.
    pub(super) fn route(&self, destination: IpAddr) -> Option<usize> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&destination))
            .map(|(_, slot)| *slot)
    }

    /// The peer an incoming datagram belongs to, or None for garbage and strangers.
    pub(super) fn for_datagram(&self, datagram: &[u8]) -> Option<usize> {
        match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&self.secret, &self.public, &init).ok()?;
                self.by_key.get(&half.peer_static_public).copied()
            }
            Packet::HandshakeResponse(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketCookieReply(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketData(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
        }
    }

    pub(super) fn status(&self) -> Vec<InProcessPeerStatus> {
        let now = SystemTime::now();
        self.peers
            .iter()
            .map(|peer| {
                let (since_handshake, tx, _, _, _) = peer.tunn.stats();
                InProcessPeerStatus {
                    public_key: peer.public_key.clone(),
                    last_handshake: since_handshake.and_then(|d| now.checked_sub(d)),
                    rx_bytes: peer.received,
                    tx_bytes: tx as u64,
                    endpoint: peer.endpoint,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(key: &Key, nets: &[&str]) -> InProcessPeer {
        InProcessPeer {
            public_key: key.clone(),
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
            endpoint: None,
            persistent_keepalive: None,
            preshared_key: None,
        }
    }

    #[test]
    fn longest_prefix_wins_and_sessions_survive_updates() {
        let a = Key::generate_private().get_public();
        let b = Key::generate_private().get_public();
        let mut table = PeerTable::new(&Key::generate_private(), 42);
        table.set(&[peer(&a, &["100.64.0.0/10"]), peer(&b, &["100.64.1.0/24"])]);
        assert_eq!(table.route("100.64.1.9".parse().unwrap()), Some(1));
        assert_eq!(table.route("100.64.2.9".parse().unwrap()), Some(0));
        assert_eq!(table.route("10.0.0.1".parse().unwrap()), None);

        let index_b = table.peers[1].index;
        table.peers[1].endpoint = Some("10.1.1.1:51820".parse().unwrap());
        table.set(&[peer(&b, &["100.64.1.0/24", "10.0.0.0/8"])]);
        assert_eq!(table.peers.len(), 1);
        assert_eq!(table.peers[0].index, index_b, "session kept");
        assert!(table.peers[0].endpoint.is_some(), "learned endpoint kept");
        assert_eq!(table.route("10.0.0.1".parse().unwrap()), Some(0));
    }

    #[test]
    fn a_changed_preshared_key_starts_a_new_session() {
        let a = Key::generate_private().get_public();
        let mut table = PeerTable::new(&Key::generate_private(), 7);
        table.set(&[peer(&a, &["100.64.0.2/32"])]);
        let plain = table.peers[0].index;
        let psk = PresharedKey::parse("X", Some(&Key::generate_preshared().to_base64()))
            .unwrap()
            .expect("set");
        let with_key = InProcessPeer {
            preshared_key: Some(psk),
            ..peer(&a, &["100.64.0.2/32"])
        };
        table.set(std::slice::from_ref(&with_key));
        let keyed = table.peers[0].index;
        assert_ne!(keyed, plain, "the key is fixed at creation: a new session");
        table.set(&[with_key]);
        assert_eq!(
            table.peers[0].index, keyed,
            "the same key keeps the session"
        );
    }
}
