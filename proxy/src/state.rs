//! State shared by the control side and every worker: the published route table, the certificate
//! resolver, and the counters `/healthz` reports. Workers only read it or bump atomics.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::ebpf::{FastPath, Splicer};
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
    /// Set once at start when the kernel fast path loaded with its splice programs.
    splicer: OnceLock<Splicer>,
    /// Why the kernel fast path is off, while it is.
    ebpf_state: std::sync::Mutex<String>,
    /// The loaded kernel fast path; used by the control thread only.
    pub fast_path: std::sync::Mutex<Option<FastPath>>,
    /// ACME challenges being solved; empty when ACME is off.
    pub acme_challenges: Arc<crate::acme::Challenges>,
    /// Each ACME domain's certificate state.
    pub acme_board: crate::acme::AcmeBoard,
    /// Which target addresses each account's WireGuard mesh carries, and how.
    pub mesh: Arc<crate::mesh::MeshTable>,
    /// The mesh backend and accounts, for `/healthz`.
    pub mesh_health: std::sync::Mutex<serde_json::Value>,
    /// Credential checks and session validation, answered by management.
    pub auth_calls: crate::control::auth_calls::AuthCalls,
    /// Failed credentials per (service, client address).
    pub lockout: crate::auth::lockout::Lockout,
    /// The CrowdSec bouncer's decisions, when NB_PROXY_CROWDSEC_API_URL is set.
    pub crowdsec: Option<Arc<crate::crowdsec::Bouncer>>,
    /// Where access logs go; set once management is configured.
    pub access_log: OnceLock<crate::auth::access_log::AccessLogQueue>,
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
    pub l4: L4Stats,
}

/// L4 counters, summed over workers.
#[derive(Default)]
pub struct L4Stats {
    /// TCP connections forwarded to a target.
    pub connections: AtomicU64,
    /// Of those, the ones the kernel splices.
    pub spliced: AtomicU64,
    /// Bytes copied through user space (zero for a spliced stream).
    pub user_space_bytes: AtomicU64,
    /// Connections and sessions refused by access restrictions in user space.
    pub denied: AtomicU64,
    pub udp_sessions: AtomicUsize,
}

impl Shared {
    pub fn new(
        config: ProxyConfig,
        routes: RouteTable,
        certs: Arc<SniResolver>,
        tls: Arc<rustls::ServerConfig>,
        max_connections: usize,
        acme_challenges: Arc<crate::acme::Challenges>,
    ) -> Self {
        let (drain_tx, _) = watch::channel(false);
        let crowdsec = config
            .crowdsec
            .clone()
            .map(|s| Arc::new(crate::crowdsec::Bouncer::new(s)));
        Self {
            crowdsec,
            config,
            routes: ArcSwap::from_pointee(routes),
            certs,
            tls,
            status: Status::default(),
            drain_tx,
            max_connections,
            splicer: OnceLock::new(),
            ebpf_state: std::sync::Mutex::new("off: not loaded".to_string()),
            fast_path: std::sync::Mutex::new(None),
            acme_challenges,
            acme_board: crate::acme::AcmeBoard::default(),
            mesh: Arc::default(),
            mesh_health: std::sync::Mutex::new(
                serde_json::json!({"backend": "off: no management connection"}),
            ),
            auth_calls: Default::default(),
            lockout: Default::default(),
            access_log: OnceLock::new(),
        }
    }

    /// The answer to an http-01 validation for `token`, or why not: `None` when this request is
    /// not ACME's to answer (http-01 off and nobody solving that token), so it is routed as
    /// any other request and a target's own ACME client keeps working behind the proxy.
    pub fn acme_http01(&self, token: &str) -> Option<Option<String>> {
        let answer = self.acme_challenges.http_answer(token);
        let ours = self
            .config
            .acme
            .as_ref()
            .is_some_and(|a| a.challenge == crate::acme::ChallengeKind::Http01);
        (ours || answer.is_some()).then_some(answer)
    }

    pub fn splicer(&self) -> Option<&Splicer> {
        self.splicer.get()
    }

    /// Only before the workers start.
    pub fn set_splicer(&self, splicer: Splicer) {
        let _ = self.splicer.set(splicer);
    }

    pub fn set_ebpf_state(&self, state: String) {
        *self.ebpf_state.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// `on: …` with what is attached, or `off: <reason>`.
    pub fn ebpf_state(&self) -> String {
        if let Some(fp) = self.fast_path().as_ref() {
            return fp.describe();
        }
        self.ebpf_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn fast_path(&self) -> std::sync::MutexGuard<'_, Option<FastPath>> {
        self.fast_path.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The XDP per-port counters, keyed `port/transport`.
    pub fn xdp_counters(&self) -> serde_json::Value {
        let guard = self.fast_path();
        let Some(fp) = guard.as_ref() else {
            return serde_json::Value::Null;
        };
        match fp.counters() {
            Ok(list) => list
                .iter()
                .map(|c| {
                    let proto = match c.protocol {
                        crate::ebpf::L4Protocol::Tcp => "tcp",
                        crate::ebpf::L4Protocol::Udp => "udp",
                    };
                    (
                        format!("{}/{proto}", c.port),
                        serde_json::json!({
                            "passed_packets": c.passed_packets,
                            "passed_bytes": c.passed_bytes,
                            "dropped_packets": c.dropped_packets,
                            "dropped_bytes": c.dropped_bytes,
                        }),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into(),
            Err(e) => serde_json::Value::String(format!("unreadable: {e}")),
        }
    }

    pub fn publish_routes(&self, table: RouteTable) {
        self.publish_routes_arc(Arc::new(table));
    }

    pub fn publish_routes_arc(&self, table: Arc<RouteTable>) {
        self.routes.store(table);
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
