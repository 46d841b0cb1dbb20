//! Session tokens: the JWTs (EdDSA over Ed25519) that management signs with a service's private
//! key and the proxy verifies locally with the service's public `session_key`, so a request with
//! a session cookie costs no round trip. NetBird's format: `iss` = `netbird-management`, `aud` =
//! `[domain]`, `sub`, `exp`, `iat`, `nbf`, and `method`, `email`, `groups`, `group_names`.
//! Keys travel base64 (standard alphabet): the private key as Go's 64 bytes (seed ‖ public).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "netbird-management";
pub const COOKIE_NAME: &str = "nb_session";
/// Used when a service leaves `max_session_age_seconds` at zero.
pub const DEFAULT_MAX_AGE_SECS: i64 = 24 * 60 * 60;
/// Longer tokens than this are refused before any parsing (a bounded cost per request).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("session token is malformed")]
    Malformed,
    #[error("session token is not signed with EdDSA")]
    Algorithm,
    #[error("session token signature does not verify")]
    Signature,
    #[error("session token is for another issuer")]
    Issuer,
    #[error("session token is for another domain")]
    Audience,
    #[error("session token has expired")]
    Expired,
    #[error("session token is not valid yet")]
    NotYetValid,
    #[error("session token names no user")]
    NoSubject,
    #[error("session key is not a base64 Ed25519 key")]
    BadKey,
}

/// `aud` as a single string or a list, as JWTs allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, domain: &str) -> bool {
        match self {
            Audience::One(a) => a.eq_ignore_ascii_case(domain),
            Audience::Many(list) => list.iter().any(|a| a.eq_ignore_ascii_case(domain)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    pub iss: String,
    pub aud: Audience,
    pub sub: String,
    pub exp: i64,
    #[serde(default)]
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub method: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub email: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_names: Vec<String>,
}

/// What a session is issued for.
#[derive(Debug, Clone, Default)]
pub struct SessionGrant {
    pub user_id: String,
    pub email: String,
    pub domain: String,
    pub method: String,
    pub groups: Vec<String>,
    pub group_names: Vec<String>,
    pub max_age_secs: i64,
}

impl SessionClaims {
    pub fn new(grant: &SessionGrant, now_unix: i64) -> Self {
        let age = if grant.max_age_secs > 0 {
            grant.max_age_secs
        } else {
            DEFAULT_MAX_AGE_SECS
        };
        Self {
            iss: ISSUER.to_string(),
            aud: Audience::Many(vec![grant.domain.clone()]),
            sub: grant.user_id.clone(),
            exp: now_unix + age,
            iat: now_unix,
            nbf: Some(now_unix),
            method: grant.method.clone(),
            email: grant.email.clone(),
            groups: grant.groups.clone(),
            group_names: grant.group_names.clone(),
        }
    }
}

/// A service's key pair, both halves base64 in NetBird's layout.
pub struct SessionKeyPair {
    pub private_key: String,
    pub public_key: String,
}

/// The key pair for a 32-byte secret seed (the caller draws it from the OS's random source).
pub fn key_pair_from_seed(seed: &[u8; 32]) -> SessionKeyPair {
    let signing = SigningKey::from_bytes(seed);
    SessionKeyPair {
        private_key: STANDARD.encode(signing.to_keypair_bytes()),
        public_key: STANDARD.encode(signing.verifying_key().to_bytes()),
    }
}

/// Signs `claims` with a base64 private key (64 bytes seed ‖ public, or the 32-byte seed).
pub fn sign(claims: &SessionClaims, private_key_b64: &str) -> Result<String, SessionError> {
    let raw = STANDARD
        .decode(private_key_b64.trim())
        .map_err(|_| SessionError::BadKey)?;
    let seed: [u8; 32] = raw
        .get(..32)
        .and_then(|s| s.try_into().ok())
        .filter(|_| raw.len() == 32 || raw.len() == 64)
        .ok_or(SessionError::BadKey)?;
    let key = SigningKey::from_bytes(&seed);
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","typ":"JWT"}"#);
    let payload =
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).map_err(|_| SessionError::Malformed)?);
    let signing_input = format!("{header}.{payload}");
    let signature = key.sign(signing_input.as_bytes());
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    ))
}

/// Verifies tokens of one service: its public key, parsed once.
#[derive(Clone)]
pub struct SessionVerifier {
    key: VerifyingKey,
}

impl std::fmt::Debug for SessionVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionVerifier").finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

impl SessionVerifier {
    /// The public key, to tell verifiers apart.
    pub fn key_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn from_base64(public_key: &str) -> Result<Self, SessionError> {
        let raw = STANDARD
            .decode(public_key.trim())
            .map_err(|_| SessionError::BadKey)?;
        let bytes: [u8; 32] = raw.try_into().map_err(|_| SessionError::BadKey)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| SessionError::BadKey)?;
        Ok(Self { key })
    }

    /// The claims of `token` when it is signed by this key, issued by management for `domain`,
    /// and valid at `now_unix`.
    pub fn verify(
        &self,
        token: &str,
        domain: &str,
        now_unix: i64,
    ) -> Result<SessionClaims, SessionError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(SessionError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionError::Malformed);
        };
        let header: Header = decode_json(h)?;
        if header.alg != "EdDSA" {
            return Err(SessionError::Algorithm);
        }
        let sig_bytes: [u8; 64] = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| SessionError::Malformed)?
            .try_into()
            .map_err(|_| SessionError::Malformed)?;
        let signing_input = &token[..h.len() + 1 + p.len()];
        self.key
            .verify(signing_input.as_bytes(), &Signature::from_bytes(&sig_bytes))
            .map_err(|_| SessionError::Signature)?;
        let claims: SessionClaims = decode_json(p)?;
        if claims.iss != ISSUER {
            return Err(SessionError::Issuer);
        }
        if !claims.aud.contains(domain) {
            return Err(SessionError::Audience);
        }
        if claims.exp <= now_unix {
            return Err(SessionError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now_unix + 60) {
            return Err(SessionError::NotYetValid);
        }
        if claims.sub.is_empty() {
            return Err(SessionError::NoSubject);
        }
        Ok(claims)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, SessionError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| SessionError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| SessionError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn grant() -> SessionGrant {
        SessionGrant {
            user_id: "u1".into(),
            email: "a@example.com".into(),
            domain: "app.example.com".into(),
            method: "password".into(),
            groups: vec!["g1".into()],
            group_names: vec!["admins".into()],
            max_age_secs: 3600,
        }
    }

    #[test]
    fn signed_token_verifies_for_its_domain_only() {
        let keys = key_pair_from_seed(&[7; 32]);
        let token = sign(&SessionClaims::new(&grant(), NOW), &keys.private_key).unwrap();
        let v = SessionVerifier::from_base64(&keys.public_key).unwrap();
        let claims = v.verify(&token, "app.example.com", NOW + 10).unwrap();
        assert_eq!(claims.sub, "u1");
        assert_eq!(claims.group_names, vec!["admins".to_string()]);
        assert_eq!(
            v.verify(&token, "other.example.com", NOW),
            Err(SessionError::Audience)
        );
        assert_eq!(
            v.verify(&token, "app.example.com", NOW + 3600),
            Err(SessionError::Expired)
        );
    }

    #[test]
    fn forged_tokens_fail() {
        let keys = key_pair_from_seed(&[7; 32]);
        let other = key_pair_from_seed(&[8; 32]);
        let v = SessionVerifier::from_base64(&keys.public_key).unwrap();
        let forged = sign(&SessionClaims::new(&grant(), NOW), &other.private_key).unwrap();
        assert_eq!(
            v.verify(&forged, "app.example.com", NOW),
            Err(SessionError::Signature)
        );
        // A payload swapped under a valid signature.
        let good = sign(&SessionClaims::new(&grant(), NOW), &keys.private_key).unwrap();
        let mut admin = grant();
        admin.user_id = "root".into();
        let evil = sign(&SessionClaims::new(&admin, NOW), &other.private_key).unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let evil_parts: Vec<&str> = evil.split('.').collect();
        let spliced = format!("{}.{}.{}", parts[0], evil_parts[1], parts[2]);
        assert_eq!(
            v.verify(&spliced, "app.example.com", NOW),
            Err(SessionError::Signature)
        );
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            parts[1]
        );
        assert_eq!(
            v.verify(&none_alg, "app.example.com", NOW),
            Err(SessionError::Algorithm)
        );
        assert_eq!(
            v.verify("garbage", "app.example.com", NOW),
            Err(SessionError::Malformed)
        );
    }

    #[test]
    fn go_layout_keys_and_string_audience() {
        let keys = key_pair_from_seed(&[9; 32]);
        assert_eq!(STANDARD.decode(&keys.private_key).unwrap().len(), 64);
        assert_eq!(STANDARD.decode(&keys.public_key).unwrap().len(), 32);
        let mut claims = SessionClaims::new(&grant(), NOW);
        claims.aud = Audience::One("APP.example.com".into());
        let token = sign(&claims, &keys.private_key).unwrap();
        let v = SessionVerifier::from_base64(&keys.public_key).unwrap();
        assert!(v.verify(&token, "app.example.com", NOW).is_ok());
        assert_eq!(
            SessionVerifier::from_base64("bm9wZQ==").err(),
            Some(SessionError::BadKey)
        );
    }
}
