//! A client connection: reads request heads one after another (keep-alive), hands each to the
//! exchange, and tunnels bytes after a protocol switch.
//!
//! Any read or write that is cancelled (timeout, drain) ends the connection: monoio streams must
//! not be used again after a cancelled operation.

use std::net::SocketAddr;
use std::rc::Rc;

use monoio::io::{AsyncReadRent, AsyncWriteRent, Splitable};
use monoio::time::Instant;

use super::exchange::{Next, exchange};
use super::head::{HeadError, RequestHead, ResponseHead};
use super::responses::{self, ProxyStatus};
use crate::dataplane::WorkerCtx;
use crate::dataplane::inbuf::{FIRST_READ, InBuf, MIN_READ, write_vec};
use crate::dataplane::pump::pump;
use crate::dataplane::readable::WaitReadable;
use crate::dataplane::upstream::UpstreamStream;

/// How the client reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientScheme {
    Https,
    Http,
}

impl ClientScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientScheme::Https => "https",
            ClientScheme::Http => "http",
        }
    }
}

/// Where a connection came in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Arrival {
    /// The public listeners (NB_PROXY_ADDRESS, NB_PROXY_HTTP_ADDRESS).
    #[default]
    Public,
    /// An account's mesh, on the proxy's tunnel address there (NB_PROXY_PRIVATE): the peer
    /// address is a tunnel address of that account.
    Mesh { account_id: std::sync::Arc<str> },
}

/// Buffers reused by every request of one connection.
pub struct Conn {
    pub scheme: ClientScheme,
    pub arrival: Arrival,
    pub inbuf: InBuf,
    pub upbuf: InBuf,
    pub head: RequestHead,
    pub resp: ResponseHead,
    pub out: Vec<u8>,
}

impl Conn {
    fn new(scheme: ClientScheme, arrival: Arrival) -> Self {
        Self {
            scheme,
            arrival,
            inbuf: InBuf::default(),
            upbuf: InBuf::default(),
            head: RequestHead::default(),
            resp: ResponseHead::default(),
            out: Vec::new(),
        }
    }

    /// Between requests only the client buffer's unread bytes matter: the target buffer and
    /// the output buffer go back to the allocator, and so does the client buffer when empty.
    fn release_idle_memory(&mut self) {
        self.upbuf.release_if_empty();
        self.inbuf.release_if_empty();
        self.out = Vec::new();
    }
}

enum HeadWait {
    Ready(usize),
    /// Closed, idle, draining or broken: end quietly.
    End,
    Reject(ProxyStatus),
}

/// Serves HTTP/1.1 on an established client stream (TLS, or plain TCP in `serve` mode) until it
/// closes.
pub async fn serve<S>(
    mut client: S,
    peer: SocketAddr,
    ctx: Rc<WorkerCtx>,
    accepted_at: Instant,
    scheme: ClientScheme,
    arrival: Arrival,
) where
    S: AsyncReadRent + AsyncWriteRent + Splitable + WaitReadable,
    S::OwnedRead: AsyncReadRent,
    S::OwnedWrite: AsyncWriteRent,
{
    let mut conn = Conn::new(scheme, arrival);
    let mut drain = ctx.shared.drain_signal();
    let mut first = true;
    loop {
        let head_len =
            match wait_for_head(&mut client, &mut conn, &ctx, &mut drain, first, accepted_at).await
            {
                HeadWait::Ready(n) => n,
                HeadWait::End => return,
                HeadWait::Reject(status) => {
                    responses::error_page(&mut conn.out, status, true, false);
                    let out = std::mem::take(&mut conn.out);
                    let _ = monoio::time::timeout(
                        ctx.shared.config.limits.header_timeout,
                        write_vec(&mut client, out),
                    )
                    .await;
                    return;
                }
            };
        first = false;
        conn.inbuf.consume(head_len);
        // Boxed: the exchange's state is large, and a task is as big as its largest state; an
        // idle keep-alive connection then holds only the small head-waiting state.
        match Box::pin(exchange(&mut client, &mut conn, peer, &ctx)).await {
            Next::KeepAlive if !ctx.shared.is_draining() => {
                conn.release_idle_memory();
                continue;
            }
            Next::KeepAlive | Next::Close => break,
            Next::Tunnel(up) => {
                let pending = conn.inbuf.data().to_vec();
                let upstream_pending = conn.upbuf.data().to_vec();
                Box::pin(tunnel(client, pending, up.stream, upstream_pending)).await;
                return;
            }
        }
    }
    let _ = monoio::time::timeout(ctx.shared.config.limits.header_timeout, client.shutdown()).await;
}

/// Reads until a whole request head is buffered. The first request (and the TLS handshake
/// before it) must arrive within the header timeout; later ones may idle up to the idle timeout
/// before their first byte, then get the header timeout for the rest.
async fn wait_for_head<S: AsyncReadRent + WaitReadable>(
    client: &mut S,
    conn: &mut Conn,
    ctx: &WorkerCtx,
    drain: &mut tokio::sync::watch::Receiver<bool>,
    first: bool,
    accepted_at: Instant,
) -> HeadWait {
    let limits = ctx.shared.config.limits;
    let mut deadline = if first {
        accepted_at + limits.header_timeout
    } else {
        Instant::now() + limits.idle_timeout
    };
    let mut waiting_idle = !first && conn.inbuf.is_empty();
    loop {
        if !conn.inbuf.is_empty() {
            match conn.head.parse(conn.inbuf.data()) {
                Ok(Some(n)) => return HeadWait::Ready(n),
                Ok(None) => {}
                Err(HeadError::TooLarge) => return HeadWait::Reject(ProxyStatus::HeadersTooLarge),
                Err(e) => {
                    tracing::debug!(error = %e, "rejecting request");
                    return HeadWait::Reject(ProxyStatus::BadRequest);
                }
            }
            if waiting_idle {
                waiting_idle = false;
                deadline = Instant::now() + limits.header_timeout;
            }
        }
        if waiting_idle && *drain.borrow() {
            return HeadWait::End;
        }
        if conn.inbuf.is_empty() {
            // No bytes of a head yet: wait lending no buffer (an idle or silent client holds
            // none). Timing out here is the end of a connection with no request started.
            let ready = monoio::time::timeout_at(deadline, client.wait_readable());
            // The drain-aware wait is written out here and for the read below: a shared async
            // helper grew every idle connection's state by ~0.9 KiB (measured by the bench).
            let ready = if waiting_idle {
                monoio::select! {
                    r = ready => r,
                    _ = drain.changed() => return HeadWait::End,
                }
            } else {
                ready.await
            };
            if !matches!(ready, Ok(Ok(()))) {
                return HeadWait::End;
            }
        }
        // A cancelled read takes the buffer with it, so note now whether a head had started.
        let head_started = !conn.inbuf.is_empty();
        let min_free = if conn.inbuf.is_empty() {
            FIRST_READ
        } else {
            MIN_READ
        };
        // Boxed: a read's state (a TLS read holds a whole record exchange) would otherwise
        // make every connection's task that large, idle ones included.
        let read = monoio::time::timeout_at(
            deadline,
            Box::pin(conn.inbuf.fill_at_least(client, min_free)),
        );
        let result = if waiting_idle {
            monoio::select! {
                r = read => r,
                _ = drain.changed() => return HeadWait::End,
            }
        } else {
            read.await
        };
        match result {
            Err(_) if !head_started => return HeadWait::End,
            Err(_) => return HeadWait::Reject(ProxyStatus::RequestTimeout),
            Ok(Err(_)) | Ok(Ok(0)) => return HeadWait::End,
            Ok(Ok(_)) => {}
        }
    }
}

/// Copies bytes both ways until each side has closed its direction.
async fn tunnel<S>(
    client: S,
    client_pending: Vec<u8>,
    upstream: UpstreamStream,
    upstream_pending: Vec<u8>,
) where
    S: Splitable,
    S::OwnedRead: AsyncReadRent,
    S::OwnedWrite: AsyncWriteRent,
{
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async move {
        pump(&mut cr, &mut uw, client_pending, None).await;
        let _ = uw.shutdown().await;
    };
    let down = async move {
        pump(&mut ur, &mut cw, upstream_pending, None).await;
        let _ = cw.shutdown().await;
    };
    monoio::join!(up, down);
}
