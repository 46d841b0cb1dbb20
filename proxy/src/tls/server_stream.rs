//! A TLS server connection on a monoio socket that holds no I/O buffer while it waits.
//!
//! monoio-rustls gives every connection two 16 KiB buffers for its whole life; with thousands
//! of idle keep-alive connections that is most of the proxy's memory. Here ciphertext buffers
//! are borrowed from a small per-thread pool only while bytes move, and given back once rustls
//! has taken every byte. Waits with no bytes in sight (before the ClientHello, and between
//! requests through `WaitReadable`) are io_uring polls that lend no buffer; other reads go
//! straight to the socket, without a poll round trip first.
//!
//! Like every monoio stream, it must not be used again after an operation was cancelled.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::sync::Arc;

use monoio::BufResult;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut, RawBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split};
use monoio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

use crate::dataplane::readable::WaitReadable;

/// Bytes asked of the socket per read: one full TLS record and its header.
const READ_SIZE: usize = 16 * 1024 + 512;
/// Buffers kept for reuse per thread; more are freed.
const POOL_LIMIT: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer(capacity: usize) -> Vec<u8> {
    let mut buf = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    buf.clear();
    buf.reserve(capacity);
    buf
}

fn give_back(buf: Vec<u8>) {
    // A buffer grown far past a record (a large write) is not worth keeping.
    if buf.capacity() == 0 || buf.capacity() > 4 * READ_SIZE {
        return;
    }
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < POOL_LIMIT {
            pool.push(buf);
        }
    });
}

pub struct TlsServerStream {
    tcp: TcpStream,
    conn: ServerConnection,
    /// Ciphertext read but not yet taken by rustls (it takes less when its plaintext buffer is
    /// full); empty and unallocated otherwise.
    pending: Vec<u8>,
    pending_pos: usize,
}

// SAFETY: monoio's split halves share the stream through an `Rc<UnsafeCell<_>>` on one thread.
// The read half only touches `pending` and the rustls reader side, the write half only the
// writer side; rustls state is only touched between awaits, never while an operation of the
// other half is borrowed into the kernel except the socket itself, which allows one read and
// one write in flight.
unsafe impl Split for TlsServerStream {}

impl TlsServerStream {
    /// The protocol negotiated with ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Runs the server handshake on `tcp`.
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        let mut stream = Self {
            tcp,
            conn,
            pending: Vec::new(),
            pending_pos: 0,
        };
        while stream.conn.is_handshaking() {
            if stream.conn.wants_write() {
                stream.send_tls().await?;
            } else if stream.conn.wants_read() {
                if stream.pending_pos >= stream.pending.len() {
                    // A client that connects and sends nothing holds no buffer.
                    stream.tcp.readable(false).await?;
                }
                if !stream.receive_tls().await? {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed during the TLS handshake",
                    ));
                }
            } else {
                break;
            }
        }
        // Finished and session tickets.
        stream.send_tls().await?;
        Ok(stream)
    }

    /// Sends everything rustls has queued, in one write per call of `write_tls`.
    async fn send_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut buf = take_buffer(READ_SIZE);
            self.conn.write_tls(&mut buf)?;
            let (res, buf) = self.tcp.write_all(buf).await;
            res?;
            give_back(buf);
        }
        Ok(())
    }

    /// Gives rustls more ciphertext: what is left from the last read, else a new read from
    /// the socket. `Ok(false)` is the end of the stream.
    async fn receive_tls(&mut self) -> io::Result<bool> {
        if self.pending_pos >= self.pending.len() {
            let buf = take_buffer(READ_SIZE);
            let (res, buf) = self.tcp.read(buf).await;
            self.pending = buf;
            self.pending_pos = 0;
            if res? == 0 {
                self.release_pending();
                return Ok(false);
            }
        }
        let mut unread = &self.pending[self.pending_pos..];
        let taken = self.conn.read_tls(&mut unread);
        let processed = taken.and_then(|n| {
            self.pending_pos += n;
            self.conn
                .process_new_packets()
                .map(|_| ())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        });
        if self.pending_pos >= self.pending.len() {
            self.release_pending();
        }
        if let Err(e) = processed {
            // Tell the peer why (the alert rustls queued), best effort.
            let _ = self.send_tls().await;
            return Err(e);
        }
        Ok(true)
    }

    fn release_pending(&mut self) {
        give_back(std::mem::take(&mut self.pending));
        self.pending_pos = 0;
    }
}

impl WaitReadable for TlsServerStream {
    async fn wait_readable(&mut self) -> io::Result<()> {
        if self.pending_pos < self.pending.len() {
            return Ok(());
        }
        let has_plaintext = self
            .conn
            .process_new_packets()
            .map(|state| state.plaintext_bytes_to_read() > 0)
            // An error shows on the next read.
            .unwrap_or(true);
        if has_plaintext {
            return Ok(());
        }
        self.tcp.readable(false).await
    }
}

impl AsyncReadRent for TlsServerStream {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: IoBufMut guarantees write_ptr is valid for bytes_total bytes.
        let slice = unsafe { std::slice::from_raw_parts_mut(buf.write_ptr(), buf.bytes_total()) };
        loop {
            match self.conn.reader().read(slice) {
                Ok(n) => {
                    // SAFETY: rustls wrote n bytes into the slice.
                    unsafe { buf.set_init(n) };
                    return (Ok(n), buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return (Err(e), buf),
            }
            match self.receive_tls().await {
                Ok(true) => {}
                // Closed without close_notify: rustls reports that on the next read.
                Ok(false) => {
                    return match self.conn.reader().read(slice) {
                        Ok(n) => {
                            // SAFETY: as above.
                            unsafe { buf.set_init(n) };
                            (Ok(n), buf)
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => (Ok(0), buf),
                        Err(e) => (Err(e), buf),
                    };
                }
                Err(e) => return (Err(e), buf),
            }
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer points into `buf`, which outlives the read.
        let n = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.read(raw).await.0,
            None => Ok(0),
        };
        if let Ok(n) = n {
            // SAFETY: n bytes were written into the first iovec.
            unsafe { buf.set_init(n) };
        }
        (n, buf)
    }
}

impl AsyncWriteRent for TlsServerStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: IoBuf guarantees read_ptr is valid for bytes_init bytes.
        let slice = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let n = match self.conn.writer().write(slice) {
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        match self.send_tls().await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer points into `buf`, which outlives the write.
        let n = match unsafe { RawBuf::new_from_iovec(&buf) } {
            Some(raw) => self.write(raw).await.0,
            None => Ok(0),
        };
        (n, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.conn.writer().flush()?;
        self.send_tls().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        self.send_tls().await?;
        self.tcp.shutdown().await
    }
}
