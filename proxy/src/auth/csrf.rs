//! Double-submit CSRF protection for the login forms: the page sets a random nonce as a
//! `SameSite=Strict` cookie and repeats it in a hidden field. Another site can make a browser
//! post the form, but cannot read the nonce, and the browser does not attach a Strict cookie to
//! its cross-site request, so the two never match.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

pub const COOKIE_NAME: &str = "nb_csrf";
/// How long a login page's forms stay usable.
const MAX_AGE_SECS: u32 = 3600;

pub fn new_nonce() -> String {
    let mut bytes = [0u8; 18];
    // The OS random source failing leaves a zero nonce, which `check` refuses.
    let _ = SystemRandom::new().fill(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn set_cookie_header(nonce: &str, secure: bool) -> String {
    format!(
        "{COOKIE_NAME}={nonce}; Path=/; HttpOnly;{} SameSite=Strict; Max-Age={MAX_AGE_SECS}",
        if secure { " Secure;" } else { "" }
    )
}

/// Single sign-on binds the browser that started it: the proxy sets this cookie with a nonce and
/// puts the same nonce in the URL the browser comes back to. `Lax`, because the way back is a
/// top-level navigation from the identity provider's site, which a `Strict` cookie would miss.
pub const SSO_COOKIE_NAME: &str = "nb_sso";
/// The query parameter of the way back that repeats the nonce.
pub const SSO_PARAM: &str = "nb_sso";
/// How long a browser may take at the identity provider.
const SSO_MAX_AGE_SECS: i64 = 600;

/// Same attributes as the session cookie (Lax, HttpOnly, whole host), shorter lived.
pub fn sso_set_cookie_header(nonce: &str, secure: bool) -> String {
    super::cookies::session_set_cookie(SSO_COOKIE_NAME, nonce, SSO_MAX_AGE_SECS, secure)
}

pub fn sso_clear_cookie_header(secure: bool) -> String {
    super::cookies::session_set_cookie(SSO_COOKIE_NAME, "", 0, secure)
}

/// True when the way back's nonce is the one this browser was given when it left (so a sign-in
/// finished elsewhere cannot be slipped to it: login CSRF).
pub fn sso_check(cookie: Option<&str>, param: Option<&str>) -> bool {
    nonces_match(cookie, param)
}

/// True when the form's nonce matches the cookie's and, when the browser names the origin, the
/// origin is the service itself (`expected_origin`, e.g. `https://app.example.com`).
pub fn check(
    cookie: Option<&str>,
    field: Option<&str>,
    origin: Option<&[u8]>,
    expected_origin: &str,
) -> bool {
    if let Some(origin) = origin
        && !origin.eq_ignore_ascii_case(expected_origin.as_bytes())
    {
        return false;
    }
    nonces_match(cookie, field)
}

/// True when both copies are there, the cookie's is a real nonce (not short, not the all-zero
/// one a failed random source leaves) and they are equal.
fn nonces_match(cookie: Option<&str>, copy: Option<&str>) -> bool {
    let (Some(cookie), Some(copy)) = (cookie, copy) else {
        return false;
    };
    if cookie.len() < 16 || cookie.bytes().all(|b| b == b'A') {
        return false;
    }
    equal_in_constant_time(cookie.as_bytes(), copy.as_bytes())
}

/// Compares without an early exit, so timing tells nothing about where the values differ.
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_sign_on_comes_back_to_the_browser_that_left() {
        let n = new_nonce();
        assert!(sso_check(Some(&n), Some(&n)));
        assert!(!sso_check(None, Some(&n)));
        assert!(!sso_check(Some(&n), None));
        assert!(!sso_check(Some(&n), Some(&new_nonce())));
        assert!(!sso_check(Some("short"), Some("short")));
        assert!(sso_set_cookie_header(&n, true).contains("SameSite=Lax"));
        assert!(sso_clear_cookie_header(true).contains("Max-Age=0"));
    }

    #[test]
    fn matching_nonce_from_the_same_origin_passes() {
        let n = new_nonce();
        assert_ne!(n, new_nonce());
        assert!(check(Some(&n), Some(&n), None, "https://a.example"));
        assert!(check(
            Some(&n),
            Some(&n),
            Some(b"https://a.example"),
            "https://a.example"
        ));
    }

    #[test]
    fn anything_else_fails() {
        let n = new_nonce();
        assert!(!check(None, Some(&n), None, "https://a.example"));
        assert!(!check(Some(&n), None, None, "https://a.example"));
        assert!(!check(
            Some(&n),
            Some("other-nonce-value-xx"),
            None,
            "https://a.example"
        ));
        assert!(!check(
            Some(&n),
            Some(&n),
            Some(b"https://evil.example"),
            "https://a.example"
        ));
        assert!(!check(
            Some("short"),
            Some("short"),
            None,
            "https://a.example"
        ));
        assert!(set_cookie_header(&n, true).contains("SameSite=Strict"));
    }
}
