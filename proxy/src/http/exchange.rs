//! One request/response exchange: route, dial, forward the request, stream the response back.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRent};

use super::access_log;
use super::body::{self, BodyError};
use super::client_ip;
use super::connection::{Arrival, Conn};
use super::gate::{self, GateLog, Identity, Verdict};
use super::head::{Framing, HeadError};
use super::responses::{self, ProxyStatus};
use super::rewrite::{self, Forwarding, ResponseContext};
use crate::auth::tunnel_peer::{self, TunnelVerdict};
use crate::config::ForwardedProto;
use crate::dataplane::WorkerCtx;
use crate::dataplane::inbuf::write_vec;
use crate::dataplane::upstream::{PoolKey, Upstream};
use crate::routes::{PathRoute, Service};

/// What the connection does after an exchange.
pub enum Next {
    KeepAlive,
    Close,
    /// The target agreed to switch protocols: bytes now flow both ways untouched.
    Tunnel(Upstream),
}

/// Why an exchange failed before a response head reached the client.
enum Failure {
    /// Answer with this page (and close if the request body was not fully read).
    Status(ProxyStatus),
    /// Nothing sensible can be sent: close.
    Abort,
}

pub async fn exchange<S: AsyncReadRent + AsyncWriteRent>(
    client: &mut S,
    conn: &mut Conn,
    peer: SocketAddr,
    ctx: &Rc<WorkerCtx>,
) -> Next {
    if conn.scheme == super::connection::ClientScheme::Http
        && let Some(token) = conn.head.path().strip_prefix(crate::acme::HTTP01_PREFIX)
        && let Some(answer) = ctx.shared.acme_http01(token)
    {
        responses::acme_challenge(&mut conn.out, answer.as_deref(), conn.head.is_head());
        let _ = monoio::time::timeout(
            Duration::from_secs(10),
            write_vec(client, std::mem::take(&mut conn.out)),
        )
        .await;
        return Next::Close;
    }
    let table = ctx.routes();
    let head = &conn.head;
    let service = table
        .service(&head.host)
        .filter(|svc| {
            svc.route(head.path()).is_some()
                || (svc.auth.is_some() && head.path().starts_with(gate::RESERVED_PREFIX))
        })
        .cloned();
    let Some(service) = service else {
        return answer(client, conn, ProxyStatus::NotFound).await;
    };
    // A mesh carries its own account's services only.
    let foreign = matches!(&conn.arrival, Arrival::Mesh { account_id } if **account_id != *service.account_id);
    if foreign {
        return answer(client, conn, ProxyStatus::NotFound).await;
    }
    if head.method() == b"CONNECT" {
        return answer(client, conn, ProxyStatus::MethodNotAllowed).await;
    }
    let started = Instant::now();
    let mut record = RequestRecord::default();
    let client_ip = client_ip::resolve(peer.ip(), &ctx.shared.config.trusted_proxies, head);
    let crowdsec =
        crate::crowdsec::check(ctx.shared.crowdsec.as_deref(), service.crowdsec, client_ip);
    let refused_by_crowdsec = crowdsec.as_ref().is_some_and(|(_, refuse)| *refuse);
    if let Some((verdict, refuse)) = &crowdsec {
        tracing::info!(client = %client_ip, service = %service.id, %verdict, refused = refuse, "CrowdSec verdict");
    }
    record.crowdsec_verdict = crowdsec.map(|(verdict, _)| verdict);
    if !service.access.permits(client_ip) || refused_by_crowdsec {
        record.status = ProxyStatus::Forbidden.code();
        access_log::record(ctx, &service, conn, client_ip, started, &record);
        return answer(client, conn, ProxyStatus::Forbidden).await;
    }
    if service.private {
        // NetBird-only: the mesh peer is the credential; sign-in methods are never offered.
        let refused = match tunnel_peer::check(ctx, &service, &conn.arrival, peer.ip()).await {
            Ok(TunnelVerdict::Pass(identity)) => {
                record.gate.method = identity.method.clone();
                record.gate.success = true;
                record.identity = Some(identity);
                None
            }
            Ok(TunnelVerdict::Denied(reason)) => {
                tracing::debug!(service = %service.id, %peer, %reason, "private service refused");
                Some(ProxyStatus::Forbidden)
            }
            Err(e) => {
                tracing::warn!(service = %service.id, %peer, error = %e, "tunnel peer not checked; refused");
                Some(ProxyStatus::ServiceUnavailable)
            }
        };
        if let Some(status) = refused {
            record.status = status.code();
            record.gate.method = tunnel_peer::METHOD.into();
            access_log::record(ctx, &service, conn, client_ip, started, &record);
            return answer(client, conn, status).await;
        }
    }
    tracing::trace!(service = %service.id, path = head.path(), "routing request");

    // A private service's peers were let in above; password, PIN and SSO are bypassed.
    if let Some(auth) = service.auth.as_ref().filter(|_| !service.private) {
        match gate::check(
            client,
            conn,
            ctx,
            &service,
            auth,
            client_ip,
            &mut record.gate,
        )
        .await
        {
            Verdict::Pass(identity) => record.identity = Some(identity),
            Verdict::Answered { status, keep_alive } => {
                record.status = status;
                access_log::record(ctx, &service, conn, client_ip, started, &record);
                return if keep_alive {
                    Next::KeepAlive
                } else {
                    Next::Close
                };
            }
        }
    }
    let route = match service.route(conn.head.path()) {
        Some(r) => r,
        None => return answer(client, conn, ProxyStatus::NotFound).await,
    };
    let outcome = forward(client, conn, peer, ctx, &service, route, &mut record).await;
    let next = match outcome {
        Ok(next) => {
            record.status = conn.resp.status;
            next
        }
        Err(Failure::Status(status)) => {
            record.status = status.code();
            answer(client, conn, status).await
        }
        Err(Failure::Abort) => {
            if record.status == 0 {
                record.status = 499;
            }
            Next::Close
        }
    };
    access_log::record(ctx, &service, conn, client_ip, started, &record);
    next
}

/// What the access log needs to know about one exchange.
#[derive(Debug, Default)]
pub struct RequestRecord {
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub gate: GateLog,
    /// What CrowdSec said about the client (`metadata.crowdsec_verdict`).
    pub crowdsec_verdict: Option<String>,
    /// Who the gate let through, for the identity headers.
    pub identity: Option<Rc<Identity>>,
}

async fn forward<S: AsyncReadRent + AsyncWriteRent>(
    client: &mut S,
    conn: &mut Conn,
    peer: SocketAddr,
    ctx: &Rc<WorkerCtx>,
    service: &Service,
    route: &PathRoute,
    record: &mut RequestRecord,
) -> Result<Next, Failure> {
    let limits = ctx.shared.config.limits;
    let has_body = conn.head.framing != Framing::None;
    let expect_handled = conn.head.expect_continue && has_body;
    let fwd = Forwarding {
        client_ip: peer.ip().to_canonical(),
        trusted_proxies: &ctx.shared.config.trusted_proxies,
        proto: match ctx.shared.config.forwarded_proto {
            ForwardedProto::Http => "http",
            ForwardedProto::Https => "https",
            ForwardedProto::Auto => conn.scheme.as_str(),
        },
        expect_handled,
        identity: record.identity.as_deref(),
        strip_auth_cookies: service.auth.is_some(),
    };
    // Released while the connection idled; one allocation covers a typical head.
    conn.out.reserve(4096);
    rewrite::upstream_request(&mut conn.out, &conn.head, service, route, &fwd);

    let key: PoolKey = ctx
        .dialer
        .key(
            &service.account_id,
            &route.target,
            route.skip_tls_verify,
            route.direct_upstream,
        )
        .map_err(|e| {
            tracing::warn!(service = %service.id, error = %e, "target unreachable");
            Failure::Status(ProxyStatus::BadGateway)
        })?;
    let response_timeout = route.request_timeout.unwrap_or(limits.upstream_timeout);
    let dial_timeout = route
        .request_timeout
        .map_or(limits.dial_timeout, |t| t.min(limits.dial_timeout));

    // A pooled connection may have been closed by the target while idle; when that shows before
    // any response byte of a body-less request, the request is sent again on a new connection.
    let mut up = dial(ctx, &key, dial_timeout, service, false).await?;
    loop {
        let (res, out) = write_vec(&mut up.stream, std::mem::take(&mut conn.out)).await;
        conn.out = out;
        if let Err(e) = res {
            if up.reused && !has_body {
                up = dial(ctx, &key, dial_timeout, service, true).await?;
                continue;
            }
            tracing::debug!(service = %service.id, error = %e, "sending request to target failed");
            return Err(Failure::Status(ProxyStatus::BadGateway));
        }
        if has_body {
            if expect_handled
                && write_all(client, responses::CONTINUE_100, limits.idle_timeout)
                    .await
                    .is_err()
            {
                return Err(Failure::Abort);
            }
            match body::copy(
                client,
                &mut conn.inbuf,
                &mut up.stream,
                conn.head.framing,
                limits.idle_timeout,
            )
            .await
            {
                Ok(n) => record.bytes_up = n,
                Err(e) => {
                    tracing::debug!(service = %service.id, error = %e, "request body not forwarded");
                    return Err(match e {
                        BodyError::Chunked(_) => Failure::Status(ProxyStatus::BadRequest),
                        e if e.is_sender_fault() => Failure::Abort,
                        _ => Failure::Status(ProxyStatus::BadGateway),
                    });
                }
            }
        }
        match read_response_head(&mut up, conn, response_timeout).await {
            Ok(()) => break,
            Err(ReadHeadError::Closed) if up.reused && !has_body => {
                up = dial(ctx, &key, dial_timeout, service, true).await?;
            }
            Err(ReadHeadError::Timeout) => {
                tracing::warn!(service = %service.id, timeout = ?response_timeout, "target did not answer in time");
                return Err(Failure::Status(ProxyStatus::GatewayTimeout));
            }
            Err(e) => {
                tracing::warn!(service = %service.id, error = ?e, "target answered badly");
                return Err(Failure::Status(ProxyStatus::BadGateway));
            }
        }
    }

    let switching = conn.resp.status == 101;
    if switching && !conn.head.upgrade {
        return Err(Failure::Status(ProxyStatus::BadGateway));
    }
    // An HTTP/1.0 client cannot read chunked framing: it gets the payload, ended by close.
    let dechunk = conn.head.minor_version == 0 && conn.resp.framing == Framing::Chunked;
    let close = !conn.head.keep_alive
        || conn.resp.framing == Framing::UntilClose
        || ctx.shared.is_draining()
        || dechunk;
    let rctx = ResponseContext {
        service,
        route,
        public_host: conn.head.host_header(),
        public_scheme: conn.scheme.as_str(),
        close,
        client_http10: conn.head.minor_version == 0,
        dechunk,
    };
    rewrite::client_response(&mut conn.out, &conn.resp, &rctx);
    let head_len = conn.out.len();
    let body_framing = if switching || dechunk {
        conn.resp.framing
    } else {
        coalesce_buffered_body(conn)
    };
    let coalesced = (conn.out.len() - head_len) as u64;
    let (res, out) = match monoio::time::timeout(
        limits.idle_timeout,
        write_vec(client, std::mem::take(&mut conn.out)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => return Err(Failure::Abort),
    };
    conn.out = out;
    record.status = conn.resp.status;
    if res.is_err() {
        return Err(Failure::Abort);
    }
    if switching {
        return Ok(Next::Tunnel(up));
    }
    let output = if dechunk {
        body::Output::Dechunked
    } else {
        body::Output::AsIs
    };
    match body::copy_as(
        &mut up.stream,
        &mut conn.upbuf,
        client,
        body_framing,
        output,
        limits.idle_timeout,
    )
    .await
    {
        Ok(n) => record.bytes_down = coalesced + n,
        Err(e) => {
            tracing::debug!(service = %service.id, error = %e, "response body not forwarded");
            conn.upbuf.consume(usize::MAX);
            return Err(Failure::Abort);
        }
    }
    if conn.resp.keep_alive && conn.upbuf.is_empty() {
        ctx.dialer.release(up);
    }
    conn.upbuf.consume(usize::MAX);
    Ok(if close { Next::Close } else { Next::KeepAlive })
}

/// Most body bytes sent together with the response head.
const COALESCE_LIMIT: usize = 16 * 1024;

/// Moves the body bytes that arrived together with the response head (a whole small response,
/// usually) behind the head in `conn.out`, so head and body leave in one send. Returns the
/// framing of what is left to copy.
fn coalesce_buffered_body(conn: &mut Conn) -> Framing {
    let Framing::Length(len) = conn.resp.framing else {
        return conn.resp.framing;
    };
    let n = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(conn.upbuf.data().len())
        .min(COALESCE_LIMIT);
    conn.out.extend_from_slice(&conn.upbuf.data()[..n]);
    conn.upbuf.consume(n);
    Framing::Length(len - n as u64)
}

async fn dial(
    ctx: &Rc<WorkerCtx>,
    key: &PoolKey,
    timeout: Duration,
    service: &Service,
    fresh: bool,
) -> Result<Upstream, Failure> {
    let res = if fresh {
        ctx.dialer.connect(key, timeout).await
    } else {
        ctx.dialer.get(key, timeout).await
    };
    res.map_err(|e| {
        tracing::warn!(service = %service.id, error = %e, "cannot reach target");
        // A tunnel whose peer does not answer is an unreachable target, not a slow one.
        if e.is_timeout() && key.is_direct() {
            Failure::Status(ProxyStatus::GatewayTimeout)
        } else {
            Failure::Status(ProxyStatus::BadGateway)
        }
    })
}

#[derive(Debug)]
enum ReadHeadError {
    /// The target closed or reset before sending any byte.
    Closed,
    Timeout,
    Io,
    Bad(#[allow(dead_code)] HeadError),
    Truncated,
}

/// Reads the target's final response head into `conn.resp`, skipping interim 1xx responses
/// (the proxy already answered `100 Continue` itself when `expect_handled`).
async fn read_response_head(
    up: &mut Upstream,
    conn: &mut Conn,
    timeout: Duration,
) -> Result<(), ReadHeadError> {
    let deadline = monoio::time::Instant::now() + timeout;
    let is_head = conn.head.is_head();
    let mut got_any = !conn.upbuf.is_empty();
    loop {
        match conn.resp.parse(conn.upbuf.data(), is_head) {
            Ok(Some(n)) => {
                conn.upbuf.consume(n);
                if (100..200).contains(&conn.resp.status) && conn.resp.status != 101 {
                    // Interim responses carry no body; the final one follows.
                    continue;
                }
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => return Err(ReadHeadError::Bad(e)),
        }
        let n = match monoio::time::timeout_at(deadline, conn.upbuf.fill(&mut up.stream)).await {
            Err(_) => return Err(ReadHeadError::Timeout),
            Ok(Err(_)) if !got_any => return Err(ReadHeadError::Closed),
            Ok(Err(_)) => return Err(ReadHeadError::Io),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return Err(if got_any {
                ReadHeadError::Truncated
            } else {
                ReadHeadError::Closed
            });
        }
        got_any = true;
    }
}

/// Sends one of the proxy's own pages; closes when the request body was not read.
async fn answer<S: AsyncWriteRent>(client: &mut S, conn: &mut Conn, status: ProxyStatus) -> Next {
    let close = !conn.head.keep_alive || conn.head.framing != Framing::None;
    responses::error_page(&mut conn.out, status, close, conn.head.is_head());
    let (res, out) = match monoio::time::timeout(
        Duration::from_secs(10),
        write_vec(client, std::mem::take(&mut conn.out)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => return Next::Close,
    };
    conn.out = out;
    if res.is_err() || close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

async fn write_all<S: AsyncWriteRent>(
    dst: &mut S,
    bytes: &'static [u8],
    idle: Duration,
) -> Result<(), ()> {
    use monoio::io::AsyncWriteRentExt;
    match monoio::time::timeout(idle, dst.write_all(bytes)).await {
        Ok((Ok(_), _)) => Ok(()),
        _ => Err(()),
    }
}
