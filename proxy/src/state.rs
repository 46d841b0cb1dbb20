//! State shared by the control side and every worker: the published route table, the certificate
//! resolver, and the counters `/healthz` reports. Workers only read it or bump atomics.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::routes::RouteTable;
use crate::tls::SniResolver;

pub struct Shared {
    pub config: ProxyConfig,
    pub routes: ArcSwap<RouteTable>,
    pub certs: Arc<SniResolver>,
    pub tls: Arc<rustls::ServerConfig>,
    pub status: Status,
    drain_tx: watch::Sender<bool>,
    /// Most client connections at once.
    pub max_connections: usize,
}

/// Counters and flags for health reporting.
#[derive(Default)]
pub struct Status {
    pub active_connections: AtomicUsize,
    pub refused_connections: AtomicU64,
    pub draining: AtomicBool,
    pub management_connected: AtomicBool,
    pub initial_sync_complete: AtomicBool,
    pub io_driver: OnceLock<&'static str>,
    pub table_generation: AtomicU64,
}

impl Shared {
    pub fn new(
        config: ProxyConfig,
        routes: RouteTable,
        certs: Arc<SniResolver>,
        tls: Arc<rustls::ServerConfig>,
        max_connections: usize,
    ) -> Self {
        let (drain_tx, _) = watch::channel(false);
        Self {
            config,
            routes: ArcSwap::from_pointee(routes),
            certs,
            tls,
            status: Status::default(),
            drain_tx,
            max_connections,
        }
    }

    pub fn publish_routes(&self, table: RouteTable) {
        self.routes.store(Arc::new(table));
        self.status.table_generation.fetch_add(1, Ordering::Relaxed);
    }

    /// A receiver that turns `true` when the proxy starts draining.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    pub fn start_draining(&self) {
        self.status.draining.store(true, Ordering::SeqCst);
        self.drain_tx.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        self.status.draining.load(Ordering::Relaxed)
    }

    /// Counts a new client connection, or refuses it when the limit is reached.
    pub fn try_open_connection(self: &Arc<Self>) -> Option<ConnectionGuard> {
        let prev = self
            .status
            .active_connections
            .fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_connections {
            self.status
                .active_connections
                .fetch_sub(1, Ordering::AcqRel);
            self.status
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionGuard(self.clone()))
    }

    pub fn active_connections(&self) -> usize {
        self.status.active_connections.load(Ordering::Acquire)
    }
}

/// Releases a connection slot when the connection ends, however it ends.
pub struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0
            .status
            .active_connections
            .fetch_sub(1, Ordering::AcqRel);
    }
}
