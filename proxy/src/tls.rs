//! TLS: rustls server configuration with SNI certificate selection, and client configurations
//! for https targets.

mod cert_store;
mod client;
mod resolver;
mod server_stream;

use std::sync::Arc;

pub use cert_store::{CertLoader, CertStore};
pub use client::{UpstreamTls, native_roots, roots_from_pem_file, verifying_client_config};
pub use resolver::SniResolver;
pub use server_stream::TlsServerStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// ALPN protocol used towards targets, and preferred with clients (HTTP/2 comes later).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// Also accepted from clients: without it, a client that offers only `http/1.0` (curl
/// --http1.0) would fail the handshake with no_application_protocol.
pub const ALPN_HTTP10: &[u8] = b"http/1.0";

pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server configuration shared by every worker; certificates come from the resolver, which
/// reloads them without touching open connections.
/// With `acme_alpn`, `acme-tls/1` is negotiated too (tls-alpn-01 validation); the data plane
/// closes such connections right after the handshake.
pub fn server_config(
    resolver: Arc<SniResolver>,
    acme_alpn: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec(), ALPN_HTTP10.to_vec()];
    if acme_alpn {
        cfg.alpn_protocols.push(crate::acme::ACME_TLS_ALPN.to_vec());
    }
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(cfg))
}
