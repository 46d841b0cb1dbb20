//! A throwaway CA and leaf certificates for the names a test serves.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem: String,
}

/// A leaf certificate and its key, PEM encoded.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// DER of the certificate, to recognise which one a server presented.
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Portcullis test CA");
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("ca");
        let pem = issuer.pem();
        TestCa { issuer, pem }
    }

    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Writes `<stem>.crt` and `<stem>.key` into `dir` (key first, so a watcher that sees the
    /// new certificate also sees its key).
    pub fn write_leaf(&self, dir: &Path, stem: &str, leaf: &Leaf) {
        std::fs::create_dir_all(dir).expect("cert dir");
        atomic_write(&dir.join(format!("{stem}.key")), leaf.key_pem.as_bytes());
        atomic_write(&dir.join(format!("{stem}.crt")), leaf.cert_pem.as_bytes());
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes through a temporary file and a rename, so readers never see half a file.
pub fn atomic_write(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!(
        "tmp{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::write(&tmp, bytes).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}
