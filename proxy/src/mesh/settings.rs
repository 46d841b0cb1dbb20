//! The mesh settings, checked at start.

use crate::cli::MeshArgs;
use crate::config::ConfigError;

use super::preshared_key::PresharedKey;

/// Which backend carries the accounts' tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Kernel,
    Tun,
    InProcess,
    Off,
}

#[derive(Debug, Clone)]
pub struct MeshSettings {
    pub backend: BackendChoice,
    /// Listen port of the first account's WireGuard; 0 = random.
    pub wg_port: u16,
    /// What peers dial; empty: management uses the address it sees.
    pub endpoint_host: String,
    /// NB_PROXY_PRIVATE: accept HTTPS on the accounts' tunnel addresses for private services.
    pub private: bool,
    /// NB_PROXY_PRESHARED_KEY: used with every peer of every account.
    pub preshared_key: Option<PresharedKey>,
}

impl MeshSettings {
    pub fn from_args(args: &MeshArgs) -> Result<MeshSettings, ConfigError> {
        let backend = match args.backend.trim() {
            "auto" | "" => BackendChoice::Auto,
            "kernel" => BackendChoice::Kernel,
            "tun" => BackendChoice::Tun,
            "in-process" | "inprocess" => BackendChoice::InProcess,
            "off" => BackendChoice::Off,
            other => {
                return Err(ConfigError::BadChoice {
                    setting: "PORTCULLIS_MESH_BACKEND",
                    value: other.to_string(),
                    allowed: "auto, kernel, tun, in-process, off",
                });
            }
        };
        let wg_port = args
            .wg_port
            .trim()
            .parse::<u16>()
            .map_err(|_| ConfigError::BadChoice {
                setting: "NB_PROXY_WG_PORT",
                value: args.wg_port.clone(),
                allowed: "a UDP port 0-65535 (0 = random)",
            })?;
        let endpoint_host = args.endpoint_host.trim().to_string();
        if endpoint_host.contains(['/', ' ', '@', '?', '#']) {
            return Err(ConfigError::BadChoice {
                setting: "PORTCULLIS_WG_ENDPOINT_HOST",
                value: endpoint_host,
                allowed: "an IP address or DNS name (no port)",
            });
        }
        Ok(MeshSettings {
            backend,
            wg_port,
            endpoint_host,
            private: args.private,
            preshared_key: PresharedKey::parse(
                "NB_PROXY_PRESHARED_KEY (--preshared-key)",
                args.preshared_key.as_deref(),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(backend: &str, port: &str) -> MeshArgs {
        MeshArgs {
            backend: backend.into(),
            wg_port: port.into(),
            endpoint_host: String::new(),
            private: false,
            preshared_key: None,
        }
    }

    #[test]
    fn settings_are_checked() {
        let s = MeshSettings::from_args(&args("in-process", "51820")).expect("valid");
        assert_eq!(s.backend, BackendChoice::InProcess);
        assert_eq!(s.wg_port, 51820);
        let e = MeshSettings::from_args(&args("wireguard", "0")).expect_err("bad backend");
        assert!(e.to_string().contains("PORTCULLIS_MESH_BACKEND"));
        let e = MeshSettings::from_args(&args("auto", "70000")).expect_err("bad port");
        assert!(e.to_string().contains("NB_PROXY_WG_PORT"));
    }
}
