//! `portcullis agent` flags and their environment variables, checked once into [`Settings`].

use std::path::PathBuf;

use clap::{ArgAction, Args};

use crate::mesh::device::{self, BackendChoice};
use crate::mesh::preshared_key::{PresharedKey, PresharedKeyError};

/// Join an account's WireGuard mesh so its proxies reach the targets on (and behind) this machine.
#[derive(Clone, Args)]
#[command(
    long_about = "Registers this machine with management using a setup key (only the first time: \
                  the peer token and WireGuard key are kept in the state directory), creates a \
                  WireGuard interface and keeps its peers (the account's proxies) in sync with \
                  management. When management says this machine routes networks, it forwards and \
                  masquerades the proxies' traffic to those networks, and to nothing else. Needs \
                  root (CAP_NET_ADMIN) and kernel WireGuard or wireguard-go."
)]
pub struct AgentArgs {
    /// Management gRPC URL, e.g. https://mgmt.example.com:443 (http:// needs --allow-insecure).
    #[arg(long = "management", env = "PORTCULLIS_AGENT_MANAGEMENT_URL")]
    pub management: String,
    /// Setup key for the first registration; not needed once the state directory holds a peer.
    #[arg(
        long = "setup-key",
        env = "PORTCULLIS_AGENT_SETUP_KEY",
        hide_env_values = true
    )]
    pub setup_key: Option<String>,
    /// Name shown to users in management (default: this machine's host name).
    #[arg(long, env = "PORTCULLIS_AGENT_NAME")]
    pub name: Option<String>,
    /// Where the peer id, peer token and WireGuard private key are kept (agent.json, mode 0600).
    #[arg(
        long = "state-dir",
        env = "PORTCULLIS_AGENT_STATE_DIR",
        default_value = "/var/lib/portcullis-agent"
    )]
    pub state_dir: PathBuf,
    /// WireGuard interface name, at most 15 bytes (default: pca<pid>-<n>, unique on the machine).
    #[arg(long, env = "PORTCULLIS_AGENT_INTERFACE")]
    pub interface: Option<String>,
    /// WireGuard backend: auto (kernel if it works, else wireguard-go on TUN), kernel or tun.
    #[arg(long, env = "PORTCULLIS_AGENT_BACKEND", default_value = "auto")]
    pub backend: String,
    /// Extra CA certificate (PEM) trusted for an https:// management, besides the system roots.
    #[arg(
        long = "management-ca-file",
        env = "PORTCULLIS_AGENT_MANAGEMENT_CA_FILE"
    )]
    pub management_ca_file: Option<PathBuf>,
    /// Allow a plaintext http:// management (the setup key and peer token travel unencrypted).
    #[arg(long, env = "PORTCULLIS_AGENT_ALLOW_INSECURE", action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub allow_insecure: bool,
    /// Log level or filter (error, warn, info, debug, or RUST_LOG-style directives).
    #[arg(
        long = "log-level",
        env = "PORTCULLIS_AGENT_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
    /// WireGuard pre-shared key used with every proxy (base64, as `wg genpsk` prints): must be
    /// the proxies' NB_PROXY_PRESHARED_KEY, or no handshake completes.
    #[arg(
        long = "preshared-key",
        env = "PORTCULLIS_AGENT_PRESHARED_KEY",
        hide_env_values = true
    )]
    pub preshared_key: Option<String>,
}

/// Never print the setup key, even in debug output.
impl std::fmt::Debug for AgentArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentArgs")
            .field("management", &self.management)
            .field("setup_key", &self.setup_key.as_ref().map(|_| "<redacted>"))
            .field("name", &self.name)
            .field("state_dir", &self.state_dir)
            .field("interface", &self.interface)
            .field("backend", &self.backend)
            .field("management_ca_file", &self.management_ca_file)
            .field("allow_insecure", &self.allow_insecure)
            .field("log_level", &self.log_level)
            .field(
                "preshared_key",
                &self.preshared_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("PORTCULLIS_AGENT_BACKEND {0:?} is not one of: auto, kernel, tun")]
    Backend(String),
    #[error("PORTCULLIS_AGENT_INTERFACE {name:?} is not a valid interface name: {reason}")]
    Interface { name: String, reason: String },
    #[error("PORTCULLIS_AGENT_MANAGEMENT_URL is empty")]
    NoManagement,
    #[error(transparent)]
    PresharedKey(#[from] PresharedKeyError),
}

/// The agent's settings, checked.
#[derive(Clone)]
pub struct Settings {
    /// Without a trailing slash, so the state file matches however the URL was typed.
    pub management: String,
    pub setup_key: Option<String>,
    pub name: String,
    pub state_dir: PathBuf,
    pub interface: String,
    pub backend: BackendChoice,
    pub ca_file: Option<PathBuf>,
    pub allow_insecure: bool,
    pub preshared_key: Option<PresharedKey>,
}

impl Settings {
    pub fn from_args(args: &AgentArgs) -> Result<Settings, SettingsError> {
        let management = args.management.trim().trim_end_matches('/').to_string();
        if management.is_empty() {
            return Err(SettingsError::NoManagement);
        }
        let backend = match args.backend.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => BackendChoice::Auto,
            "kernel" => BackendChoice::Kernel,
            "tun" | "wireguard-go" | "userspace" => BackendChoice::Tun,
            other => return Err(SettingsError::Backend(other.to_string())),
        };
        let interface = match args.interface.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => {
                name.parse::<wireguard_control::InterfaceName>()
                    .map_err(|e| SettingsError::Interface {
                        name: name.to_string(),
                        reason: e.to_string(),
                    })?;
                name.to_string()
            }
            _ => device::unique_interface_name("pca"),
        };
        let name = args
            .name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .unwrap_or_else(hostname);
        Ok(Settings {
            management,
            setup_key: args
                .setup_key
                .as_deref()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string),
            name,
            state_dir: args.state_dir.clone(),
            interface,
            backend,
            ca_file: args.management_ca_file.clone(),
            allow_insecure: args.allow_insecure,
            preshared_key: PresharedKey::parse(
                "PORTCULLIS_AGENT_PRESHARED_KEY (--preshared-key)",
                args.preshared_key.as_deref(),
            )?,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: AgentArgs,
    }

    #[test]
    fn settings_are_checked_and_the_key_stays_hidden() {
        let w = Wrapper::try_parse_from([
            "agent",
            "--management",
            "https://m.example/",
            "--setup-key",
            "SECRET-KEY",
            "--backend",
            "tun",
        ])
        .expect("parses");
        assert!(!format!("{:?}", w.args).contains("SECRET-KEY"));
        let s = Settings::from_args(&w.args).expect("valid");
        assert_eq!(s.management, "https://m.example");
        assert_eq!(s.backend, BackendChoice::Tun);
        assert!(s.interface.starts_with("pca") && s.interface.len() <= 15);
        let mut bad = w.args.clone();
        bad.backend = "wireguard".into();
        assert!(Settings::from_args(&bad).is_err());
        bad = w.args;
        bad.interface = Some("much-too-long-interface".into());
        assert!(Settings::from_args(&bad).is_err());
    }
}
