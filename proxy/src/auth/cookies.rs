//! Reading the proxy's cookies from `Cookie` headers and writing its `Set-Cookie` values.

/// Most cookie pairs looked at per request (a bounded cost for hostile headers).
const MAX_PAIRS: usize = 64;

/// The value of cookie `name` in the request's `Cookie` headers (the first one wins).
pub fn find<'a>(fields: impl Iterator<Item = (&'a [u8], &'a [u8])>, name: &str) -> Option<String> {
    let mut seen = 0;
    for (n, v) in fields {
        if !n.eq_ignore_ascii_case(b"cookie") {
            continue;
        }
        for pair in v.split(|b| *b == b';') {
            seen += 1;
            if seen > MAX_PAIRS {
                return None;
            }
            let pair = pair.trim_ascii();
            if let Some(value) = pair
                .strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
            {
                return std::str::from_utf8(value).ok().map(str::to_string);
            }
        }
    }
    None
}

/// A `Cookie` header value without the cookies in `names`; `None` when nothing is left.
pub fn without(value: &[u8], names: &[&str]) -> Option<String> {
    let kept: Vec<&str> = std::str::from_utf8(value)
        .ok()?
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let n = p.split('=').next().unwrap_or_default();
            !names.contains(&n)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// The session cookie: scoped to the whole host, out of scripts' reach, sent on top-level
/// navigation from other sites (so links into the service work) but not on their sub-requests.
pub fn session_set_cookie(name: &str, token: &str, max_age_secs: i64, secure: bool) -> String {
    format!(
        "{name}={token}; Path=/; HttpOnly;{} SameSite=Lax; Max-Age={max_age_secs}",
        if secure { " Secure;" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_across_headers() {
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b"Cookie", b"a=1; nb_sessionx=no"),
            (b"cookie", b"b=2;nb_session=tok.en"),
        ];
        assert_eq!(
            find(headers.iter().copied(), "nb_session").as_deref(),
            Some("tok.en")
        );
        assert_eq!(find(headers.iter().copied(), "c"), None);
    }

    #[test]
    fn strips_named_cookies() {
        assert_eq!(
            without(b"a=1; nb_session=x; b=2", &["nb_session"]).as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(without(b"nb_session=x", &["nb_session"]), None);
    }

    #[test]
    fn session_cookie_attributes() {
        let c = session_set_cookie("nb_session", "t", 60, true);
        assert_eq!(
            c,
            "nb_session=t; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age=60"
        );
        assert!(!session_set_cookie("nb_session", "t", 60, false).contains("Secure"));
    }
}
