//! The harness's own client: checks that every proxy answers correctly, and holds many idle
//! keep-alive TLS connections open for the memory workload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::contestants::SERVICE_HOST;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn connector(ca_pem: &str) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVICE_HOST).expect("valid name")
}

async fn tls_connect(tls: &TlsConnector, addr: SocketAddr) -> Result<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    Ok(
        tokio::time::timeout(IO_TIMEOUT, tls.connect(server_name(), tcp))
            .await
            .context("TLS handshake timed out")??,
    )
}

fn request(path: &str, close: bool) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nUser-Agent: portcullis-bench\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// GETs `path` over TLS (`tls` given) or plain TCP and returns the status and the body.
pub async fn get(
    addr: SocketAddr,
    tls: Option<&TlsConnector>,
    path: &str,
) -> Result<(u16, Vec<u8>)> {
    match tls {
        Some(tls) => exchange(&mut tls_connect(tls, addr).await?, path).await,
        None => {
            let mut tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
                .await
                .context("connect timed out")??;
            exchange(&mut tcp, path).await
        }
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    path: &str,
) -> Result<(u16, Vec<u8>)> {
    s.write_all(request(path, false).as_bytes()).await?;
    tokio::time::timeout(IO_TIMEOUT, read_response(s))
        .await
        .context("response timed out")?
}

/// Reads one response with a Content-Length body (all the proxies under test forward the
/// backend's length).
async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Result<(u16, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    let (status, head_len, body_len) = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head_len) = resp.parse(&buf)? {
            let status = resp.code.unwrap_or(0);
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .context("response without Content-Length")?;
            break (status, head_len, len);
        }
        if buf.len() > 64 * 1024 {
            bail!("response head over 64 KiB");
        }
    };
    while buf.len() < head_len + body_len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!(
                "connection closed after {} of {body_len} body bytes",
                buf.len() - head_len
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, buf[head_len..head_len + body_len].to_vec()))
}

/// Opens `count` TLS connections, sends one request on each and reads its answer, and keeps
/// them open (idle, keep-alive) until the returned value is dropped.
pub async fn open_idle(
    addr: SocketAddr,
    tls: &TlsConnector,
    count: usize,
    path: &str,
) -> Result<Vec<TlsStream<TcpStream>>> {
    const PARALLEL: usize = 64;
    let mut held = Vec::with_capacity(count);
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0;
    while held.len() < count {
        while started < count && pending.len() < PARALLEL {
            let tls = tls.clone();
            let path = path.to_string();
            pending.spawn(async move {
                let mut s = tls_connect(&tls, addr).await?;
                let (status, _) = exchange(&mut s, &path).await?;
                if status != 200 {
                    bail!("status {status}");
                }
                Ok(s)
            });
            started += 1;
        }
        match pending.join_next().await {
            Some(joined) => {
                let stream = joined.context("connection task failed")?.with_context(|| {
                    format!("idle connection {} of {count} to {addr}", held.len() + 1)
                })?;
                held.push(stream);
            }
            None => break,
        }
    }
    Ok(held)
}

/// Raises this process's open-file limit to the hard limit, for the idle connections.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    }
}
