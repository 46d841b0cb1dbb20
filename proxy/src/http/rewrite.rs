//! Builds the heads that cross the proxy: the request sent to a target and the response sent
//! back to the client. Hop-by-hop headers are dropped, forwarding headers set, paths and
//! redirects rewritten.

use std::io::Write;
use std::net::IpAddr;

use ipnet::IpNet;

use super::gate::Identity;
use super::head::{RequestHead, ResponseHead};
use crate::routes::{PathRewrite, PathRoute, Service};

/// Per-request facts the rewrite needs besides the heads.
pub struct Forwarding<'a> {
    pub client_ip: IpAddr,
    pub trusted_proxies: &'a [IpNet],
    /// Value of X-Forwarded-Proto.
    pub proto: &'a str,
    /// The proxy answered `Expect: 100-continue` itself, so the target must not see it.
    pub expect_handled: bool,
    /// Who the gate authenticated; sent as `X-NetBird-User` / `X-NetBird-Groups`.
    pub identity: Option<&'a Identity>,
    /// The service is protected: the proxy's own cookies (the session) stay with the proxy.
    pub strip_auth_cookies: bool,
}

/// Identity headers only the proxy may set: a client's copies are always dropped.
const IDENTITY_HEADERS: [&[u8]; 2] = [b"x-netbird-user", b"x-netbird-groups"];
/// The proxy's own cookies, never forwarded from a protected service's clients.
const AUTH_COOKIES: [&str; 2] = [proto::session::COOKIE_NAME, crate::auth::csrf::COOKIE_NAME];

const FORWARDING_HEADERS: [&[u8]; 3] = [
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
];

/// Writes the request head for the target into `out`.
pub fn upstream_request(
    out: &mut Vec<u8>,
    head: &RequestHead,
    service: &Service,
    route: &PathRoute,
    fwd: &Forwarding<'_>,
) {
    out.clear();
    out.extend_from_slice(head.method());
    out.push(b' ');
    write_target_path(out, head.path_and_query(), route);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    if service.pass_host_header && !head.host_header().is_empty() {
        out.extend_from_slice(head.host_header());
    } else {
        out.extend_from_slice(route.target.authority.as_bytes());
    }
    out.extend_from_slice(b"\r\n");

    let trusted = fwd
        .trusted_proxies
        .iter()
        .any(|n| n.contains(&fwd.client_ip));
    let mut prior_xff: Vec<&[u8]> = Vec::new();
    for (name, value) in head.fields.iter() {
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            if trusted {
                prior_xff.push(value);
            }
            continue;
        }
        if head.fields.is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"host")
            || FORWARDING_HEADERS
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            || (fwd.expect_handled && name.eq_ignore_ascii_case(b"expect"))
            || IDENTITY_HEADERS
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            || route
                .custom_headers
                .iter()
                .any(|(k, _)| name.eq_ignore_ascii_case(k.as_bytes()))
        {
            continue;
        }
        if fwd.strip_auth_cookies && name.eq_ignore_ascii_case(b"cookie") {
            if let Some(kept) = crate::auth::cookies::without(value, &AUTH_COOKIES) {
                put_header(out, name, kept.as_bytes());
            }
            continue;
        }
        put_header(out, name, value);
    }
    if let Some(id) = fwd.identity {
        put_identity_header(out, b"X-NetBird-User", &id.user);
        put_identity_header(out, b"X-NetBird-Groups", &id.groups);
    }

    out.extend_from_slice(b"X-Forwarded-For: ");
    for v in &prior_xff {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    let _ = write!(out, "{}\r\n", fwd.client_ip);
    let _ = write!(out, "X-Forwarded-Proto: {}\r\n", fwd.proto);
    if !head.host_header().is_empty() {
        put_header(out, b"X-Forwarded-Host", head.host_header());
    }
    for (k, v) in &route.custom_headers {
        put_header(out, k.as_bytes(), v.as_bytes());
    }
    if head.upgrade {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
        if let Some(u) = head.fields.get("upgrade") {
            put_header(out, b"Upgrade", u);
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// `base_path` of the target + the request path, with the route prefix removed in strip mode.
fn write_target_path(out: &mut Vec<u8>, path_and_query: &str, route: &PathRoute) {
    if path_and_query == "*" {
        out.push(b'*');
        return;
    }
    let rest = match route.rewrite {
        PathRewrite::Preserve => path_and_query,
        PathRewrite::Strip if route.prefix == "/" => path_and_query,
        PathRewrite::Strip => {
            let prefix = route.prefix.trim_end_matches('/');
            path_and_query
                .strip_prefix(prefix)
                .unwrap_or(path_and_query)
        }
    };
    out.extend_from_slice(route.target.base_path.as_bytes());
    if !rest.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(rest.as_bytes());
}

/// Identity values come from outside the proxy (an identity provider's claims, a peer's
/// self-chosen name), whichever way they were verified: control characters are dropped here,
/// where every one is written, so that none can end the header early and add headers or a
/// request of its own.
fn put_identity_header(out: &mut Vec<u8>, name: &[u8], value: &str) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    let mut utf8 = [0u8; 4];
    for c in value.chars().filter(|c| !c.is_control()) {
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What the response rewrite needs to know about the exchange.
pub struct ResponseContext<'a> {
    pub service: &'a Service,
    pub route: &'a PathRoute,
    /// The Host the client asked for, used as the public authority in rewritten redirects.
    pub public_host: &'a [u8],
    /// `https` or `http`: how the client reached the proxy.
    pub public_scheme: &'a str,
    pub close: bool,
    pub client_http10: bool,
    /// The body is passed on without its chunked framing, so `Transfer-Encoding` goes.
    pub dechunk: bool,
}

/// Writes the response head for the client into `out`.
pub fn client_response(out: &mut Vec<u8>, resp: &ResponseHead, ctx: &ResponseContext<'_>) {
    out.clear();
    let _ = write!(out, "HTTP/1.1 {} ", resp.status);
    out.extend_from_slice(resp.reason());
    out.extend_from_slice(b"\r\n");
    let upgrade = resp.status == 101;
    for (name, value) in resp.fields.iter() {
        if upgrade && name.eq_ignore_ascii_case(b"upgrade") {
            put_header(out, name, value);
            continue;
        }
        if resp.fields.is_hop_by_hop(name)
            || (ctx.dechunk && name.eq_ignore_ascii_case(b"transfer-encoding"))
        {
            continue;
        }
        if ctx.service.rewrite_redirects
            && name.eq_ignore_ascii_case(b"location")
            && let Some(new) = rewrite_location(value, ctx)
        {
            put_header(out, name, new.as_bytes());
            continue;
        }
        put_header(out, name, value);
    }
    if upgrade {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
    } else if ctx.close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if ctx.client_http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Maps a redirect to the target's own address back to the public address of the service.
fn rewrite_location(value: &[u8], ctx: &ResponseContext<'_>) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?;
    let host = std::str::from_utf8(ctx.public_host).ok()?;
    let target = &ctx.route.target;
    let rest = target.origins.iter().find_map(|origin| {
        let head = value.get(..origin.len())?;
        let rest = &value[origin.len()..];
        (head.eq_ignore_ascii_case(origin)
            && (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')))
        .then_some(rest)
    })?;
    let rest = match rest.strip_prefix(target.base_path.as_str()) {
        Some(r) if !target.base_path.is_empty() && (r.is_empty() || r.starts_with(['/', '?'])) => r,
        _ => rest,
    };
    let prefix = match ctx.route.rewrite {
        PathRewrite::Strip => ctx.route.prefix.trim_end_matches('/'),
        PathRewrite::Preserve => "",
    };
    let rest = if rest.is_empty() { "/" } else { rest };
    Some(format!("{}://{host}{prefix}{rest}", ctx.public_scheme))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{PathMapping, PathRewriteMode, PathTargetOptions, ProxyMapping};

    fn service(prefix: &str, target: &str, mode: PathRewriteMode, pass_host: bool) -> Service {
        let mut opts = PathTargetOptions {
            path_rewrite: mode as i32,
            ..Default::default()
        };
        opts.custom_headers.insert("X-Env".into(), "test".into());
        Service::from_mapping(&ProxyMapping {
            id: "s".into(),
            domain: "app.example".into(),
            pass_host_header: pass_host,
            rewrite_redirects: true,
            path: vec![PathMapping {
                path: prefix.into(),
                target: target.into(),
                options: Some(opts),
            }],
            ..Default::default()
        })
        .unwrap()
    }

    fn request(raw: &[u8]) -> RequestHead {
        let mut h = RequestHead::default();
        h.parse(raw).unwrap().unwrap();
        h
    }

    fn fwd<'a>(trusted: &'a [IpNet]) -> Forwarding<'a> {
        Forwarding {
            client_ip: "192.0.2.9".parse().unwrap(),
            trusted_proxies: trusted,
            proto: "https",
            expect_handled: false,
            identity: None,
            strip_auth_cookies: false,
        }
    }

    #[test]
    fn identity_headers_are_the_proxys_alone() {
        let s = service(
            "/",
            "http://h:1",
            PathRewriteMode::PathRewriteDefault,
            false,
        );
        let h = request(b"GET / HTTP/1.1\r\nHost: a\r\nX-NetBird-User: boss@example.com\r\nx-netbird-groups: admins\r\nCookie: a=1; nb_session=secret; nb_csrf=n\r\n\r\n");
        let mut out = Vec::new();
        upstream_request(&mut out, &h, &s, &s.routes[0], &fwd(&[]));
        let text = String::from_utf8(out).unwrap();
        assert!(!text.to_ascii_lowercase().contains("x-netbird"), "{text}");
        let id = Identity {
            user: "a@example.com".into(),
            groups: "ops,dev".into(),
            ..Default::default()
        };
        let mut f = fwd(&[]);
        f.identity = Some(&id);
        f.strip_auth_cookies = true;
        let mut out = Vec::new();
        upstream_request(&mut out, &h, &s, &s.routes[0], &f);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("X-NetBird-User: a@example.com\r\n"), "{text}");
        assert!(text.contains("X-NetBird-Groups: ops,dev\r\n"), "{text}");
        assert!(!text.contains("boss@"), "{text}");
        assert!(text.contains("Cookie: a=1\r\n"), "{text}");
        assert!(!text.contains("secret"), "{text}");

        // A name chosen by a peer or an identity provider cannot add headers.
        let id = Identity {
            user: "laptop\r\nX-Admin: 1\r\n\r\nGET /evil HTTP/1.1".into(),
            groups: "a\nb\x7f\u{85}c".into(),
            ..Default::default()
        };
        f.identity = Some(&id);
        let mut out = Vec::new();
        upstream_request(&mut out, &h, &s, &s.routes[0], &f);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("X-NetBird-User: laptopX-Admin: 1GET /evil HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(text.contains("X-NetBird-Groups: abc\r\n"), "{text}");
        assert!(!text.contains("\r\nX-Admin"), "{text}");
    }

    #[test]
    fn strip_prefix_and_base_path() {
        let s = service(
            "/api",
            "http://10.0.0.1:8080/v1",
            PathRewriteMode::PathRewriteDefault,
            false,
        );
        let h = request(b"GET /api/users?x=1 HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Env: spoof\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n");
        let mut out = Vec::new();
        upstream_request(&mut out, &h, &s, &s.routes[0], &fwd(&[]));
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("GET /v1/users?x=1 HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n"),
            "{text}"
        );
        assert!(!text.contains("X-Hop"));
        assert!(!text.contains("spoof"));
        assert!(!text.contains("6.6.6.6"));
        assert!(text.contains("X-Forwarded-For: 192.0.2.9\r\n"));
        assert!(text.contains("X-Forwarded-Host: app.example\r\n"));
        assert!(text.contains("X-Env: test\r\n"));
    }

    #[test]
    fn preserve_and_pass_host() {
        let s = service(
            "/api",
            "http://10.0.0.1:8080",
            PathRewriteMode::PathRewritePreserve,
            true,
        );
        let h = request(b"GET /api HTTP/1.1\r\nHost: App.Example:8443\r\n\r\n");
        let mut out = Vec::new();
        upstream_request(&mut out, &h, &s, &s.routes[0], &fwd(&[]));
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("GET /api HTTP/1.1\r\nHost: App.Example:8443\r\n"),
            "{text}"
        );
    }

    #[test]
    fn strip_to_root() {
        let s = service(
            "/api",
            "http://h:1",
            PathRewriteMode::PathRewriteDefault,
            false,
        );
        let h = request(b"GET /api?q HTTP/1.1\r\nHost: app.example\r\n\r\n");
        let mut out = Vec::new();
        upstream_request(&mut out, &h, &s, &s.routes[0], &fwd(&[]));
        assert!(out.starts_with(b"GET /?q HTTP/1.1\r\n"));
    }

    #[test]
    fn trusted_proxy_extends_xff() {
        let s = service(
            "/",
            "http://h:1",
            PathRewriteMode::PathRewriteDefault,
            false,
        );
        let h = request(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.5\r\n\r\n");
        let trusted = ["192.0.2.0/24".parse().unwrap()];
        let mut out = Vec::new();
        upstream_request(&mut out, &h, &s, &s.routes[0], &fwd(&trusted));
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("X-Forwarded-For: 203.0.113.5, 192.0.2.9\r\n"),
            "{text}"
        );
    }

    #[test]
    fn redirects_map_back_to_public_host() {
        let s = service(
            "/app",
            "http://10.0.0.1:8080/base",
            PathRewriteMode::PathRewriteDefault,
            false,
        );
        let ctx = ResponseContext {
            service: &s,
            route: &s.routes[0],
            public_host: b"app.example:8443",
            public_scheme: "https",
            close: false,
            client_http10: false,
            dechunk: false,
        };
        assert_eq!(
            rewrite_location(b"http://10.0.0.1:8080/base/login?n=1", &ctx).as_deref(),
            Some("https://app.example:8443/app/login?n=1")
        );
        assert_eq!(rewrite_location(b"https://elsewhere/x", &ctx), None);
        assert_eq!(rewrite_location(b"http://10.0.0.1:80800/x", &ctx), None);
    }
}
