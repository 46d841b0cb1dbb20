//! One account's WireGuard, whichever backend carries it: the same operations over a
//! kernel/TUN interface or the in-process stack.

use std::net::SocketAddr;
use std::time::SystemTime;

use ipnet::IpNet;
use wireguard_control::Key;

use super::device::{self, DeviceSpec, PeerSpec, WgDevice};
use super::inprocess::{InProcessMesh, InProcessPeer, InProcessSpec};
use super::preshared_key::PresharedKey;
use super::table::Carrier;

/// The backend picked at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Tun,
    InProcess,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Kernel => "kernel",
            Backend::Tun => "tun (wireguard-go)",
            Backend::InProcess => "in-process (boringtun + smoltcp)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error(transparent)]
    InProcess(#[from] super::inprocess::InProcessError),
}

/// A peer as every backend takes it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub public_key: Key,
    pub allowed_ips: Vec<IpNet>,
    pub preshared_key: Option<PresharedKey>,
}

/// A peer's state as every backend reports it.
#[derive(Debug, Clone)]
pub struct PeerState {
    pub public_key: Key,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub endpoint: Option<SocketAddr>,
}

pub enum Tunnel {
    Device(WgDevice),
    InProcess(InProcessMesh),
}

impl Tunnel {
    /// Blocking: spawns or configures an interface.
    pub fn create(
        backend: Backend,
        name: &str,
        private_key: Key,
        listen_port: u16,
        address: IpNet,
    ) -> Result<Tunnel, TunnelError> {
        Ok(match backend {
            Backend::Kernel | Backend::Tun => {
                let choice = if backend == Backend::Kernel {
                    device::BackendChoice::Kernel
                } else {
                    device::BackendChoice::Tun
                };
                let spec = DeviceSpec {
                    name: name.to_string(),
                    private_key,
                    listen_port,
                    address,
                };
                Tunnel::Device(WgDevice::create(&spec, choice)?)
            }
            Backend::InProcess => Tunnel::InProcess(InProcessMesh::start(&InProcessSpec {
                private_key,
                listen_port,
                address,
            })?),
        })
    }

    pub fn listen_port(&self) -> u16 {
        match self {
            Tunnel::Device(d) => d.listen_port(),
            Tunnel::InProcess(m) => m.listen_port(),
        }
    }

    pub fn carrier(&self) -> Carrier {
        match self {
            Tunnel::Device(d) => Carrier::Device(d.name().into()),
            Tunnel::InProcess(_) => Carrier::InProcess,
        }
    }

    /// The interface name, for the firewall; none for the in-process backend.
    pub fn interface(&self) -> Option<&str> {
        match self {
            Tunnel::Device(d) => Some(d.name()),
            Tunnel::InProcess(_) => None,
        }
    }

    /// Replaces the peer set. The proxy answers handshakes and never dials peers itself: its
    /// peers learn its endpoint from management and keep the path open with keepalives.
    pub fn set_peers(&self, peers: &[Peer]) -> Result<(), TunnelError> {
        match self {
            Tunnel::Device(d) => {
                let specs: Vec<PeerSpec> = peers
                    .iter()
                    .map(|p| PeerSpec {
                        public_key: p.public_key.clone(),
                        allowed_ips: p.allowed_ips.clone(),
                        endpoint: None,
                        persistent_keepalive: None,
                        preshared_key: p.preshared_key.clone(),
                    })
                    .collect();
                d.set_peers(&specs)?;
            }
            Tunnel::InProcess(m) => {
                let specs: Vec<InProcessPeer> = peers
                    .iter()
                    .map(|p| InProcessPeer {
                        public_key: p.public_key.clone(),
                        allowed_ips: p.allowed_ips.clone(),
                        endpoint: None,
                        persistent_keepalive: None,
                        preshared_key: p.preshared_key.clone(),
                    })
                    .collect();
                m.set_peers(&specs)?;
            }
        }
        Ok(())
    }

    pub fn peers(&self) -> Result<Vec<PeerState>, TunnelError> {
        Ok(match self {
            Tunnel::Device(d) => d
                .peers()?
                .into_iter()
                .map(|p| PeerState {
                    public_key: p.public_key,
                    last_handshake: p.last_handshake,
                    rx_bytes: p.rx_bytes,
                    endpoint: p.endpoint,
                })
                .collect(),
            Tunnel::InProcess(m) => m
                .peers()
                .into_iter()
                .map(|p| PeerState {
                    public_key: p.public_key,
                    last_handshake: p.last_handshake,
                    rx_bytes: p.rx_bytes,
                    endpoint: p.endpoint,
                })
                .collect(),
        })
    }

    /// In-process only: the loopback bridge for `target` (created on first use).
    pub fn bridge(&self, target: SocketAddr) -> Option<SocketAddr> {
        match self {
            Tunnel::Device(_) => None,
            Tunnel::InProcess(m) => match m.bridge(target) {
                Ok(addr) => Some(addr),
                Err(e) => {
                    tracing::warn!(%target, error = %e, "no in-process bridge to the target");
                    None
                }
            },
        }
    }

    pub fn close_bridge(&self, target: SocketAddr) {
        if let Tunnel::InProcess(m) = self {
            m.close_bridge(target);
        }
    }
}

/// Picks the best backend this process can use; the reason is shown in `/healthz`.
pub fn pick(choice: super::settings::BackendChoice) -> Result<(Backend, String), String> {
    use super::settings::BackendChoice as C;
    let tun_usable = || -> Result<(), String> {
        use crate::ebpf::privileges::{CAP_NET_ADMIN, effective_capabilities};
        if effective_capabilities().is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) == 0) {
            return Err("no CAP_NET_ADMIN".to_string());
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun".to_string());
        }
        if !program_on_path("wireguard-go") {
            return Err("wireguard-go is not installed".to_string());
        }
        Ok(())
    };
    match choice {
        C::Off => Err("off (PORTCULLIS_MESH_BACKEND=off)".to_string()),
        C::Kernel => device::kernel_wireguard_available().map(|()| {
            (
                Backend::Kernel,
                "chosen by PORTCULLIS_MESH_BACKEND".to_string(),
            )
        }),
        C::Tun => tun_usable().map(|()| {
            (
                Backend::Tun,
                "chosen by PORTCULLIS_MESH_BACKEND".to_string(),
            )
        }),
        C::InProcess => Ok((
            Backend::InProcess,
            "chosen by PORTCULLIS_MESH_BACKEND".to_string(),
        )),
        C::Auto => {
            let kernel = match device::kernel_wireguard_available() {
                Ok(()) => return Ok((Backend::Kernel, "kernel WireGuard available".into())),
                Err(reason) => reason,
            };
            match tun_usable() {
                Ok(()) => Ok((Backend::Tun, kernel)),
                Err(tun) => Ok((Backend::InProcess, format!("{kernel}; TUN: {tun}"))),
            }
        }
    }
}

fn program_on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}
