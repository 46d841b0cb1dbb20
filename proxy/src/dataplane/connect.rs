//! Dialing a target over the path the mesh chose: an ordinary socket, one bound to an account's
//! WireGuard interface, or the in-process backend's loopback bridge.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use monoio::net::TcpStream;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::mesh::Via;

pub async fn connect_tcp(addr: SocketAddr, via: &Via) -> io::Result<TcpStream> {
    match via {
        Via::Direct => TcpStream::connect_addr(addr).await,
        Via::Bridge(bridge) => TcpStream::connect_addr(*bridge).await,
        Via::Device(device) => connect_bound(addr, device).await,
    }
}

/// Data sent into a tunnel whose peer went away is never acknowledged; without a bound the
/// request would wait for the whole upstream timeout. Through a live tunnel an ACK takes
/// milliseconds.
const MESH_USER_TIMEOUT: Duration = Duration::from_secs(5);
/// A new connection to a live peer completes in milliseconds; the default dial timeout (10 s)
/// would only make a dead peer's 502 slower.
pub const MESH_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// monoio cannot set options before its connect, so the socket is made and bound here, the
/// non-blocking connect started, and completion awaited as writability.
async fn connect_bound(addr: SocketAddr, device: &str) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.bind_device(Some(device.as_bytes()))?;
    socket.set_tcp_user_timeout(Some(MESH_USER_TIMEOUT))?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable(false).await?;
    // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    if let Some(e) = SockRef::from(&fd).take_error()? {
        return Err(e);
    }
    Ok(stream)
}
