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

#[derive(Debug, Clone)]
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
        let eab = match (&args.eab_kid, &args.eab_hmac_key) {
            (Some(kid), Some(key)) if !kid.is_empty() && !key.is_empty() => {
                let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(key.trim().trim_end_matches('='))
                    .map_err(|e| {
                        ConfigError::BadAcme(format!(
                            "NB_PROXY_ACME_EAB_HMAC_KEY is not base64url: {e}"
                        ))
                    })?;
                Some((kid.clone(), decoded))
            }
            (None, None) => None,
            (Some(k), None) if k.is_empty() => None,
            (None, Some(h)) if h.is_empty() => None,
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
