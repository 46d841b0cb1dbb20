//! The agent against a fake management's `Agent` service: registers, brings the interface and
//! the routing rules up, removes them on shutdown, reuses its state on restart and exits with
//! an error once the peer is deleted. Needs root and wireguard-go; skips without them.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::mesh::agent_server::{Agent, AgentServer};
use proto::mesh::{AgentConfig, AgentSyncRequest, ProxyPeer, RegisterRequest, RegisterResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wireguard_control::Key;

use super::*;
use crate::mesh::device::{self, cmd};

const TOKEN: &str = "peer-token-1";

#[derive(Default)]
struct Fake {
    registered: AtomicU32,
    deleted: AtomicBool,
    proxy_key: String,
    streams: Mutex<Vec<mpsc::Sender<Result<AgentConfig, Status>>>>,
}

/// The service and the test share one fake.
struct Shared(Arc<Fake>);

#[tonic::async_trait]
impl Agent for Shared {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        if request.get_ref().setup_key != "setup-1" {
            return Err(Status::permission_denied("bad setup key"));
        }
        self.0.registered.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(RegisterResponse {
            peer_id: "peer-1".into(),
            peer_token: TOKEN.into(),
            tunnel_address: "100.64.0.7/10".into(),
        }))
    }

    type SyncStream = ReceiverStream<Result<AgentConfig, Status>>;

    async fn sync(
        &self,
        request: Request<AgentSyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if self.0.deleted.load(Ordering::SeqCst) || bearer != Some(&format!("Bearer {TOKEN}")) {
            return Err(Status::unauthenticated("unknown peer"));
        }
        let (tx, rx) = mpsc::channel(4);
        let config = AgentConfig {
            tunnel_address: "100.64.0.7/10".into(),
            proxies: vec![ProxyPeer {
                public_key: self.0.proxy_key.clone(),
                endpoint: "127.0.0.1:51999".into(),
                allowed_ips: vec!["100.64.0.1/32".into()],
                persistent_keepalive: 25,
            }],
            routed_networks: vec!["10.99.0.0/24".into()],
        };
        let _ = tx.send(Ok(config)).await;
        self.0
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root");
    }
    if cmd::run("wireguard-go", &["--version"], None).is_err() {
        return Some("wireguard-go is not installed");
    }
    if cmd::run("nft", &["--version"], None).is_err() {
        return Some("nft is not installed");
    }
    None
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn agent_follows_management() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped agent_follows_management: {reason}");
        return;
    }
    let proxy_key = Key::generate_private().get_public().to_base64();
    let fake = Arc::new(Fake {
        proxy_key: proxy_key.clone(),
        ..Fake::default()
    });
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let server = tonic::transport::Server::builder()
        .add_service(AgentServer::new(Shared(Arc::clone(&fake))))
        .serve(addr);
    let server = tokio::spawn(server);

    let state_dir = std::env::temp_dir().join(format!("pc-agent-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let interface = device::unique_interface_name("pca");
    let settings = Settings {
        management: format!("http://{addr}"),
        setup_key: Some("setup-1".into()),
        name: "test-agent".into(),
        state_dir: state_dir.clone(),
        interface: interface.clone(),
        backend: device::BackendChoice::Tun,
        ca_file: None,
        allow_insecure: true,
        preshared_key: None,
    };

    // First run: registers, comes up, goes away on shutdown.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run_until(settings.clone(), async move {
        let _ = stopped.await;
    }));
    let table = format!("portcullis_agent_{}", interface.replace('-', "_"));
    wait_for("the proxy peer", || {
        cmd::run("wg", &["show", &interface, "peers"], None)
            .is_ok_and(|peers| peers.contains(&proxy_key))
    })
    .await;
    let rules = cmd::run("nft", &["list", "table", "inet", &table], None).expect("our table");
    assert!(
        rules.contains("100.64.0.1") && rules.contains("10.99.0.0/24"),
        "{rules}"
    );
    let addrs = cmd::run("ip", &["-o", "address", "show", "dev", &interface], None).expect("ip");
    assert!(addrs.contains("100.64.0.7/10"), "{addrs}");
    assert!(state::load(&state_dir).expect("state").is_some());
    let _ = stop.send(());
    let code = agent.await.expect("agent task").expect("clean exit");
    assert_eq!(code, 0);
    assert!(cmd::run("ip", &["link", "show", "dev", &interface], None).is_err());
    assert!(cmd::run("nft", &["list", "table", "inet", &table], None).is_err());

    // Second run: the stored identity is used (no new registration, no setup key needed);
    // then the peer is deleted and the agent ends with an error and retires its state.
    let restarted = Settings {
        setup_key: None,
        ..settings
    };
    let agent = tokio::spawn(run_until(restarted, std::future::pending()));
    wait_for("the reconnected stream", || {
        fake.streams.lock().is_ok_and(|s| s.len() == 2)
    })
    .await;
    assert_eq!(fake.registered.load(Ordering::SeqCst), 1);
    fake.deleted.store(true, Ordering::SeqCst);
    fake.streams
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
    let ended = tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("agent ends")
        .expect("agent task");
    assert!(
        matches!(ended, Err(AgentError::PeerDeleted(_))),
        "{ended:?}"
    );
    assert!(state::load(&state_dir).expect("no state").is_none());
    assert!(cmd::run("ip", &["link", "show", "dev", &interface], None).is_err());

    server.abort();
    let _ = std::fs::remove_dir_all(&state_dir);
}
