//! Automatic certificates over ACME (instant-acme): issuance, storage in the certificate
//! directory, renewal, challenge answers for the data plane, and the lock replicas share.
//!
//! The control thread runs [`manager::run`]; the workers only read [`Challenges`].

pub mod challenges;
mod issue;
pub mod lease;
mod lock;
pub mod manager;
mod settings;
pub mod storage;

use std::path::Path;
use std::time::{Duration, SystemTime};

pub use challenges::{ACME_TLS_ALPN, Challenges, HTTP01_PREFIX};
pub use manager::{AcmeBoard, CertState};
pub use settings::{AcmeSettings, ChallengeKind, LockMethod};

/// Longest wait for another replica's lock (an order takes seconds; a stuck one is broken).
const LOCK_WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{path}: {message}")]
    Storage { path: String, message: String },
    #[error("certificate lock: {0}")]
    Lock(String),
    #[error("{0}")]
    Acme(String),
    #[error("rate limited by the ACME CA: {message}")]
    RateLimited {
        message: String,
        retry_after: Option<SystemTime>,
    },
    #[error("challenge failed: {0}")]
    Challenge(String),
    #[error("certificate key or request: {0}")]
    Key(String),
    #[error("the ACME CA did not finish within {0:?}")]
    Timeout(Duration),
}

impl AcmeError {
    fn storage(path: &Path, e: std::io::Error) -> Self {
        AcmeError::Storage {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// A service domain ACME can issue for: a DNS name with a dot, not an IP, not a wildcard.
pub fn issuable_domain(domain: &str) -> Option<String> {
    let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if d.len() > 253 || !d.contains('.') || d.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let labels_ok = d.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    labels_ok.then_some(d)
}

#[cfg(test)]
mod tests {
    use super::issuable_domain;

    #[test]
    fn only_dns_names_are_issued_for() {
        assert_eq!(
            issuable_domain("App.Example.com.").as_deref(),
            Some("app.example.com")
        );
        assert!(issuable_domain("localhost").is_none());
        assert!(issuable_domain("127.0.0.1").is_none());
        assert!(issuable_domain("*.example.com").is_none());
        assert!(issuable_domain("a_b.example.com").is_none());
    }
}
