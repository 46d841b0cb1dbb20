//! The `portcullis` command line. Every proxy setting is also an environment variable with
//! NetBird's name, so a NetBird proxy's env file works unchanged.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A reverse proxy that publishes services living inside a WireGuard mesh",
    long_about = "Portcullis terminates TLS, routes HTTP by host and path prefix and forwards \
                  to targets. Run `portcullis up` to try it on one machine, or \
                  `portcullis proxy` to run a proxy. Every flag of `portcullis proxy` can also be \
                  set by the NB_PROXY_* environment variable shown beside it."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a proxy: serves the services of a management server and/or a mappings file.
    Proxy(Box<ProxyArgs>),
    /// Try Portcullis on this machine: management, a proxy and a demo service in one process.
    Up(UpArgs),
    /// Run or administer a management server (accounts, tokens, clusters, services).
    Management(crate::management_cli::ManagementArgs),
    /// Join an account's WireGuard mesh from a machine that runs targets (or routes to them).
    Agent(crate::agent::AgentArgs),
}

/// `portcullis up`: a one-machine demo with no setup.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the demo keeps its certificate and mappings file.
    #[arg(long, env = "PORTCULLIS_DATA_DIR", default_value = "./portcullis-data")]
    pub data_dir: PathBuf,
    /// HTTPS port of the demo proxy (443 needs root or CAP_NET_BIND_SERVICE).
    #[arg(long, default_value_t = 8443)]
    pub https_port: u16,
    /// Plain-HTTP port of the demo proxy (redirects to HTTPS).
    #[arg(long, default_value_t = 8081)]
    pub http_port: u16,
    /// Health endpoint of the demo proxy.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub health_addr: String,
    /// REST API of the embedded management.
    #[arg(long, default_value = "127.0.0.1:33071")]
    pub api_addr: std::net::SocketAddr,
    /// gRPC address of the embedded management (the proxy dials it).
    #[arg(long, default_value = "127.0.0.1:33073")]
    pub grpc_addr: std::net::SocketAddr,
    /// Port of the demo service the proxy publishes.
    #[arg(long, default_value_t = 8082)]
    pub demo_port: u16,
}

/// Settings of `portcullis proxy`. Names, flags and defaults follow NetBird's proxy.
#[derive(Debug, Args, Clone)]
pub struct ProxyArgs {
    /// Management server URL (https:// uses TLS, http:// needs NB_PROXY_ALLOW_INSECURE).
    #[arg(
        long = "mgmt",
        env = "NB_PROXY_MANAGEMENT_ADDRESS",
        default_value = "https://api.netbird.io:443"
    )]
    pub management_address: String,
    /// Proxy token sent to management as `authorization: Bearer <token>`.
    #[arg(long = "token", env = "NB_PROXY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Extra CA certificate (PEM) trusted for an https:// management, besides the system roots.
    #[arg(long = "mgmt-ca-file", env = "NB_PROXY_MANAGEMENT_CA_FILE")]
    pub management_ca_file: Option<PathBuf>,
    /// Allow sending the token over plaintext http://.
    #[arg(long, env = "NB_PROXY_ALLOW_INSECURE", action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub allow_insecure: bool,
    /// Cluster address this proxy serves, e.g. proxy.example.com.
    #[arg(long, env = "NB_PROXY_DOMAIN")]
    pub domain: Option<String>,
    /// This proxy's id in its cluster (default: <hostname>-<https port>).
    #[arg(long = "proxy-id", env = "NB_PROXY_ID")]
    pub proxy_id: Option<String>,

    /// HTTPS listen address (`:443` means every interface).
    #[arg(long = "addr", env = "NB_PROXY_ADDRESS", default_value = ":443")]
    pub https_address: String,
    /// Plain-HTTP listen address; it answers with a redirect to HTTPS. `off` disables it.
    #[arg(
        long = "http-addr",
        env = "NB_PROXY_HTTP_ADDRESS",
        default_value = ":80"
    )]
    pub http_address: String,
    /// What the plain-HTTP listener does: `redirect` to HTTPS, or `serve` requests like HTTPS
    /// ones (for a proxy behind a load balancer that terminates TLS).
    #[arg(
        long = "http-mode",
        env = "NB_PROXY_HTTP_MODE",
        default_value = "redirect"
    )]
    pub http_mode: String,
    /// Health probes address (/healthz, /livez, /readyz).
    #[arg(
        long = "health-addr",
        env = "NB_PROXY_HEALTH_ADDRESS",
        default_value = "localhost:8080"
    )]
    pub health_address: String,

    /// Certificate directory: the default certificate plus `<name>.crt`/`<name>.key` pairs.
    #[arg(
        long = "cert-dir",
        env = "NB_PROXY_CERTIFICATE_DIRECTORY",
        default_value = "./certs"
    )]
    pub cert_dir: PathBuf,
    /// File name of the default certificate inside the certificate directory.
    #[arg(
        long = "cert-file",
        env = "NB_PROXY_CERTIFICATE_FILE",
        default_value = "tls.crt"
    )]
    pub cert_file: String,
    /// File name of the default certificate's key inside the certificate directory.
    #[arg(
        long = "cert-key-file",
        env = "NB_PROXY_CERTIFICATE_KEY_FILE",
        default_value = "tls.key"
    )]
    pub cert_key_file: String,
    /// Directory of `<name>.crt`/`<name>.key` pairs whose SANs may be wildcards (*.example.com).
    #[arg(long = "wildcard-cert-dir", env = "NB_PROXY_WILDCARD_CERT_DIR")]
    pub wildcard_cert_dir: Option<PathBuf>,

    /// TOML file of services served without a management server; reloaded when it changes.
    #[arg(long = "mappings", env = "NB_PROXY_MAPPINGS_FILE")]
    pub mappings_file: Option<PathBuf>,

    /// Number of data-plane worker threads (0 = one per core).
    #[arg(long, env = "NB_PROXY_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// I/O driver of the workers: auto (io_uring, else epoll), io-uring, legacy (epoll).
    #[arg(long = "io-driver", env = "NB_PROXY_IO_DRIVER", default_value = "auto")]
    pub io_driver: String,
    /// Most client connections open at once (0 = derived from the open-file limit).
    #[arg(
        long = "max-connections",
        env = "NB_PROXY_MAX_CONNECTIONS",
        default_value_t = 0
    )]
    pub max_connections: usize,
    /// Time a client has to complete the TLS handshake and send a request head.
    #[arg(
        long = "header-timeout",
        env = "NB_PROXY_HEADER_TIMEOUT",
        default_value = "10s"
    )]
    pub header_timeout: String,
    /// Time an idle keep-alive client connection is kept open, and a stalled transfer waited for.
    #[arg(
        long = "idle-timeout",
        env = "NB_PROXY_IDLE_TIMEOUT",
        default_value = "60s"
    )]
    pub idle_timeout: String,
    /// Time to wait for a target's response head when the service sets no request_timeout.
    #[arg(
        long = "upstream-timeout",
        env = "NB_PROXY_UPSTREAM_TIMEOUT",
        default_value = "60s"
    )]
    pub upstream_timeout: String,
    /// Cap on a service's backend dial timeout (0 = no cap; the dial timeout itself is 10s).
    #[arg(
        long = "max-dial-timeout",
        env = "NB_PROXY_MAX_DIAL_TIMEOUT",
        default_value = "0"
    )]
    pub max_dial_timeout: String,
    /// On SIGTERM, how long in-flight requests may take before the process exits anyway.
    #[arg(
        long = "shutdown-timeout",
        env = "NB_PROXY_SHUTDOWN_TIMEOUT",
        default_value = "30s"
    )]
    pub shutdown_timeout: String,
    /// How often certificate and mappings files are checked for changes.
    #[arg(
        long = "reload-interval",
        env = "NB_PROXY_RELOAD_INTERVAL",
        default_value = "1s"
    )]
    pub reload_interval: String,
    /// X-Forwarded-Proto sent to targets: auto (the client's scheme), http or https.
    #[arg(
        long = "forwarded-proto",
        env = "NB_PROXY_FORWARDED_PROTO",
        default_value = "auto"
    )]
    pub forwarded_proto: String,
    /// Comma-separated CIDRs of proxies in front of this one: their X-Forwarded-For header is
    /// believed (the client is its right-most address that is not one of them) and extended,
    /// and with --proxy-protocol their PROXY header is required.
    #[arg(
        long = "trusted-proxies",
        env = "NB_PROXY_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Directory holding a GeoLite2-format database (`*.mmdb`: a Country one preferred over a
    /// City one such as NetBird's GeoLite2-City_<date>.mmdb; the newest name of a kind) for
    /// services with country restrictions. Read once at start, not downloaded; without one,
    /// such services are refused rather than served unrestricted.
    #[arg(
        long = "geo-data-dir",
        env = "NB_PROXY_GEO_DATA_DIR",
        default_value = "/var/lib/netbird/geolocation"
    )]
    pub geo_data_dir: std::path::PathBuf,

    /// CrowdSec Local API URL (e.g. http://127.0.0.1:8080). With --crowdsec-api-key, the proxy
    /// follows its decision stream and services with crowdsec_mode enforce/observe act on it.
    #[arg(long = "crowdsec-api-url", env = "NB_PROXY_CROWDSEC_API_URL")]
    pub crowdsec_api_url: Option<String>,
    /// Bouncer key for the CrowdSec Local API (`cscli bouncers add NAME`).
    #[arg(
        long = "crowdsec-api-key",
        env = "NB_PROXY_CROWDSEC_API_KEY",
        hide_env_values = true
    )]
    pub crowdsec_api_key: Option<String>,
    /// How often the CrowdSec decision stream is asked for changes.
    #[arg(
        long = "crowdsec-interval",
        env = "PORTCULLIS_CROWDSEC_INTERVAL",
        default_value = "10s"
    )]
    pub crowdsec_interval: String,

    /// Behind an L4 load balancer: connections from --trusted-proxies must start with a PROXY
    /// protocol (v1 or v2) header, whose source then is the client address (access rules,
    /// X-Forwarded-For, logs). Applies to the HTTPS listener, the HTTP listener in `serve` mode
    /// and TCP/TLS service ports; not to UDP, nor to the HTTP redirect/ACME listener. Headers
    /// from other addresses are not accepted: they are taken at their socket address. Needs
    /// --trusted-proxies.
    #[arg(
        long = "proxy-protocol",
        env = "NB_PROXY_PROXY_PROTOCOL",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true"
    )]
    pub proxy_protocol: bool,

    /// Serve services in mode tcp, udp and tls on their own listen ports, and report so to
    /// management.
    #[arg(
        long = "supports-custom-ports",
        env = "NB_PROXY_SUPPORTS_CUSTOM_PORTS",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = true,
        default_missing_value = "true"
    )]
    pub supports_custom_ports: bool,
    /// Cap on a UDP session's idle timeout (0: no cap). A session idle this long is reaped.
    #[arg(
        long = "max-session-idle-timeout",
        env = "NB_PROXY_MAX_SESSION_IDLE_TIMEOUT",
        default_value = "0"
    )]
    pub max_session_idle_timeout: String,
    /// The kernel fast path for L4 ports: auto (load it when the binary carries it and the
    /// process has CAP_BPF and CAP_NET_ADMIN; else run in user space and say why) or off.
    #[arg(long = "ebpf", env = "PORTCULLIS_EBPF", default_value = "auto")]
    pub ebpf: String,
    /// Comma-separated interfaces to attach the XDP filter to (the public ones). Empty: no XDP;
    /// the sockmap splice still runs.
    #[arg(
        long = "xdp-interfaces",
        env = "PORTCULLIS_XDP_INTERFACES",
        value_delimiter = ','
    )]
    pub xdp_interfaces: Vec<String>,
    /// Splice established L4 TCP connections in the kernel (sockmap): on or off. Off by
    /// default: the kernel queues spliced bytes without backpressure, so a client faster than
    /// its target can pin kernel memory (measured: 1.2 GB during one 3 s iperf3 run).
    #[arg(
        long = "l4-splice",
        env = "PORTCULLIS_L4_SPLICE",
        default_value = "off"
    )]
    pub l4_splice: String,

    /// Log level: error, warn, info, debug, trace.
    #[arg(long = "log-level", env = "NB_PROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: text or json.
    #[arg(long = "log-format", env = "NB_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    #[command(flatten)]
    pub acme: AcmeArgs,

    #[command(flatten)]
    pub mesh: MeshArgs,

    #[command(flatten)]
    pub not_yet: NotYetSupported,
}

/// Automatic certificates over ACME.
#[derive(Debug, Args, Clone)]
#[command(next_help_heading = "Automatic certificates (ACME)")]
pub struct AcmeArgs {
    /// Obtain and renew a certificate for every HTTP service domain with ACME. Certificates in
    /// the certificate and wildcard directories still win for the names they cover.
    #[arg(long = "acme-certs", env = "NB_PROXY_ACME_CERTIFICATES", action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub enabled: bool,
    /// Challenge: tls-alpn-01 (answered on the HTTPS listener) or http-01 (answered on
    /// NB_PROXY_ACME_ADDRESS).
    #[arg(
        long = "acme-challenge-type",
        env = "NB_PROXY_ACME_CHALLENGE_TYPE",
        default_value = "tls-alpn-01"
    )]
    pub challenge_type: String,
    /// Plain-HTTP address where http-01 challenges are answered; shares the plain-HTTP listener
    /// when both name the same address. Only bound in http-01 mode.
    #[arg(
        long = "acme-addr",
        env = "NB_PROXY_ACME_ADDRESS",
        default_value = ":80"
    )]
    pub address: String,
    /// ACME directory URL.
    #[arg(
        long = "acme-dir",
        env = "NB_PROXY_ACME_DIRECTORY",
        default_value = "https://acme-v02.api.letsencrypt.org/directory"
    )]
    pub directory: String,
    /// Contact e-mail for the ACME account (expiry notices from the CA).
    #[arg(long = "acme-email", env = "NB_PROXY_ACME_EMAIL")]
    pub email: Option<String>,
    /// PEM bundle of CA certificates that verify the ACME directory's TLS, instead of the
    /// system roots (for a private or test CA such as Pebble).
    #[arg(long = "acme-ca-file", env = "NB_PROXY_ACME_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// External account binding key id.
    #[arg(
        long = "acme-eab-kid",
        env = "NB_PROXY_ACME_EAB_KID",
        hide_env_values = true
    )]
    pub eab_kid: Option<String>,
    /// External account binding HMAC key (base64url).
    #[arg(
        long = "acme-eab-hmac-key",
        env = "NB_PROXY_ACME_EAB_HMAC_KEY",
        hide_env_values = true
    )]
    pub eab_hmac_key: Option<String>,
    /// How replicas sharing the certificate directory take turns issuing: auto (k8s-lease
    /// inside Kubernetes, else flock), flock, or k8s-lease.
    #[arg(
        long = "cert-lock-method",
        env = "NB_PROXY_CERT_LOCK_METHOD",
        default_value = "auto"
    )]
    pub lock_method: String,
}

/// The WireGuard mesh through which targets on peers and private networks are reached.
#[derive(Args, Clone)]
#[command(next_help_heading = "WireGuard mesh")]
pub struct MeshArgs {
    /// How the proxy joins each account's WireGuard mesh: `auto` (kernel WireGuard, else
    /// `wireguard-go` on a TUN device when the process has CAP_NET_ADMIN, else in-process),
    /// `kernel`, `tun`, `in-process` (no privilege needed), or `off` (targets are always dialed
    /// directly).
    #[arg(
        long = "mesh-backend",
        env = "PORTCULLIS_MESH_BACKEND",
        default_value = "auto"
    )]
    pub backend: String,
    /// WireGuard listen port (UDP) while the proxy serves one account; 0 = random. Every further
    /// account gets a random port; the ports are reported to management, which tells the peers.
    #[arg(long = "wg-port", env = "NB_PROXY_WG_PORT", default_value = "0")]
    pub wg_port: String,
    /// The host (IP or DNS name) peers dial to reach this proxy's WireGuard. Empty: the address
    /// management sees this proxy's connection come from.
    #[arg(
        long = "wg-endpoint-host",
        env = "PORTCULLIS_WG_ENDPOINT_HOST",
        default_value = ""
    )]
    pub endpoint_host: String,
    /// Serve NetBird-only (private) services to mesh peers: HTTPS is also accepted on each
    /// account's tunnel address (the port of NB_PROXY_ADDRESS), and every request there is
    /// checked with management's ValidateTunnelPeer by its tunnel source address. Needs the
    /// kernel or TUN mesh backend (the in-process one cannot accept); reported to management as
    /// the `supports_private_service` capability.
    #[arg(long = "private", env = "NB_PROXY_PRIVATE", action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub private: bool,
    /// WireGuard pre-shared key used with every mesh peer (base64, as `wg genpsk` prints): a
    /// peer completes a handshake only if it holds the same key (`portcullis agent
    /// --preshared-key`, or `PresharedKey =` in a wg-quick config). Management never sees it.
    #[arg(
        long = "preshared-key",
        env = "NB_PROXY_PRESHARED_KEY",
        hide_env_values = true
    )]
    pub preshared_key: Option<String>,
}

/// Never prints the pre-shared key, even in debug output.
impl std::fmt::Debug for MeshArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshArgs")
            .field("backend", &self.backend)
            .field("wg_port", &self.wg_port)
            .field("endpoint_host", &self.endpoint_host)
            .field("private", &self.private)
            .field(
                "preshared_key",
                &self.preshared_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// NetBird settings accepted so that existing env files work, but not acted on yet.
/// Each one that is set is named once in the log at start.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Accepted for NetBird compatibility, not acted on yet")]
pub struct NotYetSupported {
    #[arg(long = "require-subdomain", env = "NB_PROXY_REQUIRE_SUBDOMAIN")]
    pub require_subdomain: Option<String>,
    #[arg(long = "debug-endpoint", env = "NB_PROXY_DEBUG_ENDPOINT")]
    pub debug_endpoint: Option<String>,
    #[arg(long = "debug-endpoint-addr", env = "NB_PROXY_DEBUG_ENDPOINT_ADDRESS")]
    pub debug_endpoint_address: Option<String>,
}

impl NotYetSupported {
    /// Names of the settings that were given a value.
    pub fn set_names(&self) -> Vec<&'static str> {
        let all: [(&'static str, &Option<String>); 3] = [
            ("NB_PROXY_REQUIRE_SUBDOMAIN", &self.require_subdomain),
            ("NB_PROXY_DEBUG_ENDPOINT", &self.debug_endpoint),
            (
                "NB_PROXY_DEBUG_ENDPOINT_ADDRESS",
                &self.debug_endpoint_address,
            ),
        ];
        all.iter()
            .filter(|(_, v)| v.as_deref().is_some_and(|s| !s.is_empty()))
            .map(|(k, _)| *k)
            .collect()
    }
}
