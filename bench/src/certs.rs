//! One ECDSA P-256 certificate for every proxy under test, so the TLS work is the same.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

/// Files of the shared server certificate.
pub struct CertFiles {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate followed by its key, as HAProxy's `crt` wants it.
    pub combined: PathBuf,
    pub ca_pem: String,
}

pub fn write(dir: &Path, host: &str) -> Result<CertFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Portcullis bench CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    // rcgen's default key algorithm is ECDSA P-256 with SHA-256.
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![host.to_string(), "localhost".to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.distinguished_name.push(DnType::CommonName, host);
    let cert = params.signed_by(&key, &ca)?;

    let files = CertFiles {
        dir: dir.to_path_buf(),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        combined: dir.join("combined.pem"),
        ca_pem: ca.pem(),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    std::fs::write(
        &files.combined,
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    std::fs::write(dir.join("ca.pem"), &files.ca_pem)?;
    Ok(files)
}
