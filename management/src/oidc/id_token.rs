//! Checks an ID token (OpenID Connect Core 1.0 §3.1.3.7): signature by one of the provider's
//! keys (RSA, ECDSA or Ed25519; never `none` or a shared secret), issuer, audience, expiry and
//! nonce.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

use super::OidcError;

/// Clock difference tolerated between management and the provider.
const SKEW_SECS: i64 = 120;

pub struct Expected<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub nonce: &'a str,
    pub now_unix: i64,
}

fn refuse(reason: impl Into<String>) -> OidcError {
    OidcError::IdToken(reason.into())
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, OidcError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| refuse(format!("its {what} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|_| refuse(format!("its {what} is not a JSON object")))
}

fn b64_field(key: &Value, name: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(key[name].as_str()?).ok()
}

/// True when `key` (a JWK) verifies `signature` over `message` with `alg`.
fn key_verifies(alg: &str, key: &Value, message: &[u8], signature: &[u8]) -> bool {
    let kty = key["kty"].as_str().unwrap_or_default();
    let rsa = |params: &'static signature::RsaParameters| {
        let (Some(n), Some(e)) = (b64_field(key, "n"), b64_field(key, "e")) else {
            return false;
        };
        kty == "RSA"
            && RsaPublicKeyComponents { n: &n, e: &e }
                .verify(params, message, signature)
                .is_ok()
    };
    let ec = |crv: &str, alg: &'static signature::EcdsaVerificationAlgorithm| {
        let (Some(x), Some(y)) = (b64_field(key, "x"), b64_field(key, "y")) else {
            return false;
        };
        if kty != "EC" || key["crv"] != crv {
            return false;
        }
        let mut point = Vec::with_capacity(1 + x.len() + y.len());
        point.push(4);
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        UnparsedPublicKey::new(alg, point)
            .verify(message, signature)
            .is_ok()
    };
    match alg {
        "RS256" => rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
        "RS384" => rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
        "RS512" => rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
        "PS256" => rsa(&signature::RSA_PSS_2048_8192_SHA256),
        "PS384" => rsa(&signature::RSA_PSS_2048_8192_SHA384),
        "PS512" => rsa(&signature::RSA_PSS_2048_8192_SHA512),
        "ES256" => ec("P-256", &signature::ECDSA_P256_SHA256_FIXED),
        "ES384" => ec("P-384", &signature::ECDSA_P384_SHA384_FIXED),
        "EdDSA" => {
            kty == "OKP"
                && key["crv"] == "Ed25519"
                && b64_field(key, "x").is_some_and(|x| {
                    UnparsedPublicKey::new(&signature::ED25519, x)
                        .verify(message, signature)
                        .is_ok()
                })
        }
        _ => false,
    }
}

/// The claims of `token` once every check holds.
pub fn verify(
    token: &str,
    jwks: &Value,
    expected: &Expected<'_>,
) -> Result<Map<String, Value>, OidcError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse("it is not a signed JWT"));
    };
    let header = decode_json(h, "header")?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kid = header.get("kid").and_then(Value::as_str);
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| refuse("its signature is not base64url"))?;
    let message = &token.as_bytes()[..h.len() + 1 + p.len()];
    let keys = jwks["keys"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let signed = keys
        .iter()
        .filter(|k| kid.is_none_or(|kid| k["kid"] == kid))
        .filter(|k| k["use"].is_null() || k["use"] == "sig")
        .any(|k| key_verifies(alg, k, message, &signature));
    if !signed {
        return Err(refuse(format!(
            "no key of the provider verifies its signature (alg {alg:?}, kid {kid:?})"
        )));
    }
    let claims = decode_json(p, "payload")?;
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("iss") != Some(expected.issuer) {
        return Err(refuse(format!(
            "issuer {:?} is not {:?}",
            text("iss"),
            expected.issuer
        )));
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == expected.client_id,
        Some(Value::Array(list)) => {
            list.iter().any(|a| a == expected.client_id)
                && (list.len() == 1 || text("azp") == Some(expected.client_id))
        }
        _ => false,
    };
    if !audience_ok {
        return Err(refuse("it was not issued to this client (aud/azp)"));
    }
    let exp = claims.get("exp").and_then(Value::as_i64);
    if exp.is_none_or(|exp| exp + SKEW_SECS < expected.now_unix) {
        return Err(refuse("it has expired"));
    }
    if claims
        .get("iat")
        .and_then(Value::as_i64)
        .is_some_and(|iat| iat > expected.now_unix + SKEW_SECS)
    {
        return Err(refuse("it was issued in the future"));
    }
    if text("nonce") != Some(expected.nonce) {
        return Err(refuse("its nonce is not the one of this sign-in"));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    use super::*;

    struct Signer {
        pair: EcdsaKeyPair,
        rng: SystemRandom,
    }

    impl Signer {
        fn new() -> Self {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .unwrap();
            Self { pair, rng }
        }

        fn jwks(&self) -> Value {
            let point = self.pair.public_key().as_ref();
            json!({"keys": [{
                "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            }]})
        }

        fn sign(&self, header: Value, claims: Value) -> String {
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let sig = self.pair.sign(&self.rng, input.as_bytes()).unwrap();
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
        }
    }

    fn claims() -> Value {
        json!({"iss": "https://id.example", "aud": "client", "sub": "alice",
               "exp": 2_000, "iat": 1_000, "nonce": "n-1", "email": "a@example.com"})
    }

    const EXPECTED: Expected<'static> = Expected {
        issuer: "https://id.example",
        client_id: "client",
        nonce: "n-1",
        now_unix: 1_500,
    };

    #[test]
    fn a_good_token_passes_and_each_fault_is_named() {
        let s = Signer::new();
        let header = json!({"alg": "ES256", "kid": "k1"});
        let good = s.sign(header.clone(), claims());
        let c = verify(&good, &s.jwks(), &EXPECTED).unwrap();
        assert_eq!(c["email"], "a@example.com");

        let mut tampered = good.clone();
        tampered.replace_range(
            good.find('.').unwrap() + 2..good.find('.').unwrap() + 3,
            "A",
        );
        assert!(verify(&tampered, &s.jwks(), &EXPECTED).is_err());
        let other = Signer::new();
        assert!(verify(&good, &other.jwks(), &EXPECTED).is_err());
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(json!({"alg": "none"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        assert!(verify(&none, &s.jwks(), &EXPECTED).is_err());

        for (field, value, needle) in [
            ("iss", json!("https://evil.example"), "issuer"),
            ("aud", json!("someone-else"), "client"),
            ("aud", json!(["client", "other"]), "client"),
            ("exp", json!(1_000), "expired"),
            ("nonce", json!("n-2"), "nonce"),
        ] {
            let mut c = claims();
            c[field] = value;
            let e = verify(&s.sign(header.clone(), c), &s.jwks(), &EXPECTED).unwrap_err();
            assert!(e.to_string().contains(needle), "{field}: {e}");
        }
        let mut c = claims();
        c["aud"] = json!(["client", "other"]);
        c["azp"] = json!("client");
        assert!(verify(&s.sign(header, c), &s.jwks(), &EXPECTED).is_ok());
    }
}
