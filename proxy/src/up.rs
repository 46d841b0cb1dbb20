//! `portcullis up`: try Portcullis on one machine with nothing to set up.
//!
//! Creates a private CA and a certificate for `*.localhost` in the data directory (once), starts
//! an embedded management server on SQLite in the data directory, a small demo service on
//! loopback, and a proxy for the cluster `localhost` on high ports, so no root is needed. It
//! prints the admin token and the `curl` line that publishes the demo service.

use std::convert::Infallible;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::cli::{Cli, Command, UpArgs};

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create the demo certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("cannot start the demo service: {0}")]
    Demo(std::io::Error),
    #[error(transparent)]
    Proxy(#[from] crate::proxy_main::StartError),
    #[error("internal: {0}")]
    Args(String),
    #[error("cannot start the embedded management: {0}")]
    Management(String),
}

pub const DEMO_HOST: &str = "demo.localhost";
/// The cluster address of the embedded proxy: services are published as `<name>.localhost`.
pub const CLUSTER: &str = "localhost";
const EMBEDDED_TOKEN_NAME: &str = "portcullis-up embedded proxy";

/// What the embedded management handed out for this run.
struct Embedded {
    admin_pat: String,
    proxy_token: String,
    first_run: bool,
}

pub fn run(args: &UpArgs) -> Result<i32, UpError> {
    let data = &args.data_dir;
    let certs = data.join("certs");
    mkdir(&certs)?;
    let ca_path = data.join("ca.crt");
    if !certs.join("tls.crt").exists() || !ca_path.exists() {
        write_demo_certs(&certs, &ca_path)?;
    }
    start_demo_service(args.demo_port)?;
    let embedded = start_management(args)?;

    let port = args.https_port;
    let url = if port == 443 {
        format!("https://{DEMO_HOST}/")
    } else {
        format!("https://{DEMO_HOST}:{port}/")
    };
    // Line breaks only between arguments: inside the quoted JSON a backslash-newline is literal.
    let create = format!(
        "curl -sS -H 'Authorization: Token {pat}' -H 'Content-Type: application/json' \\\n      \
         http://{api}/api/reverse-proxies/services \\\n      \
         -d '{{\"name\":\"demo\",\"domain\":\"{DEMO_HOST}\",\"targets\":[{{\"target_id\":\"demo\",\"target_type\":\"host\",\"protocol\":\"http\",\"host\":\"127.0.0.1\",\"port\":{demo}}}]}}'",
        pat = embedded.admin_pat,
        api = args.api_addr,
        demo = args.demo_port,
    );
    let banner = format!(
        "\nPortcullis is up: a management server, a proxy for the cluster `{CLUSTER}`, and a demo\n\
         service on 127.0.0.1:{demo}.\n\
         \n  Admin token    {pat}{first}\
         \n  REST API       http://{api}/api/reverse-proxies/services\
         \n  Proxy          https://*.{CLUSTER}:{port}/   (health: http://{health}/healthz)\n\
         \n1. Publish the demo service through the proxy:\n\n    {create}\n\
         \n2. Open it:\n\n    curl --cacert {ca} --resolve {DEMO_HOST}:{port}:127.0.0.1 {url}\n\
         \nData (store, certificates) lives in {data}. Stop with Ctrl-C.\n",
        demo = args.demo_port,
        pat = embedded.admin_pat,
        first = if embedded.first_run {
            "   (new account: admin@localhost)"
        } else {
            "   (a fresh token for this run)"
        },
        api = args.api_addr,
        health = args.health_addr,
        ca = ca_path.display(),
        data = data.display(),
    );
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(banner.as_bytes());
    let _ = stdout.flush();

    let https = format!("127.0.0.1:{port}");
    let http = format!("127.0.0.1:{}", args.http_port);
    let cert_dir = certs.display().to_string();
    let mgmt = format!("http://{}", args.grpc_addr);
    let argv = [
        "portcullis",
        "proxy",
        "--addr",
        &https,
        "--http-addr",
        &http,
        "--health-addr",
        &args.health_addr,
        "--cert-dir",
        &cert_dir,
        "--mgmt",
        &mgmt,
        "--allow-insecure",
        "--token",
        &embedded.proxy_token,
        "--domain",
        CLUSTER,
    ];
    let cli =
        <Cli as clap::Parser>::try_parse_from(argv).map_err(|e| UpError::Args(e.to_string()))?;
    let Command::Proxy(proxy_args) = cli.command else {
        return Err(UpError::Args("expected proxy arguments".into()));
    };
    Ok(crate::proxy_main::run(&proxy_args)?)
}

/// Starts management on its own thread; on first run creates the account. Each run mints a new
/// admin token and a new proxy token (revoking the previous run's), so none is kept on disk.
fn start_management(args: &UpArgs) -> Result<Embedded, UpError> {
    use management::server::{Management, ManagementConfig};
    use management::store::Store;
    let config = ManagementConfig {
        grpc_listen: args.grpc_addr,
        http_listen: args.api_addr,
        store_url: crate::management_cli::sqlite_url(&args.data_dir.join("management.db")),
        heartbeat: crate::management_cli::UP_HEARTBEAT,
        // Everything stays on loopback.
        grpc_tls: None,
        access_log_retention_days: 7,
        public_url: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("portcullis-up-management")
        .build()
        .map_err(UpError::Demo)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("portcullis-up-management".into())
        .spawn(move || {
            rt.block_on(async move {
                let prepared = async {
                    let m = Management::bind(&config).await.map_err(|e| e.to_string())?;
                    let embedded = prepare_accounts(&m.store)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((m, embedded))
                }
                .await;
                match prepared {
                    Ok((m, embedded)) => {
                        let _ = tx.send(Ok(embedded));
                        if let Err(e) = m.serve(std::future::pending()).await {
                            tracing::error!(error = %e, "embedded management stopped");
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(UpError::Demo)?;
    let embedded = rx
        .recv()
        .map_err(|_| UpError::Management("the management thread ended".into()))?
        .map_err(UpError::Management)?;

    async fn prepare_accounts(store: &Store) -> Result<Embedded, management::store::StoreError> {
        use management::store::Role;
        let owner = store.first_owner().await?;
        let (account, user, first_run) = match owner {
            Some(u) => (u.account_id.clone(), u, false),
            None => {
                let b = management::bootstrap::create_account(store, "default", "admin@localhost")
                    .await?;
                let u = store
                    .user(&b.account_id, &b.user_id)
                    .await?
                    .ok_or_else(|| {
                        management::store::StoreError::Corrupt("bootstrap user".into())
                    })?;
                (b.account_id, u, true)
            }
        };
        debug_assert!(user.role >= Role::Admin);
        let (_, admin_pat) = store.create_pat(&user.id, "portcullis up", None).await?;
        for t in store.list_proxy_tokens(Some(&account)).await? {
            if t.name == EMBEDDED_TOKEN_NAME && !t.revoked {
                store.revoke_proxy_token(Some(&account), &t.id).await?;
            }
        }
        let (_, proxy_token) = store
            .create_proxy_token(Some(&account), EMBEDDED_TOKEN_NAME, None)
            .await?;
        Ok(Embedded {
            admin_pat,
            proxy_token,
            first_run,
        })
    }
    Ok(embedded)
}

fn mkdir(path: &Path) -> Result<(), UpError> {
    fs::create_dir_all(path).map_err(|source| UpError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), UpError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(|source| UpError::Io {
            path: path.display().to_string(),
            source,
        })
}

/// A CA (kept only as a public certificate for clients) and a `*.localhost` certificate.
fn write_demo_certs(certs: &Path, ca_path: &Path) -> Result<(), UpError> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Portcullis demo CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec![
        "localhost".to_string(),
        DEMO_HOST.to_string(),
        "*.localhost".to_string(),
    ])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
    write_file(&certs.join("tls.crt"), leaf.pem().as_bytes())?;
    write_file(&certs.join("tls.key"), leaf_key.serialize_pem().as_bytes())?;
    restrict(&certs.join("tls.key"));
    write_file(ca_path, ca.pem().as_bytes())?;
    Ok(())
}

fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
}

/// Starts the demo service on a loopback port, on its own thread.
fn start_demo_service(port: u16) -> Result<SocketAddr, UpError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).map_err(UpError::Demo)?;
    listener.set_nonblocking(true).map_err(UpError::Demo)?;
    let addr = listener.local_addr().map_err(UpError::Demo)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(UpError::Demo)?;
    std::thread::Builder::new()
        .name("portcullis-demo".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(demo_page);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        })
        .map_err(UpError::Demo)?;
    Ok(addr)
}

async fn demo_page(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let forwarded_for = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let body = format!(
        "Hello from the Portcullis demo service.\n\
         You asked for {} {} and reached it through the proxy (X-Forwarded-For: {}).\n",
        req.method(),
        req.uri(),
        forwarded_for
    );
    Ok(Response::new(Full::new(Bytes::from(body))))
}
