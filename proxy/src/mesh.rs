//! The WireGuard mesh: how the proxy reaches targets that live on peers and behind routing
//! peers. One WireGuard identity per account; three backends behind one interface, picked at
//! start, best first: kernel WireGuard (`wireguard-control`), userspace WireGuard on a TUN
//! device (`wireguard-go`, configured over its UAPI socket), in-process WireGuard with a
//! userspace TCP/IP stack (boringtun + smoltcp, no privilege).

pub mod control;
pub mod device;
pub mod firewall;
pub mod inbound;
pub mod inprocess;
pub mod preshared_key;
pub mod settings;
pub mod table;
pub mod tunnel;

pub use settings::{BackendChoice, MeshSettings};
pub use table::{AccountRoutes, Carrier, MeshDial, MeshSnapshot, MeshTable, PeerRoute, Via};

/// account → (service id, one-time token) of the newest mapping that carried a token.
pub type Tokens = std::sync::Arc<std::collections::HashMap<String, (String, String)>>;

/// How the mesh starts: the backend picked before the proxy reports its capabilities, and,
/// with NB_PROXY_PRIVATE on a backend that can accept connections, where the mesh listeners
/// for private services open.
pub struct MeshStart {
    pub picked: Result<(tunnel::Backend, String), String>,
    pub inbound: Option<inbound::MeshInbound>,
}

impl MeshStart {
    /// Whether private services can be served: NB_PROXY_PRIVATE, and a backend whose tunnel is
    /// a host interface the proxy can listen on.
    pub fn serves_private(
        settings: &MeshSettings,
        picked: &Result<(tunnel::Backend, String), String>,
    ) -> bool {
        settings.private
            && matches!(
                picked,
                Ok((tunnel::Backend::Kernel | tunnel::Backend::Tun, _))
            )
    }
}

/// What the mesh task gets from the mapping stream.
pub struct MeshInputs {
    pub tokens: tokio::sync::watch::Receiver<Tokens>,
    /// Accounts whose tunnel state changed: their services' status is sent again.
    pub status_events: tokio::sync::mpsc::Sender<String>,
}
