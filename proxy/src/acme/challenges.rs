//! Answers to pending ACME challenges, read by the workers without locks.
//!
//! A replica publishes the challenges it is solving here and also writes them into the shared
//! certificate directory, because the CA may validate against any replica behind the domain;
//! every replica loads the others' from there (`load_peers`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;

/// The ALPN protocol of tls-alpn-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Path prefix of http-01 (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";
/// Most challenge files loaded from the shared directory, per kind.
const MAX_PEER_FILES: usize = 512;
/// Largest challenge file read from the shared directory.
const MAX_PEER_FILE: u64 = 16 * 1024;
/// Older challenge files are left over from a replica that died mid-order: ignored (a CA
/// validates within minutes).
const MAX_PEER_AGE: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, Default, Clone)]
pub struct ChallengeSet {
    /// http-01: token → key authorization.
    pub http: HashMap<String, String>,
    /// tls-alpn-01: domain → the self-signed certificate carrying the acmeIdentifier.
    pub alpn: HashMap<String, Arc<CertifiedKey>>,
}

#[derive(Debug, Default)]
pub struct Challenges {
    current: ArcSwap<ChallengeSet>,
    local: Mutex<ChallengeSet>,
    peers: Mutex<ChallengeSet>,
}

impl Challenges {
    pub fn http_answer(&self, token: &str) -> Option<String> {
        self.current.load().http.get(token).cloned()
    }

    pub fn alpn_certificate(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        self.current.load().alpn.get(domain).cloned()
    }

    pub fn add_http(&self, token: String, key_authorization: String) {
        self.change_local(|set| {
            set.http.insert(token, key_authorization);
        });
    }

    pub fn remove_http(&self, token: &str) {
        self.change_local(|set| {
            set.http.remove(token);
        });
    }

    pub fn add_alpn(&self, domain: String, cert: Arc<CertifiedKey>) {
        self.change_local(|set| {
            set.alpn.insert(domain, cert);
        });
    }

    pub fn remove_alpn(&self, domain: &str) {
        self.change_local(|set| {
            set.alpn.remove(domain);
        });
    }

    /// Replaces what other replicas published.
    pub fn set_peers(&self, peers: ChallengeSet) {
        *lock(&self.peers) = peers;
        self.republish();
    }

    fn change_local(&self, f: impl FnOnce(&mut ChallengeSet)) {
        f(&mut lock(&self.local));
        self.republish();
    }

    fn republish(&self) {
        let mut merged = lock(&self.peers).clone();
        let local = lock(&self.local);
        merged.http.extend(local.http.clone());
        merged.alpn.extend(local.alpn.clone());
        self.current.store(Arc::new(merged));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A token as the CA sends it: base64url, so it is also a safe file name.
pub fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A self-signed certificate for `domain` with the acmeIdentifier extension (RFC 8737 §3),
/// and its PEM (certificate, then key) for the other replicas.
pub fn alpn_certificate(
    domain: &str,
    digest: &[u8],
) -> Result<(Arc<CertifiedKey>, String), rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let pem = format!("{}{}", cert.pem(), key.serialize_pem());
    Ok((
        certified_from_pem(pem.as_bytes()).ok_or(rcgen::Error::CouldNotParseCertificate)?,
        pem,
    ))
}

/// A certificate and key from one PEM text.
fn certified_from_pem(pem: &[u8]) -> Option<Arc<CertifiedKey>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .ok()?;
    let key = PrivateKeyDer::from_pem_slice(pem).ok()?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).ok()?;
    (!chain.is_empty()).then(|| Arc::new(CertifiedKey::new(chain, signer)))
}

/// Reads the challenges every replica wrote to `dir` (`http-01/<token>`,
/// `tls-alpn-01/<domain>.pem`); unreadable or oversized files are skipped.
pub fn load_peers(dir: &Path) -> ChallengeSet {
    let mut set = ChallengeSet::default();
    for (name, bytes) in read_small_files(&dir.join("http-01")) {
        if valid_token(&name)
            && let Ok(text) = String::from_utf8(bytes)
        {
            set.http.insert(name, text.trim().to_string());
        }
    }
    for (name, bytes) in read_small_files(&dir.join("tls-alpn-01")) {
        if let Some(domain) = name.strip_suffix(".pem")
            && let Some(cert) = certified_from_pem(&bytes)
        {
            set.alpn.insert(domain.to_string(), cert);
        }
    }
    set
}

fn read_small_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let fresh = |m: &std::fs::Metadata| {
        m.modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age <= MAX_PEER_AGE)
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.metadata()
                .is_ok_and(|m| m.is_file() && m.len() <= MAX_PEER_FILE && fresh(&m))
        })
        .take(MAX_PEER_FILES)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.starts_with('.') || name.ends_with(".tmp") {
                return None;
            }
            Some((name, std::fs::read(e.path()).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_peer_challenges_merge() {
        let c = Challenges::default();
        c.add_http("tok-1".into(), "tok-1.thumb".into());
        let mut peers = ChallengeSet::default();
        peers.http.insert("tok-2".into(), "tok-2.thumb".into());
        c.set_peers(peers);
        assert_eq!(c.http_answer("tok-1").as_deref(), Some("tok-1.thumb"));
        assert_eq!(c.http_answer("tok-2").as_deref(), Some("tok-2.thumb"));
        c.remove_http("tok-1");
        assert!(c.http_answer("tok-1").is_none());
        c.set_peers(ChallengeSet::default());
        assert!(c.http_answer("tok-2").is_none());
    }

    #[test]
    fn alpn_certificate_round_trips_through_the_shared_directory() {
        let dir = std::env::temp_dir().join(format!("pc-acme-chal-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("tls-alpn-01")).unwrap();
        std::fs::create_dir_all(dir.join("http-01")).unwrap();
        let (_, pem) = alpn_certificate("a.example", &[7u8; 32]).unwrap();
        std::fs::write(dir.join("tls-alpn-01/a.example.pem"), pem).unwrap();
        std::fs::write(dir.join("http-01/tok_9"), "tok_9.x\n").unwrap();
        std::fs::write(dir.join("http-01/bad.name"), "x").unwrap();
        let set = load_peers(&dir);
        assert!(set.alpn.contains_key("a.example"));
        assert_eq!(set.http.get("tok_9").map(String::as_str), Some("tok_9.x"));
        assert!(!set.http.contains_key("bad.name"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokens_are_checked() {
        assert!(valid_token("abc-DEF_123"));
        assert!(!valid_token("../etc"));
        assert!(!valid_token(""));
    }
}
