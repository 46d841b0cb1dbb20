//! NB_PROXY_PRIVATE: HTTPS accepted on each account's tunnel address, for NetBird-only
//! (private) services. Each listener is bound to the account's interface (`SO_BINDTODEVICE`),
//! so a connection names its account even when several accounts' tunnels share an address;
//! the workers mark its requests as having arrived over that mesh (`Arrival::Mesh`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, watch};

use crate::l4::{OpenPort, PortSocket};

/// What the mesh task needs to open listeners on the workers.
#[derive(Clone)]
pub struct MeshInbound {
    workers: Vec<mpsc::Sender<OpenPort>>,
    /// The port of NB_PROXY_ADDRESS: a private service has one URL on and off the mesh.
    port: u16,
}

impl MeshInbound {
    pub fn new(workers: Vec<mpsc::Sender<OpenPort>>, port: u16) -> Self {
        Self { workers, port }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// One listener per worker on `ip` (the proxy's tunnel address), bound to `interface`.
    /// They close when the returned sender is dropped.
    pub fn open(
        &self,
        account_id: &str,
        interface: &str,
        ip: IpAddr,
    ) -> Result<watch::Sender<bool>, String> {
        let addr = SocketAddr::new(ip, self.port);
        let account: Arc<str> = Arc::from(account_id);
        let mut sockets = Vec::with_capacity(self.workers.len());
        for _ in &self.workers {
            let socket = bind(addr, interface)
                .map_err(|e| format!("cannot listen on {addr} on {interface}: {e}"))?;
            sockets.push(socket);
        }
        let (closed_tx, closed_rx) = watch::channel(false);
        for (worker, socket) in self.workers.iter().zip(sockets) {
            let open = OpenPort {
                port: self.port,
                socket: PortSocket::MeshHttps(socket, account.clone()),
                closed: closed_rx.clone(),
            };
            if worker.try_send(open).is_err() {
                closed_tx.send_replace(true);
                return Err("a worker's queue of listener changes is full".to_string());
            }
        }
        Ok(closed_tx)
    }
}

/// `SO_REUSEPORT` spreads connections over the workers and lets this more specific socket
/// share the port with a public listener on the wildcard address; the kernel prefers the
/// device-bound, exact-address socket for packets that arrive on the tunnel.
fn bind(addr: SocketAddr, interface: &str) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind_device(Some(interface.as_bytes()))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
