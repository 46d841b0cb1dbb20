//! A WireGuard network interface owned by this process (kernel or `wireguard-go` on TUN).
//!
//! Creating a [`WgDevice`] brings the interface up with its key, port and address; dropping it
//! removes the interface, its routes and (for TUN) the `wireguard-go` child. WireGuard itself is
//! configured through `wireguard-control`; addresses, links and routes through `ip`.

pub mod cmd;
mod routes;
mod wggo;

use std::collections::{BTreeSet, HashSet};
use std::ffi::CString;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use super::preshared_key::PresharedKey;
use cmd::CmdError;
use wggo::WgGo;

/// What carries an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceBackend {
    Kernel,
    Tun,
}

impl std::fmt::Display for DeviceBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceBackend::Kernel => "kernel",
            DeviceBackend::Tun => "tun (wireguard-go)",
        })
    }
}

/// Which backend to create an interface with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Kernel WireGuard where the module works, else TUN.
    Auto,
    Kernel,
    Tun,
}

#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// At most 15 bytes, unique on the machine (see [`unique_interface_name`]).
    pub name: String,
    pub private_key: Key,
    /// 0 = a random free port (read back with [`WgDevice::listen_port`]).
    pub listen_port: u16,
    /// This interface's tunnel address with the mesh's prefix length, e.g. 100.64.0.1/10.
    pub address: IpNet,
}

#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub public_key: Key,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<PresharedKey>,
}

#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub public_key: Key,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("invalid interface name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("{0} — use the TUN backend (wireguard-go) or load the wireguard module")]
    KernelUnavailable(String),
    #[error("cannot start `wireguard-go -f {name}`: {source} — is wireguard-go installed?")]
    SpawnWireguardGo {
        name: String,
        source: std::io::Error,
    },
    #[error(
        "wireguard-go for {name} exited ({status}) before it was ready — is /dev/net/tun there and CAP_NET_ADMIN granted?"
    )]
    WireguardGoExited { name: String, status: String },
    #[error("wireguard-go for {name} did not open its UAPI socket within {waited:?}")]
    NotReady { name: String, waited: Duration },
    #[error("cannot configure WireGuard interface {name}: {source}")]
    Configure {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot read WireGuard interface {name}: {source}")]
    Read {
        name: String,
        source: std::io::Error,
    },
    #[error("interface {name} has no index: it vanished")]
    NoIndex { name: String },
    #[error(transparent)]
    Command(#[from] CmdError),
    #[error("cannot write {path}: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
}

/// A WireGuard interface; dropping it removes the interface and its routes.
pub struct WgDevice {
    name: String,
    iface: InterfaceName,
    ifindex: u32,
    backend: DeviceBackend,
    listen_port: u16,
    address: IpNet,
    /// Routes this device installed (prefixes, truncated).
    routes: Mutex<BTreeSet<IpNet>>,
    /// The TUN backend's process; `None` for kernel interfaces.
    wggo: Option<WgGo>,
}

// === impl WgDevice ===

impl WgDevice {
    /// Creates the interface, sets key and port, assigns the address, brings it up and turns
    /// reverse-path filtering off on it (so two interfaces may carry overlapping ranges).
    /// Blocking (runs `ip`, may start wireguard-go and wait for it); returns when it is ready.
    pub fn create(spec: &DeviceSpec, choice: BackendChoice) -> Result<WgDevice, DeviceError> {
        let iface: InterfaceName =
            spec.name
                .parse()
                .map_err(
                    |e: wireguard_control::InvalidInterfaceName| DeviceError::BadName {
                        name: spec.name.clone(),
                        reason: e.to_string(),
                    },
                )?;
        let backend = match choice {
            BackendChoice::Kernel => {
                kernel_wireguard_available().map_err(DeviceError::KernelUnavailable)?;
                DeviceBackend::Kernel
            }
            BackendChoice::Tun => DeviceBackend::Tun,
            BackendChoice::Auto => match kernel_wireguard_available() {
                Ok(()) => DeviceBackend::Kernel,
                Err(reason) => {
                    tracing::debug!(%reason, "using wireguard-go on TUN");
                    DeviceBackend::Tun
                }
            },
        };
        let wggo = match backend {
            DeviceBackend::Tun => Some(WgGo::start(&spec.name)?),
            DeviceBackend::Kernel => None,
        };
        // From here on `device` owns whatever exists, so an error below cleans up on drop.
        let mut device = WgDevice {
            name: spec.name.clone(),
            iface,
            ifindex: 0,
            backend,
            listen_port: spec.listen_port,
            address: spec.address,
            routes: Mutex::new(BTreeSet::new()),
            wggo,
        };
        // For the kernel backend this also creates the link.
        DeviceUpdate::new()
            .set_private_key(spec.private_key.clone())
            .set_listen_port(spec.listen_port)
            .apply(&device.iface, device.wc_backend())
            .map_err(|source| device.configure_error(source))?;
        device.ifindex = interface_index(&spec.name).ok_or_else(|| DeviceError::NoIndex {
            name: spec.name.clone(),
        })?;
        let address = spec.address.to_string();
        cmd::run("ip", &["address", "add", &address, "dev", &spec.name], None)?;
        disable_rp_filter(&spec.name)?;
        cmd::run("ip", &["link", "set", "dev", &spec.name, "up"], None)?;
        device.listen_port = device.read()?.listen_port.unwrap_or(spec.listen_port);
        tracing::debug!(
            interface = %device.name,
            backend = %device.backend,
            address = %device.address,
            port = device.listen_port,
            pid = device.wggo.as_ref().map(WgGo::pid),
            "WireGuard interface up"
        );
        Ok(device)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn backend(&self) -> DeviceBackend {
        self.backend
    }

    /// The port WireGuard listens on (the one picked when 0 was asked).
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// Makes the peer set exactly `peers` and routes every allowed IP outside the interface's
    /// own prefix through this interface. Peers that stay keep their sessions: only the peers
    /// that left are removed (WireGuard's replace-all would drop every session on each change).
    pub fn set_peers(&self, peers: &[PeerSpec]) -> Result<(), DeviceError> {
        let wanted: HashSet<&Key> = peers.iter().map(|p| &p.public_key).collect();
        let mut update = DeviceUpdate::new();
        for old in self.read()?.peers {
            if !wanted.contains(&old.config.public_key) {
                update = update.remove_peer_by_key(&old.config.public_key);
            }
        }
        for peer in peers {
            let mut builder = PeerConfigBuilder::new(&peer.public_key).replace_allowed_ips();
            for net in &peer.allowed_ips {
                builder = builder.add_allowed_ip(net.addr(), net.prefix_len());
            }
            if let Some(endpoint) = peer.endpoint {
                builder = builder.set_endpoint(endpoint);
            }
            builder = match peer.persistent_keepalive {
                Some(seconds) => builder.set_persistent_keepalive_interval(seconds),
                None => builder.unset_persistent_keepalive(),
            };
            builder = match &peer.preshared_key {
                Some(key) => builder.set_preshared_key(key.key().clone()),
                None => builder.unset_preshared_key(),
            };
            update = update.add_peer(builder);
        }
        update
            .apply(&self.iface, self.wc_backend())
            .map_err(|source| self.configure_error(source))?;
        self.sync_routes(peers.iter().flat_map(|p| &p.allowed_ips))
    }

    pub fn peers(&self) -> Result<Vec<PeerStatus>, DeviceError> {
        Ok(self
            .read()?
            .peers
            .into_iter()
            .map(|p| PeerStatus {
                public_key: p.config.public_key,
                last_handshake: p.stats.last_handshake_time,
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
                endpoint: p.config.endpoint,
            })
            .collect())
    }

    fn sync_routes<'a>(
        &self,
        allowed: impl IntoIterator<Item = &'a IpNet>,
    ) -> Result<(), DeviceError> {
        let wanted = routes::wanted(self.address, allowed);
        let metric = routes::metric(self.ifindex);
        let mut installed = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for net in installed.difference(&wanted) {
            if let Err(e) = routes::remove(&self.name, &metric, net) {
                tracing::warn!(interface = %self.name, route = %net, error = %e, "cannot remove a route no longer needed");
            }
        }
        installed.retain(|net| wanted.contains(net));
        // Every wanted route is (re)placed each time, so one deleted behind our back comes back.
        for net in &wanted {
            routes::add(&self.name, &metric, net)?;
            installed.insert(*net);
        }
        Ok(())
    }

    fn read(&self) -> Result<Device, DeviceError> {
        Device::get(&self.iface, self.wc_backend()).map_err(|source| DeviceError::Read {
            name: self.name.clone(),
            source,
        })
    }

    fn wc_backend(&self) -> Backend {
        match self.backend {
            DeviceBackend::Kernel => Backend::Kernel,
            DeviceBackend::Tun => Backend::Userspace,
        }
    }

    fn configure_error(&self, source: std::io::Error) -> DeviceError {
        DeviceError::Configure {
            name: self.name.clone(),
            source,
        }
    }
}

impl Drop for WgDevice {
    fn drop(&mut self) {
        let metric = routes::metric(self.ifindex);
        let installed = std::mem::take(
            self.routes
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for net in &installed {
            if let Err(e) = routes::remove(&self.name, &metric, net) {
                tracing::debug!(interface = %self.name, route = %net, error = %e, "route already gone");
            }
        }
        match self.backend {
            DeviceBackend::Kernel => {
                if let Err(e) = cmd::run("ip", &["link", "del", "dev", &self.name], None) {
                    tracing::warn!(interface = %self.name, error = %e, "cannot remove the WireGuard interface");
                }
            }
            // Stopping wireguard-go closes the TUN, which removes the interface.
            DeviceBackend::Tun => drop(self.wggo.take()),
        }
        tracing::debug!(interface = %self.name, "WireGuard interface removed");
    }
}

// === free functions ===

/// Whether this kernel can create WireGuard interfaces; `Err` says why not. Probed once per
/// process by creating (and deleting) a throw-away interface.
pub fn kernel_wireguard_available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let name = unique_interface_name("pcp");
            let iface: InterfaceName = name
                .parse()
                .map_err(|e| format!("no kernel WireGuard: probe name {name:?}: {e}"))?;
            match DeviceUpdate::new().apply(&iface, Backend::Kernel) {
                Ok(()) => {
                    if let Err(e) = cmd::run("ip", &["link", "del", "dev", &name], None) {
                        tracing::warn!(interface = %name, error = %e, "cannot remove the kernel WireGuard probe interface");
                    }
                    Ok(())
                }
                Err(e) => Err(format!("no kernel WireGuard: {}", describe(&e))),
            }
        })
        .clone()
}

/// A name of at most 15 bytes that no other interface or wireguard-go socket on this machine
/// uses: `prefix` (shortened if needed) + our PID in hex + `-` + a per-process counter. The
/// socket folder is shared across network namespaces, so it is checked too.
pub fn unique_interface_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    const MAX: usize = 15;
    let pid = std::process::id();
    let mut name = String::new();
    // Bounded: a clash needs another process with our PID (another PID namespace).
    for _ in 0..256 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let suffix = format!("{pid:x}-{n:x}");
        let keep = MAX.saturating_sub(suffix.len());
        let head: String = prefix
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(keep)
            .collect();
        name = format!("{head}{suffix}");
        if !wggo::socket_path(&name).exists() && interface_index(&name).is_none() {
            break;
        }
    }
    name
}

/// The index of an interface in this thread's network namespace.
fn interface_index(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Strict reverse-path filtering would drop packets from a peer whose range another interface
/// also routes. The kernel uses max(all, interface), so `all` must allow it too (we leave
/// `all` alone: it is the host's).
fn disable_rp_filter(name: &str) -> Result<(), DeviceError> {
    let path = format!("/proc/sys/net/ipv4/conf/{name}/rp_filter");
    std::fs::write(&path, "0").map_err(|source| DeviceError::Sysctl { path, source })
}

/// "Operation not supported (os error 95)" → "operation not supported".
fn describe(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

#[cfg(test)]
mod tests;
