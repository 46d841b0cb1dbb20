//! L4 services: custom TCP, UDP and TLS-passthrough ports.
//!
//! The control side opens and closes the listening sockets as services come and go
//! (`listeners`) and hands one socket per port to every worker; workers accept on them (`tcp`,
//! `udp`) and look the service up in the route table for each connection, so a changed target
//! needs no new socket.

pub mod client_hello;
pub mod listeners;
pub mod proxy_header;
pub mod tcp;
mod tcp_bytes;
pub mod udp;

use std::rc::Rc;

use tokio::sync::{mpsc, watch};

use crate::dataplane::WorkerCtx;
use crate::routes::Transport;

/// Most port changes a worker may have queued; beyond it a port is reported as not opened.
pub const COMMAND_QUEUE: usize = 1024;

/// A listening socket for one worker, and the signal that closes it.
pub enum PortSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
    /// HTTPS on an account's tunnel address, for private services (`mesh::inbound`).
    MeshHttps(std::net::TcpListener, std::sync::Arc<str>),
}

pub struct OpenPort {
    pub port: u16,
    pub socket: PortSocket,
    pub closed: watch::Receiver<bool>,
}

impl OpenPort {
    pub fn transport(&self) -> Transport {
        match self.socket {
            PortSocket::Tcp(_) | PortSocket::MeshHttps(..) => Transport::Tcp,
            PortSocket::Udp(_) => Transport::Udp,
        }
    }
}

/// Runs on each worker: starts serving every port the control side opens.
pub async fn serve_ports(mut commands: mpsc::Receiver<OpenPort>, ctx: Rc<WorkerCtx>) {
    while let Some(open) = commands.recv().await {
        let (port, closed) = (open.port, open.closed);
        match open.socket {
            PortSocket::Tcp(l) => match monoio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    monoio::spawn(tcp::accept_loop(l, port, ctx.clone(), closed));
                }
                Err(e) => tracing::error!(port, error = %e, "cannot serve TCP port"),
            },
            PortSocket::Udp(s) => match udp::PortSocket::new(s) {
                Ok(s) => {
                    monoio::spawn(udp::serve(s, port, ctx.clone(), closed));
                }
                Err(e) => tracing::error!(port, error = %e, "cannot serve UDP port"),
            },
            PortSocket::MeshHttps(l, account_id) => {
                monoio::spawn(crate::dataplane::serve_mesh_inbound(
                    l,
                    account_id,
                    ctx.clone(),
                    closed,
                ));
            }
        }
    }
}
