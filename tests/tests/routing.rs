//! Routing and header rules through the real proxy, with real curl and real target servers.

use tests::backend::Backend;
use tests::client::curl;
use tests::proxy::{Proxy, ProxyOptions};

fn headers_of(v: &serde_json::Value) -> Vec<(String, String)> {
    v["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap_or_default().to_ascii_lowercase(),
                h[1].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    hs.iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn host_and_longest_prefix_routing_with_both_rewrite_modes() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let api = Backend::start("api");
    let v2 = Backend::start("v2");
    let mappings = format!(
        r#"
[[service]]
id = "a"
domain = "a.test.internal"
[[service.path]]
path = "/"
target = "http://127.0.0.1:{a}"
[[service.path]]
path = "/api"
target = "http://127.0.0.1:{api}/base"
[[service.path]]
path = "/api/v2"
target = "http://127.0.0.1:{v2}"
path_rewrite = "preserve"

[[service]]
id = "b"
domain = "b.test.internal"
[[service.path]]
target = "http://127.0.0.1:{b}"
"#,
        a = a.port(),
        b = b.port(),
        api = api.port(),
        v2 = v2.port()
    );
    let proxy = Proxy::start(ProxyOptions::new(mappings));
    let ca = proxy.ca_path();
    let get = |host: &str, path: &str| curl(&ca, host, proxy.https_port, path, &[]);

    let r = get("a.test.internal", "/hello?x=1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["backend"], "a");
    assert_eq!(r.json()["path"], "/hello?x=1");

    let r = get("b.test.internal", "/hello");
    assert_eq!(r.json()["backend"], "b");

    // Strip mode (the default) removes the prefix and prepends the target's base path.
    let r = get("a.test.internal", "/api/users?id=7");
    assert_eq!(r.json()["backend"], "api");
    assert_eq!(r.json()["path"], "/base/users?id=7");
    let r = get("a.test.internal", "/api");
    assert_eq!(r.json()["path"], "/base/");

    // The longest prefix wins, and preserve mode keeps the path as sent.
    let r = get("a.test.internal", "/api/v2/items");
    assert_eq!(r.json()["backend"], "v2");
    assert_eq!(r.json()["path"], "/api/v2/items");

    // Prefixes match whole segments.
    let r = get("a.test.internal", "/apix");
    assert_eq!(r.json()["backend"], "a");

    // Host matching ignores case and a port in the Host header.
    let r = get("A.Test.Internal", "/");
    assert_eq!(r.json()["backend"], "a");
}

#[test]
fn pass_host_header_custom_headers_and_forwarding_headers() {
    let t = Backend::start("t");
    let mappings = format!(
        r#"
[[service]]
id = "keep"
domain = "keep.test.internal"
pass_host_header = true
[[service.path]]
target = "http://127.0.0.1:{p}"
custom_headers = {{ "X-Env" = "staging", "X-Team" = "edge" }}

[[service]]
id = "plain"
domain = "plain.test.internal"
[[service.path]]
target = "http://127.0.0.1:{p}"
"#,
        p = t.port()
    );
    let proxy = Proxy::start(ProxyOptions::new(mappings));
    let ca = proxy.ca_path();
    let port = proxy.https_port;

    let r = curl(
        &ca,
        "keep.test.internal",
        port,
        "/",
        &[
            "-H",
            "X-Env: spoofed",
            "-H",
            "X-Forwarded-For: 203.0.113.66",
            "-H",
            "X-Forwarded-Host: evil",
        ],
    );
    let hs = headers_of(&r.json());
    assert_eq!(
        header(&hs, "host"),
        vec![format!("keep.test.internal:{port}").as_str()]
    );
    assert_eq!(
        header(&hs, "x-env"),
        vec!["staging"],
        "custom header replaces the client's"
    );
    assert_eq!(header(&hs, "x-team"), vec!["edge"]);
    // An untrusted client's X-Forwarded-For is not believed.
    assert_eq!(header(&hs, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(header(&hs, "x-forwarded-proto"), vec!["https"]);
    assert_eq!(
        header(&hs, "x-forwarded-host"),
        vec![format!("keep.test.internal:{port}").as_str()]
    );

    let r = curl(&ca, "plain.test.internal", port, "/", &[]);
    let hs = headers_of(&r.json());
    assert_eq!(
        header(&hs, "host"),
        vec![format!("127.0.0.1:{}", t.port()).as_str()]
    );
    assert!(header(&hs, "x-env").is_empty());
}

#[test]
fn trusted_proxies_extend_x_forwarded_for() {
    let t = Backend::start("t");
    let mappings = format!(
        "[[service]]\nid='s'\ndomain='s.test.internal'\n[[service.path]]\ntarget='http://127.0.0.1:{}'\n",
        t.port()
    );
    let proxy =
        Proxy::start(ProxyOptions::new(mappings).env("NB_PROXY_TRUSTED_PROXIES", "127.0.0.0/8"));
    let r = curl(
        &proxy.ca_path(),
        "s.test.internal",
        proxy.https_port,
        "/",
        &["-H", "X-Forwarded-For: 203.0.113.66"],
    );
    let hs = headers_of(&r.json());
    assert_eq!(
        header(&hs, "x-forwarded-for"),
        vec!["203.0.113.66, 127.0.0.1"]
    );
}

#[test]
fn redirects_from_the_target_are_rewritten_to_the_public_address() {
    let t = Backend::start("t");
    let mappings = format!(
        r#"
[[service]]
id = "rw"
domain = "rw.test.internal"
rewrite_redirects = true
[[service.path]]
path = "/app"
target = "http://127.0.0.1:{p}"

[[service]]
id = "raw"
domain = "raw.test.internal"
[[service.path]]
target = "http://127.0.0.1:{p}"
"#,
        p = t.port()
    );
    let proxy = Proxy::start(ProxyOptions::new(mappings));
    let ca = proxy.ca_path();
    let port = proxy.https_port;
    let to = format!("http://127.0.0.1:{}/login?next=%2F", t.port());

    let r = curl(
        &ca,
        "rw.test.internal",
        port,
        &format!("/app/redirect?to={to}"),
        &[],
    );
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some(format!("https://rw.test.internal:{port}/app/login?next=%2F").as_str())
    );

    let r = curl(
        &ca,
        "raw.test.internal",
        port,
        &format!("/redirect?to={to}"),
        &[],
    );
    assert_eq!(
        r.header("location"),
        Some(to.as_str()),
        "rewrite_redirects off leaves it alone"
    );
}

/// A proxy for `s.test.internal` with its plain-HTTP listener on, in `mode`, and curl's answer to
/// `GET http://…/a?b=1` on that listener.
fn plain_http_get(mode: &str) -> (Proxy, Backend, tests::client::CurlResponse) {
    let t = Backend::start("t");
    let mappings = format!(
        "[[service]]\nid='s'\ndomain='s.test.internal'\n[[service.path]]\ntarget='http://127.0.0.1:{}'\n",
        t.port()
    );
    let mut opts = ProxyOptions::new(mappings).env("NB_PROXY_HTTP_MODE", mode);
    opts.http_listener = true;
    let proxy = Proxy::start(opts);
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-i",
            "--max-time",
            "10",
            "-H",
            "Host: s.test.internal",
        ])
        .arg(format!("http://127.0.0.1:{}/a?b=1", proxy.http_port))
        .output()
        .expect("curl");
    let r = tests::client::parse_response(&out.stdout);
    (proxy, t, r)
}

#[test]
fn plain_http_is_redirected_to_https() {
    let (proxy, _t, r) = plain_http_get("redirect");
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some(format!("https://s.test.internal:{}/a?b=1", proxy.https_port).as_str())
    );
}

#[test]
fn plain_http_is_served_in_serve_mode() {
    let (_proxy, t, r) = plain_http_get("serve");
    assert_eq!(r.status, 200, "forwarded, not redirected");
    let hs = headers_of(&r.json());
    assert_eq!(
        header(&hs, "x-forwarded-proto"),
        vec!["http"],
        "the client came over plain HTTP"
    );
    assert_eq!(t.request_count(), 1);
}

#[test]
fn unknown_http_mode_is_refused_with_the_allowed_values() {
    let out = std::process::Command::new(tests::proxy::binary())
        .args(["proxy", "--http-mode", "proxy"])
        .env("NB_PROXY_ADDRESS", "127.0.0.1:0")
        .output()
        .expect("portcullis");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NB_PROXY_HTTP_MODE") && err.contains("redirect, serve"),
        "{err}"
    );
}
