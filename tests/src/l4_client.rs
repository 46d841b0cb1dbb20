//! Clients for L4 tests: TCP and UDP sockets bound to a chosen source address, and a TCP
//! round trip that streams a pattern through an echo and compares hashes.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::backend::{FNV_OFFSET, fnv1a64};

/// A TCP connection from `source` (any port) to `dest`, with read and write timeouts.
pub fn tcp_from(
    source: Ipv4Addr,
    dest: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    s.connect_timeout(&dest.into(), timeout)?;
    let tcp: TcpStream = s.into();
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(tcp)
}

pub fn udp_from(source: Ipv4Addr) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddrV4::new(source, 0)).expect("bind udp client");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    s
}

/// Sends `total` bytes of a pattern while reading the echo; returns (hash sent, hash received,
/// bytes received).
///
/// The client's end of stream (FIN) is sent only once the first echoed byte came back (or the
/// reader gave up), so the proxy always meets an established connection: a kernel splice is
/// refused for a socket whose peer already closed its side, and a test asserting the splice
/// would otherwise depend on who wins that race.
pub fn echo_round_trip(stream: TcpStream, total: usize) -> (u64, u64, usize) {
    let mut writer = stream.try_clone().expect("clone");
    let (echo_began, wait_for_echo) = std::sync::mpsc::channel::<()>();
    let sender = std::thread::spawn(move || {
        let mut hash = FNV_OFFSET;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        while sent < total {
            let n = chunk.len().min(total - sent);
            for b in chunk[..n].iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            if let Err(e) = writer.write_all(&chunk[..n]) {
                eprintln!("echo_round_trip: write failed after {sent} of {total} bytes: {e}");
                break;
            }
            hash = fnv1a64(&chunk[..n], hash);
            sent += n;
        }
        // Bounded: the reader signals or drops its end within its read timeout.
        let _ = wait_for_echo.recv_timeout(Duration::from_secs(30));
        let _ = writer.shutdown(std::net::Shutdown::Write);
        hash
    });
    let mut reader = stream;
    let mut hash = FNV_OFFSET;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut echo_began = Some(echo_began);
    while got < total {
        match reader.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) => {
                eprintln!("echo_round_trip: end of stream after {got} of {total} bytes");
                break;
            }
            Err(e) => {
                eprintln!("echo_round_trip: read failed after {got} of {total} bytes: {e}");
                break;
            }
            Ok(n) => {
                if let Some(began) = echo_began.take() {
                    let _ = began.send(());
                }
                hash = fnv1a64(&buf[..n], hash);
                got += n;
            }
        }
    }
    drop(echo_began);
    let sent_hash = sender.join().expect("sender");
    (sent_hash, hash, got)
}
