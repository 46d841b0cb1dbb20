//! UDP ports: one session per client address, each with its own socket to the target, reaped
//! after the service's `session_idle_timeout` without traffic either way.
//!
//! Datagrams are moved with non-blocking system calls once the socket is readable, so one
//! 64 KiB buffer per port serves every session and nothing is allocated per datagram.
//!
//! Access rules (CIDRs, then countries) are checked for the datagram's source when its session
//! starts; the session's later datagrams come from the same address. There is no PROXY protocol
//! for UDP (`NB_PROXY_PROXY_PROTOCOL` applies to TCP listeners only): the source is the client.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use monoio::net::udp::UdpSocket;
use monoio::time::Instant;
use tokio::sync::watch;

use crate::dataplane::WorkerCtx;
use crate::routes::L4Service;
use crate::state::ConnectionGuard;

/// The largest datagram; a smaller buffer would cut datagrams silently.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams moved per readiness wake-up before other tasks get a turn.
const BATCH: usize = 64;

/// A socket registered with the runtime for readiness, and a second handle on the same socket
/// for the non-blocking calls.
pub struct PortSocket {
    ready: UdpSocket,
    io: StdUdp,
}

impl PortSocket {
    pub fn new(socket: StdUdp) -> std::io::Result<PortSocket> {
        socket.set_nonblocking(true)?;
        let io = socket.try_clone()?;
        Ok(PortSocket {
            ready: UdpSocket::from_std(socket)?,
            io,
        })
    }
}

struct Session {
    upstream: PortSocket,
    last_seen: Cell<Instant>,
    _guard: ConnectionGuard,
    /// The service as of the route table the session was last checked against; for the access
    /// log entry written when the session ends too.
    service: RefCell<std::sync::Arc<L4Service>>,
    started: std::time::Instant,
    bytes_up: Cell<u64>,
    bytes_down: Cell<u64>,
}

type Sessions = Rc<RefCell<HashMap<SocketAddr, Rc<Session>>>>;

/// Serves one worker's socket of a UDP port until the port is closed or the proxy drains.
pub async fn serve(
    socket: PortSocket,
    port: u16,
    ctx: Rc<WorkerCtx>,
    mut closed: watch::Receiver<bool>,
) {
    let socket = Rc::new(socket);
    let sessions: Sessions = Rc::default();
    let buf = Rc::new(RefCell::new(vec![0u8; MAX_DATAGRAM]));
    let mut drain = ctx.shared.drain_signal();
    loop {
        if *closed.borrow() || *drain.borrow() {
            break;
        }
        let ready = monoio::select! {
            r = socket.ready.readable(false) => r,
            _ = closed.changed() => break,
            _ = drain.changed() => break,
        };
        if let Err(e) = ready {
            tracing::debug!(port, error = %e, "UDP wait failed");
            monoio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for _ in 0..BATCH {
            let mut b = buf.borrow_mut();
            let (n, client) = match socket.io.recv_from(&mut b) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(port, error = %e, "UDP receive failed");
                    break;
                }
            };
            let Some(session) = session_for(client, port, &ctx, &socket, &sessions, &buf) else {
                continue;
            };
            session.last_seen.set(Instant::now());
            // A full send buffer drops the datagram, as the network would.
            if session.upstream.io.send(&b[..n]).is_ok() {
                session.bytes_up.set(session.bytes_up.get() + n as u64);
            }
        }
    }
    // Sessions notice the closed port on their own and end.
    sessions.borrow_mut().clear();
}

fn session_for(
    client: SocketAddr,
    port: u16,
    ctx: &Rc<WorkerCtx>,
    socket: &Rc<PortSocket>,
    sessions: &Sessions,
    buf: &Rc<RefCell<Vec<u8>>>,
) -> Option<Rc<Session>> {
    let existing = sessions.borrow().get(&client).cloned();
    let service = ctx.routes().l4.udp.get(&port).cloned();
    if let Some(session) = existing {
        let Some(service) = service else {
            end(sessions, client, &session);
            return None;
        };
        if std::sync::Arc::ptr_eq(&service, &session.service.borrow()) {
            return Some(session);
        }
        // The route table changed since this session was checked: rules that now refuse the
        // client end it, rather than letting it run until it idles out.
        if !permitted(ctx, &service, client) {
            end(sessions, client, &session);
            return None;
        }
        *session.service.borrow_mut() = service;
        return Some(session);
    }
    let service = service?;
    if !permitted(ctx, &service, client) {
        return None;
    }
    let guard = ctx.shared.try_open_connection()?;
    let target = match ctx.dialer.resolve_l4(&service.target) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(service = %service.id, error = %e, "UDP target not resolved");
            return None;
        }
    };
    let upstream = match connect(target) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(service = %service.id, %target, error = %e, "UDP target socket failed");
            return None;
        }
    };
    let idle = ctx
        .shared
        .config
        .cap_session_idle(service.session_idle_timeout);
    let session = Rc::new(Session {
        upstream,
        last_seen: Cell::new(Instant::now()),
        _guard: guard,
        service: RefCell::new(service),
        started: std::time::Instant::now(),
        bytes_up: Cell::new(0),
        bytes_down: Cell::new(0),
    });
    sessions.borrow_mut().insert(client, session.clone());
    ctx.shared
        .status
        .l4
        .udp_sessions
        .fetch_add(1, Ordering::Relaxed);
    monoio::spawn(replies(
        session.clone(),
        client,
        idle,
        ctx.clone(),
        socket.clone(),
        sessions.clone(),
        buf.clone(),
    ));
    Some(session)
}

/// Ends a session now: out of the table, and its reply task woken (shutting the target socket
/// down makes it readable) so the session is counted and logged at once, not when it idles out.
fn end(sessions: &Sessions, client: SocketAddr, session: &Session) {
    sessions.borrow_mut().remove(&client);
    let _ = socket2::SockRef::from(&session.upstream.io).shutdown(std::net::Shutdown::Both);
}

/// True while `session` is the one the table holds for `client` (not ended, not replaced).
fn is_current(sessions: &Sessions, client: SocketAddr, session: &Rc<Session>) -> bool {
    sessions
        .borrow()
        .get(&client)
        .is_some_and(|s| Rc::ptr_eq(s, session))
}

/// The service's CIDR, country and CrowdSec rules for `client`; a refusal is counted.
fn permitted(ctx: &WorkerCtx, service: &L4Service, client: SocketAddr) -> bool {
    let stats = &ctx.shared.status.l4;
    if !service.access.permits(client.ip()) {
        stats.denied.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if let Some((verdict, refuse)) = crate::crowdsec::check(
        ctx.shared.crowdsec.as_deref(),
        service.crowdsec,
        client.ip(),
    ) {
        tracing::info!(%client, service = %service.id, %verdict, refused = refuse, "CrowdSec verdict");
        if refuse {
            stats.denied.fetch_add(1, Ordering::Relaxed);
            return false;
        }
    }
    true
}

fn connect(target: SocketAddr) -> std::io::Result<PortSocket> {
    let local: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = StdUdp::bind(local)?;
    s.connect(target)?;
    PortSocket::new(s)
}

/// Carries the target's datagrams back to the client until the session has been idle for
/// `idle` or the port closes.
async fn replies(
    session: Rc<Session>,
    client: SocketAddr,
    idle: Duration,
    ctx: Rc<WorkerCtx>,
    socket: Rc<PortSocket>,
    sessions: Sessions,
    buf: Rc<RefCell<Vec<u8>>>,
) {
    let mut drain = ctx.shared.drain_signal();
    loop {
        let expires = session.last_seen.get() + idle;
        if Instant::now() >= expires || *drain.borrow() {
            break;
        }
        let woke = monoio::select! {
            r = session.upstream.ready.readable(false) => Some(r),
            _ = monoio::time::sleep_until(expires) => None,
            _ = drain.changed() => None,
        };
        match woke {
            Some(Ok(())) => {}
            Some(Err(_)) => break,
            None => continue,
        }
        // Ended while waiting (its rules changed, or the port closed): nothing more goes back.
        if !is_current(&sessions, client, &session) {
            break;
        }
        for _ in 0..BATCH {
            let mut b = buf.borrow_mut();
            match session.upstream.io.recv(&mut b) {
                Ok(n) => {
                    session.last_seen.set(Instant::now());
                    if socket.io.send_to(&b[..n], client).is_ok() {
                        session.bytes_down.set(session.bytes_down.get() + n as u64);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // ICMP port unreachable from the target shows up here; the session lives on
                // until idle, as the target may come back.
                Err(_) => break,
            }
        }
    }
    if is_current(&sessions, client, &session) {
        sessions.borrow_mut().remove(&client);
    }
    crate::http::access_log::record_l4(
        &ctx,
        &session.service.borrow(),
        client.ip(),
        session.started,
        (session.bytes_up.get(), session.bytes_down.get()),
        "udp",
        false,
    );
    ctx.shared
        .status
        .l4
        .udp_sessions
        .fetch_sub(1, Ordering::Relaxed);
}
