//! The protected services of the authentication tests: the real management on SQLite, a proxy
//! joined to it, and three services behind password, PIN and header authentication.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::Backend;
use crate::client::{CurlResponse, curl};
use crate::management::{Api, Management, StoreKind, TestStore};
use crate::proxy::{Proxy, ProxyOptions, TestDir, free_port};

pub const CLUSTER: &str = "auth.test";
pub const PASSWORD: &str = "correct horse battery";
pub const PIN: &str = "482913";
pub const API_KEY: &str = "k-9f8e7d6c5b4a";
pub const HTML: &str = "Accept: text/html,application/xhtml+xml";

pub struct Setup {
    pub backend: Backend,
    pub management: Management,
    pub store: TestStore,
    pub api: Api,
    pub proxy: Proxy,
    pub dir: TestDir,
}

pub fn auth_body(name: &str, domain: &str, port: u16, extra: Value) -> Value {
    let mut body = json!({
        "name": name,
        "domain": domain,
        "targets": [{"target_id": name, "target_type": "host", "protocol": "http",
                     "host": "127.0.0.1", "port": port}],
        "auth": {
            "password_auth": {"enabled": true, "password": PASSWORD},
            "pin_auth": {"enabled": true, "pin": PIN},
            "header_auths": [{"enabled": true, "header": "X-API-Key", "value": API_KEY}],
        },
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

/// Management (SQLite) with an account and its owner's API, a backend, and a proxy joined to
/// management for `*.auth.test` (certificate from the proxy's test CA), with three protected
/// services: `app` and `other` (password, PIN, header), `short` (PIN, 2 s sessions).
pub fn setup(label: &str, proxy_env: &[(&str, &str)]) -> Setup {
    let s = start(label, proxy_env, free_port(), &[]);
    for (name, extra) in [
        ("app", json!({})),
        ("other", json!({})),
        (
            "short",
            json!({"auth": {
                "pin_auth": {"enabled": true, "pin": PIN},
                "max_session_age_seconds": 2,
            }}),
        ),
    ] {
        let domain = format!("{name}.{CLUSTER}");
        let mut body = auth_body(name, &domain, s.backend.port(), json!({}));
        if let Some(auth) = extra.get("auth") {
            body["auth"] = auth.clone();
        }
        let (status, v) = s
            .api
            .call("POST", "/api/reverse-proxies/services", Some(&body));
        assert_eq!(status, 200, "create {name}: {v}");
    }
    for name in ["app", "other", "short"] {
        wait_status(&s, &format!("{name}.{CLUSTER}"), 401);
    }
    s
}

/// What `setup` starts, without services: management's REST API on `management_http_port`
/// (so a test can tell an identity provider its callback beforehand), with extra environment.
pub fn start(
    label: &str,
    proxy_env: &[(&str, &str)],
    management_http_port: u16,
    management_env: &[(String, String)],
) -> Setup {
    let dir = TestDir::new(label);
    let store = TestStore::new(StoreKind::Sqlite, &dir).expect("sqlite store");
    let management = Management::start_on(
        &dir,
        &store.url,
        "2s",
        free_port(),
        management_http_port,
        management_env,
    );
    let (_, pat) = management.bootstrap("owner@auth.test");
    let api = management.api(&pat);
    let (_, token) = api.create_proxy_token("auth-proxy");
    let backend = Backend::start("protected");
    let mut opts = ProxyOptions::new("")
        .env("NB_PROXY_MANAGEMENT_ADDRESS", &management.grpc_url())
        .env("NB_PROXY_TOKEN", &token)
        .env("NB_PROXY_ALLOW_INSECURE", "true")
        .env("NB_PROXY_DOMAIN", CLUSTER);
    for (k, v) in proxy_env {
        opts = opts.env(k, v);
    }
    opts.cert_names = vec![format!("*.{CLUSTER}")];
    let proxy = Proxy::start(opts);
    proxy.wait_health("initial sync", |h| h["initial_sync_complete"] == true);
    Setup {
        backend,
        management,
        store,
        api,
        proxy,
        dir,
    }
}

pub fn wait_status(s: &Setup, host: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = get(s, host, "/", &[]).status;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host} still answers {got}, not {want}\n{}",
            s.proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn get(s: &Setup, host: &str, path: &str, extra: &[&str]) -> CurlResponse {
    curl(&s.proxy.ca_path(), host, s.proxy.https_port, path, extra)
}

/// The private session key management stored for `domain` (read from the SQLite file, the
/// way an attacker with the key would sign; used to build tokens that fail for one reason).
pub fn session_private_key(s: &Setup, domain: &str) -> String {
    let db = s.store.sqlite_path.as_ref().expect("sqlite");
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             print(c.execute('select a.session_private_key from service_auth a join services s \
             on s.id=a.service_id where s.domain=?', (sys.argv[2],)).fetchone()[0])",
        )
        .arg(db)
        .arg(domain)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
