//! Service credentials: argon2id hashing and checking of passwords, PINs and header values, and
//! each protected service's Ed25519 session key pair. Hashing is deliberately slow, so it runs on
//! the blocking pool, never on the async workers.

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use ring::rand::{SecureRandom, SystemRandom};

use crate::model::auth::AuthInput;
use crate::store::{HeaderHash, ServiceAuthRow};

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A method was enabled without a secret, and none was stored before.
    #[error("{0} is required when the method is enabled")]
    Missing(String),
    #[error("cannot hash a credential: {0}")]
    Hash(String),
    #[error("the system random source failed")]
    Random,
}

/// An argon2id PHC string for `plain`.
pub fn hash(plain: &str) -> Result<String, CredentialError> {
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| CredentialError::Random)?;
    let hashed: PasswordHash = Argon2::default()
        .hash_password_with_salt(plain.as_bytes(), &salt)
        .map_err(|e| CredentialError::Hash(e.to_string()))?;
    Ok(hashed.to_string())
}

/// True when `plain` matches the PHC string `hashed` (false for a malformed hash).
pub fn verify(hashed: &str, plain: &str) -> bool {
    PasswordHash::new(hashed)
        .map(|h| {
            Argon2::default()
                .verify_password(plain.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// [`verify`] on the blocking pool.
pub async fn verify_blocking(hashed: String, plain: String) -> bool {
    tokio::task::spawn_blocking(move || verify(&hashed, &plain))
        .await
        .unwrap_or(false)
}

/// The row to store for `input`: new secrets hashed, empty ones kept from `previous`, the key
/// pair kept (or made for a newly protected service).
pub async fn prepare(
    input: AuthInput,
    previous: Option<ServiceAuthRow>,
) -> Result<ServiceAuthRow, CredentialError> {
    tokio::task::spawn_blocking(move || prepare_now(&input, previous.as_ref()))
        .await
        .map_err(|e| CredentialError::Hash(e.to_string()))?
}

fn prepare_now(
    input: &AuthInput,
    previous: Option<&ServiceAuthRow>,
) -> Result<ServiceAuthRow, CredentialError> {
    let keep_or_hash = |given: &Option<String>,
                        old: Option<&String>,
                        what: &str|
     -> Result<Option<String>, CredentialError> {
        match given {
            None => Ok(None),
            Some(plain) if plain.is_empty() => old
                .cloned()
                .map(Some)
                .ok_or_else(|| CredentialError::Missing(what.to_string())),
            Some(plain) => hash(plain).map(Some),
        }
    };
    let password_hash = keep_or_hash(
        &input.password,
        previous.and_then(|p| p.password_hash.as_ref()),
        "auth.password_auth.password",
    )?;
    let pin_hash = keep_or_hash(
        &input.pin,
        previous.and_then(|p| p.pin_hash.as_ref()),
        "auth.pin_auth.pin",
    )?;
    let mut header_auths = Vec::with_capacity(input.headers.len());
    for (i, (header, value)) in input.headers.iter().enumerate() {
        let old = previous.and_then(|p| {
            p.header_auths
                .iter()
                .find(|h| h.header.eq_ignore_ascii_case(header))
                .map(|h| &h.hashed_value)
        });
        let hashed = keep_or_hash(
            &Some(value.clone()),
            old,
            &format!("auth.header_auths[{i}].value"),
        )?
        .unwrap_or_default();
        header_auths.push(HeaderHash {
            header: header.clone(),
            hashed_value: hashed,
        });
    }
    let (session_private_key, session_public_key) = match previous {
        Some(p) => (p.session_private_key.clone(), p.session_public_key.clone()),
        None => {
            let mut seed = [0u8; 32];
            SystemRandom::new()
                .fill(&mut seed)
                .map_err(|_| CredentialError::Random)?;
            let pair = proto::session::key_pair_from_seed(&seed);
            (pair.private_key, pair.public_key)
        }
    };
    Ok(ServiceAuthRow {
        password_hash,
        pin_hash,
        header_auths,
        session_private_key,
        session_public_key,
        max_session_age: input
            .max_session_age_secs
            .or(previous.map(|p| p.max_session_age))
            .unwrap_or(crate::model::auth::DEFAULT_SESSION_AGE),
        sso_groups: input.sso_groups.clone(),
    })
}

/// What a proxy receives: the public key and the hashes of header values, never the rest.
pub fn to_proto(row: &ServiceAuthRow) -> proto::Authentication {
    proto::Authentication {
        session_key: row.session_public_key.clone(),
        max_session_age_seconds: row.max_session_age,
        password: row.password_hash.is_some(),
        pin: row.pin_hash.is_some(),
        oidc: row.sso_groups.is_some(),
        header_auths: row
            .header_auths
            .iter()
            .map(|h| proto::HeaderAuth {
                header: h.header.clone(),
                hashed_value: h.hashed_value.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(password: Option<&str>, headers: &[(&str, &str)]) -> AuthInput {
        AuthInput {
            password: password.map(str::to_string),
            pin: None,
            headers: headers
                .iter()
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect(),
            max_session_age_secs: Some(60),
            sso_groups: None,
        }
    }

    #[test]
    fn hashes_verify_and_secrets_are_kept_when_left_empty() {
        let first = prepare_now(&input(Some("s3cret-pass"), &[("X-Key", "abc")]), None).unwrap();
        let pw = first.password_hash.clone().unwrap();
        assert!(pw.starts_with("$argon2id$"));
        assert!(!pw.contains("s3cret-pass"));
        assert!(verify(&pw, "s3cret-pass"));
        assert!(!verify(&pw, "wrong"));
        assert!(verify(&first.header_auths[0].hashed_value, "abc"));
        // Sent back empty (as NetBird clients do): the stored secrets and the keys stay.
        let again = prepare_now(&input(Some(""), &[("x-key", "")]), Some(&first)).unwrap();
        assert_eq!(again.password_hash, first.password_hash);
        assert_eq!(
            again.header_auths[0].hashed_value,
            first.header_auths[0].hashed_value
        );
        assert_eq!(again.session_private_key, first.session_private_key);
        // Enabled without a secret and none stored: refused.
        assert!(matches!(
            prepare_now(&input(Some(""), &[]), None),
            Err(CredentialError::Missing(_))
        ));
        assert!(!verify("not a hash", "x"));
    }

    #[test]
    fn proxies_get_only_public_parts() {
        let row = prepare_now(&input(Some("s3cret-pass"), &[]), None).unwrap();
        let p = to_proto(&row);
        assert!(p.password && !p.pin && !p.oidc);
        assert_eq!(p.session_key, row.session_public_key);
        let verifier = proto::session::SessionVerifier::from_base64(&p.session_key);
        assert!(verifier.is_ok());
        assert!(!format!("{p:?}").contains(&row.session_private_key));
    }
}
