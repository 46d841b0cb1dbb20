//! Picks a certificate for each handshake from the current certificate store.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::CertStore;

#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl SniResolver {
    pub fn new(store: CertStore) -> Self {
        Self {
            store: ArcSwap::from_pointee(store),
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
        let store = self.store.load();
        match hello.server_name() {
            Some(name) => store.find(&name.to_ascii_lowercase()),
            None => store.default_cert(),
        }
    }
}
