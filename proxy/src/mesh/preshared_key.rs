//! The optional WireGuard pre-shared key (`NB_PROXY_PRESHARED_KEY` on the proxy,
//! `PORTCULLIS_AGENT_PRESHARED_KEY` on the agent): a symmetric key WireGuard mixes into every
//! handshake on top of the public keys, so a peer without it cannot complete one. One key for
//! every peer, shared out of band: management never sees it. It is never printed.

use wireguard_control::Key;

#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(Key);

#[derive(Debug, thiserror::Error)]
#[error(
    "{setting} is not a WireGuard key: expected 32 bytes in base64 (44 characters, as `wg genpsk` prints)"
)]
pub struct PresharedKeyError {
    pub setting: &'static str,
}

impl PresharedKey {
    /// None for an unset or empty value.
    pub fn parse(
        setting: &'static str,
        value: Option<&str>,
    ) -> Result<Option<PresharedKey>, PresharedKeyError> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some(text) => Key::from_base64(text)
                .map(|key| Some(PresharedKey(key)))
                .map_err(|_| PresharedKeyError { setting }),
        }
    }

    pub fn key(&self) -> &Key {
        &self.0
    }
}

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_genpsk_key_and_refuses_anything_else() {
        let text = Key::generate_preshared().to_base64();
        let key = PresharedKey::parse("X", Some(&format!(" {text}\n")))
            .expect("valid")
            .expect("set");
        assert_eq!(key.key().to_base64(), text);
        assert!(PresharedKey::parse("X", None).expect("unset").is_none());
        assert!(
            PresharedKey::parse("X", Some("  "))
                .expect("empty")
                .is_none()
        );
        for bad in [
            "abc",
            &text[..40],
            "not base64 at all, not at all, not at all!!",
        ] {
            let e = PresharedKey::parse("NB_PROXY_PRESHARED_KEY", Some(bad)).unwrap_err();
            assert!(
                e.to_string().starts_with("NB_PROXY_PRESHARED_KEY is not"),
                "{e}"
            );
        }
        assert!(!format!("{key:?}").contains(&text));
    }
}
