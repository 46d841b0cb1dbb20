//! The ACME settings, checked once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use base64::Engine;

use crate::cli::AcmeArgs;
use crate::config::{ConfigError, parse_listen};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    TlsAlpn01,
    Http01,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMethod {
    Auto,
    Flock,
    K8sLease,
}

#[derive(Clone)]
pub struct AcmeSettings {
    pub directory: String,
    pub email: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// External account binding: key id and the decoded HMAC key.
    pub eab: Option<(String, Vec<u8>)>,
    pub challenge: ChallengeKind,
    /// Where http-01 challenges are answered (http-01 only).
    pub http_address: Option<SocketAddr>,
    pub lock: LockMethod,
}

/// Written by hand so that the EAB key never reaches a log.
impl std::fmt::Debug for AcmeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeSettings")
            .field("directory", &self.directory)
            .field("email", &self.email)
            .field("ca_file", &self.ca_file)
            .field("eab_kid", &self.eab.as_ref().map(|(kid, _)| kid))
            .field("challenge", &self.challenge)
            .field("http_address", &self.http_address)
            .field("lock", &self.lock)
            .finish()
    }
}

/// A setting with a value; an empty one (common in env templates) counts as unset.
fn present(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.trim().is_empty())
}

impl AcmeSettings {
    /// None when ACME is off.
    pub fn from_args(args: &AcmeArgs) -> Result<Option<Self>, ConfigError> {
        if !args.enabled {
            return Ok(None);
        }
        let challenge = match args.challenge_type.as_str() {
            "tls-alpn-01" => ChallengeKind::TlsAlpn01,
            "http-01" => ChallengeKind::Http01,
            other => {
                return Err(ConfigError::BadChoice {
                    setting: "NB_PROXY_ACME_CHALLENGE_TYPE",
                    value: other.to_string(),
                    allowed: "tls-alpn-01, http-01",
                });
            }
        };
        let lock = match args.lock_method.as_str() {
            "auto" => LockMethod::Auto,
            "flock" => LockMethod::Flock,
            "k8s-lease" => LockMethod::K8sLease,
            other => {
                return Err(ConfigError::BadChoice {
                    setting: "NB_PROXY_CERT_LOCK_METHOD",
                    value: other.to_string(),
                    allowed: "auto, flock, k8s-lease",
                });
            }
        };
        let http_address = match challenge {
            ChallengeKind::Http01 => Some(parse_listen("NB_PROXY_ACME_ADDRESS", &args.address)?),
            ChallengeKind::TlsAlpn01 => None,
        };
        if !(args.directory.starts_with("https://") || args.directory.starts_with("http://")) {
            return Err(ConfigError::BadAcme(format!(
                "NB_PROXY_ACME_DIRECTORY {:?} is not an http(s) URL",
                args.directory
            )));
        }
        let eab = match (present(&args.eab_kid), present(&args.eab_hmac_key)) {
            (Some(kid), Some(key)) => {
                let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(key.trim().trim_end_matches('='))
                    .map_err(|e| {
                        ConfigError::BadAcme(format!(
                            "NB_PROXY_ACME_EAB_HMAC_KEY is not base64url: {e}"
                        ))
                    })?;
                Some((kid.to_string(), decoded))
            }
            (None, None) => None,
            _ => {
                return Err(ConfigError::BadAcme(
                    "NB_PROXY_ACME_EAB_KID and NB_PROXY_ACME_EAB_HMAC_KEY go together".to_string(),
                ));
            }
        };
        Ok(Some(Self {
            directory: args.directory.clone(),
            email: args.email.clone().filter(|e| !e.is_empty()),
            ca_file: args.ca_file.clone(),
            eab,
            challenge,
            http_address,
            lock,
        }))
    }
}
