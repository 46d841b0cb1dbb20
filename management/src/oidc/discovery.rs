//! The provider's discovery document (`/.well-known/openid-configuration`), kept for a few
//! minutes per issuer so a burst of sign-ins fetches it once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{HttpClient, OidcError};

const FRESH_FOR: Duration = Duration::from_secs(300);
/// Issuers remembered at once; the cache is cleared when it would grow past this.
const MAX_ISSUERS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderMetadata {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    pub scopes_supported: Vec<String>,
}

#[derive(Default)]
pub struct DiscoveryCache {
    entries: Mutex<HashMap<String, (Instant, ProviderMetadata)>>,
}

impl DiscoveryCache {
    pub async fn get(
        &self,
        http: &HttpClient,
        issuer: &str,
    ) -> Result<ProviderMetadata, OidcError> {
        if let Some((at, m)) = self.lock().get(issuer)
            && at.elapsed() < FRESH_FOR
        {
            return Ok(m.clone());
        }
        let m = fetch(http, issuer).await?;
        let mut entries = self.lock();
        if entries.len() >= MAX_ISSUERS {
            entries.clear();
        }
        entries.insert(issuer.to_string(), (Instant::now(), m.clone()));
        Ok(m)
    }

    pub fn forget(&self, issuer: &str) {
        self.lock().remove(issuer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, ProviderMetadata)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub async fn fetch(http: &HttpClient, issuer: &str) -> Result<ProviderMetadata, OidcError> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let doc = http.get_json(&url).await?;
    parse(&url, issuer, &doc)
}

fn parse(url: &str, issuer: &str, doc: &serde_json::Value) -> Result<ProviderMetadata, OidcError> {
    let bad = |reason: String| OidcError::Document {
        url: url.to_string(),
        reason,
    };
    let field = |name: &str| -> Result<String, OidcError> {
        doc[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| bad(format!("{name} is missing")))
    };
    let m = ProviderMetadata {
        issuer: field("issuer")?,
        authorization_endpoint: field("authorization_endpoint")?,
        token_endpoint: field("token_endpoint")?,
        jwks_uri: field("jwks_uri")?,
        scopes_supported: doc["scopes_supported"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    };
    // OpenID Connect Discovery 1.0 §4.3: the document must name the issuer it was fetched for.
    if m.issuer != issuer {
        return Err(bad(format!(
            "it names issuer {:?}, not {issuer:?}",
            m.issuer
        )));
    }
    for (name, endpoint) in [
        ("authorization_endpoint", &m.authorization_endpoint),
        ("token_endpoint", &m.token_endpoint),
        ("jwks_uri", &m.jwks_uri),
    ] {
        super::check_issuer_url(endpoint).map_err(|e| bad(format!("{name}: {e}")))?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_must_name_its_issuer() {
        let doc = serde_json::json!({
            "issuer": "https://id.example",
            "authorization_endpoint": "https://id.example/auth",
            "token_endpoint": "https://id.example/token",
            "jwks_uri": "https://id.example/jwks",
            "scopes_supported": ["openid", "email"],
        });
        let m = parse("u", "https://id.example", &doc).unwrap();
        assert_eq!(m.token_endpoint, "https://id.example/token");
        assert_eq!(m.scopes_supported, ["openid", "email"]);
        let e = parse("u", "https://other.example", &doc).unwrap_err();
        assert!(e.to_string().contains("names issuer"), "{e}");
        let mut plain = doc.clone();
        plain["token_endpoint"] = "http://id.example/token".into();
        assert!(parse("u", "https://id.example", &plain).is_err());
    }
}
