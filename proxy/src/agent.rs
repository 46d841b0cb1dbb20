//! `portcullis agent`: joins an account's WireGuard mesh from a machine that runs targets.
//!
//! Registers once with a setup key (the identity is kept in the state directory), then follows
//! management's `Agent.Sync` stream: every `AgentConfig` replaces the interface's peers (the
//! account's proxies) and, on a routing peer, the forwarding rules. Reconnects with backoff; a
//! deleted peer (UNAUTHENTICATED) ends the agent with an error.

mod args;
mod channel;
mod desired;
mod firewall;
mod net;
mod state;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proto::mesh::agent_client::AgentClient;
use proto::mesh::{AgentSyncRequest, RegisterRequest};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};
use wireguard_control::KeyPair;

pub use args::{AgentArgs, Settings, SettingsError};
use net::AgentNet;
use state::AgentState;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Channel(#[from] channel::ChannelError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen for SIGINT/SIGTERM: {0}")]
    Signals(std::io::Error),
    #[error(
        "no agent state for {url} in {dir}: --setup-key (PORTCULLIS_AGENT_SETUP_KEY) is required for the first registration"
    )]
    NoSetupKey { url: String, dir: String },
    #[error("management refused the registration ({code:?}): {message}")]
    Refused { code: Code, message: String },
    #[error("the peer token is not valid in gRPC metadata; remove {0} and register again")]
    BadToken(String),
    #[error(
        "management no longer knows this peer ({0}); its state was moved aside, start again with a setup key to rejoin"
    )]
    PeerDeleted(String),
}

/// Runs until SIGINT/SIGTERM (`Ok(0)`) or a fatal error.
pub fn run(args: &AgentArgs) -> Result<i32, AgentError> {
    let settings = Settings::from_args(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(async {
        let mut signals = Shutdown::install()?;
        run_until(settings, async move { signals.wait().await }).await
    })
}

/// The agent until `shutdown` completes (`Ok(0)`, after removing what it set up) or a fatal
/// error.
pub async fn run_until(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<i32, AgentError> {
    let client = AgentClient::new(channel::connect(&settings)?);
    tokio::pin!(shutdown);
    let identity = tokio::select! {
        () = &mut shutdown => return Ok(0),
        identity = identity(&settings, client.clone()) => identity?,
    };
    let token: MetadataValue<Ascii> =
        format!("Bearer {}", identity.peer_token)
            .parse()
            .map_err(|_| {
                AgentError::BadToken(state::path(&settings.state_dir).display().to_string())
            })?;
    let key = identity.key()?;
    tracing::info!(peer_id = %identity.peer_id, public_key = %key.get_public().to_base64(), management = %settings.management, "agent registered");
    let net = Arc::new(Mutex::new(AgentNet::new(
        &settings.interface,
        settings.backend,
        key,
        settings.preshared_key.clone(),
    )));
    let outcome = tokio::select! {
        () = &mut shutdown => {
            tracing::info!("shutting down");
            Ok(0)
        }
        deleted = follow(client, &identity.peer_id, &token, &net) => Err(deleted),
    };
    // Teardown waits for an apply in flight (it holds the lock), then removes what exists.
    let teardown = Arc::clone(&net);
    let _ = tokio::task::spawn_blocking(move || {
        teardown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    })
    .await;
    match outcome {
        Ok(code) => Ok(code),
        Err(status) => {
            match state::retire(&settings.state_dir) {
                Ok(to) => tracing::warn!(moved_to = %to.display(), "agent state moved aside"),
                Err(e) => tracing::warn!(error = %e, "cannot move the agent state aside"),
            }
            Err(AgentError::PeerDeleted(status.message().to_string()))
        }
    }
}

// === identity ===

/// The stored identity for this management, else a new key registered with the setup key.
async fn identity(
    settings: &Settings,
    mut client: AgentClient<Channel>,
) -> Result<AgentState, AgentError> {
    match state::load(&settings.state_dir)? {
        Some(state) if state.management_url == settings.management => return Ok(state),
        Some(state) => tracing::info!(
            stored = %state.management_url,
            management = %settings.management,
            "the stored agent state belongs to another management; registering again"
        ),
        None => {}
    }
    let Some(setup_key) = settings.setup_key.clone() else {
        return Err(AgentError::NoSetupKey {
            url: settings.management.clone(),
            dir: settings.state_dir.display().to_string(),
        });
    };
    let keys = KeyPair::generate();
    let request = RegisterRequest {
        setup_key,
        public_key: keys.public.to_base64(),
        name: settings.name.clone(),
    };
    let mut backoff = Backoff::new();
    // Bounded per attempt (connect timeout) and by the caller's shutdown signal.
    let response = loop {
        match client.register(request.clone()).await {
            Ok(response) => break response.into_inner(),
            Err(status) if retryable(&status) => {
                let wait = backoff.step();
                tracing::warn!(code = ?status.code(), error = %status.message(), retry_in = ?wait, "cannot register with management");
                tokio::time::sleep(wait).await;
            }
            Err(status) => {
                return Err(AgentError::Refused {
                    code: status.code(),
                    message: status.message().to_string(),
                });
            }
        }
    };
    let state = AgentState {
        management_url: settings.management.clone(),
        peer_id: response.peer_id,
        peer_token: response.peer_token,
        private_key: keys.private.to_base64(),
    };
    state::save(&settings.state_dir, &state)?;
    tracing::info!(peer_id = %state.peer_id, tunnel_address = %response.tunnel_address, name = %settings.name, "registered with management");
    Ok(state)
}

fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
    )
}

// === sync ===

/// Follows the configuration stream, reconnecting with backoff; returns only when management
/// says the peer is gone.
async fn follow(
    mut client: AgentClient<Channel>,
    peer_id: &str,
    token: &MetadataValue<Ascii>,
    net: &Arc<Mutex<AgentNet>>,
) -> Status {
    let mut backoff = Backoff::new();
    // Ends by returning (peer deleted) or by the caller dropping it (shutdown).
    loop {
        let mut request = tonic::Request::new(AgentSyncRequest {
            peer_id: peer_id.to_string(),
        });
        request
            .metadata_mut()
            .insert("authorization", token.clone());
        let why = match client.sync(request).await {
            Err(status) => status,
            Ok(response) => {
                tracing::debug!("connected to management, waiting for the configuration");
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(config)) => {
                            if apply(&config, net).await {
                                backoff.reset();
                            } else {
                                // A fresh stream brings a fresh snapshot to try again with.
                                break Status::aborted("the configuration could not be applied");
                            }
                        }
                        Ok(None) => break Status::unavailable("management ended the stream"),
                        Err(status) => break status,
                    }
                }
            }
        };
        if why.code() == Code::Unauthenticated {
            tracing::error!(error = %why.message(), "management rejected this peer's token: the peer was deleted");
            return why;
        }
        let wait = backoff.step();
        tracing::warn!(code = ?why.code(), error = %why.message(), retry_in = ?wait, "lost the configuration stream");
        tokio::time::sleep(wait).await;
    }
}

/// Applies one configuration; `false` (after logging why) when it failed.
async fn apply(config: &proto::mesh::AgentConfig, net: &Arc<Mutex<AgentNet>>) -> bool {
    let desired = match desired::resolve(config).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "ignoring a configuration");
            return false;
        }
    };
    let net = Arc::clone(net);
    let applied = tokio::task::spawn_blocking(move || {
        net.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(&desired)
    })
    .await;
    match applied {
        Ok(Ok(a)) => {
            tracing::info!(
                routed_networks = a.routed,
                listen_port = a.listen_port,
                "agent up: interface {} ({}), tunnel address {}, {} proxies",
                a.interface,
                a.backend,
                a.address,
                a.proxies
            );
            true
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot apply the configuration");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "applying the configuration failed");
            false
        }
    }
}

// === plumbing ===

struct Shutdown {
    interrupt: Signal,
    terminate: Signal,
}

impl Shutdown {
    fn install() -> Result<Shutdown, AgentError> {
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt()).map_err(AgentError::Signals)?,
            terminate: signal(SignalKind::terminate()).map_err(AgentError::Signals)?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// 1 s, doubling, capped at 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(30);

    fn new() -> Backoff {
        Backoff { next: Self::START }
    }

    fn reset(&mut self) {
        self.next = Self::START;
    }

    fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        now
    }
}

#[cfg(test)]
mod fake_management;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let steps: Vec<u64> = (0..7).map(|_| b.step().as_secs()).collect();
        assert_eq!(steps, [1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.step().as_secs(), 1);
    }
}
