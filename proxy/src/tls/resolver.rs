//! Picks a certificate for each handshake from the current certificate store, or the ACME
//! tls-alpn-01 challenge certificate when the CA's validator asks for `acme-tls/1`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::CertStore;
use crate::acme::{ACME_TLS_ALPN, Challenges};

#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
    challenges: Arc<Challenges>,
    /// tls-alpn-01 is the configured ACME challenge.
    acme_alpn: bool,
}

impl SniResolver {
    pub fn new(store: CertStore, challenges: Arc<Challenges>, acme_alpn: bool) -> Self {
        Self {
            store: ArcSwap::from_pointee(store),
            challenges,
            acme_alpn,
        }
    }

    /// Replaces the store; handshakes already under way keep the certificate they picked.
    pub fn publish(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }

    pub fn store(&self) -> Arc<CertStore> {
        self.store.load_full()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A validator offers acme-tls/1 and nothing else (RFC 8737 §3).
        let acme = self.acme_alpn
            && hello.alpn().is_some_and(|offered| {
                let offered: Vec<&[u8]> = offered.collect();
                offered == [ACME_TLS_ALPN]
            });
        if acme {
            // Only the challenge certificate may answer a validator; without one the
            // handshake fails.
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.challenges.alpn_certificate(&name);
        }
        let store = self.store.load();
        match hello.server_name() {
            Some(name) => store.find(&name.to_ascii_lowercase()),
            None => store.default_cert(),
        }
    }
}
