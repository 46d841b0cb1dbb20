//! A service's authentication settings (`ProxyMapping.auth`), parsed once per table build so a
//! request only compares strings and verifies a signature.

use proto::Authentication;
use proto::session::{DEFAULT_MAX_AGE_SECS, SessionVerifier};

/// Which methods protect a service, and the key its session tokens are checked with.
#[derive(Debug)]
pub struct ServiceAuth {
    pub verifier: SessionVerifier,
    pub max_session_age_secs: i64,
    pub password: bool,
    pub pin: bool,
    pub oidc: bool,
    /// Header names (lower case) whose value, when present, is checked with management.
    pub headers: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthConfigError {
    #[error(
        "authentication is enabled but the session key is not a base64 Ed25519 public key; \
         refusing the service rather than serving it unprotected"
    )]
    SessionKey,
    #[error("header authentication names {0:?}, which is not a valid header name")]
    HeaderName(String),
}

impl ServiceAuth {
    /// `None` when no method is enabled: the service is public.
    pub fn from_mapping(auth: Option<&Authentication>) -> Result<Option<Self>, AuthConfigError> {
        let Some(a) = auth else {
            return Ok(None);
        };
        let mut headers = Vec::with_capacity(a.header_auths.len());
        for h in &a.header_auths {
            let name = h.header.trim().to_ascii_lowercase();
            if !super::is_token(&name) {
                return Err(AuthConfigError::HeaderName(h.header.clone()));
            }
            if !headers.contains(&name) {
                headers.push(name);
            }
        }
        if !(a.password || a.pin || a.oidc || !headers.is_empty()) {
            return Ok(None);
        }
        let verifier = SessionVerifier::from_base64(&a.session_key)
            .map_err(|_| AuthConfigError::SessionKey)?;
        Ok(Some(Self {
            verifier,
            max_session_age_secs: if a.max_session_age_seconds > 0 {
                a.max_session_age_seconds
            } else {
                DEFAULT_MAX_AGE_SECS
            },
            password: a.password,
            pin: a.pin,
            oidc: a.oidc,
            headers,
        }))
    }

    /// True when a person can sign in on a page (as opposed to header-only services).
    pub fn has_login_page(&self) -> bool {
        self.password || self.pin || self.oidc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::HeaderAuth;

    fn key() -> String {
        proto::session::key_pair_from_seed(&[1; 32]).public_key
    }

    #[test]
    fn nothing_enabled_is_public() {
        let a = Authentication {
            session_key: key(),
            ..Default::default()
        };
        assert!(ServiceAuth::from_mapping(Some(&a)).unwrap().is_none());
        assert!(ServiceAuth::from_mapping(None).unwrap().is_none());
    }

    #[test]
    fn enabled_without_a_key_is_refused() {
        let a = Authentication {
            password: true,
            session_key: "nope".into(),
            ..Default::default()
        };
        assert_eq!(
            ServiceAuth::from_mapping(Some(&a)).unwrap_err(),
            AuthConfigError::SessionKey
        );
    }

    #[test]
    fn header_names_are_lower_cased_and_checked() {
        let mut a = Authentication {
            session_key: key(),
            header_auths: vec![HeaderAuth {
                header: "X-API-Key".into(),
                hashed_value: "$argon2id$...".into(),
            }],
            ..Default::default()
        };
        let s = ServiceAuth::from_mapping(Some(&a)).unwrap().unwrap();
        assert_eq!(s.headers, vec!["x-api-key".to_string()]);
        assert!(!s.has_login_page());
        assert_eq!(s.max_session_age_secs, DEFAULT_MAX_AGE_SECS);
        a.header_auths[0].header = "bad header".into();
        assert!(matches!(
            ServiceAuth::from_mapping(Some(&a)),
            Err(AuthConfigError::HeaderName(_))
        ));
    }
}
