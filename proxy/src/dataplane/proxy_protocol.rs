//! Inbound PROXY protocol (v1 and v2) for a proxy behind an L4 load balancer
//! (`NB_PROXY_PROXY_PROTOCOL`), on the HTTPS listener, the HTTP listener in `serve` mode and the
//! L4 TCP ports. Only connections from `NB_PROXY_TRUSTED_PROXIES` may carry the header, and from
//! them it is required (NetBird's `REQUIRE` policy); anyone else is taken at its socket address
//! (a header it sends then breaks its own TLS or HTTP, as it should). UDP has no PROXY protocol.
//!
//! The header is read before anything else (the TLS handshake included), bounded in size and
//! time, and consumed byte-exact: the socket is peeked to find where the header ends and only
//! that much is read, so the bytes behind it stay in the socket for the TLS/HTTP layer.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use monoio::io::AsyncReadRentExt;
use monoio::net::TcpStream;

use crate::config::ProxyConfig;

/// v2: 12-byte signature, version/command, family, 2-byte length.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
/// A v1 line is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// v2 addresses plus TLVs; real balancers send well under this.
const V2_MAX_BODY: usize = 4096;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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

/// Who the balancer says the connection is from, and what it was addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The client: the header's source, or the socket peer for `LOCAL`/`UNKNOWN`.
    pub client: SocketAddr,
    /// The header's destination (the balancer's front address), when it names one.
    pub destination: Option<SocketAddr>,
}

impl Origin {
    fn direct(peer: SocketAddr) -> Self {
        Origin {
            client: peer,
            destination: None,
        }
    }
}

/// The connection's origin: read from a PROXY header when `NB_PROXY_PROXY_PROTOCOL` is on and the
/// peer is a trusted proxy, else the socket peer. `None` when a trusted peer's header is missing,
/// late or malformed: the connection is to be closed.
pub async fn accept(
    mut tcp: TcpStream,
    peer: SocketAddr,
    config: &ProxyConfig,
) -> Option<(TcpStream, Origin)> {
    let ip = crate::routes::access::canonical(peer.ip());
    if !config.proxy_protocol || !config.trusted_proxies.iter().any(|n| n.contains(&ip)) {
        return Some((tcp, Origin::direct(peer)));
    }
    match read(&mut tcp, peer).await {
        Ok(origin) => Some((tcp, origin)),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "PROXY header refused; closing the connection");
            None
        }
    }
}

/// Reads the header from a connection that must start with one.
pub async fn read(tcp: &mut TcpStream, peer: SocketAddr) -> Result<Origin, ProxyHeaderError> {
    let header = match monoio::time::timeout(READ_TIMEOUT, read_header(tcp)).await {
        Ok(r) => r?,
        Err(_) => return Err(ProxyHeaderError::Timeout),
    };
    parse(&header, peer)
}

/// The header's bytes, consumed from the socket and nothing after them.
async fn read_header(tcp: &mut TcpStream) -> Result<Vec<u8>, ProxyHeaderError> {
    let mut header: Vec<u8> = Vec::new();
    let mut peeked: Vec<u8> = Vec::with_capacity(V1_MAX.max(V2_FIXED));
    loop {
        tcp.readable(false)
            .await
            .map_err(|_| ProxyHeaderError::Io)?;
        peeked.clear();
        let n = match peek(tcp, &mut peeked) {
            Ok(0) => return Err(ProxyHeaderError::Io),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(ProxyHeaderError::Io),
        };
        let mut seen = header.clone();
        seen.extend_from_slice(&peeked[..n]);
        // Known length: take what is missing (it may still be on its way); unknown: everything
        // peeked is header, take it and look again.
        let take = match header_len(&seen)? {
            Some(total) => total - header.len(),
            None => n,
        };
        let (res, got) = tcp.read_exact(Vec::with_capacity(take)).await;
        res.map_err(|_| ProxyHeaderError::Io)?;
        header.extend_from_slice(&got);
        if header_len(&header)? == Some(header.len()) {
            return Ok(header);
        }
    }
}

/// Copies the bytes waiting in the socket into `buf` (up to its capacity) without consuming them.
fn peek(tcp: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    // SAFETY: the descriptor is owned by `tcp`, which outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
    let sock = socket2::SockRef::from(&fd);
    let spare: &mut [MaybeUninit<u8>] = buf.spare_capacity_mut();
    let n = sock.recv_with_flags(spare, libc::MSG_PEEK | libc::MSG_DONTWAIT)?;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(n) };
    Ok(n)
}

/// The header's full length once `seen` (the connection's first bytes) tells it; `None` while
/// more bytes are needed to know.
fn header_len(seen: &[u8]) -> Result<Option<usize>, ProxyHeaderError> {
    // Whether what arrived so far agrees with `sig`.
    let starts = |sig: &[u8]| {
        let n = seen.len().min(sig.len());
        seen[..n] == sig[..n]
    };
    if starts(b"PROXY ") {
        let line = &seen[..seen.len().min(V1_MAX)];
        return match line.windows(2).position(|w| w == b"\r\n") {
            Some(end) => Ok(Some(end + 2)),
            None if seen.len() >= V1_MAX => Err(ProxyHeaderError::Malformed),
            None => Ok(None),
        };
    }
    if starts(&V2_SIGNATURE) {
        if seen.len() < V2_FIXED {
            return Ok(None);
        }
        let body = usize::from(u16::from_be_bytes([seen[14], seen[15]]));
        if body > V2_MAX_BODY {
            return Err(ProxyHeaderError::Malformed);
        }
        return Ok(Some(V2_FIXED + body));
    }
    Err(ProxyHeaderError::Missing)
}

fn parse(header: &[u8], peer: SocketAddr) -> Result<Origin, ProxyHeaderError> {
    if header.starts_with(b"PROXY") {
        parse_v1(header, peer)
    } else {
        parse_v2(header, peer)
    }
}

fn parse_v1(bytes: &[u8], peer: SocketAddr) -> Result<Origin, ProxyHeaderError> {
    let header = ppp::v1::Header::try_from(bytes).map_err(|_| ProxyHeaderError::Malformed)?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Origin {
            client: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            destination: Some(SocketAddr::new(
                IpAddr::V4(a.destination_address),
                a.destination_port,
            )),
        },
        ppp::v1::Addresses::Tcp6(a) => Origin {
            client: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            destination: Some(SocketAddr::new(
                IpAddr::V6(a.destination_address),
                a.destination_port,
            )),
        },
        ppp::v1::Addresses::Unknown => Origin::direct(peer),
    })
}

fn parse_v2(bytes: &[u8], peer: SocketAddr) -> Result<Origin, ProxyHeaderError> {
    let header = ppp::v2::Header::try_from(bytes).map_err(|_| ProxyHeaderError::Malformed)?;
    if header.command == ppp::v2::Command::Local {
        // A health check of the balancer itself.
        return Ok(Origin::direct(peer));
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Origin {
            client: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            destination: Some(SocketAddr::new(
                IpAddr::V4(a.destination_address),
                a.destination_port,
            )),
        },
        ppp::v2::Addresses::IPv6(a) => Origin {
            client: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            destination: Some(SocketAddr::new(
                IpAddr::V6(a.destination_address),
                a.destination_port,
            )),
        },
        _ => Origin::direct(peer),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "10.0.0.1:9999".parse().unwrap()
    }

    fn v2(source: &str, destination: &str) -> Vec<u8> {
        crate::l4::proxy_header::v2(
            source.parse().unwrap(),
            destination.parse().unwrap(),
            ppp::v2::Protocol::Stream,
        )
        .unwrap()
    }

    #[test]
    fn v1_and_v2_sources() {
        let v1 = b"PROXY TCP4 203.0.113.5 10.0.0.2 40000 443\r\n";
        assert_eq!(
            parse(v1, peer()).unwrap(),
            Origin {
                client: "203.0.113.5:40000".parse().unwrap(),
                destination: Some("10.0.0.2:443".parse().unwrap()),
            }
        );
        let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n";
        assert_eq!(
            parse(v1, peer()).unwrap().client,
            "[2001:db8::7]:40000".parse().unwrap()
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n", peer()).unwrap(),
            Origin::direct(peer())
        );
        assert_eq!(
            parse(&v2("198.51.100.7:5555", "10.0.0.2:443"), peer()).unwrap(),
            Origin {
                client: "198.51.100.7:5555".parse().unwrap(),
                destination: Some("10.0.0.2:443".parse().unwrap()),
            }
        );
        assert!(parse(b"PROXY TCP4 nonsense\r\n", peer()).is_err());
        // LOCAL (a balancer's health check): the socket peer.
        let mut local = v2("198.51.100.7:5555", "10.0.0.2:443");
        local[12] = 0x20;
        assert_eq!(parse(&local, peer()).unwrap(), Origin::direct(peer()));
    }

    #[test]
    fn header_length_from_the_first_bytes() {
        assert_eq!(header_len(b""), Ok(None));
        assert_eq!(header_len(b"PRO"), Ok(None));
        assert_eq!(header_len(b"PROXY TCP4 1.2.3.4"), Ok(None));
        let v1 = b"PROXY TCP4 203.0.113.5 10.0.0.2 40000 443\r\n\x16\x03\x01";
        assert_eq!(header_len(v1), Ok(Some(v1.len() - 3)));
        assert_eq!(header_len(&[b'P'; 4]), Err(ProxyHeaderError::Missing));
        // A TLS ClientHello or an HTTP request is not a header.
        assert_eq!(
            header_len(b"\x16\x03\x01\x02\x00"),
            Err(ProxyHeaderError::Missing)
        );
        assert_eq!(
            header_len(b"GET / HTTP/1.1\r\n"),
            Err(ProxyHeaderError::Missing)
        );
        // A v1 line without its CRLF within 107 bytes.
        let mut long = b"PROXY ".to_vec();
        long.resize(200, b'1');
        assert_eq!(header_len(&long), Err(ProxyHeaderError::Malformed));
        let h = v2("198.51.100.7:5555", "10.0.0.2:443");
        assert_eq!(header_len(&h[..15]), Ok(None));
        assert_eq!(header_len(&h[..16]), Ok(Some(h.len())));
        let mut huge = h[..16].to_vec();
        huge[14..16].copy_from_slice(&5000u16.to_be_bytes());
        assert_eq!(header_len(&huge), Err(ProxyHeaderError::Malformed));
    }

    /// Runs `test` on the legacy (epoll) driver, and on io_uring where the kernel has it.
    fn on_both_drivers<F, Fut>(test: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(test());
        if monoio::utils::detect_uring() {
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .build()
                .unwrap()
                .block_on(test());
        }
    }

    /// Sends `chunks` (with a pause between them, then closes) to a fresh connection, reads its
    /// header, then everything after it.
    async fn read_from(chunks: Vec<Vec<u8>>) -> (Result<Origin, ProxyHeaderError>, Vec<u8>) {
        use monoio::io::AsyncReadRent;
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            for c in chunks {
                s.write_all(&c).unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        let (mut tcp, peer) = listener.accept().await.unwrap();
        let origin = read(&mut tcp, peer).await;
        let mut rest = Vec::new();
        loop {
            let (res, buf) = tcp.read(Vec::with_capacity(4096)).await;
            match res {
                Ok(n) if n > 0 => rest.extend_from_slice(&buf),
                _ => break,
            }
        }
        sender.join().unwrap();
        (origin, rest)
    }

    #[test]
    fn reads_exactly_the_header_and_leaves_the_rest() {
        on_both_drivers(|| async {
            let hello = b"\x16\x03\x01\x00\x05hello".to_vec();
            // v1 and the first bytes of TLS in one segment.
            let mut first = b"PROXY TCP4 203.0.113.5 10.0.0.2 40000 443\r\n".to_vec();
            first.extend_from_slice(&hello);
            let (origin, rest) = read_from(vec![first]).await;
            assert_eq!(origin.unwrap().client, "203.0.113.5:40000".parse().unwrap());
            assert_eq!(rest, hello);
            // v1 split in the middle of its line and between CR and LF.
            let (origin, rest) = read_from(vec![
                b"PROXY TCP4 198.51.1".to_vec(),
                b"00.7 10.0.0.2 5 443\r".to_vec(),
                b"\nGET /".to_vec(),
            ])
            .await;
            assert_eq!(origin.unwrap().client, "198.51.100.7:5".parse().unwrap());
            assert_eq!(rest, b"GET /");
            // v2 split inside its fixed part and inside its addresses.
            let h = v2("[2001:db8::9]:7", "[2001:db8::1]:443");
            let (origin, rest) = read_from(vec![
                h[..7].to_vec(),
                h[7..20].to_vec(),
                [&h[20..], &hello[..]].concat(),
            ])
            .await;
            assert_eq!(origin.unwrap().client, "[2001:db8::9]:7".parse().unwrap());
            assert_eq!(rest, hello);
            // No header, and a closed connection.
            let (origin, _) = read_from(vec![hello.clone()]).await;
            assert_eq!(origin, Err(ProxyHeaderError::Missing));
            let (origin, _) = read_from(vec![b"PROXY TCP4".to_vec()]).await;
            assert_eq!(origin, Err(ProxyHeaderError::Io));
        });
    }
}
