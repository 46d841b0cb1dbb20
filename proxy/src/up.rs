//! `portcullis up`: try Portcullis on one machine with nothing to set up.
//!
//! Creates a private CA and a certificate for `*.localhost` in the data directory (once), starts
//! a small demo service on loopback, writes a mappings file that publishes it as
//! `demo.localhost`, and runs the proxy on high ports, so no root is needed.

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
}

pub const DEMO_HOST: &str = "demo.localhost";

pub fn run(args: &UpArgs) -> Result<i32, UpError> {
    let data = &args.data_dir;
    let certs = data.join("certs");
    mkdir(&certs)?;
    let ca_path = data.join("ca.crt");
    if !certs.join("tls.crt").exists() || !ca_path.exists() {
        write_demo_certs(&certs, &ca_path)?;
    }
    let demo_addr = start_demo_service()?;
    let mappings = data.join("mappings.toml");
    write_file(
        &mappings,
        format!(
            "# Written by `portcullis up`. Edit it: the proxy reloads it when it changes.\n\
             [[service]]\nid = \"demo\"\ndomain = \"{DEMO_HOST}\"\n\n\
             [[service.path]]\npath = \"/\"\ntarget = \"http://{demo_addr}\"\n"
        )
        .as_bytes(),
    )?;

    let port = args.https_port;
    let url = if port == 443 {
        format!("https://{DEMO_HOST}/")
    } else {
        format!("https://{DEMO_HOST}:{port}/")
    };
    let banner = format!(
        "\nPortcullis is up.\n\
         \n  Demo service   {url}\n\
         \n  Try it:        curl --cacert {ca} --resolve {DEMO_HOST}:{port}:127.0.0.1 {url}\n\
         \n  Health         http://{health}/healthz\
         \n  Services file  {mappings} (edited files are reloaded)\
         \n  Certificates   {certs}\n\
         \nStop with Ctrl-C.\n",
        ca = ca_path.display(),
        health = args.health_addr,
        mappings = mappings.display(),
        certs = certs.display(),
    );
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(banner.as_bytes());
    let _ = stdout.flush();

    let https = format!("127.0.0.1:{port}");
    let http = format!("127.0.0.1:{}", args.http_port);
    let cert_dir = certs.display().to_string();
    let mappings_arg = mappings.display().to_string();
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
        "--mappings",
        &mappings_arg,
    ];
    let cli =
        <Cli as clap::Parser>::try_parse_from(argv).map_err(|e| UpError::Args(e.to_string()))?;
    let Command::Proxy(proxy_args) = cli.command else {
        return Err(UpError::Args("expected proxy arguments".into()));
    };
    Ok(crate::proxy_main::run(&proxy_args)?)
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

/// Starts the demo service on an ephemeral loopback port, on its own thread.
fn start_demo_service() -> Result<SocketAddr, UpError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(UpError::Demo)?;
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
