//! Typed proxy configuration, parsed once from the command line and environment.
//! Nothing deeper in the proxy reads the environment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::cli::ProxyArgs;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{setting}: {value:?} is not a listen address (expected `:PORT`, `HOST:PORT` or `IP:PORT`)"
    )]
    BadAddress {
        setting: &'static str,
        value: String,
    },
    #[error("{setting}: {value:?} is not a duration (examples: 10s, 500ms, 2m): {reason}")]
    BadDuration {
        setting: &'static str,
        value: String,
        reason: String,
    },
    #[error("{setting}: {value:?} must be one of {allowed}")]
    BadChoice {
        setting: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("NB_PROXY_TRUSTED_PROXIES: {value:?} is not a CIDR or IP address")]
    BadCidr { value: String },
    #[error("{0}")]
    BadAcme(String),
    #[error("{0}")]
    BadCrowdsec(String),
    #[error(transparent)]
    BadPresharedKey(#[from] crate::mesh::preshared_key::PresharedKeyError),
}

/// Which io driver the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriverChoice {
    Auto,
    IoUring,
    Legacy,
}

/// What the plain-HTTP listener does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// Answer with a redirect to the same URL on HTTPS.
    Redirect,
    /// Route and forward it like an HTTPS request (behind a TLS-terminating load balancer).
    Serve,
}

/// What the proxy sends as X-Forwarded-Proto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedProto {
    Auto,
    Http,
    Https,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub https_listen: SocketAddr,
    pub http_listen: Option<SocketAddr>,
    pub http_mode: HttpMode,
    pub health_listen: String,
    pub cert_dir: PathBuf,
    pub cert_file: String,
    pub cert_key_file: String,
    pub wildcard_cert_dir: Option<PathBuf>,
    pub mappings_file: Option<PathBuf>,
    pub workers: usize,
    pub io_driver: IoDriverChoice,
    pub max_connections: usize,
    pub limits: Limits,
    pub reload_interval: Duration,
    pub forwarded_proto: ForwardedProto,
    pub trusted_proxies: Vec<IpNet>,
    /// Connections from trusted proxies start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// The CrowdSec Local API to follow, when configured.
    pub crowdsec: Option<crate::crowdsec::CrowdsecSettings>,
    pub custom_ports: bool,
    /// Zero: no cap.
    pub max_session_idle: Duration,
    pub ebpf: EbpfChoice,
    pub xdp_interfaces: Vec<String>,
    pub l4_splice: bool,
    /// None when ACME is off.
    pub acme: Option<crate::acme::AcmeSettings>,
    pub mesh: crate::mesh::MeshSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EbpfChoice {
    Auto,
    Off,
}

/// Timeouts and bounds of the data plane.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub upstream_timeout: Duration,
    pub dial_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// Dial timeout used when nothing caps it.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

impl ProxyConfig {
    pub fn from_args(args: &ProxyArgs) -> Result<Self, ConfigError> {
        let https_listen = parse_listen("NB_PROXY_ADDRESS", &args.https_address)?;
        let http_listen = match args.http_address.trim() {
            "" | "off" | "none" => None,
            other => Some(parse_listen("NB_PROXY_HTTP_ADDRESS", other)?),
        };
        let http_mode = match args.http_mode.as_str() {
            "redirect" => HttpMode::Redirect,
            "serve" => HttpMode::Serve,
            other => {
                return Err(ConfigError::BadChoice {
                    setting: "NB_PROXY_HTTP_MODE",
                    value: other.to_string(),
                    allowed: "redirect, serve",
                });
            }
        };
        let max_dial = parse_duration("NB_PROXY_MAX_DIAL_TIMEOUT", &args.max_dial_timeout)?;
        let dial_timeout = if max_dial.is_zero() {
            DEFAULT_DIAL_TIMEOUT
        } else {
            DEFAULT_DIAL_TIMEOUT.min(max_dial)
        };
        let limits = Limits {
            header_timeout: parse_positive("NB_PROXY_HEADER_TIMEOUT", &args.header_timeout)?,
            idle_timeout: parse_positive("NB_PROXY_IDLE_TIMEOUT", &args.idle_timeout)?,
            upstream_timeout: parse_positive("NB_PROXY_UPSTREAM_TIMEOUT", &args.upstream_timeout)?,
            dial_timeout,
            shutdown_timeout: parse_duration("NB_PROXY_SHUTDOWN_TIMEOUT", &args.shutdown_timeout)?,
        };
        let io_driver = match args.io_driver.as_str() {
            "auto" => IoDriverChoice::Auto,
            "io-uring" | "io_uring" | "iouring" => IoDriverChoice::IoUring,
            "legacy" | "epoll" => IoDriverChoice::Legacy,
            other => {
                return Err(ConfigError::BadChoice {
                    setting: "NB_PROXY_IO_DRIVER",
                    value: other.to_string(),
                    allowed: "auto, io-uring, legacy",
                });
            }
        };
        let forwarded_proto = match args.forwarded_proto.as_str() {
            "auto" => ForwardedProto::Auto,
            "http" => ForwardedProto::Http,
            "https" => ForwardedProto::Https,
            other => {
                return Err(ConfigError::BadChoice {
                    setting: "NB_PROXY_FORWARDED_PROTO",
                    value: other.to_string(),
                    allowed: "auto, http, https",
                });
            }
        };
        let trusted_proxies = args
            .trusted_proxies
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(parse_cidr)
            .collect::<Result<Vec<_>, _>>()?;
        let workers = if args.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            args.workers
        };
        let ebpf = match args.ebpf.as_str() {
            "auto" | "on" => EbpfChoice::Auto,
            "off" => EbpfChoice::Off,
            other => {
                return Err(ConfigError::BadChoice {
                    setting: "PORTCULLIS_EBPF",
                    value: other.to_string(),
                    allowed: "auto, off",
                });
            }
        };
        let l4_splice = match args.l4_splice.as_str() {
            "on" | "true" => true,
            "off" | "false" => false,
            other => {
                return Err(ConfigError::BadChoice {
                    setting: "PORTCULLIS_L4_SPLICE",
                    value: other.to_string(),
                    allowed: "on, off",
                });
            }
        };
        Ok(Self {
            https_listen,
            http_listen,
            http_mode,
            health_listen: args.health_address.clone(),
            cert_dir: args.cert_dir.clone(),
            cert_file: args.cert_file.clone(),
            cert_key_file: args.cert_key_file.clone(),
            wildcard_cert_dir: args.wildcard_cert_dir.clone(),
            mappings_file: args.mappings_file.clone(),
            workers,
            io_driver,
            max_connections: args.max_connections,
            limits,
            reload_interval: parse_positive("NB_PROXY_RELOAD_INTERVAL", &args.reload_interval)?,
            forwarded_proto,
            trusted_proxies,
            proxy_protocol: args.proxy_protocol,
            crowdsec: crowdsec_settings(args)?,
            custom_ports: args.supports_custom_ports,
            max_session_idle: parse_duration(
                "NB_PROXY_MAX_SESSION_IDLE_TIMEOUT",
                &args.max_session_idle_timeout,
            )?,
            ebpf,
            xdp_interfaces: args
                .xdp_interfaces
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            l4_splice,
            acme: crate::acme::AcmeSettings::from_args(&args.acme)?,
            mesh: crate::mesh::MeshSettings::from_args(&args.mesh)?,
        })
    }
}

impl ProxyConfig {
    /// A UDP session's idle timeout after NB_PROXY_MAX_SESSION_IDLE_TIMEOUT.
    pub fn cap_session_idle(&self, wanted: Duration) -> Duration {
        if self.max_session_idle.is_zero() {
            wanted
        } else {
            wanted.min(self.max_session_idle)
        }
    }
}

/// `:443` means every interface (IPv6 socket that also accepts IPv4); `host:port` is resolved once.
pub fn parse_listen(setting: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    let bad = || ConfigError::BadAddress {
        setting,
        value: value.to_string(),
    };
    if let Some(port) = value.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    }
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let mut addrs = value.to_socket_addrs().map_err(|_| bad())?;
    // Prefer IPv4 for names like `localhost`, which is what people mean on most hosts.
    let all: Vec<SocketAddr> = addrs.by_ref().collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or_else(|| all.first())
        .copied()
        .ok_or_else(bad)
}

pub fn parse_duration(setting: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let value = value.trim();
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(value).map_err(|e| ConfigError::BadDuration {
        setting,
        value: value.to_string(),
        reason: e.to_string(),
    })
}

fn parse_positive(setting: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(setting, value)?;
    if d.is_zero() {
        return Err(ConfigError::BadDuration {
            setting,
            value: value.to_string(),
            reason: "must be greater than zero".to_string(),
        });
    }
    Ok(d)
}

fn parse_cidr(value: &str) -> Result<IpNet, ConfigError> {
    if let Ok(net) = value.parse::<IpNet>() {
        return Ok(net);
    }
    value
        .parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| ConfigError::BadCidr {
            value: value.to_string(),
        })
}

/// The address a browser should use to reach a listener, for messages and redirects.
pub fn display_host(addr: &SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V6(ip) if ip.is_unspecified() => "localhost".to_string(),
        IpAddr::V4(ip) if ip == Ipv4Addr::UNSPECIFIED => "localhost".to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    }
}

fn crowdsec_settings(
    args: &ProxyArgs,
) -> Result<Option<crate::crowdsec::CrowdsecSettings>, ConfigError> {
    let url = args
        .crowdsec_api_url
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let key = args
        .crowdsec_api_key
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let (url, key) = match (url, key) {
        (None, None) => return Ok(None),
        (Some(u), Some(k)) => (u, k),
        _ => {
            return Err(ConfigError::BadCrowdsec(
                "NB_PROXY_CROWDSEC_API_URL and NB_PROXY_CROWDSEC_API_KEY go together: set both or neither"
                    .into(),
            ));
        }
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::BadCrowdsec(format!(
            "NB_PROXY_CROWDSEC_API_URL: {url:?} must start with http:// or https://"
        )));
    }
    let interval = parse_positive("PORTCULLIS_CROWDSEC_INTERVAL", &args.crowdsec_interval)?;
    Ok(Some(crate::crowdsec::CrowdsecSettings {
        url: url.to_string(),
        api_key: key.to_string(),
        interval,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_only_listens_everywhere() {
        let a = parse_listen("X", ":8443").unwrap();
        assert!(a.ip().is_unspecified());
        assert_eq!(a.port(), 8443);
    }

    #[test]
    fn explicit_ip_kept() {
        let a = parse_listen("X", "127.0.0.1:9").unwrap();
        assert_eq!(a, "127.0.0.1:9".parse().unwrap());
    }

    #[test]
    fn bad_address_names_the_setting() {
        let e = parse_listen("NB_PROXY_ADDRESS", ":http").unwrap_err();
        assert!(e.to_string().contains("NB_PROXY_ADDRESS"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("X", "0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration("X", "1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_positive("X", "0").is_err());
        assert!(parse_duration("X", "ten").is_err());
    }

    #[test]
    fn cidrs_and_bare_ips() {
        assert_eq!(
            parse_cidr("10.0.0.0/8").unwrap(),
            "10.0.0.0/8".parse().unwrap()
        );
        assert_eq!(
            parse_cidr("192.0.2.1").unwrap(),
            "192.0.2.1/32".parse().unwrap()
        );
        assert!(parse_cidr("nope").is_err());
    }
}
