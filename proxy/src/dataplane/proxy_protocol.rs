//! Inbound PROXY protocol (v1 and v2) on the HTTPS and HTTP listeners, for a proxy behind an L4
//! load balancer (`NB_PROXY_PROXY_PROTOCOL`). Only connections from `NB_PROXY_TRUSTED_PROXIES`
//! may carry the header; anyone else is taken at its socket address (a header it sends then
//! breaks its own TLS or HTTP, as it should). The header is read byte-exact, so nothing of the
//! TLS handshake behind it is consumed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use monoio::io::AsyncReadRentExt;
use monoio::net::TcpStream;

/// v2: 12-byte signature, version/command, family, 2-byte length.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// v1 lines are at most 107 bytes; v2 addresses plus TLVs are capped here.
const V1_MAX: usize = 107;
const V2_MAX_BODY: usize = 4096;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection closed before the PROXY header")]
    Io,
    #[error("the PROXY header did not arrive in time")]
    Timeout,
    #[error("the connection does not start with a PROXY header")]
    Missing,
    #[error("malformed PROXY header")]
    Malformed,
}

/// Reads the header; returns the client address it names (the socket peer for `UNKNOWN`/`LOCAL`).
pub async fn read(tcp: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, ProxyHeaderError> {
    match monoio::time::timeout(READ_TIMEOUT, read_header(tcp, peer)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyHeaderError::Timeout),
    }
}

async fn read_exact(tcp: &mut TcpStream, n: usize) -> Result<Vec<u8>, ProxyHeaderError> {
    let (res, buf) = tcp.read_exact(Vec::with_capacity(n)).await;
    res.map_err(|_| ProxyHeaderError::Io)?;
    Ok(buf)
}

async fn read_header(
    tcp: &mut TcpStream,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyHeaderError> {
    let mut head = read_exact(tcp, 5).await?;
    if head == b"PROXY" {
        // v1: a text line ending in CRLF.
        while !head.ends_with(b"\r\n") {
            if head.len() >= V1_MAX {
                return Err(ProxyHeaderError::Malformed);
            }
            head.extend(read_exact(tcp, 1).await?);
        }
        return parse_v1(&head, peer);
    }
    if head[..] != V2_SIGNATURE[..5] {
        return Err(ProxyHeaderError::Missing);
    }
    head.extend(read_exact(tcp, 11).await?);
    if head[..12] != V2_SIGNATURE {
        return Err(ProxyHeaderError::Missing);
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_BODY {
        return Err(ProxyHeaderError::Malformed);
    }
    if len > 0 {
        head.extend(read_exact(tcp, len).await?);
    }
    parse_v2(&head, peer)
}

fn parse_v1(bytes: &[u8], peer: SocketAddr) -> Result<SocketAddr, ProxyHeaderError> {
    let header = ppp::v1::Header::try_from(bytes).map_err(|_| ProxyHeaderError::Malformed)?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
        ppp::v1::Addresses::Tcp6(a) => SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
        ppp::v1::Addresses::Unknown => peer,
    })
}

fn parse_v2(bytes: &[u8], peer: SocketAddr) -> Result<SocketAddr, ProxyHeaderError> {
    let header = ppp::v2::Header::try_from(bytes).map_err(|_| ProxyHeaderError::Malformed)?;
    if header.command == ppp::v2::Command::Local {
        // A health check of the balancer itself.
        return Ok(peer);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
        ppp::v2::Addresses::IPv6(a) => SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
        _ => peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "10.0.0.1:9999".parse().unwrap()
    }

    #[test]
    fn v1_and_v2_sources() {
        let v1 = b"PROXY TCP4 203.0.113.5 10.0.0.2 40000 443\r\n";
        assert_eq!(
            parse_v1(v1, peer()).unwrap(),
            "203.0.113.5:40000".parse().unwrap()
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n", peer()).unwrap(), peer());
        let v2 = crate::l4::proxy_header::v2(
            "198.51.100.7:5555".parse().unwrap(),
            "10.0.0.2:443".parse().unwrap(),
            ppp::v2::Protocol::Stream,
        )
        .unwrap();
        assert_eq!(
            parse_v2(&v2, peer()).unwrap(),
            "198.51.100.7:5555".parse().unwrap()
        );
        assert!(parse_v1(b"PROXY TCP4 nonsense\r\n", peer()).is_err());
    }
}
