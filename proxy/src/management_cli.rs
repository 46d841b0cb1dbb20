//! `portcullis management …`: run the management server, bootstrap an account, mint tokens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use management::server::{Management, ManagementConfig, ServeError};
use management::store::{Store, StoreError};

#[derive(Debug, Args)]
pub struct ManagementArgs {
    #[command(subcommand)]
    pub action: ManagementAction,
}

#[derive(Debug, Subcommand)]
pub enum ManagementAction {
    /// Serve gRPC for proxies and the REST API for people.
    Serve(ServeArgs),
    /// Create an account with an owner and print the owner's personal access token (once).
    Bootstrap(BootstrapArgs),
    /// Mint a proxy token and print it (once): account-scoped, or management-wide with --shared.
    ProxyToken(ProxyTokenArgs),
}

#[derive(Debug, Args, Clone)]
pub struct StoreArgs {
    /// Directory of the SQLite store (management.db) when no store URL is given.
    #[arg(long, env = "PORTCULLIS_DATA_DIR", default_value = "./portcullis-data")]
    pub data_dir: PathBuf,
    /// Store URL: `postgres://user:password@host/db` for several replicas; default SQLite in the data dir.
    #[arg(long, env = "PORTCULLIS_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
}

impl StoreArgs {
    pub fn url(&self) -> Result<String, std::io::Error> {
        match &self.store_url {
            Some(u) => Ok(u.clone()),
            None => {
                std::fs::create_dir_all(&self.data_dir)?;
                Ok(sqlite_url(&self.data_dir.join("management.db")))
            }
        }
    }
}

pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// gRPC address proxies dial (plaintext; put TLS in front for remote proxies).
    #[arg(
        long = "grpc-addr",
        env = "PORTCULLIS_GRPC_ADDRESS",
        default_value = "0.0.0.0:33073"
    )]
    pub grpc_addr: SocketAddr,
    /// REST API address.
    #[arg(
        long = "http-addr",
        env = "PORTCULLIS_HTTP_ADDRESS",
        default_value = "127.0.0.1:33071"
    )]
    pub http_addr: SocketAddr,
    /// How often open proxy streams re-check their token (a revoked token disconnects within it).
    #[arg(
        long = "heartbeat",
        env = "PORTCULLIS_HEARTBEAT_INTERVAL",
        default_value = "60s"
    )]
    pub heartbeat: String,
    /// Days access logs are kept; older ones are deleted hourly. 0 keeps them forever.
    #[arg(
        long = "access-log-retention-days",
        env = "PORTCULLIS_ACCESS_LOG_RETENTION_DAYS",
        default_value_t = 30
    )]
    pub access_log_retention_days: u32,
    /// Where browsers reach the REST address, e.g. https://manage.example.com: single sign-on
    /// sends them back to <URL>/oauth2/callback (register that at the identity provider).
    /// Default: http://<REST address>.
    #[arg(long = "public-url", env = "PORTCULLIS_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// PEM certificate (chain) for the gRPC listener; with --tls-key-file, proxies dial https://.
    #[arg(
        long = "tls-cert-file",
        env = "PORTCULLIS_TLS_CERT_FILE",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for --tls-cert-file.
    #[arg(
        long = "tls-key-file",
        env = "PORTCULLIS_TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Email of the account owner.
    #[arg(long)]
    pub email: String,
    /// Account name.
    #[arg(long, default_value = "default")]
    pub account_name: String,
}

#[derive(Debug, Args)]
pub struct ProxyTokenArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Token name.
    #[arg(long)]
    pub name: String,
    /// Management-wide token: its proxies form shared clusters that serve every account.
    #[arg(long, conflicts_with = "account")]
    pub shared: bool,
    /// Account the token belongs to (Bring Your Own Proxy).
    #[arg(long)]
    pub account: Option<String>,
    /// Lifetime in seconds (0 = never expires).
    #[arg(long, default_value_t = 0)]
    pub expires_in: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagementCliError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot prepare the data directory: {0}")]
    DataDir(std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Usage(String),
}

fn runtime() -> Result<tokio::runtime::Runtime, ManagementCliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("portcullis-management")
        .build()
        .map_err(ManagementCliError::Runtime)
}

pub fn run(args: &ManagementArgs) -> Result<i32, ManagementCliError> {
    let rt = runtime()?;
    rt.block_on(async {
        match &args.action {
            ManagementAction::Serve(a) => serve(a).await,
            ManagementAction::Bootstrap(a) => {
                let store = Store::open(&a.store.url().map_err(ManagementCliError::DataDir)?).await?;
                let b = management::bootstrap::create_account(&store, &a.account_name, &a.email).await?;
                println!("account {}\nowner {} ({})\npersonal access token (shown once): {}", b.account_id, b.user_id, a.email, b.pat);
                Ok(0)
            }
            ManagementAction::ProxyToken(a) => {
                if !a.shared && a.account.is_none() {
                    return Err(ManagementCliError::Usage(
                        "give --account ID for an account token, or --shared for a management-wide one".into(),
                    ));
                }
                let store = Store::open(&a.store.url().map_err(ManagementCliError::DataDir)?).await?;
                let expires = (a.expires_in > 0).then(|| management::store::now() + a.expires_in);
                let (t, plain) = store.create_proxy_token(a.account.as_deref(), &a.name, expires).await?;
                println!("proxy token {} (shown once): {}", t.id, plain);
                Ok(0)
            }
        }
    })
}

async fn serve(a: &ServeArgs) -> Result<i32, ManagementCliError> {
    let heartbeat = crate::config::parse_duration("PORTCULLIS_HEARTBEAT_INTERVAL", &a.heartbeat)
        .map_err(|e| ManagementCliError::Usage(e.to_string()))?;
    if heartbeat.is_zero() {
        return Err(ManagementCliError::Usage(
            "PORTCULLIS_HEARTBEAT_INTERVAL must be above zero".into(),
        ));
    }
    let grpc_tls = match (&a.tls_cert_file, &a.tls_key_file) {
        (Some(c), Some(k)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| {
                    ManagementCliError::Usage(format!("cannot read {}: {e}", p.display()))
                })
            };
            Some((read(c)?, read(k)?))
        }
        _ => None,
    };
    if grpc_tls.is_none() && !a.grpc_addr.ip().is_loopback() {
        tracing::warn!(
            grpc = %a.grpc_addr,
            "gRPC for proxies is plaintext: proxy tokens cross the network unencrypted; set \
             PORTCULLIS_TLS_CERT_FILE and PORTCULLIS_TLS_KEY_FILE"
        );
    }
    let config = ManagementConfig {
        grpc_listen: a.grpc_addr,
        http_listen: a.http_addr,
        store_url: a.store.url().map_err(ManagementCliError::DataDir)?,
        heartbeat,
        grpc_tls,
        access_log_retention_days: a.access_log_retention_days,
        public_url: a.public_url.clone(),
    };
    let m = Management::bind(&config).await?;
    tracing::info!(
        grpc = ?m.grpc_addr(),
        rest = ?m.http_addr(),
        store = %management::store::redact(&config.store_url),
        "management server ready"
    );
    m.serve(shutdown_signal()).await?;
    Ok(0)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("management shutting down");
}

/// Interval used by `up`'s embedded management.
pub const UP_HEARTBEAT: Duration = Duration::from_secs(60);
