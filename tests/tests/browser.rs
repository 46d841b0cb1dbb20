//! Sign-in pages in a real browser: headless Chromium (over WebDriver) against the real proxy
//! and management, and for single sign-on a real OpenID Connect provider (`oidc-provider` on
//! Node.js, `tests/oidc/`). Screenshots go to `target/test-screenshots/` (`login.png` is the
//! sign-in page).
//!
//! The first two tests check the harness alone (a browser on a loopback page, the identity
//! provider's discovery document and a code flow through its sign-in pages); the others the
//! product.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::auth_setup::{
    CLUSTER, HTML, PASSWORD, PIN, Setup, auth_body, session_private_key, setup, start, wait_status,
};
use tests::backend::Backend;
use tests::browser::Browser;
use tests::client::curl;
use tests::oidc::{OidcProvider, form_encode, jwt_claims};
use tests::proxy::{TestDir, free_port};

const WAIT: Duration = Duration::from_secs(20);
const PAGE: &str = "/some/page?tab=2";

fn screenshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/test-screenshots/{name}"))
}

/// Saves a screenshot, checks it is a PNG of some size, prints where it is.
fn screenshot(b: &Browser, name: &str) {
    let path = screenshot_path(name);
    let bytes = b.screenshot(&path);
    assert!(bytes > 1000, "screenshot of {bytes} bytes");
    let png = std::fs::read(&path).expect("read screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    eprintln!("screenshot: {}", path.display());
}

fn page_url(s: &Setup, host: &str, path: &str) -> String {
    format!("https://{host}.{CLUSTER}:{}{path}", s.proxy.https_port)
}

/// Polls (≤ 20 s) until the page is the backend's JSON echo; returns it.
fn wait_for_echo(b: &Browser, what: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = b.text();
        if let Ok(v) = serde_json::from_str::<Value>(&text)
            && v["backend"].is_string()
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no backend echo at {}:\n{}",
            b.url(),
            b.source()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The values of header `name` (any case) in a backend echo.
fn echoed(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .filter_map(|h| h[1].as_str().map(str::to_string))
        .collect()
}

/// The protected page, served by the backend, with the identity the proxy vouched for.
fn landed(b: &Browser, user: &str) -> Value {
    let echo = wait_for_echo(b, "the protected page");
    assert_eq!(echo["backend"], "protected", "{echo}");
    assert_eq!(echo["path"], PAGE, "{echo}");
    assert_eq!(echoed(&echo, "x-netbird-user"), [user], "{echo}");
    assert!(b.url().ends_with(PAGE), "landed on {}", b.url());
    echo
}

// ---- the harness alone ----

#[test]
fn browser_harness_opens_a_loopback_page_and_takes_a_screenshot() {
    let dir = TestDir::new("browser-harness");
    let backend = Backend::start("harness");
    let Some(b) = Browser::start(&dir, "harness.test") else {
        return;
    };
    b.goto(&format!("http://127.0.0.1:{}/hello?x=1", backend.port()));
    let echo = wait_for_echo(&b, "a loopback page");
    assert_eq!(echo["backend"], "harness");
    assert_eq!(echo["path"], "/hello?x=1");
    screenshot(&b, "harness.png");
    // Names of the test's domain go to loopback.
    b.goto(&format!(
        "http://page.harness.test:{}/mapped",
        backend.port()
    ));
    let echo = wait_for_echo(&b, "a mapped name");
    assert_eq!(
        echoed(&echo, "host"),
        [format!("page.harness.test:{}", backend.port())]
    );
    assert_eq!(b.status(), Some(200));
    // Any other name resolves to nothing: the browser reaches loopback only.
    let err = b
        .try_goto(&format!("http://elsewhere.example:{}/", backend.port()))
        .expect_err("a name outside the test's domain must not resolve");
    assert!(err.to_string().contains("ERR_NAME_NOT_RESOLVED"), "{err}");
}

#[test]
fn identity_provider_discovery_and_a_code_flow_through_its_sign_in_pages() {
    let dir = TestDir::new("oidc-harness");
    let callback = Backend::start("callback");
    let redirect_uri = format!("http://127.0.0.1:{}/cb", callback.port());
    let Some(idp) = OidcProvider::start(&dir, &redirect_uri) else {
        return;
    };
    let d = idp.discovery();
    assert_eq!(d["issuer"], idp.issuer.as_str(), "{d}");
    for key in ["authorization_endpoint", "token_endpoint", "jwks_uri"] {
        let url = d[key].as_str().unwrap_or_default();
        assert!(url.starts_with(&idp.issuer), "{key}: {d}");
    }
    for claim in ["email", "groups"] {
        assert!(
            d["claims_supported"]
                .as_array()
                .is_some_and(|a| a.iter().any(|c| c == claim)),
            "{claim}: {d}"
        );
    }
    let Some(b) = Browser::start(&dir, "harness.test") else {
        return;
    };
    b.goto(&format!(
        "{}/auth?client_id={}&redirect_uri={}&response_type=code&scope={}&state=s-1&nonce=n-1",
        idp.issuer,
        form_encode(&idp.client_id),
        form_encode(&redirect_uri),
        form_encode("openid email profile"),
    ));
    sign_in_at_provider(&b, &idp, "alice", Some("oidc-provider.png"));
    let echo = wait_for_echo(&b, "the client's redirect URI");
    let path = echo["path"].as_str().unwrap_or_default();
    assert!(path.starts_with("/cb?"), "{echo}");
    let code = path
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("code="))
        .unwrap_or_else(|| panic!("no code in {path}"));
    assert!(path.contains("state=s-1"), "{path}");
    let tokens = idp.redeem(code, &redirect_uri);
    let claims = jwt_claims(tokens["id_token"].as_str().expect("an ID token"));
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["email"], "alice@example.com", "{claims}");
    assert_eq!(claims["groups"], json!(["staff"]), "{claims}");
    assert_eq!(claims["aud"], idp.client_id.as_str(), "{claims}");
}

/// Goes through the provider's development sign-in pages as `login` (any password), then its
/// consent page, until the browser leaves the provider. Each page is told apart by its
/// `input[name=prompt]` (both are titled "Sign-in"). Bounded: ≤ 20 s, ≤ 3 of each page.
fn sign_in_at_provider(b: &Browser, idp: &OidcProvider, login: &str, shot: Option<&str>) {
    let deadline = Instant::now() + WAIT;
    let (mut logins, mut consents) = (0, 0);
    loop {
        if b.has("form input[name=prompt][value=login]") {
            logins += 1;
            assert!(
                logins <= 3,
                "the provider keeps asking to sign in:\n{}\n{}",
                b.source(),
                idp.log_text()
            );
            if let (1, Some(name)) = (logins, shot) {
                screenshot(b, name);
            }
            b.type_into("form input[name=login]", login);
            b.type_into("form input[name=password]", "any password");
            b.click("form button[type=submit]");
        } else if b.has("form input[name=prompt][value=consent]") {
            consents += 1;
            assert!(consents <= 3, "the provider keeps asking for consent");
            b.click("form button[type=submit]");
        } else if !b.url().starts_with(&format!("{}/", idp.issuer)) && logins > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sign-in at the provider did not finish (at {}):\n{}\n{}",
            b.url(),
            b.source(),
            idp.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- password and PIN ----

fn open_sign_in(s: &Setup, label: &str) -> Option<Browser> {
    let b = Browser::start(&s.dir, CLUSTER)?;
    b.goto(&page_url(s, "app", PAGE));
    b.wait_for(&format!("{label}: the sign-in page"), |src| {
        src.contains("Sign in") && src.contains("name=\"password\"")
    });
    Some(b)
}

fn sign_in(b: &Browser, method: &str, secret: &str) {
    b.type_into(
        &format!("form[data-method={method}] input[name={method}]"),
        secret,
    );
    b.click(&format!("form[data-method={method}] button[type=submit]"));
}

#[test]
fn password_sign_in_with_a_screenshot_of_the_page() {
    let s = setup("browser-password", &[]);
    let Some(b) = open_sign_in(&s, "password") else {
        return;
    };
    assert_eq!(b.status(), Some(401));
    assert!(b.has("form[data-method=pin] input[name=pin]"));
    screenshot(&b, "login.png");
    sign_in(&b, "password", PASSWORD);
    landed(&b, "password-user");
}

#[test]
fn pin_sign_in() {
    let s = setup("browser-pin", &[]);
    let Some(b) = open_sign_in(&s, "pin") else {
        return;
    };
    sign_in(&b, "pin", PIN);
    landed(&b, "pin-user");
}

#[test]
fn wrong_password_then_the_right_one() {
    let s = setup("browser-retry", &[]);
    let Some(b) = open_sign_in(&s, "retry") else {
        return;
    };
    sign_in(&b, "password", "not the password");
    b.wait_for("the error message", |src| src.contains("Wrong password"));
    assert_eq!(b.status(), Some(401));
    assert!(b.text().contains("Wrong password"), "visible: {}", b.text());
    screenshot(&b, "login-wrong-password.png");
    assert!(!b.source().contains("x-netbird-user"));
    sign_in(&b, "password", PASSWORD);
    landed(&b, "password-user");
}

// ---- single sign-on ----

/// The proxy and management, management's single sign-on pointed at a fresh provider, a group
/// `staff`, and service `sso.auth.test` (password, PIN and SSO for `staff`). Field order is
/// drop order: the provider stops before the rest.
struct Sso {
    idp: OidcProvider,
    s: Setup,
    _idp_dir: TestDir,
}

fn sso_setup(label: &str) -> Option<Sso> {
    let management_port = free_port();
    let base = format!("http://127.0.0.1:{management_port}");
    let idp_dir = TestDir::new(&format!("{label}-idp"));
    // Before management: it may read the discovery document when told the issuer.
    let idp = OidcProvider::start(&idp_dir, &format!("{base}/oauth2/callback"))?;
    let s = start(
        label,
        &[],
        management_port,
        &[("PORTCULLIS_PUBLIC_URL".into(), base)],
    );
    let (status, v) = s.api.call(
        "PUT",
        "/api/identity-provider",
        Some(&json!({
            "issuer": idp.issuer,
            "client_id": idp.client_id,
            "client_secret": idp.client_secret,
            "groups_claim": "groups",
        })),
    );
    assert!(
        (200..300).contains(&status),
        "PUT /api/identity-provider: {status} {v}"
    );
    let (status, group) = s
        .api
        .call("POST", "/api/groups", Some(&json!({"name": "staff"})));
    assert!(
        (200..300).contains(&status),
        "POST /api/groups: {status} {group}"
    );
    let staff = group["id"].as_str().expect("group id").to_string();
    let domain = format!("sso.{CLUSTER}");
    let mut body = auth_body("sso", &domain, s.backend.port(), json!({}));
    body["auth"]["bearer_auth"] = json!({"enabled": true, "distribution_groups": [staff]});
    let (status, v) = s
        .api
        .call("POST", "/api/reverse-proxies/services", Some(&body));
    assert_eq!(status, 200, "create sso: {v}");
    wait_status(&s, &domain, 401);
    Some(Sso {
        idp,
        s,
        _idp_dir: idp_dir,
    })
}

/// Opens the protected page, follows the sign-in page's single sign-on link and signs in at
/// the provider as `login`.
fn sso_round_trip(sso: &Sso, b: &Browser, login: &str, shot: Option<&str>) {
    b.goto(&page_url(&sso.s, "sso", PAGE));
    b.wait_for("the sign-in page with single sign-on", |src| {
        src.contains("Sign in") && src.contains("id=\"sso\"")
    });
    assert!(
        b.has("a#sso[href^='/__portcullis__/sso?return_to=']"),
        "{}",
        b.source()
    );
    b.click("a#sso");
    sign_in_at_provider(b, &sso.idp, login, shot);
}

#[test]
fn single_sign_on_as_a_member_of_the_allowed_group() {
    let Some(sso) = sso_setup("browser-sso") else {
        return;
    };
    let Some(b) = Browser::start(&sso.s.dir, CLUSTER) else {
        return;
    };
    sso_round_trip(&sso, &b, "alice", Some("sso-provider-login.png"));
    landed(&b, "alice@example.com");
    // Management created the user on first sign-in.
    let (status, users) = sso.s.api.call("GET", "/api/users", None);
    assert_eq!(status, 200, "{users}");
    assert!(users.to_string().contains("alice@example.com"), "{users}");
    // The session cookie holds: the page opens again without signing in.
    b.goto(&page_url(&sso.s, "sso", PAGE));
    landed(&b, "alice@example.com");
}

#[test]
fn single_sign_on_outside_the_allowed_group_is_denied() {
    let Some(sso) = sso_setup("browser-sso-denied") else {
        return;
    };
    let Some(b) = Browser::start(&sso.s.dir, CLUSTER) else {
        return;
    };
    sso_round_trip(&sso, &b, "bob", None);
    let src = b.wait_for("the access denied page", |src| {
        src.contains("Access denied")
    });
    screenshot(&b, "sso-access-denied.png");
    assert_eq!(b.status(), Some(403), "{src}");
    assert!(
        b.url().starts_with(&format!(
            "https://sso.{CLUSTER}:{}/",
            sso.s.proxy.https_port
        )),
        "denied at {}",
        b.url()
    );
    assert!(!src.contains("x-netbird-user"), "{src}");
    // No session: the page asks to sign in again.
    b.goto(&page_url(&sso.s, "sso", PAGE));
    b.wait_for("the sign-in page again", |src| src.contains("id=\"sso\""));
    assert_eq!(b.status(), Some(401));
}

/// Login CSRF: a valid session token that reaches a browser which did not start the sign-in
/// (no `nb_sso` cookie matching the way back's nonce) is refused without a session; the same
/// token with the matching pair signs in.
#[test]
fn a_sign_in_finished_in_another_browser_is_refused() {
    let Some(sso) = sso_setup("browser-sso-csrf") else {
        return;
    };
    let domain = format!("sso.{CLUSTER}");
    let token = proto::session::sign(
        &proto::session::SessionClaims::new(
            &proto::session::SessionGrant {
                user_id: "mallory".into(),
                email: "mallory@example.com".into(),
                domain: domain.clone(),
                method: "oidc".into(),
                max_age_secs: 300,
                ..Default::default()
            },
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64,
        ),
        &session_private_key(&sso.s, &domain),
    )
    .expect("sign");
    let nonce = "bm9uY2Utb2YtdGhpcy1icm93c2Vy";
    let path = format!("{PAGE}&session_token={token}&nb_sso={nonce}");
    let ask = |extra: &[&str]| {
        let mut args = vec!["-H", HTML];
        args.extend_from_slice(extra);
        curl(
            &sso.s.proxy.ca_path(),
            &domain,
            sso.s.proxy.https_port,
            &path,
            &args,
        )
    };
    for cookie in [None, Some("nb_sso=c29tZW9uZS1lbHNlcy1ub25jZQ")] {
        let header = cookie.map(|c| format!("Cookie: {c}"));
        let extra: Vec<&str> = header.iter().flat_map(|h| ["-H", h.as_str()]).collect();
        let r = ask(&extra);
        assert_eq!(r.status, 403, "{}", r.text());
        assert!(r.text().contains("another browser"), "{}", r.text());
        assert!(
            r.header("set-cookie")
                .is_none_or(|c| !c.contains("nb_session="))
        );
    }
    let r = ask(&["-H", &format!("Cookie: nb_sso={nonce}")]);
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location"), Some(PAGE));
    let cookies: Vec<&str> = r
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(
        cookies.iter().any(|c| c.starts_with("nb_session=")),
        "{cookies:?}"
    );
    assert!(
        cookies.iter().any(|c| c.starts_with("nb_sso=;")),
        "the binding cookie is cleared: {cookies:?}"
    );
}
