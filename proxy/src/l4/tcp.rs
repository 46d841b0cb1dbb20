//! TCP and TLS-passthrough ports: accept, pick the service, dial the target, then let the
//! kernel splice the two sockets when it can and copy in user space when it cannot.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::client_hello;
use super::proxy_header;
use crate::dataplane::WorkerCtx;
use crate::dataplane::pump::pump;
use crate::ebpf::{EbpfError, SpliceMark};
use crate::routes::L4Service;
use crate::routes::l4::TcpPort;
use crate::state::ConnectionGuard;

/// Accepts on one worker's socket of `port` until the port is closed or the proxy drains.
pub async fn accept_loop(
    listener: TcpListener,
    port: u16,
    ctx: Rc<WorkerCtx>,
    mut closed: watch::Receiver<bool>,
) {
    let mut drain = ctx.shared.drain_signal();
    loop {
        if *closed.borrow() || *drain.borrow() {
            return;
        }
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = closed.changed() => return,
            _ = drain.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(port, error = %e, "L4 accept failed");
                // EMFILE and friends: do not spin.
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(guard) = ctx.shared.try_open_connection() else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let fut = Box::pin(serve(tcp, peer, port, ctx.clone(), guard));
        monoio::spawn(fut);
    }
}

async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    port: u16,
    ctx: Rc<WorkerCtx>,
    _guard: ConnectionGuard,
) {
    // Behind a balancer (NB_PROXY_PROXY_PROTOCOL), the PROXY header's source is the client from
    // here on: access rules, CrowdSec, logs and the header sent to the target.
    let Some((mut client, origin)) =
        crate::dataplane::proxy_protocol::accept(client, peer, &ctx.shared.config).await
    else {
        return;
    };
    let peer = origin.client;
    let stats = &ctx.shared.status.l4;
    let (service, pending) = match pick_service(&mut client, peer, port, &ctx).await {
        Some(picked) => picked,
        None => return,
    };
    // CIDRs and countries. XDP already dropped what the CIDR rules refuse when the port has one
    // service; countries, and clients named by a PROXY header, are only known here.
    if !service.access.permits(peer.ip()) {
        stats.denied.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, service = %service.id, "source not allowed");
        return;
    }
    if let Some((verdict, refuse)) =
        crate::crowdsec::check(ctx.shared.crowdsec.as_deref(), service.crowdsec, peer.ip())
    {
        tracing::info!(%peer, service = %service.id, %verdict, refused = refuse, "CrowdSec verdict");
        if refuse {
            stats.denied.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let started = std::time::Instant::now();
    let target = match ctx.dialer.resolve_l4(&service.target) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(service = %service.id, error = %e, "L4 target not resolved");
            return;
        }
    };
    let via = if service.direct_upstream {
        crate::mesh::Via::Direct
    } else {
        match ctx.dialer.mesh_via(&service.account_id, target) {
            Ok(via) => via,
            Err(e) => {
                tracing::warn!(service = %service.id, error = %e, "L4 target unreachable");
                return;
            }
        }
    };
    let dial = monoio::time::timeout(
        ctx.shared.config.limits.dial_timeout,
        crate::dataplane::connect::connect_tcp(target, &via),
    );
    let mut upstream = match dial.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(service = %service.id, %target, error = %e, "L4 target refused");
            return;
        }
        Err(_) => {
            tracing::warn!(service = %service.id, %target, "L4 target did not answer in time");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let mut preface = Vec::new();
    if service.proxy_protocol {
        let local = origin
            .destination
            .or_else(|| client.local_addr().ok())
            .unwrap_or(peer);
        match proxy_header::v2(peer, local, ppp::v2::Protocol::Stream) {
            Ok(h) => preface = h,
            Err(e) => {
                tracing::warn!(error = %e, "PROXY header not built");
                return;
            }
        }
    }
    preface.extend_from_slice(&pending);
    if !preface.is_empty() && upstream.write_all(preface).await.0.is_err() {
        return;
    }
    let mark = match splice(&ctx, &client, &upstream) {
        Spliced::Yes(mark) => {
            stats.spliced.fetch_add(1, Ordering::Relaxed);
            Some(mark)
        }
        Spliced::No => None,
        Spliced::Broken => return,
    };
    let (client_fd, upstream_fd) = (client.as_raw_fd(), upstream.as_raw_fd());
    // Spliced or not, both directions are read until they end: when spliced, the reads see
    // only the end of the stream (the kernel moves the bytes), and any byte the splice lets
    // through to user space is still forwarded.
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let counter = &stats.user_space_bytes;
    // SAFETY: the halves alive in this join keep both descriptors open.
    let (a, b) = unsafe {
        (
            BorrowedFd::borrow_raw(client_fd),
            BorrowedFd::borrow_raw(upstream_fd),
        )
    };
    let (up, down) = monoio::join!(
        one_way(
            &mut cr,
            &mut uw,
            counter,
            mark.as_ref().map(|m| move || m.a_to_b_flushed(a, b)),
        ),
        one_way(
            &mut ur,
            &mut cw,
            counter,
            mark.as_ref().map(|m| move || m.b_to_a_flushed(a, b)),
        ),
    );
    // Spliced bytes pass user space by, so the client socket's own counts are the truth.
    let carried = match mark {
        // SAFETY: `cr` and `cw` are still alive and keep the client's descriptor open.
        Some(_) => super::tcp_bytes::carried(unsafe { BorrowedFd::borrow_raw(client_fd) })
            .map_or((up, down), |(received, sent)| {
                (received.max(up), sent.max(down))
            }),
        None => (up, down),
    };
    crate::http::access_log::record_l4(
        &ctx,
        &service,
        peer.ip(),
        started,
        carried,
        "tcp",
        mark.is_some(),
    );
}

/// One direction: copies until its source ends, lets the kernel pass on what it spliced (when
/// spliced), then shuts the destination's write side.
async fn one_way<R: AsyncReadRent, W: AsyncWriteRent>(
    from: &mut R,
    to: &mut W,
    counter: &AtomicU64,
    spliced_flushed: Option<impl Fn() -> Result<bool, EbpfError>>,
) -> u64 {
    let moved = pump(from, to, Vec::new(), Some(counter)).await;
    if let Some(flushed) = spliced_flushed {
        wait_flushed(flushed).await;
    }
    let _ = to.shutdown().await;
    moved
}

/// The kernel sends spliced bytes on its own schedule: after one side ended, the other side's
/// write direction is shut only once everything that arrived has been passed on (or the wait
/// gives up: a peer that stopped reading cannot hold the connection forever).
async fn wait_flushed(flushed: impl Fn() -> Result<bool, EbpfError>) {
    const GIVE_UP: std::time::Duration = std::time::Duration::from_secs(60);
    let started = monoio::time::Instant::now();
    let mut pause = std::time::Duration::from_micros(200);
    while started.elapsed() < GIVE_UP {
        match flushed() {
            Ok(true) | Err(_) => return,
            Ok(false) => {}
        }
        monoio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
    tracing::debug!("spliced bytes not flushed within {GIVE_UP:?}; closing anyway");
}

/// The service for a new connection; for a TLS port, reads the ClientHello (returned, to be
/// sent on) to match its SNI.
async fn pick_service(
    client: &mut TcpStream,
    peer: SocketAddr,
    port: u16,
    ctx: &WorkerCtx,
) -> Option<(Arc<L4Service>, Vec<u8>)> {
    {
        let routes = ctx.routes();
        match routes.l4.tcp.get(&port)? {
            TcpPort::Plain(s) => return Some((s.clone(), Vec::new())),
            TcpPort::Sni { .. } => {}
        }
    }
    let deadline = monoio::time::Instant::now() + ctx.shared.config.limits.header_timeout;
    let (sni, hello) =
        match monoio::time::timeout_at(deadline, client_hello::read_sni(client)).await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                tracing::debug!(%peer, port, error = %e, "TLS passthrough: no usable ClientHello");
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, port, "TLS passthrough: ClientHello timed out");
                return None;
            }
        };
    let Some(sni) = sni else {
        tracing::debug!(%peer, port, "TLS passthrough: ClientHello without SNI");
        return None;
    };
    let routes = ctx.routes();
    match routes.l4.tcp.get(&port)?.by_sni(&sni) {
        Some(s) => Some((s.clone(), hello)),
        None => {
            tracing::debug!(%peer, port, %sni, "TLS passthrough: no service for this name");
            None
        }
    }
}

enum Spliced {
    /// The kernel carries the pair; the mark tells later when it has passed everything on.
    Yes(SpliceMark),
    /// Copy in user space.
    No,
    /// The splice failed after the kernel had moved bytes: neither path can continue the
    /// stream in order, so the connection closes.
    Broken,
}

/// Hands the pair to the kernel's sockmap when the fast path is loaded with its splice.
fn splice(ctx: &WorkerCtx, client: &TcpStream, upstream: &TcpStream) -> Spliced {
    let Some(splicer) = ctx.shared.splicer() else {
        return Spliced::No;
    };
    // SAFETY: both descriptors are owned by streams that outlive this call.
    let (a, b) = unsafe {
        (
            BorrowedFd::borrow_raw(client.as_raw_fd()),
            BorrowedFd::borrow_raw(upstream.as_raw_fd()),
        )
    };
    match splicer.splice_marked(a, b) {
        Ok(mark) => Spliced::Yes(mark),
        Err(EbpfError::Splice { source, .. }) if source.raw_os_error() == Some(libc::EPIPE) => {
            tracing::warn!("splice failed half-way; closing the connection");
            Spliced::Broken
        }
        Err(e) => {
            tracing::debug!(error = %e, "splice not set up; copying in user space");
            Spliced::No
        }
    }
}
