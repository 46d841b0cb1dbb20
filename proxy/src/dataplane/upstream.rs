//! Connections to targets: plain TCP or TLS, dialed with a timeout and kept alive in a per-worker
//! pool keyed by address and TLS settings.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::BufResult;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split};
use monoio::net::TcpStream;
use monoio_rustls::{ClientTlsStream, TlsConnector};
use rustls_pki_types::ServerName;

use super::connect::{MESH_DIAL_TIMEOUT, connect_tcp};
use crate::mesh::{MeshDial, MeshTable, Via};
use crate::routes::{Target, TargetScheme};
use crate::tls::UpstreamTls;

/// Idle upstream connections kept per target, and how long one may sit idle before it is
/// considered stale (targets often close idle connections after a few seconds). The per-target
/// cap must exceed the requests a worker runs at once against a busy target: below that, every
/// burst closes connections it will redial a moment later (a TCP handshake per request and a
/// long latency tail, seen in the benchmark at 64 connections with a cap of 32).
const MAX_IDLE_PER_KEY: usize = 256;
const MAX_IDLE_TOTAL: usize = 4096;
const IDLE_LIFETIME: Duration = Duration::from_secs(15);
/// Resolved names are cached this long per worker.
const DNS_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("TLS handshake with {addr}: {message}")]
    Tls { addr: SocketAddr, message: String },
    #[error("{addr} is unreachable: {reason}")]
    Mesh { addr: SocketAddr, reason: String },
}

impl DialError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, DialError::Timeout { .. })
    }
}

pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<ClientTlsStream<TcpStream>>),
}

// SAFETY: both variants are `Split`; the halves of a split stream are used on one thread only.
unsafe impl Split for UpstreamStream {}

impl AsyncReadRent for UpstreamStream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Self::Plain(s) => s.read(buf).await,
            Self::Tls(s) => s.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Self::Plain(s) => s.readv(buf).await,
            Self::Tls(s) => s.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for UpstreamStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Self::Plain(s) => s.write(buf).await,
            Self::Tls(s) => s.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Self::Plain(s) => s.writev(buf).await,
            Self::Tls(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.flush().await,
            Self::Tls(s) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.shutdown().await,
            Self::Tls(s) => s.shutdown().await,
        }
    }
}

/// What makes two upstream connections interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    addr: SocketAddr,
    /// Part of the key: two accounts may use the same tunnel address for different targets.
    via: Via,
    tls: Option<(ServerName<'static>, bool)>,
}

pub struct Upstream {
    pub stream: UpstreamStream,
    pub key: PoolKey,
    /// True when it came from the pool, so a failure before any response byte may be a stale
    /// connection and the request can be retried on a fresh one.
    pub reused: bool,
}

impl PoolKey {
    pub fn is_direct(&self) -> bool {
        self.via == Via::Direct
    }
}

/// Per-worker state for reaching targets.
pub struct Dialer {
    tls: UpstreamTls,
    mesh: Arc<MeshTable>,
    idle: RefCell<HashMap<PoolKey, Vec<(UpstreamStream, Instant)>>>,
    idle_total: RefCell<usize>,
    dns: RefCell<HashMap<(String, u16), (SocketAddr, Instant)>>,
}

impl Dialer {
    pub fn new(tls: UpstreamTls, mesh: Arc<MeshTable>) -> Self {
        Self {
            tls,
            mesh,
            idle: RefCell::new(HashMap::new()),
            idle_total: RefCell::new(0),
            dns: RefCell::new(HashMap::new()),
        }
    }

    /// How to reach `target` for a service of `account`; `direct` targets bypass the mesh.
    pub fn key(
        &self,
        account: &str,
        target: &Target,
        skip_verify: bool,
        direct: bool,
    ) -> Result<PoolKey, DialError> {
        let addr = match target.socket_addr() {
            Some(a) => a,
            None => self.resolve(&target.host, target.port)?,
        };
        let tls = match target.scheme {
            TargetScheme::Http => None,
            TargetScheme::Https => Some((target.server_name.clone(), skip_verify)),
        };
        let via = if direct {
            Via::Direct
        } else {
            self.mesh_via(account, addr)?
        };
        Ok(PoolKey { addr, via, tls })
    }

    /// The path to `addr` in `account`'s mesh, `Direct` when the mesh does not carry it.
    pub fn mesh_via(&self, account: &str, addr: SocketAddr) -> Result<Via, DialError> {
        match self.mesh.load().dial(account, addr) {
            None => Ok(Via::Direct),
            Some(MeshDial::Via(via)) => Ok(via),
            Some(MeshDial::Unreachable(reason)) => Err(DialError::Mesh { addr, reason }),
        }
    }

    /// Names are resolved with the system resolver and cached; mesh targets are IP literals and
    /// never get here.
    /// The address of an L4 target, resolved like an HTTP target's.
    pub fn resolve_l4(
        &self,
        target: &crate::routes::l4::L4Target,
    ) -> Result<SocketAddr, DialError> {
        match target.addr {
            Some(a) => Ok(a),
            None => self.resolve(&target.host, target.port),
        }
    }

    fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, DialError> {
        let now = Instant::now();
        let cache_key = (host.to_string(), port);
        if let Some((addr, at)) = self.dns.borrow().get(&cache_key)
            && now.duration_since(*at) < DNS_TTL
        {
            return Ok(*addr);
        }
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| DialError::Resolve {
                host: host.to_string(),
                message: e.to_string(),
            })?
            .next()
            .ok_or_else(|| DialError::Resolve {
                host: host.to_string(),
                message: "no addresses".to_string(),
            })?;
        let mut dns = self.dns.borrow_mut();
        if dns.len() > 4096 {
            dns.clear();
        }
        dns.insert(cache_key, (addr, now));
        Ok(addr)
    }

    /// A pooled connection if a fresh one is idle, else a new one.
    pub async fn get(&self, key: &PoolKey, dial_timeout: Duration) -> Result<Upstream, DialError> {
        if let Some(stream) = self.checkout(key) {
            return Ok(Upstream {
                stream,
                key: key.clone(),
                reused: true,
            });
        }
        self.connect(key, dial_timeout).await
    }

    fn checkout(&self, key: &PoolKey) -> Option<UpstreamStream> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some((stream, since)) = list.pop() {
            *self.idle_total.borrow_mut() -= 1;
            if now.duration_since(since) < IDLE_LIFETIME {
                return Some(stream);
            }
        }
        None
    }

    pub async fn connect(
        &self,
        key: &PoolKey,
        dial_timeout: Duration,
    ) -> Result<Upstream, DialError> {
        let addr = key.addr;
        let dial_timeout = if key.is_direct() {
            dial_timeout
        } else {
            dial_timeout.min(MESH_DIAL_TIMEOUT)
        };
        let tcp = match monoio::time::timeout(dial_timeout, connect_tcp(addr, &key.via)).await {
            Err(_) => return Err(DialError::Timeout { addr }),
            Ok(Err(source)) => return Err(DialError::Connect { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let stream = match &key.tls {
            None => UpstreamStream::Plain(tcp),
            Some((name, skip_verify)) => {
                let config = if *skip_verify {
                    self.tls.unverified.clone()
                } else {
                    self.tls.verified.clone()
                };
                let connector = TlsConnector::from(config);
                match monoio::time::timeout(dial_timeout, connector.connect(name.clone(), tcp))
                    .await
                {
                    Err(_) => return Err(DialError::Timeout { addr }),
                    Ok(Err(e)) => {
                        return Err(DialError::Tls {
                            addr,
                            message: e.to_string(),
                        });
                    }
                    Ok(Ok(s)) => UpstreamStream::Tls(Box::new(s)),
                }
            }
        };
        Ok(Upstream {
            stream,
            key: key.clone(),
            reused: false,
        })
    }

    /// Returns a connection whose last exchange ended cleanly.
    pub fn release(&self, upstream: Upstream) {
        let mut total = self.idle_total.borrow_mut();
        if *total >= MAX_IDLE_TOTAL {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(upstream.key).or_default();
        if list.len() >= MAX_IDLE_PER_KEY {
            return;
        }
        list.push((upstream.stream, Instant::now()));
        *total += 1;
    }
}
