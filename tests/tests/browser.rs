//! Sign-in pages in a real browser: headless Chromium (over WebDriver) against the real proxy
//! and management. A screenshot of the sign-in page is saved to
//! `target/test-screenshots/login.png`.

use std::path::PathBuf;

use tests::auth_setup::{CLUSTER, PASSWORD, PIN, Setup, setup};
use tests::browser::Browser;

fn page_url(s: &Setup, path: &str) -> String {
    format!("https://app.{CLUSTER}:{}{path}", s.proxy.https_port)
}

fn open_sign_in(s: &Setup, label: &str) -> Option<Browser> {
    let b = Browser::start(&s.dir, CLUSTER)?;
    b.goto(&page_url(s, "/some/page?tab=2"));
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

/// The backend's echo of the page asked for, with the identity the proxy sent.
fn landed(b: &Browser, user: &str) {
    let src = b.wait_for("the protected page", |src| {
        src.contains("x-netbird-user") || src.contains("X-NetBird-User")
    });
    assert!(src.contains(user), "{src}");
    assert!(
        b.url().ends_with("/some/page?tab=2"),
        "landed on {}",
        b.url()
    );
}

#[test]
fn password_sign_in_with_a_screenshot_of_the_page() {
    let s = setup("browser-password", &[]);
    let Some(b) = open_sign_in(&s, "password") else {
        return;
    };
    let shot =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-screenshots/login.png");
    let bytes = b.screenshot(&shot);
    assert!(bytes > 1000, "screenshot of {bytes} bytes");
    eprintln!("sign-in page screenshot: {}", shot.display());
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
    assert!(!b.source().contains("x-netbird-user"));
    sign_in(&b, "password", PASSWORD);
    landed(&b, "password-user");
}
