//! What the agent changes on the host: its WireGuard interface and, on a routing peer, its
//! nftables table. Blocking (runs `ip`, `nft`, may start wireguard-go); the caller runs it off
//! the async thread. Dropping it undoes everything.

use wireguard_control::Key;

use super::desired::Desired;
use super::firewall::{AgentFirewall, FirewallError};
use crate::mesh::device::{BackendChoice, DeviceError, DeviceSpec, PeerSpec, WgDevice};
use crate::mesh::preshared_key::PresharedKey;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("WireGuard interface: {0}")]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

pub struct AgentNet {
    interface: String,
    backend: BackendChoice,
    key: Key,
    preshared_key: Option<PresharedKey>,
    // Field order is drop order: the rules go before the interface they name.
    firewall: AgentFirewall,
    /// The interface and the address it was created with.
    device: Option<(WgDevice, ipnet::IpNet)>,
}

/// What was applied, for the log line.
pub struct Applied {
    pub interface: String,
    pub backend: String,
    pub address: std::net::IpAddr,
    pub proxies: usize,
    pub routed: usize,
    pub listen_port: u16,
}

impl AgentNet {
    pub fn new(
        interface: &str,
        backend: BackendChoice,
        key: Key,
        preshared_key: Option<PresharedKey>,
    ) -> AgentNet {
        AgentNet {
            interface: interface.to_string(),
            backend,
            key,
            preshared_key,
            firewall: AgentFirewall::new(interface),
            device: None,
        }
    }

    /// Makes the host match `desired`. The interface is created on first use and recreated
    /// when the tunnel address changes; peers and rules are replaced every time.
    pub fn apply(&mut self, desired: &Desired) -> Result<Applied, NetError> {
        let device = match self.device.take() {
            Some((device, address)) if address == desired.address => device,
            old => {
                // Same name: the old interface must be gone before the new one is made.
                drop(old);
                let spec = DeviceSpec {
                    name: self.interface.clone(),
                    private_key: self.key.clone(),
                    listen_port: 0,
                    address: desired.address,
                };
                WgDevice::create(&spec, self.backend)?
            }
        };
        let device = &self.device.insert((device, desired.address)).0;
        let peers: Vec<PeerSpec> = desired
            .peers
            .iter()
            .map(|p| PeerSpec {
                preshared_key: self.preshared_key.clone(),
                ..p.clone()
            })
            .collect();
        device.set_peers(&peers)?;
        self.firewall
            .apply(&desired.proxy_sources, &desired.routed)?;
        Ok(Applied {
            interface: device.name().to_string(),
            backend: device.backend().to_string(),
            address: desired.address.addr(),
            proxies: desired.peers.len(),
            routed: desired.routed.len(),
            listen_port: device.listen_port(),
        })
    }

    /// Removes the rules, then the interface.
    pub fn clear(&mut self) {
        if let Err(e) = self.firewall.remove() {
            tracing::warn!(table = %self.firewall.table(), error = %e, "cannot remove the agent's nftables table");
        }
        self.device = None;
    }
}
