//! What the data plane asks before it dials a target: does this account's mesh carry the
//! address, and how. Published by the mesh control task as a whole snapshot, read by workers
//! with one atomic load per dial.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;

/// How a worker reaches a target that the mesh carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Via {
    /// Not a mesh address (or a `direct_upstream` target): an ordinary socket.
    Direct,
    /// A WireGuard interface (kernel or TUN) of this account: the socket is bound to it, so two
    /// accounts with the same range and the same target address stay apart.
    Device(Arc<str>),
    /// The in-process backend: a loopback listener that forwards into the account's tunnel.
    Bridge(SocketAddr),
}

/// The outcome of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshDial {
    Via(Via),
    /// The mesh carries the address but cannot reach it now; answered at once (502).
    Unreachable(String),
}

/// One peer's networks and whether its tunnel is up.
#[derive(Debug, Clone)]
pub struct PeerRoute {
    pub name: String,
    /// Its WireGuard public key (base64): who an address of its networks stands for.
    pub public_key: Arc<str>,
    pub networks: Vec<IpNet>,
    pub up: bool,
}

/// What carries an account's tunnel traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carrier {
    /// A WireGuard interface (kernel or TUN) by name.
    Device(Arc<str>),
    /// The in-process backend, through per-target loopback bridges.
    InProcess,
}

/// One account's mesh as the data plane sees it.
#[derive(Debug, Clone)]
pub struct AccountRoutes {
    /// The account's tunnel range (the proxy's own address prefix).
    pub range: IpNet,
    /// The proxy's own tunnel address in the account.
    pub address: IpAddr,
    pub carrier: Carrier,
    pub peers: Vec<PeerRoute>,
    /// In-process backend: target → loopback bridge. Empty for the device backends.
    pub bridges: HashMap<SocketAddr, SocketAddr>,
}

impl AccountRoutes {
    /// The peer whose networks hold `ip`, by longest prefix (WireGuard's own rule).
    pub fn peer_for(&self, ip: IpAddr) -> Option<&PeerRoute> {
        self.peers
            .iter()
            .flat_map(|p| p.networks.iter().map(move |n| (n, p)))
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, p)| p)
    }

    /// True when the account's mesh carries `ip` (its range or a routed network).
    pub fn carries(&self, ip: IpAddr) -> bool {
        self.range.contains(&ip) || self.peer_for(ip).is_some()
    }
}

#[derive(Debug, Default)]
pub struct MeshSnapshot {
    pub accounts: HashMap<String, AccountRoutes>,
}

impl MeshSnapshot {
    /// How to dial `addr` for a service of `account`; `None`: not a mesh address.
    pub fn dial(&self, account: &str, addr: SocketAddr) -> Option<MeshDial> {
        let routes = self.accounts.get(account)?;
        let ip = addr.ip();
        if !routes.carries(ip) {
            return None;
        }
        let Some(peer) = routes.peer_for(ip) else {
            return Some(MeshDial::Unreachable(format!(
                "no peer of the mesh has the address {ip}"
            )));
        };
        if !peer.up {
            return Some(MeshDial::Unreachable(format!(
                "the WireGuard tunnel to peer {} is down",
                peer.name
            )));
        }
        match &routes.carrier {
            Carrier::Device(name) => Some(MeshDial::Via(Via::Device(name.clone()))),
            Carrier::InProcess => Some(match routes.bridges.get(&addr) {
                Some(bridge) => MeshDial::Via(Via::Bridge(*bridge)),
                None => MeshDial::Unreachable(format!("no in-process bridge to {addr} yet")),
            }),
        }
    }
}

/// The published snapshot.
#[derive(Default)]
pub struct MeshTable {
    current: ArcSwap<MeshSnapshot>,
}

impl MeshTable {
    /// Read on every dial: a guard, not an `Arc` clone, so workers do not contend on one
    /// reference count.
    pub fn load(&self) -> arc_swap::Guard<Arc<MeshSnapshot>> {
        self.current.load()
    }

    pub fn publish(&self, snapshot: MeshSnapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn account(carrier: Carrier, up: bool) -> AccountRoutes {
        AccountRoutes {
            range: net("100.64.0.0/10"),
            address: "100.64.0.1".parse().unwrap(),
            carrier,
            peers: vec![PeerRoute {
                name: "target".into(),
                public_key: Arc::from("key"),
                networks: vec![net("100.64.0.2/32"), net("10.20.0.0/24")],
                up,
            }],
            bridges: HashMap::new(),
        }
    }

    #[test]
    fn each_account_dials_its_own_device() {
        let mut snap = MeshSnapshot::default();
        snap.accounts
            .insert("a".into(), account(Carrier::Device("pcm-a".into()), true));
        snap.accounts
            .insert("b".into(), account(Carrier::Device("pcm-b".into()), true));
        let target: SocketAddr = "100.64.0.2:80".parse().expect("addr");
        assert_eq!(
            snap.dial("a", target),
            Some(MeshDial::Via(Via::Device("pcm-a".into())))
        );
        assert_eq!(
            snap.dial("b", target),
            Some(MeshDial::Via(Via::Device("pcm-b".into())))
        );
        // Not a mesh address, or an account without a mesh: dialed directly.
        assert_eq!(snap.dial("a", "127.0.0.1:80".parse().expect("addr")), None);
        assert_eq!(snap.dial("c", target), None);
        // A routed subnet goes through the peer that routes it.
        assert!(matches!(
            snap.dial("a", "10.20.0.9:80".parse().expect("addr")),
            Some(MeshDial::Via(Via::Device(_)))
        ));
    }

    #[test]
    fn a_down_peer_or_unknown_address_is_unreachable_at_once() {
        let mut snap = MeshSnapshot::default();
        snap.accounts
            .insert("a".into(), account(Carrier::Device("pcm-a".into()), false));
        assert!(matches!(
            snap.dial("a", "100.64.0.2:80".parse().expect("addr")),
            Some(MeshDial::Unreachable(m)) if m.contains("down")
        ));
        assert!(matches!(
            snap.dial("a", "100.64.0.77:80".parse().expect("addr")),
            Some(MeshDial::Unreachable(m)) if m.contains("no peer")
        ));
    }

    #[test]
    fn in_process_targets_go_through_their_bridge() {
        let mut routes = account(Carrier::InProcess, true);
        let target: SocketAddr = "100.64.0.2:80".parse().expect("addr");
        let bridge: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        routes.bridges.insert(target, bridge);
        let mut snap = MeshSnapshot::default();
        snap.accounts.insert("a".into(), routes);
        assert_eq!(
            snap.dial("a", target),
            Some(MeshDial::Via(Via::Bridge(bridge)))
        );
        assert!(matches!(
            snap.dial("a", "100.64.0.2:81".parse().expect("addr")),
            Some(MeshDial::Unreachable(_))
        ));
    }
}
