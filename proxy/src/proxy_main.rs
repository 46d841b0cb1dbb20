//! `portcullis proxy`: wires configuration, certificates, routes, workers and the control thread.

use std::sync::Arc;

use crate::cli::ProxyArgs;
use crate::config::{ConfigError, EbpfChoice, ProxyConfig};
use crate::control::management::{ManagementError, ManagementLink};
use crate::control::sources::Sources;
use crate::dataplane::listener::{self, ListenError};
use crate::dataplane::{self, WorkerError};
use crate::ebpf::FastPath;
use crate::l4::listeners::L4Listeners;
use crate::mappings_file::MappingsFileError;
use crate::routes::RouteTable;
use crate::routes::Transport;
use crate::state::Shared;
use crate::tls::{self, CertLoader, SniResolver, TlsSetupError, UpstreamTls};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Mappings(#[from] MappingsFileError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("cannot serve health probes on {addr} (NB_PROXY_HEALTH_ADDRESS): {source}")]
    Health {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the control runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Management(#[from] ManagementError),
    #[error("ACME: {0}")]
    Acme(#[from] crate::acme::AcmeError),
}

/// Runs a proxy until SIGTERM/SIGINT; returns the exit code.
pub fn run(args: &ProxyArgs) -> Result<i32, StartError> {
    let config = ProxyConfig::from_args(args)?;
    match crate::geo::install(&args.geo_data_dir) {
        Ok(true) => tracing::info!(
            database = %crate::geo::database().map(|g| g.path.display().to_string()).unwrap_or_default(),
            "country database loaded"
        ),
        Ok(false) => tracing::info!(
            dir = %args.geo_data_dir.display(),
            "no country database (*.mmdb); services with country restrictions will be refused"
        ),
        Err(e) => {
            tracing::error!(error = %e, "country database not loaded; services with country restrictions will be refused")
        }
    }
    for name in args.not_yet.set_names() {
        tracing::warn!(
            setting = name,
            "this setting is accepted but not acted on yet"
        );
    }
    let management = match args.token.as_deref().filter(|t| !t.is_empty()) {
        Some(token) => Some(
            ManagementLink::new(
                &args.management_address,
                token,
                args.allow_insecure,
                args.domain.as_deref(),
                proxy_id(args, &config),
                args.not_yet.require_subdomain.as_deref() == Some("true"),
                args.management_ca_file.as_deref(),
            )
            .map(|mut link| {
                link.custom_ports = config.custom_ports;
                link.crowdsec = config.crowdsec.is_some();
                link
            })?,
        ),
        None => None,
    };
    // Picked before the proxy reports its capabilities, which depend on it.
    let mesh_picked = management
        .as_ref()
        .map(|_| crate::mesh::tunnel::pick(config.mesh.backend));
    let serves_private = mesh_picked
        .as_ref()
        .is_some_and(|p| crate::mesh::MeshStart::serves_private(&config.mesh, p));
    if config.mesh.private && !serves_private {
        let why = match &mesh_picked {
            None => "there is no management (NB_PROXY_TOKEN)".to_string(),
            Some(Err(reason)) => format!("the mesh is off: {reason}"),
            Some(Ok((backend, _))) => format!(
                "the {backend} mesh backend cannot accept connections; use kernel or tun \
                 (PORTCULLIS_MESH_BACKEND)"
            ),
        };
        tracing::warn!(%why, "NB_PROXY_PRIVATE is set, but private services cannot be served");
    }
    let management = management.map(|mut link| {
        link.private_services = serves_private;
        link
    });
    if config.mappings_file.is_none() && management.is_none() {
        tracing::warn!(
            "neither NB_PROXY_TOKEN (management) nor NB_PROXY_MAPPINGS_FILE is set: no services are served"
        );
    }

    let acme = match &config.acme {
        Some(settings) => Some(crate::acme::manager::prepare(
            settings,
            &config.cert_dir,
            &lock_identity(args, &config),
        )?),
        None => None,
    };
    let max_connections = connection_limit(config.max_connections);
    let mut certs = CertLoader::new(
        config.cert_dir.clone(),
        config.cert_file.clone(),
        config.cert_key_file.clone(),
        config.wildcard_cert_dir.clone(),
    );
    if config.acme.is_some() {
        certs = certs.with_acme_dir(crate::acme::storage::AcmeDir::new(&config.cert_dir).certs());
    }
    let scan = certs.scan();
    for e in &scan.errors {
        tracing::error!(error = %e, "certificate not loaded");
    }
    if !scan.store.has_default() && scan.store.name_count() == 0 && config.acme.is_none() {
        tracing::warn!(
            dir = %config.cert_dir.display(),
            "no certificate found: TLS handshakes will fail until one is added"
        );
    }
    let challenges = Arc::new(crate::acme::Challenges::default());
    let tls_alpn = config
        .acme
        .as_ref()
        .is_some_and(|a| a.challenge == crate::acme::ChallengeKind::TlsAlpn01);
    let resolver = Arc::new(SniResolver::new(scan.store, challenges.clone(), tls_alpn));
    let file_mappings = match &config.mappings_file {
        Some(path) => crate::mappings_file::load(path)?,
        None => Vec::new(),
    };
    let server_tls = tls::server_config(resolver.clone(), tls_alpn)?;
    let upstream_tls = UpstreamTls::new()?;

    let bound = listener::bind_all(
        config.workers,
        config.https_listen,
        config.http_listen,
        acme_listen(&config),
    )?;
    let health_std = std::net::TcpListener::bind(config.health_listen.as_str())
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .map_err(|source| StartError::Health {
            addr: config.health_listen.clone(),
            source,
        })?;

    tracing::info!(
        https = %config.https_listen,
        http = ?config.http_listen,
        health = %config.health_listen,
        workers = config.workers,
        services = file_mappings.len(),
        management = management.is_some(),
        max_connections,
        "starting proxy"
    );
    let shared = Arc::new(Shared::new(
        config,
        RouteTable::default(),
        resolver,
        server_tls,
        max_connections,
        challenges,
    ));
    load_fast_path(&shared);
    let (port_senders, port_receivers): (Vec<_>, Vec<_>) = (0..shared.config.workers)
        .map(|_| tokio::sync::mpsc::channel(crate::l4::COMMAND_QUEUE))
        .unzip();
    let mesh = mesh_picked.map(|picked| crate::mesh::MeshStart {
        picked,
        inbound: serves_private.then(|| {
            crate::mesh::inbound::MeshInbound::new(
                port_senders.clone(),
                shared.config.https_listen.port(),
            )
        }),
    });
    let listeners = shared
        .config
        .custom_ports
        .then(|| L4Listeners::new(shared.config.https_listen.ip(), port_senders));
    let sources = Arc::new(Sources::new(reserved_ports(&shared.config), listeners));
    let acme = acme.map(|prepared| (prepared, sources.feed_acme()));
    sources.set_file(file_mappings, &shared);
    let _workers = dataplane::start(shared.clone(), bound, port_receivers, upstream_tls)?;
    tracing::info!(
        io_driver = shared.status.io_driver.get().copied().unwrap_or("?"),
        "proxy ready"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("portcullis-control")
        .build()
        .map_err(StartError::Runtime)?;
    let code = rt.block_on(async move {
        let health = match tokio::net::TcpListener::from_std(health_std) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve health probes");
                return 1;
            }
        };
        crate::control::run(shared, certs, health, sources, management, mesh, acme).await
    });
    Ok(code)
}

/// Loads the kernel fast path when allowed; every reason it cannot is logged once and shown in
/// `/healthz`, and the proxy goes on in user space.
fn load_fast_path(shared: &Shared) {
    let config = &shared.config;
    let off = |reason: String| {
        tracing::info!(%reason, "kernel fast path off; L4 traffic is filtered and copied in user space");
        shared.set_ebpf_state(format!("off: {reason}"));
    };
    if config.ebpf == EbpfChoice::Off {
        return off("switched off (PORTCULLIS_EBPF=off)".to_string());
    }
    if !config.custom_ports {
        return off("custom ports are switched off".to_string());
    }
    if !crate::ebpf::object_built_in() {
        return off(
            "this binary was built without the eBPF object (cargo xtask build-ebpf)".to_string(),
        );
    }
    match FastPath::load(&config.xdp_interfaces, config.l4_splice) {
        Ok(fp) => {
            tracing::info!(state = %fp.describe(), "kernel fast path loaded");
            if let Some(splicer) = fp.splicer() {
                shared.set_splicer(splicer);
            }
            *shared.fast_path() = Some(fp);
        }
        Err(e) => off(e.to_string()),
    }
}

/// The http-01 listener, when it is not the plain-HTTP listener already.
fn acme_listen(config: &ProxyConfig) -> Option<std::net::SocketAddr> {
    let addr = config.acme.as_ref()?.http_address?;
    (config.http_listen != Some(addr)).then_some(addr)
}

/// The proxy's own listen ports, which an L4 service must not share.
fn reserved_ports(config: &ProxyConfig) -> Vec<(Transport, u16, &'static str)> {
    let mut out = vec![(
        Transport::Tcp,
        config.https_listen.port(),
        "NB_PROXY_ADDRESS",
    )];
    if let Some(http) = config.http_listen {
        out.push((Transport::Tcp, http.port(), "NB_PROXY_HTTP_ADDRESS"));
    }
    if let Some(acme) = acme_listen(config) {
        out.push((Transport::Tcp, acme.port(), "NB_PROXY_ACME_ADDRESS"));
    }
    if let Some(port) = config
        .health_listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
    {
        out.push((Transport::Tcp, port, "NB_PROXY_HEALTH_ADDRESS"));
    }
    out
}

/// NB_PROXY_ID, else `<hostname>-<https port>`: stable across restarts, distinct for several
/// proxies on one host.
fn proxy_id(args: &ProxyArgs, config: &ProxyConfig) -> String {
    if let Some(id) = args.proxy_id.as_deref().filter(|s| !s.is_empty()) {
        return id.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "proxy".to_string());
    format!("{host}-{}", config.https_listen.port())
}

/// Who holds a certificate lock: unique per process even when replicas share NB_PROXY_ID or
/// all run as PID 1 in their containers.
fn lock_identity(args: &ProxyArgs, config: &ProxyConfig) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{:08x}",
        proxy_id(args, config),
        nanos ^ std::process::id().rotate_left(16)
    )
}

/// The configured limit, or one derived from the open-file limit (each proxied connection needs
/// a client and a target descriptor). The soft limit is raised to the hard one first.
fn connection_limit(configured: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let derived = usize::try_from(soft.saturating_sub(128) / 2)
        .unwrap_or(usize::MAX)
        .max(16);
    if configured == 0 {
        derived
    } else {
        if configured > derived {
            tracing::warn!(
                configured,
                open_file_limit = soft,
                "NB_PROXY_MAX_CONNECTIONS is above what the open-file limit allows; \
                 connections beyond it will fail with 'too many open files'"
            );
        }
        configured
    }
}
