//! Clients for tests: `curl` (the real one) and a raw TLS connection for byte-level requests.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

use crate::process::stdout_of;

/// A minimal HTTP/1.0 GET over plain TCP (health probes), bounded by a 5 s timeout.
pub fn plain_get(addr: impl ToSocketAddrs, path: &str) -> std::io::Result<Vec<u8>> {
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or(std::io::ErrorKind::NotFound)?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let pos = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(std::io::ErrorKind::InvalidData)?;
    Ok(buf[pos + 4..].to_vec())
}

/// What curl saw.
#[derive(Debug)]
pub struct CurlResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl CurlResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Runs `curl` against `https://host:port/path` with `--resolve` to loopback and the test CA.
pub fn curl(ca: &Path, host: &str, port: u16, path: &str, extra: &[&str]) -> CurlResponse {
    let url = format!("https://{host}:{port}{path}");
    let out = stdout_of(
        Command::new("curl")
            .args(["-sS", "-i", "--max-time", "60", "--http1.1"])
            .arg("--cacert")
            .arg(ca)
            .arg("--resolve")
            .arg(format!("{host}:{port}:127.0.0.1"))
            .args(extra)
            .arg(&url)
            .stdin(Stdio::null()),
        &format!("curl {url}"),
    );
    parse_response(&out)
}

/// Splits `curl -i` output into the final response (interim 1xx heads are skipped).
pub fn parse_response(raw: &[u8]) -> CurlResponse {
    let mut rest = raw;
    loop {
        let pos = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&rest[..pos]).into_owned();
        let body = &rest[pos + 4..];
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .expect("status line");
        if (100..200).contains(&status) && status != 101 {
            rest = body;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        return CurlResponse {
            status,
            headers,
            body: body.to_vec(),
        };
    }
}

/// rustls client configuration trusting only the test CA.
pub fn tls_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the proxy on loopback, with read timeouts so no test can hang.
pub fn tls_connect(ca_pem: &str, host: &str, port: u16) -> TlsStream {
    try_tls_connect(ca_pem, host, port).expect("TLS handshake with the proxy")
}

/// Like `tls_connect`, but a failed connection or handshake is returned, not a panic.
pub fn try_tls_connect(ca_pem: &str, host: &str, port: u16) -> std::io::Result<TlsStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
    let conn =
        rustls::ClientConnection::new(tls_config(ca_pem), name).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// DER of the certificate the server presented.
pub fn peer_cert(stream: &TlsStream) -> Vec<u8> {
    stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .expect("server certificate")
}

/// Reads one response (head and, when Content-Length says so, body) from a keep-alive stream.
pub fn read_response<S: Read>(stream: &mut S) -> std::io::Result<CurlResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut resp = parse_response(&buf[..head_end]);
    let len: usize = resp
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    resp.body = body;
    Ok(resp)
}

/// Sends raw bytes on a new TLS connection and returns everything read until the proxy closes
/// (or 20 s pass).
pub fn raw_exchange(ca_pem: &str, host: &str, port: u16, request: &[u8]) -> Vec<u8> {
    let mut s = tls_connect(ca_pem, host, port);
    s.write_all(request).expect("send request");
    s.flush().expect("flush");
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    out
}

/// Status code of the first response in raw bytes.
pub fn status_of(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    text.lines().next()?.split_whitespace().nth(1)?.parse().ok()
}
