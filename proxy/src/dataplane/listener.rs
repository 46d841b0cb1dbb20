//! Listening sockets, bound before the workers start so that a bad address or a missing
//! privilege stops the proxy at once with a clear message.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "cannot listen on {addr} ({setting}): permission denied — run as root, grant \
         CAP_NET_BIND_SERVICE, or pick a port above 1023"
    )]
    Permission {
        addr: SocketAddr,
        setting: &'static str,
    },
    #[error(
        "cannot listen on {addr} ({setting}): the address is already in use by another program"
    )]
    InUse {
        addr: SocketAddr,
        setting: &'static str,
    },
    #[error("cannot listen on {addr} ({setting}): {source}")]
    Other {
        addr: SocketAddr,
        setting: &'static str,
        source: std::io::Error,
    },
}

/// One worker's listeners.
pub struct BoundListeners {
    pub https: std::net::TcpListener,
    pub http: Option<std::net::TcpListener>,
    /// ACME http-01 answers, when they have an address of their own.
    pub acme: Option<std::net::TcpListener>,
}

/// Binds one `SO_REUSEPORT` socket per worker for each address; the kernel spreads new
/// connections across them.
pub fn bind_all(
    workers: usize,
    https: SocketAddr,
    http: Option<SocketAddr>,
    acme: Option<SocketAddr>,
) -> Result<Vec<BoundListeners>, ListenError> {
    let mut out = Vec::with_capacity(workers);
    for _ in 0..workers {
        out.push(BoundListeners {
            https: bind(https, "NB_PROXY_ADDRESS")?,
            http: http.map(|a| bind(a, "NB_PROXY_HTTP_ADDRESS")).transpose()?,
            acme: acme.map(|a| bind(a, "NB_PROXY_ACME_ADDRESS")).transpose()?,
        });
    }
    Ok(out)
}

pub fn bind(addr: SocketAddr, setting: &'static str) -> Result<std::net::TcpListener, ListenError> {
    let classify = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::PermissionDenied => ListenError::Permission { addr, setting },
        std::io::ErrorKind::AddrInUse => ListenError::InUse { addr, setting },
        _ => ListenError::Other {
            addr,
            setting,
            source,
        },
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(classify)?;
    socket.set_reuse_address(true).map_err(classify)?;
    socket.set_reuse_port(true).map_err(classify)?;
    if addr.is_ipv6() {
        // `:443` binds [::] and should take IPv4 too.
        socket.set_only_v6(false).map_err(classify)?;
    }
    socket.set_nodelay(true).map_err(classify)?;
    socket.bind(&addr.into()).map_err(classify)?;
    socket.listen(4096).map_err(classify)?;
    socket.set_nonblocking(true).map_err(classify)?;
    Ok(socket.into())
}
