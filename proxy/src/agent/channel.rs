//! The gRPC channel to management: TLS with the system roots (plus an optional CA file) for
//! https://, plaintext http:// only with explicit consent since the setup key and peer token
//! travel in it.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::args::Settings;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "refusing to send the setup key and peer token over plaintext {0}: use https:// or set PORTCULLIS_AGENT_ALLOW_INSECURE=true"
    )]
    Insecure(String),
    #[error("PORTCULLIS_AGENT_MANAGEMENT_URL {url:?} is not valid: {message}")]
    BadUrl { url: String, message: String },
    #[error("cannot read PORTCULLIS_AGENT_MANAGEMENT_CA_FILE {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
}

/// A lazily connecting channel: connection errors show up per call, where the caller retries.
pub fn connect(settings: &Settings) -> Result<Channel, ChannelError> {
    let url = &settings.management;
    let bad = |message: String| ChannelError::BadUrl {
        url: url.clone(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|source| ChannelError::CaFile {
                path: path.display().to_string(),
                source,
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    } else if url.starts_with("http://") {
        if !settings.allow_insecure {
            return Err(ChannelError::Insecure(url.clone()));
        }
    } else {
        return Err(bad("the scheme must be https:// or http://".to_string()));
    }
    Ok(endpoint.connect_lazy())
}
