//! The ACME part of the certificate directory, shared by replicas:
//!
//! ```text
//! <cert dir>/acme/accounts/<directory>.json   account credentials (0600)
//! <cert dir>/acme/certs/<domain>.crt|.key     issued chains and keys (the key 0600)
//! <cert dir>/acme/locks/<name>.lock           flock files
//! <cert dir>/acme/challenges/…                challenges being solved (see challenges.rs)
//! ```

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use x509_cert::der::Decode;

use super::AcmeError;

#[derive(Debug, Clone)]
pub struct AcmeDir {
    root: PathBuf,
}

/// Validity of a stored certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Renewal starts at two thirds of the lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life.mul_f64(2.0 / 3.0)
    }
}

impl AcmeDir {
    pub fn new(cert_dir: &Path) -> Self {
        Self {
            root: cert_dir.join("acme"),
        }
    }

    pub fn certs(&self) -> PathBuf {
        self.root.join("certs")
    }

    pub fn challenges(&self) -> PathBuf {
        self.root.join("challenges")
    }

    pub fn locks(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// Creates the folders; the whole tree is private to the proxy's user.
    pub fn prepare(&self) -> Result<(), AcmeError> {
        for dir in [
            self.root.clone(),
            self.root.join("accounts"),
            self.certs(),
            self.locks(),
            self.challenges().join("http-01"),
            self.challenges().join("tls-alpn-01"),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| AcmeError::storage(&dir, e))?;
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700));
        Ok(())
    }

    /// One account file per directory URL: a new CA means a new account.
    pub fn account_file(&self, directory_url: &str) -> PathBuf {
        let name: String = directory_url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.root.join("accounts").join(format!("{name}.json"))
    }

    pub fn cert_paths(&self, domain: &str) -> (PathBuf, PathBuf) {
        let certs = self.certs();
        (
            certs.join(format!("{domain}.crt")),
            certs.join(format!("{domain}.key")),
        )
    }

    /// The validity of the stored certificate for `domain`, if there is a readable one.
    pub fn stored(&self, domain: &str) -> Option<Validity> {
        let (crt, key) = self.cert_paths(domain);
        if !key.exists() {
            return None;
        }
        let pem = std::fs::read(&crt).ok()?;
        validity_of_pem(&pem)
    }

    /// Writes the key, then the chain; each file appears whole (rename).
    pub fn store(&self, domain: &str, chain_pem: &str, key_pem: &str) -> Result<(), AcmeError> {
        let (crt, key) = self.cert_paths(domain);
        write_atomic(&key, key_pem.as_bytes(), 0o600)?;
        write_atomic(&crt, chain_pem.as_bytes(), 0o644)
    }

    pub fn write_http_challenge(&self, token: &str, key_auth: &str) -> Result<(), AcmeError> {
        let path = self.challenges().join("http-01").join(token);
        write_atomic(&path, key_auth.as_bytes(), 0o644)
    }

    pub fn write_alpn_challenge(&self, domain: &str, pem: &str) -> Result<(), AcmeError> {
        let path = self
            .challenges()
            .join("tls-alpn-01")
            .join(format!("{domain}.pem"));
        write_atomic(&path, pem.as_bytes(), 0o600)
    }

    pub fn remove_http_challenge(&self, token: &str) {
        let _ = std::fs::remove_file(self.challenges().join("http-01").join(token));
    }

    pub fn remove_alpn_challenge(&self, domain: &str) {
        let _ = std::fs::remove_file(
            self.challenges()
                .join("tls-alpn-01")
                .join(format!("{domain}.pem")),
        );
    }

    /// Modification times of the challenge folders: a change means another replica published
    /// or withdrew a challenge.
    pub fn challenges_stamp(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let m = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (
            m(self.challenges().join("http-01")),
            m(self.challenges().join("tls-alpn-01")),
        )
    }
}

/// Validity of the first certificate in a PEM text.
pub fn validity_of_pem(pem: &[u8]) -> Option<Validity> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let first = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let cert = x509_cert::Certificate::from_der(first.as_ref()).ok()?;
    let v = &cert.tbs_certificate.validity;
    Some(Validity {
        not_before: SystemTime::UNIX_EPOCH + v.not_before.to_unix_duration(),
        not_after: SystemTime::UNIX_EPOCH + v.not_after.to_unix_duration(),
    })
}

/// A file only the proxy's user may read (account keys).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    write_atomic(path, bytes, 0o600)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AcmeError> {
    // Unique per process and call: replicas and concurrent orders never share a temp file, and
    // `create_new` guarantees the file gets `mode` (a leftover file would keep its own).
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}-{n}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        AcmeError::storage(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_two_thirds() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let v = Validity {
            not_before: start,
            not_after: start + Duration::from_secs(90),
        };
        assert_eq!(v.renew_at(), start + Duration::from_secs(60));
    }

    #[test]
    fn account_files_are_named_after_the_directory() {
        let d = AcmeDir::new(Path::new("/x"));
        assert_eq!(
            d.account_file("https://127.0.0.1:14000/dir"),
            PathBuf::from("/x/acme/accounts/127.0.0.1_14000_dir.json")
        );
    }

    #[test]
    fn stores_and_reads_validity() {
        let dir = std::env::temp_dir().join(format!("pc-acme-store-{}", std::process::id()));
        let acme = AcmeDir::new(&dir);
        acme.prepare().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["s.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        acme.store("s.example", &cert.pem(), &key.serialize_pem())
            .unwrap();
        let v = acme.stored("s.example").expect("stored");
        assert!(v.not_after > v.not_before);
        assert!(acme.stored("other.example").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
