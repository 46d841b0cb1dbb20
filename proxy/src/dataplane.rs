//! The data plane: one monoio runtime per worker thread (io_uring, epoll as fallback), each with
//! its own `SO_REUSEPORT` listeners, upstream pool and route-table snapshot.

pub mod connect;
pub mod inbuf;
pub mod listener;
pub mod proxy_protocol;
pub mod pump;
pub mod readable;
pub mod upstream;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;

use monoio::net::{TcpListener, TcpStream};
use monoio::time::Instant;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use crate::config::{HttpMode, IoDriverChoice};
use crate::http::connection::{Arrival, ClientScheme};
use crate::routes::RouteTable;
use crate::state::Shared;
use crate::tls::{TlsServerStream, UpstreamTls};
use listener::BoundListeners;
use upstream::Dialer;

/// The L4 ports the control side opens for one worker.
pub type PortCommands = tokio::sync::mpsc::Receiver<crate::l4::OpenPort>;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker {id}: cannot start the {driver} runtime: {source}")]
    Runtime {
        id: usize,
        driver: &'static str,
        source: std::io::Error,
    },
    #[error("worker {id}: cannot use its listening socket: {source}")]
    Listener { id: usize, source: std::io::Error },
    #[error("cannot start worker thread: {0}")]
    Thread(std::io::Error),
}

/// What one worker owns. Lives on that worker's thread only.
pub struct WorkerCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub dialer: Dialer,
    /// `Rc` over the shared `Arc` on purpose: cloning it per request touches only this
    /// worker's counter, never the cache line every core shares.
    #[allow(clippy::redundant_allocation)]
    routes: RefCell<Rc<Arc<RouteTable>>>,
    /// Session tokens this worker already verified.
    pub sessions: RefCell<crate::auth::session_cache::SessionCache>,
    /// Mesh peers this worker recently let into private services.
    pub tunnel_peers: RefCell<crate::auth::tunnel_peer::TunnelPeerCache>,
}

impl WorkerCtx {
    /// The current route table. One atomic load per call; the refcount touched on the hot path
    /// is this worker's own `Rc`, not the shared `Arc`.
    #[allow(clippy::redundant_allocation)]
    pub fn routes(&self) -> Rc<Arc<RouteTable>> {
        let latest = self.shared.routes.load();
        let mut current = self.routes.borrow_mut();
        if !Arc::ptr_eq(&latest, &current) {
            *current = Rc::new(arc_swap::Guard::into_inner(latest));
        }
        current.clone()
    }
}

/// Which driver a worker should run.
pub fn pick_driver(choice: IoDriverChoice) -> &'static str {
    match choice {
        IoDriverChoice::Legacy => "legacy",
        IoDriverChoice::IoUring => "io_uring",
        IoDriverChoice::Auto if monoio::utils::detect_uring() => "io_uring",
        IoDriverChoice::Auto => "legacy",
    }
}

/// Starts the workers; returns once every one of them runs its accept loops.
pub fn start(
    shared: Arc<Shared>,
    listeners: Vec<BoundListeners>,
    port_commands: Vec<PortCommands>,
    upstream_tls: UpstreamTls,
) -> Result<Vec<std::thread::JoinHandle<()>>, WorkerError> {
    let driver = pick_driver(shared.config.io_driver);
    if shared.config.proxy_protocol && shared.config.trusted_proxies.is_empty() {
        tracing::warn!(
            "NB_PROXY_PROXY_PROTOCOL is on but NB_PROXY_TRUSTED_PROXIES is empty: PROXY headers \
             are accepted only from trusted proxies, so none will be; set NB_PROXY_TRUSTED_PROXIES \
             to the load balancer's addresses"
        );
    }
    let _ = shared.status.io_driver.set(driver);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), WorkerError>>();
    let mut handles = Vec::new();
    let count = listeners.len();
    for (id, (bound, ports)) in listeners.into_iter().zip(port_commands).enumerate() {
        let shared = shared.clone();
        let tls = upstream_tls.clone();
        let ready = ready_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("portcullis-worker-{id}"))
            .spawn(move || run_worker(id, driver, shared, bound, ports, tls, ready))
            .map_err(WorkerError::Thread)?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..count {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    Ok(handles)
}

fn run_worker(
    id: usize,
    driver: &'static str,
    shared: Arc<Shared>,
    bound: BoundListeners,
    ports: PortCommands,
    tls: UpstreamTls,
    ready: mpsc::Sender<Result<(), WorkerError>>,
) {
    let runtime_err = |source| WorkerError::Runtime { id, driver, source };
    let work = move || worker_main(id, shared, bound, ports, tls, ready.clone());
    let result = if driver == "io_uring" {
        RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .with_entries(4096)
            .build()
            .map(|mut rt| rt.block_on(work()))
    } else {
        RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(work()))
    };
    if let Err(e) = result {
        tracing::error!(error = %runtime_err(e), "worker stopped");
    }
}

async fn worker_main(
    id: usize,
    shared: Arc<Shared>,
    bound: BoundListeners,
    ports: PortCommands,
    tls: UpstreamTls,
    ready: mpsc::Sender<Result<(), WorkerError>>,
) {
    let listener_err = |source| WorkerError::Listener { id, source };
    let https = match TcpListener::from_std(bound.https) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(listener_err(e)));
            return;
        }
    };
    let http = match bound.http.map(TcpListener::from_std).transpose() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(listener_err(e)));
            return;
        }
    };
    let acme = match bound.acme.map(TcpListener::from_std).transpose() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(listener_err(e)));
            return;
        }
    };
    let routes = RefCell::new(Rc::new(shared.routes.load_full()));
    let ctx = Rc::new(WorkerCtx {
        id,
        shared: shared.clone(),
        dialer: Dialer::new(tls, shared.mesh.clone()),
        routes,
        sessions: RefCell::default(),
        tunnel_peers: RefCell::default(),
    });
    let server_tls = shared.tls.clone();
    monoio::spawn(crate::l4::serve_ports(ports, ctx.clone()));
    if let Some(acme) = acme {
        // Answers http-01 validations; anything else is redirected like on the HTTP listener.
        monoio::spawn(accept_loop(acme, ctx.clone(), |tcp, _peer, ctx, at| {
            crate::http::redirect::serve(tcp, ctx, at)
        }));
    }
    let _ = ready.send(Ok(()));
    tracing::debug!(worker = id, "worker running");
    let https_loop = accept_loop(https, ctx.clone(), move |tcp, peer, ctx, at| {
        let config = server_tls.clone();
        async move {
            let Some((tcp, peer)) = behind_balancer(tcp, peer, &ctx).await else {
                return;
            };
            serve_https(config, tcp, peer, ctx, at, Arrival::Public).await
        }
    });
    match http {
        Some(http) => match ctx.shared.config.http_mode {
            HttpMode::Redirect => {
                // No PROXY header here: like NetBird's port-80 (http-01) listener, the redirect
                // and ACME answers are served to whoever connects, so a balancer forwards it plain.
                let http_loop = accept_loop(http, ctx.clone(), |tcp, _peer, ctx, at| {
                    crate::http::redirect::serve(tcp, ctx, at)
                });
                monoio::join!(https_loop, http_loop);
            }
            HttpMode::Serve => {
                let http_loop = accept_loop(http, ctx.clone(), |tcp, peer, ctx, at| async move {
                    let Some((tcp, peer)) = behind_balancer(tcp, peer, &ctx).await else {
                        return;
                    };
                    crate::http::connection::serve(
                        tcp,
                        peer,
                        ctx,
                        at,
                        ClientScheme::Http,
                        Arrival::Public,
                    )
                    .await
                });
                monoio::join!(https_loop, http_loop);
            }
        },
        None => https_loop.await,
    }
    tracing::debug!(worker = id, "worker stopped accepting");
    // In-flight connections finish on their own tasks; the process exits when they are done
    // or the shutdown timeout passes.
    std::future::pending::<()>().await;
}

async fn accept_loop<F, Fut>(listener: TcpListener, ctx: Rc<WorkerCtx>, handler: F)
where
    F: Fn(TcpStream, SocketAddr, Rc<WorkerCtx>, Instant) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    accept_until(listener, ctx, None, handler).await
}

/// Resolves once `closed` says so (or its sender is gone); never without one.
async fn until_closed(closed: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    let Some(c) = closed else {
        return std::future::pending().await;
    };
    while !*c.borrow_and_update() {
        if c.changed().await.is_err() {
            return;
        }
    }
}

/// Accepts one account's mesh connections (NB_PROXY_PRIVATE) until `closed`: HTTPS, marked as
/// having arrived over that account's mesh.
pub async fn serve_mesh_inbound(
    listener: std::net::TcpListener,
    account_id: Arc<str>,
    ctx: Rc<WorkerCtx>,
    closed: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(account = %account_id, error = %e, "cannot serve the mesh listener");
            return;
        }
    };
    let server_tls = ctx.shared.tls.clone();
    accept_until(listener, ctx, Some(closed), move |tcp, peer, ctx, at| {
        let arrival = Arrival::Mesh {
            account_id: account_id.clone(),
        };
        serve_https(server_tls.clone(), tcp, peer, ctx, at, arrival)
    })
    .await;
}

async fn accept_until<F, Fut>(
    listener: TcpListener,
    ctx: Rc<WorkerCtx>,
    mut closed: Option<tokio::sync::watch::Receiver<bool>>,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr, Rc<WorkerCtx>, Instant) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let mut drain = ctx.shared.drain_signal();
    let mut fd_warned_at: Option<Instant> = None;
    loop {
        if *drain.borrow() {
            return;
        }
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = drain.changed() => return,
            _ = until_closed(&mut closed) => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Some(guard) = ctx.shared.try_open_connection() else {
                    tracing::debug!(%peer, "connection limit reached, refusing connection");
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                // Boxed: an async block that awaits a future it captured keeps room for it twice,
                // and this one is a whole connection's state.
                let fut = Box::pin(handler(tcp, peer, ctx.clone(), Instant::now()));
                monoio::spawn(async move {
                    fut.await;
                    drop(guard);
                });
            }
            Err(e) => {
                // EMFILE / ENFILE
                let out_of_fds = matches!(e.raw_os_error(), Some(24) | Some(23));
                if out_of_fds {
                    let now = Instant::now();
                    if fd_warned_at.is_none_or(|t| now.duration_since(t).as_secs() >= 10) {
                        tracing::error!(
                            "out of file descriptors: cannot accept connections; raise LimitNOFILE \
                             or lower NB_PROXY_MAX_CONNECTIONS"
                        );
                        fd_warned_at = Some(now);
                    }
                    monoio::time::sleep(std::time::Duration::from_millis(50)).await;
                } else {
                    tracing::debug!(error = %e, "accept failed");
                }
            }
        }
    }
}

/// With `NB_PROXY_PROXY_PROTOCOL`, a connection from a trusted balancer starts with a PROXY
/// header naming the client; `None` when that header is missing or bad (the connection ends).
async fn behind_balancer(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: &WorkerCtx,
) -> Option<(TcpStream, SocketAddr)> {
    proxy_protocol::accept(tcp, peer, &ctx.shared.config)
        .await
        .map(|(tcp, origin)| (tcp, origin.client))
}

async fn serve_https(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: Rc<WorkerCtx>,
    accepted_at: Instant,
    arrival: Arrival,
) {
    let deadline = accepted_at + ctx.shared.config.limits.header_timeout;
    // Boxed so the handshake's state is freed once it is done (see connection::serve).
    let tls =
        match monoio::time::timeout_at(deadline, Box::pin(TlsServerStream::accept(tcp, config)))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
    if tls.alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) {
        // A tls-alpn-01 validator: the handshake was the whole answer (RFC 8737 §3).
        tracing::debug!(%peer, "answered an ACME tls-alpn-01 validation");
        return;
    }
    crate::http::connection::serve(tls, peer, ctx, accepted_at, ClientScheme::Https, arrival).await;
}
