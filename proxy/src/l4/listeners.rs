//! Opening and closing L4 listen ports on the control side, one socket per worker.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, watch};

use super::{OpenPort, PortSocket};
use crate::routes::Transport;

/// The ports that are open, and a way to reach every worker.
pub struct L4Listeners {
    bind_ip: IpAddr,
    workers: Vec<mpsc::Sender<OpenPort>>,
    open: HashMap<(Transport, u16), watch::Sender<bool>>,
}

impl L4Listeners {
    /// `bind_ip` is the address of NB_PROXY_ADDRESS (all addresses for `:443`).
    pub fn new(bind_ip: IpAddr, workers: Vec<mpsc::Sender<OpenPort>>) -> Self {
        Self {
            bind_ip,
            workers,
            open: HashMap::new(),
        }
    }

    /// Opens the `wanted` ports not open yet and closes the open ones no longer wanted.
    /// Returns the ports that could not be opened, with the reason; they are tried again on the
    /// next call.
    pub fn sync(&mut self, wanted: &[(Transport, u16)]) -> HashMap<(Transport, u16), String> {
        self.open.retain(|key, closed| {
            let keep = wanted.contains(key);
            if !keep {
                closed.send_replace(true);
                tracing::info!(port = key.1, transport = %key.0, "L4 port closed");
            }
            keep
        });
        let mut failed = HashMap::new();
        for key in wanted {
            if self.open.contains_key(key) {
                continue;
            }
            match self.open_port(key.0, key.1) {
                Ok(closed) => {
                    tracing::info!(port = key.1, transport = %key.0, "L4 port open");
                    self.open.insert(*key, closed);
                }
                Err(reason) => {
                    tracing::error!(port = key.1, transport = %key.0, %reason, "L4 port not opened");
                    failed.insert(*key, reason);
                }
            }
        }
        failed
    }

    fn open_port(&self, transport: Transport, port: u16) -> Result<watch::Sender<bool>, String> {
        let addr = SocketAddr::new(self.bind_ip, port);
        probe(transport, addr)?;
        let mut sockets = Vec::with_capacity(self.workers.len());
        for _ in &self.workers {
            sockets.push(bind(transport, addr).map_err(|e| describe(transport, addr, &e))?);
        }
        let (closed_tx, closed_rx) = watch::channel(false);
        for (worker, socket) in self.workers.iter().zip(sockets) {
            let open = OpenPort {
                port,
                socket,
                closed: closed_rx.clone(),
            };
            if worker.try_send(open).is_err() {
                closed_tx.send_replace(true);
                return Err("a worker's queue of port changes is full; try again".to_string());
            }
        }
        Ok(closed_tx)
    }
}

/// Every worker's socket sets SO_REUSEPORT, which would let a second program (or a second
/// proxy) share the port silently. A bind without it first tells whether anyone holds the port.
fn probe(transport: Transport, addr: SocketAddr) -> Result<(), String> {
    let socket = new_socket(transport, addr).map_err(|e| describe(transport, addr, &e))?;
    if transport == Transport::Tcp {
        // Lets the probe pass over connections in TIME_WAIT, but not over a listener.
        socket
            .set_reuse_address(true)
            .map_err(|e| describe(transport, addr, &e))?;
    }
    socket
        .bind(&addr.into())
        .map_err(|e| describe(transport, addr, &e))
}

fn new_socket(transport: Transport, addr: SocketAddr) -> std::io::Result<Socket> {
    let (ty, proto) = match transport {
        Transport::Tcp => (Type::STREAM, Protocol::TCP),
        Transport::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

fn bind(transport: Transport, addr: SocketAddr) -> std::io::Result<PortSocket> {
    let socket = new_socket(transport, addr)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    match transport {
        Transport::Tcp => {
            socket.set_reuse_address(true)?;
            socket.set_nodelay(true)?;
            socket.bind(&addr.into())?;
            socket.listen(4096)?;
            Ok(PortSocket::Tcp(socket.into()))
        }
        Transport::Udp => {
            socket.bind(&addr.into())?;
            Ok(PortSocket::Udp(socket.into()))
        }
    }
}

fn describe(transport: Transport, addr: SocketAddr, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!(
                "port {}/{transport} on {addr} is in use by another program",
                addr.port()
            )
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "port {}/{transport}: permission denied (ports below 1024 need root or \
             CAP_NET_BIND_SERVICE)",
            addr.port()
        ),
        _ => format!("port {}/{transport} on {addr}: {e}", addr.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_held_elsewhere_is_refused_and_others_open() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = held.local_addr().unwrap().port();
        let free = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (tx, mut rx) = mpsc::channel(8);
        let mut l = L4Listeners::new("127.0.0.1".parse().unwrap(), vec![tx]);
        let failed = l.sync(&[(Transport::Tcp, busy), (Transport::Udp, free)]);
        assert!(
            failed[&(Transport::Tcp, busy)].contains("in use"),
            "{failed:?}"
        );
        assert_eq!(failed.len(), 1);
        let open = rx.try_recv().unwrap();
        assert_eq!((open.transport(), open.port), (Transport::Udp, free));
        let closed = open.closed.clone();
        l.sync(&[]);
        assert!(*closed.borrow());
    }
}
