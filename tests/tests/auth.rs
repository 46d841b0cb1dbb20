//! Authentication end to end with real clients (curl): the real management (SQLite) checks
//! passwords, PINs and header values and signs sessions; the real proxy shows the login page,
//! sets and verifies the `nb_session` cookie locally, limits failed attempts, sets identity
//! headers and ships access logs.

use std::time::{Duration, Instant};

use proto::session::{Audience, SessionClaims, SessionGrant, sign};
use tests::auth_setup::{
    API_KEY, CLUSTER, HTML, PASSWORD, PIN, Setup, get, session_private_key, setup,
};
use tests::client::CurlResponse;

/// The value of cookie `name` among a response's `Set-Cookie` headers.
fn set_cookie<'a>(r: &'a CurlResponse, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
        .find_map(|(_, v)| v.strip_prefix(&format!("{name}=")))
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_string()
}

/// Opens the login page like a browser and submits one form; returns the answer to the POST.
fn submit(s: &Setup, host: &str, return_to: &str, fields: &[(&str, &str)]) -> CurlResponse {
    let page = get(s, host, return_to, &["-H", HTML]);
    assert_eq!(page.status, 401, "login page: {}", page.text());
    let nonce = cookie_value(set_cookie(&page, "nb_csrf").expect("a CSRF cookie"));
    assert!(
        page.text().contains(&nonce),
        "the form carries the CSRF nonce"
    );
    post_form(s, host, Some(&nonce), &nonce, return_to, fields, &[])
}

fn post_form(
    s: &Setup,
    host: &str,
    cookie_nonce: Option<&str>,
    field_nonce: &str,
    return_to: &str,
    fields: &[(&str, &str)],
    extra: &[&str],
) -> CurlResponse {
    let mut args: Vec<String> = vec!["-H".into(), HTML.into()];
    if let Some(n) = cookie_nonce {
        args.push("-H".into());
        args.push(format!("Cookie: nb_csrf={n}"));
    }
    for (k, v) in [("csrf", field_nonce), ("return_to", return_to)]
        .iter()
        .chain(fields)
    {
        args.push("--data-urlencode".into());
        args.push(format!("{k}={v}"));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    get(s, host, "/__portcullis__/login", &refs)
}

fn login(s: &Setup, host: &str, method: &str, secret: &str) -> String {
    let r = submit(
        s,
        host,
        "/after/login?x=1",
        &[("method", method), (method, secret)],
    );
    assert_eq!(r.status, 303, "{method} login: {}", r.text());
    assert_eq!(r.header("location"), Some("/after/login?x=1"));
    let set = set_cookie(&r, "nb_session").expect("session cookie");
    for attr in ["Path=/", "HttpOnly", "Secure", "SameSite=Lax", "Max-Age="] {
        assert!(set.contains(attr), "{attr} missing in {set}");
    }
    format!("nb_session={}", cookie_value(set))
}

fn echoed_headers(r: &CurlResponse) -> Vec<(String, String)> {
    let v = r.json();
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

fn header_of(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .collect()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn password_pin_and_header_auth_with_identity_headers() {
    let s = setup("auth-methods", &[]);
    let host = format!("app.{CLUSTER}");

    // An API client gets a challenge, not a page.
    let api = get(&s, &host, "/", &["-H", "Accept: application/json"]);
    assert_eq!(api.status, 401);
    assert!(
        api.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    assert!(!api.text().contains("<html"), "{}", api.text());

    // A browser gets one page with every method, no external assets, no script.
    let page = get(&s, &host, "/deep/link", &["-H", HTML]);
    assert_eq!(page.status, 401);
    let html = page.text();
    assert!(
        html.contains("<form")
            && html.contains("name=\"password\"")
            && html.contains("name=\"pin\"")
    );
    assert!(
        !html.contains("<script") && !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );

    // Wrong password, then the right one.
    let wrong = submit(
        &s,
        &host,
        "/",
        &[("method", "password"), ("password", "nope")],
    );
    assert_eq!(wrong.status, 401);
    assert!(wrong.text().contains("Wrong password"), "{}", wrong.text());
    assert!(set_cookie(&wrong, "nb_session").is_none());
    let session = login(&s, &host, "password", PASSWORD);

    // The session passes; identity headers are the proxy's, spoofed copies and the session
    // cookie never reach the target.
    let r = get(
        &s,
        &host,
        "/echo",
        &[
            "-H",
            &format!("Cookie: theme=dark; {session}"),
            "-H",
            "X-NetBird-User: admin@evil.example",
            "-H",
            "X-NetBird-Groups: admins",
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let headers = echoed_headers(&r);
    assert_eq!(
        header_of(&headers, "x-netbird-user"),
        vec!["password-user".to_string()]
    );
    assert!(
        header_of(&headers, "x-netbird-groups")
            .iter()
            .all(|g| g.is_empty())
    );
    let cookies = header_of(&headers, "cookie").join(";");
    assert!(
        cookies.contains("theme=dark") && !cookies.contains("nb_session"),
        "{cookies}"
    );

    // PIN.
    let pin_session = login(&s, &host, "pin", PIN);
    assert_eq!(
        get(&s, &host, "/", &["-H", &format!("Cookie: {pin_session}")]).status,
        200
    );

    // A form without the CSRF cookie, or from another origin, is refused.
    let no_cookie = post_form(
        &s,
        &host,
        None,
        "abc",
        "/",
        &[("method", "pin"), ("pin", PIN)],
        &[],
    );
    assert_eq!(no_cookie.status, 403, "{}", no_cookie.text());
    let page = get(&s, &host, "/", &["-H", HTML]);
    let nonce = cookie_value(set_cookie(&page, "nb_csrf").unwrap());
    let cross = post_form(
        &s,
        &host,
        Some(&nonce),
        &nonce,
        "/",
        &[("method", "pin"), ("pin", PIN)],
        &["-H", "Origin: https://evil.example"],
    );
    assert_eq!(cross.status, 403);
    // The return path cannot leave the service.
    let page = get(&s, &host, "/", &["-H", HTML]);
    let nonce = cookie_value(set_cookie(&page, "nb_csrf").unwrap());
    let open = post_form(
        &s,
        &host,
        Some(&nonce),
        &nonce,
        "//evil.example/x",
        &[("method", "pin"), ("pin", PIN)],
        &[],
    );
    assert_eq!(open.status, 303);
    assert_eq!(open.header("location"), Some("/"));

    // Header auth: the right value passes without any page, a wrong one gets 401.
    let ok = get(&s, &host, "/api", &["-H", &format!("X-API-Key: {API_KEY}")]);
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        header_of(&echoed_headers(&ok), "x-netbird-user"),
        vec!["header-user".to_string()]
    );
    let bad = get(&s, &host, "/api", &["-H", "X-API-Key: guess"]);
    assert_eq!(bad.status, 401);
}

#[test]
fn forged_expired_and_foreign_cookies_show_the_login_page() {
    let s = setup("auth-cookies", &[]);
    let host = format!("app.{CLUSTER}");
    let good = login(&s, &host, "password", PASSWORD);
    assert_eq!(
        get(&s, &host, "/", &["-H", &format!("Cookie: {good}")]).status,
        200
    );

    let key = session_private_key(&s, &host);
    let grant = |domain: &str| SessionGrant {
        user_id: "intruder".into(),
        domain: domain.into(),
        method: "password".into(),
        max_age_secs: 3600,
        ..Default::default()
    };
    let token_cookie = |t: String| format!("Cookie: nb_session={t}");

    // Signed with the right key, but expired.
    let mut expired = SessionClaims::new(&grant(&host), now() - 7200);
    expired.exp = now() - 60;
    // Signed with the right key, for another service.
    let foreign = SessionClaims::new(&grant(&format!("other.{CLUSTER}")), now());
    // Right audience, wrong key.
    let other_key = proto::session::key_pair_from_seed(&[42; 32]).private_key;
    let forged = sign(&SessionClaims::new(&grant(&host), now()), &other_key).unwrap();
    // Right key, wrong issuer.
    let mut issuer = SessionClaims::new(&grant(&host), now());
    issuer.iss = "someone-else".into();
    issuer.aud = Audience::One(host.clone());

    for (what, token) in [
        ("expired", sign(&expired, &key).unwrap()),
        ("other audience", sign(&foreign, &key).unwrap()),
        ("forged", forged),
        ("other issuer", sign(&issuer, &key).unwrap()),
        ("garbage", "a.b.c".to_string()),
    ] {
        let r = get(&s, &host, "/", &["-H", HTML, "-H", &token_cookie(token)]);
        assert_eq!(r.status, 401, "{what} cookie accepted");
        assert!(r.text().contains("<form"), "{what}: no login page");
    }
    // The control: the same construction with nothing wrong passes, so the cases above fail
    // for their one reason.
    let fine = sign(&SessionClaims::new(&grant(&host), now()), &key).unwrap();
    assert_eq!(
        get(&s, &host, "/", &["-H", &token_cookie(fine)]).status,
        200
    );

    // A session issued by management with a 2 s lifetime stops working after it.
    let short_host = format!("short.{CLUSTER}");
    let short = login(&s, &short_host, "pin", PIN);
    assert_eq!(
        get(&s, &short_host, "/", &["-H", &format!("Cookie: {short}")]).status,
        200
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        get(&s, &short_host, "/", &["-H", &format!("Cookie: {short}")]).status,
        401
    );
    // A session of one service does not open another.
    assert_eq!(
        get(
            &s,
            &format!("other.{CLUSTER}"),
            "/",
            &["-H", &format!("Cookie: {good}")]
        )
        .status,
        401
    );
}

#[test]
fn failed_pins_lock_the_address_out() {
    let s = setup("auth-lockout", &[]);
    let host = format!("app.{CLUSTER}");
    for i in 1..=5 {
        let r = submit(&s, &host, "/", &[("method", "pin"), ("pin", "000000")]);
        assert_eq!(r.status, 401, "attempt {i}: {}", r.text());
    }
    let sixth = submit(&s, &host, "/", &[("method", "pin"), ("pin", "000000")]);
    assert_eq!(sixth.status, 429, "{}", sixth.text());
    let retry: u64 = sixth
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!(retry >= 1);
    // Even the right PIN is refused while locked.
    let right = submit(&s, &host, "/", &[("method", "pin"), ("pin", PIN)]);
    assert_eq!(right.status, 429);
    assert!(set_cookie(&right, "nb_session").is_none());
    // Header guesses count the same way.
    let guess = get(&s, &host, "/", &["-H", "X-API-Key: guess"]);
    assert_eq!(guess.status, 429);
    assert!(guess.header("retry-after").is_some());
    // Another service is not affected.
    let other = submit(
        &s,
        &format!("other.{CLUSTER}"),
        "/",
        &[("method", "pin"), ("pin", PIN)],
    );
    assert_eq!(other.status, 303);
}

#[test]
fn every_request_is_logged_and_losses_are_counted() {
    let mut s = setup("auth-logs", &[]);
    let host = format!("app.{CLUSTER}");
    let session = login(&s, &host, "password", PASSWORD);
    let cookie = format!("Cookie: {session}");
    let mut sent = 0;
    for path in ["/one", "/two", "/three"] {
        assert_eq!(get(&s, &host, path, &["-H", &cookie]).status, 200);
        sent += 1;
    }
    assert_eq!(
        get(&s, &host, "/denied", &["-H", "X-API-Key: wrong"]).status,
        401
    );
    let _ = sent;

    // Every request appears with its fields.
    let deadline = Instant::now() + Duration::from_secs(15);
    let entries = loop {
        let v = s.api.ok(
            "GET",
            &format!("/api/events/proxy?host={host}&page_size=100"),
            None,
        );
        let data = v["data"].as_array().cloned().unwrap_or_default();
        let found = ["/one", "/two", "/three", "/denied"]
            .iter()
            .all(|p| data.iter().any(|e| e["path"] == *p));
        if found {
            break data;
        }
        assert!(Instant::now() < deadline, "access logs missing: {v}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let one = entries.iter().find(|e| e["path"] == "/one").unwrap();
    assert_eq!(one["status_code"], 200);
    assert_eq!(one["method"], "GET");
    assert_eq!(one["source_ip"], "127.0.0.1");
    assert_eq!(one["user_id"], "password-user");
    assert_eq!(one["auth_method_used"], "password");
    assert_eq!(one["protocol"], "http");
    assert!(one["bytes_download"].as_i64().unwrap() > 0, "{one}");
    let denied = entries.iter().find(|e| e["path"] == "/denied").unwrap();
    assert_eq!(denied["status_code"], 401);
    assert_eq!(denied["auth_method_used"], "header");
    let login = entries
        .iter()
        .find(|e| e["path"] == "/__portcullis__/login")
        .expect("the login request is logged");
    assert_eq!(login["status_code"], 303);
    // Filters.
    let failed = s.api.ok(
        "GET",
        &format!("/api/events/proxy?host={host}&status=failed"),
        None,
    );
    assert!(
        failed["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["status_code"].as_i64().unwrap() >= 400)
    );

    // Management down: requests with a session still succeed (verified locally) and the lost
    // logs are counted.
    s.management.stop();
    let mut ok = 0;
    for i in 0..20 {
        let r = get(&s, &host, &format!("/offline/{i}"), &["-H", &cookie]);
        assert_eq!(r.status, 200, "request {i} failed while management is down");
        ok += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = s.proxy.health();
        let dropped = h["access_log"]["dropped"].as_u64().unwrap_or(0);
        if dropped >= ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drops not counted: {}",
            h["access_log"]
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
