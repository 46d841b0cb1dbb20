//! Certificates on disk → an index by name.
//!
//! The certificate directory holds the default pair (`tls.crt`/`tls.key` by default) and any
//! number of `<name>.crt`/`<name>.key` pairs; the wildcard directory holds more pairs. Each pair
//! is indexed by the DNS names in its certificate (SANs), so `*.example.com` patterns come from
//! the certificate itself. A pair that fails to load keeps its previous version.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: no certificate in the file")]
    Empty { path: String },
    #[error("{path}: the key is not a supported private key: {message}")]
    Key { path: String, message: String },
    #[error("{cert} and {key} do not belong together: {message}")]
    Mismatch {
        cert: String,
        key: String,
        message: String,
    },
    #[error("{path}: the certificate is not valid X.509: {message}")]
    X509 { path: String, message: String },
}

/// An immutable index of certificates, published to the SNI resolver.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// Names served by a certificate from ACME (issued here, not configured).
    acme_names: std::collections::HashSet<String>,
}

impl CertStore {
    /// True when a certificate names `name` (exactly or by wildcard); the default does not count.
    pub fn covers(&self, name: &str) -> bool {
        self.exact.contains_key(name)
            || name
                .split_once('.')
                .is_some_and(|(_, parent)| self.wildcard.contains_key(parent))
    }

    /// True when a configured (static or wildcard) certificate covers `name`: ACME leaves it be.
    pub fn covered_by_configured(&self, name: &str) -> bool {
        self.covers(name) && !self.acme_names.contains(name)
    }

    /// Exact name, then a wildcard for the parent domain, then the default certificate.
    pub fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(c) = self.exact.get(name) {
            return Some(c.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(c) = self.wildcard.get(parent)
        {
            return Some(c.clone());
        }
        self.default.clone()
    }

    pub fn default_cert(&self) -> Option<Arc<CertifiedKey>> {
        self.default.clone()
    }

    pub fn name_count(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn has_default(&self) -> bool {
        self.default.is_some()
    }
}

/// A loaded pair and the file stamps it was loaded from.
#[derive(Debug, Clone)]
struct LoadedPair {
    stamp: (FileStamp, FileStamp),
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// Modification time and size: enough to notice a rewritten file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: SystemTime,
    len: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            len: meta.len(),
        })
    }
}

/// Where certificates live, and what was loaded from there last time.
#[derive(Debug)]
pub struct CertLoader {
    cert_dir: PathBuf,
    cert_file: String,
    key_file: String,
    wildcard_dir: Option<PathBuf>,
    /// Certificates ACME issued; they come last and never shadow a configured one.
    acme_dir: Option<PathBuf>,
    loaded: HashMap<PathBuf, LoadedPair>,
    last_scan: Vec<(PathBuf, Option<FileStamp>)>,
}

/// What one scan produced.
pub struct ScanResult {
    pub store: CertStore,
    pub errors: Vec<CertError>,
}

impl CertLoader {
    pub fn new(
        cert_dir: PathBuf,
        cert_file: String,
        key_file: String,
        wildcard_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            cert_dir,
            cert_file,
            key_file,
            wildcard_dir,
            acme_dir: None,
            loaded: HashMap::new(),
            last_scan: Vec::new(),
        }
    }

    /// Also serves the certificates ACME stores in `dir`.
    pub fn with_acme_dir(mut self, dir: PathBuf) -> Self {
        self.acme_dir = Some(dir);
        self
    }

    /// True when any certificate or key file appeared, disappeared or changed since the last scan.
    pub fn changed(&self) -> bool {
        self.stamps() != self.last_scan
    }

    fn pairs(&self) -> Vec<(PathBuf, PathBuf)> {
        let mut pairs = Vec::new();
        let default_crt = self.cert_dir.join(&self.cert_file);
        pairs.push((default_crt.clone(), self.cert_dir.join(&self.key_file)));
        for dir in std::iter::once(&self.cert_dir)
            .chain(self.wildcard_dir.as_ref())
            .chain(self.acme_dir.as_ref())
        {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "crt") && *p != default_crt)
                .collect();
            found.sort();
            for crt in found {
                let key = crt.with_extension("key");
                pairs.push((crt, key));
            }
        }
        pairs
    }

    fn stamps(&self) -> Vec<(PathBuf, Option<FileStamp>)> {
        self.pairs()
            .into_iter()
            .flat_map(|(c, k)| [c, k])
            .map(|p| {
                let s = FileStamp::of(&p);
                (p, s)
            })
            .collect()
    }

    /// Loads every pair, reusing unchanged ones and keeping the previous version of a pair that
    /// fails to load.
    pub fn scan(&mut self) -> ScanResult {
        self.last_scan = self.stamps();
        let mut errors = Vec::new();
        let mut store = CertStore::default();
        let default_crt = self.cert_dir.join(&self.cert_file);
        let mut still_present = HashMap::new();
        for (crt, key) in self.pairs() {
            let (Some(cs), Some(ks)) = (FileStamp::of(&crt), FileStamp::of(&key)) else {
                if crt != default_crt || crt.exists() || key.exists() {
                    errors.push(CertError::Read {
                        path: format!("{} / {}", crt.display(), key.display()),
                        message: "a certificate needs both its .crt and its .key file".into(),
                    });
                }
                // A pair whose file vanished keeps serving until both files are gone.
                if let Some(prev) = self.loaded.get(&crt) {
                    still_present.insert(crt.clone(), prev.clone());
                }
                continue;
            };
            let pair = match self.loaded.get(&crt) {
                Some(prev) if prev.stamp == (cs, ks) => Ok(prev.clone()),
                _ => load_pair(&crt, &key).map(|(names, key)| LoadedPair {
                    stamp: (cs, ks),
                    names,
                    key,
                }),
            };
            let pair = match pair {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e);
                    match self.loaded.get(&crt) {
                        Some(prev) => {
                            tracing::warn!(file = %crt.display(), "keeping the previous certificate");
                            prev.clone()
                        }
                        None => continue,
                    }
                }
            };
            if crt == default_crt {
                store.default = Some(pair.key.clone());
            }
            let from_acme = self.acme_dir.as_ref().is_some_and(|d| crt.starts_with(d));
            for name in &pair.names {
                if from_acme {
                    if store.covers(name) {
                        continue;
                    }
                    store.acme_names.insert(name.clone());
                }
                let slot = match name.strip_prefix("*.") {
                    Some(suffix) => store.wildcard.entry(suffix.to_string()),
                    None => store.exact.entry(name.clone()),
                };
                // The certificate directory is scanned first and wins over the wildcard one.
                slot.or_insert_with(|| pair.key.clone());
            }
            still_present.insert(crt, pair);
        }
        self.loaded = still_present;
        ScanResult { store, errors }
    }
}

/// Loads one certificate chain and its key, checks they match and returns the chain's DNS names.
fn load_pair(crt: &Path, key: &Path) -> Result<(Vec<String>, Arc<CertifiedKey>), CertError> {
    let read_err = |p: &Path, e: &dyn std::fmt::Display| CertError::Read {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(crt)
        .map_err(|e| read_err(crt, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(crt, &e))?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::Empty {
            path: crt.display().to_string(),
        });
    };
    let names = dns_names(leaf).map_err(|message| CertError::X509 {
        path: crt.display().to_string(),
        message,
    })?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err(key, &e))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| CertError::Key {
            path: key.display().to_string(),
            message: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| CertError::Mismatch {
        cert: crt.display().to_string(),
        key: key.display().to_string(),
        message: e.to_string(),
    })?;
    Ok((names, Arc::new(certified)))
}

/// DNS names of a certificate's SAN extension, lower-case.
fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let cert = x509_cert::Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
    let not_after = cert.tbs_certificate.validity.not_after.to_unix_duration();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    if not_after < now {
        tracing::warn!("a certificate on disk has expired; it is served until replaced");
    }
    let san = cert
        .tbs_certificate
        .get::<SubjectAltName>()
        .map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Some((_, SubjectAltName(general_names))) = san {
        for gn in general_names {
            if let GeneralName::DnsName(name) = gn {
                names.push(name.as_str().trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}
