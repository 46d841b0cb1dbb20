//! Reading a TLS ClientHello far enough to learn its SNI, without terminating TLS: the bytes
//! read are kept and sent on to the target unchanged.

use monoio::io::AsyncReadRent;

/// A ClientHello is a few hundred bytes; post-quantum key shares make it a few KiB. Anything
/// beyond this is not a ClientHello worth waiting for.
pub const MAX_HELLO_BYTES: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("connection closed before the ClientHello was complete")]
    Closed,
    #[error("ClientHello larger than {MAX_HELLO_BYTES} bytes")]
    TooLarge,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(String),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads until the ClientHello is complete. Returns the SNI (if the client sent one) and every
/// byte read so far.
pub async fn read_sni<S: AsyncReadRent>(
    stream: &mut S,
) -> Result<(Option<String>, Vec<u8>), HelloError> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen: Vec<u8> = Vec::with_capacity(2048);
    loop {
        let start = seen.len();
        if start >= MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        seen.reserve(4096.min(MAX_HELLO_BYTES - start));
        let (res, buf) = stream.read(seen).await;
        seen = buf;
        if res? == 0 {
            return Err(HelloError::Closed);
        }
        let mut fresh = &seen[start..];
        while !fresh.is_empty() {
            match acceptor.read_tls(&mut fresh) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(HelloError::NotTls(e.to_string())),
            }
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_string);
                return Ok((sni, seen));
            }
            Err((e, _)) => return Err(HelloError::NotTls(e.to_string())),
        }
    }
}
