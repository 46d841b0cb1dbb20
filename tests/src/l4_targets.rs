//! Targets for L4 tests: a TCP echo (optionally expecting a PROXY v2 header first), a UDP echo
//! and a TLS server that names itself. Each runs on threads in the namespace it was started
//! in, polls a stop flag so every loop is bounded, and stops when dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(20);

pub struct Target {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// PROXY v2 headers received, one per connection (only when asked for).
    pub proxy_headers: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Datagrams a UDP echo received.
    pub datagrams: Arc<AtomicU64>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Target {
    /// Echoes every byte back; with `expect_proxy_header`, first reads a PROXY v2 header and
    /// records it.
    pub fn tcp_echo(expect_proxy_header: bool) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let headers = Arc::new(Mutex::new(Vec::new()));
        let (s, h) = (stop.clone(), headers.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, h) = (s.clone(), h.clone());
                        std::thread::spawn(move || echo(conn, expect_proxy_header, &h, &s));
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        Target {
            addr,
            stop,
            thread: Some(thread),
            proxy_headers: headers,
            datagrams: Arc::default(),
        }
    }

    /// Sends every datagram back to its sender.
    pub fn udp_echo() -> Target {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp echo");
        socket.set_read_timeout(Some(POLL)).expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let datagrams = Arc::new(AtomicU64::new(0));
        let (s, count) = (stop.clone(), datagrams.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_535];
            while !s.load(Ordering::SeqCst) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Target {
            addr,
            stop,
            thread: Some(thread),
            proxy_headers: Arc::default(),
            datagrams,
        }
    }

    /// Completes a TLS handshake with `cert_pem`/`key_pem` and writes `I am {name}\n`.
    pub fn tls_named(name: &'static str, cert_pem: &str, key_pem: &str) -> Target {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .map(|c| c.expect("cert"))
                .collect();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("server config"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind tls");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((tcp, _)) = listener.accept() else {
                    std::thread::sleep(POLL);
                    continue;
                };
                let config = config.clone();
                std::thread::spawn(move || {
                    let _ = tcp.set_nonblocking(false);
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let _ = tls.write_all(format!("I am {name}\n").as_bytes());
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.conn.complete_io(&mut tls.sock);
                });
            }
        });
        Target {
            addr,
            stop,
            thread: Some(thread),
            proxy_headers: Arc::default(),
            datagrams: Arc::default(),
        }
    }
}

fn echo(mut conn: TcpStream, proxy_header: bool, headers: &Mutex<Vec<Vec<u8>>>, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    if proxy_header {
        let mut fixed = [0u8; 16];
        if read_full(&mut conn, &mut fixed, stop).is_err() {
            return;
        }
        let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let mut rest = vec![0u8; len];
        if read_full(&mut conn, &mut rest, stop).is_err() {
            return;
        }
        let mut header = fixed.to_vec();
        header.extend_from_slice(&rest);
        headers.lock().expect("headers").push(header);
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if is_timeout(&e) => continue,
            Err(_) => break,
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

fn read_full(conn: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        if stop.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        match conn.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
