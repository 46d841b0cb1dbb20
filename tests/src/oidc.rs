//! The identity provider of the single sign-on tests: `oidc-provider` (npm, a certified OpenID
//! Connect provider) run by Node.js on loopback from `tests/oidc/provider.mjs`, with its
//! development sign-in pages (any login, any password). `cargo xtask test` installs Node.js and
//! `npm ci`s the package into `tests/oidc/node_modules`.
//!
//! Accounts: `alice` (alice@example.com, groups `["staff"]`), `bob` (bob@example.com, groups
//! `["guests"]`); any other login gets `LOGIN@example.com` and no groups.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use crate::client::parse_response;
use crate::process::Supervised;
use crate::proxy::{TestDir, free_port};

pub const CLIENT_ID: &str = "portcullis-test";
pub const CLIENT_SECRET: &str = "portcullis-test-secret";
const WAIT: Duration = Duration::from_secs(20);

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// A running provider; stopped (by PID) when dropped.
pub struct OidcProvider {
    process: Supervised,
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
}

/// Why the provider cannot run here, if it cannot.
fn missing() -> Option<String> {
    let node = Command::new("node").arg("--version").output();
    if !node.as_ref().is_ok_and(|o| o.status.success()) {
        return Some("Node.js (`node`) is not installed".into());
    }
    let package = oidc_dir().join("node_modules/oidc-provider/package.json");
    if !package.exists() {
        return Some(format!(
            "{} is missing (`npm ci` in tests/oidc)",
            package.display()
        ));
    }
    None
}

impl OidcProvider {
    /// Starts the provider on a free loopback port with one confidential client
    /// (`client_secret_basic`, authorization code, PKCE allowed) whose only redirect URI is
    /// `redirect_uri`. `None` (reason printed) when Node.js or the package is missing; in CI
    /// (`CI` set) that fails instead.
    pub fn start(dir: &TestDir, redirect_uri: &str) -> Option<OidcProvider> {
        if let Some(why) = missing() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{why} in CI: run the tests through `cargo xtask test`"
            );
            eprintln!("skipping: {why} (`cargo xtask test` installs it)");
            return None;
        }
        let port = free_port();
        let process = Supervised::spawn(
            Command::new("node")
                .arg("provider.mjs")
                .arg(port.to_string())
                .arg(redirect_uri)
                .env("OIDC_CLIENT_ID", CLIENT_ID)
                .env("OIDC_CLIENT_SECRET", CLIENT_SECRET)
                .current_dir(oidc_dir()),
            "oidc-provider",
            dir.0.join(format!("oidc-provider-{port}.log")),
        );
        let issuer = format!("http://127.0.0.1:{port}");
        let ready = format!("oidc-provider ready {issuer}");
        let deadline = Instant::now() + WAIT;
        while !process.log_text().contains(&ready) {
            assert!(
                Instant::now() < deadline,
                "oidc-provider did not start within {WAIT:?}:\n{}",
                process.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(OidcProvider {
            process,
            port,
            issuer,
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
        })
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// `GET /.well-known/openid-configuration`.
    pub fn discovery(&self) -> Value {
        let (status, body) = http(
            self.port,
            "GET",
            "/.well-known/openid-configuration",
            &[],
            "",
        );
        assert_eq!(status, 200, "discovery: {body}");
        serde_json::from_str(&body).expect("discovery document is JSON")
    }

    /// Redeems an authorization code at the token endpoint (as the client, HTTP Basic);
    /// returns the token response.
    pub fn redeem(&self, code: &str, redirect_uri: &str) -> Value {
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.client_id, self.client_secret));
        let form = format!(
            "grant_type=authorization_code&code={}&redirect_uri={}",
            form_encode(code),
            form_encode(redirect_uri)
        );
        let (status, body) = http(
            self.port,
            "POST",
            "/token",
            &[
                ("Authorization", &format!("Basic {basic}")),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &form,
        );
        assert_eq!(status, 200, "token endpoint: {body}\n{}", self.log_text());
        serde_json::from_str(&body).expect("token response is JSON")
    }
}

/// The claims of a JWT (its payload, not verified).
pub fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .expect("JWT payload is base64url");
    serde_json::from_slice(&bytes).expect("JWT payload is JSON")
}

/// `application/x-www-form-urlencoded` value encoding.
pub fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with `Connection: close`, bounded by 10 s.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to oidc-provider");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body.as_bytes()))
        .expect("send to oidc-provider");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read from oidc-provider");
    let resp = parse_response(&raw);
    (resp.status, resp.text())
}
