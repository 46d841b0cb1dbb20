//! Single sign-on against the account's OpenID Connect provider: authorization code flow with
//! PKCE (S256), state and nonce, the ID token's signature checked against the provider's keys.
//! [`sign_in`] is the flow; the rest are its parts.

mod discovery;
mod http;
mod id_token;
pub mod sign_in;

pub use discovery::ProviderMetadata;
pub use http::HttpClient;

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("identity provider at {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("identity provider answered {url} with HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("identity provider document {url} is not valid: {reason}")]
    Document { url: String, reason: String },
    #[error("ID token refused: {0}")]
    IdToken(String),
    #[error("no TLS roots for the identity provider: {0}")]
    Roots(std::io::Error),
}

/// Plain HTTP only to a provider on this host; anything else must use TLS.
pub fn check_issuer_url(issuer: &str) -> Result<(), String> {
    let rest = if let Some(r) = issuer.strip_prefix("https://") {
        r
    } else if let Some(r) = issuer.strip_prefix("http://") {
        let host = host_of(r);
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            return Err(format!(
                "issuer {issuer:?}: plain http is allowed only on loopback; use https"
            ));
        }
        r
    } else {
        return Err(format!("issuer {issuer:?} must start with https://"));
    };
    if host_of(rest).is_empty() || issuer.contains(['?', '#', ' ']) {
        return Err(format!("issuer {issuer:?} is not a URL without query"));
    }
    Ok(())
}

/// The host of `host[:port][/path]` (brackets kept for IPv6).
fn host_of(authority_and_path: &str) -> &str {
    let authority = authority_and_path
        .split('/')
        .next()
        .unwrap_or(authority_and_path);
    if authority.starts_with('[') {
        return authority.split_inclusive(']').next().unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// `application/x-www-form-urlencoded` encoding of one value (query strings and forms).
pub fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_need_tls_off_loopback() {
        assert!(check_issuer_url("https://login.example.com/realms/x").is_ok());
        assert!(check_issuer_url("http://127.0.0.1:9000").is_ok());
        assert!(check_issuer_url("http://localhost/x").is_ok());
        assert!(check_issuer_url("http://[::1]:80").is_ok());
        assert!(check_issuer_url("http://login.example.com").is_err());
        assert!(check_issuer_url("http://127.0.0.1.evil.example").is_err());
        assert!(check_issuer_url("ftp://x").is_err());
        assert!(check_issuer_url("https://x/?a=b").is_err());
        assert_eq!(form_encode("a b&c=/"), "a+b%26c%3D%2F");
    }
}
