//! The real management server for tests: started by PID, stopped by PID, on SQLite or on the
//! PostgreSQL that `cargo xtask test` runs (`PORTCULLIS_TEST_PG_URL`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::{Supervised, stdout_of};
use crate::proxy::{TestDir, binary, free_port};

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// A store for one test: a SQLite file, or a fresh database on the test PostgreSQL.
pub struct TestStore {
    pub url: String,
    pub kind: StoreKind,
    pub sqlite_path: Option<PathBuf>,
}

impl TestStore {
    /// `None` (with the reason printed) when PostgreSQL is wanted but not available here.
    pub fn new(kind: StoreKind, dir: &TestDir) -> Option<TestStore> {
        match kind {
            StoreKind::Sqlite => {
                let path = dir.0.join("management.db");
                Some(TestStore {
                    url: format!("sqlite://{}", path.display()),
                    kind,
                    sqlite_path: Some(path),
                })
            }
            StoreKind::Postgres => {
                let Ok(base) = std::env::var("PORTCULLIS_TEST_PG_URL") else {
                    assert!(
                        std::env::var_os("CI").is_none(),
                        "PORTCULLIS_TEST_PG_URL is not set in CI: run the tests through `cargo xtask test`"
                    );
                    eprintln!(
                        "skipping the PostgreSQL run: PORTCULLIS_TEST_PG_URL is not set (use `cargo xtask test`)"
                    );
                    return None;
                };
                static N: AtomicU32 = AtomicU32::new(0);
                let db = format!(
                    "t{}_{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                );
                stdout_of(
                    Command::new("psql")
                        .arg(&base)
                        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
                        .arg(format!("CREATE DATABASE {db}")),
                    "psql CREATE DATABASE",
                );
                let url = match base.rsplit_once('/') {
                    Some((prefix, _)) => format!("{prefix}/{db}"),
                    None => panic!("PORTCULLIS_TEST_PG_URL must end with /DATABASE"),
                };
                Some(TestStore {
                    url,
                    kind,
                    sqlite_path: None,
                })
            }
        }
    }

    /// Everything the store holds, as text, to look for secrets in.
    pub fn dump(&self) -> String {
        match self.kind {
            StoreKind::Sqlite => {
                let path = self.sqlite_path.as_ref().expect("sqlite path");
                let mut all = Vec::new();
                for suffix in ["", "-wal", "-shm"] {
                    let p = PathBuf::from(format!("{}{suffix}", path.display()));
                    if let Ok(bytes) = std::fs::read(&p) {
                        all.extend(bytes);
                    }
                }
                String::from_utf8_lossy(&all).into_owned()
            }
            StoreKind::Postgres => {
                let dump = stdout_of(
                    Command::new("pg_dump")
                        .arg(&self.url)
                        .args(["--data-only", "--inserts"]),
                    "pg_dump",
                );
                String::from_utf8_lossy(&dump).into_owned()
            }
        }
    }
}

/// A running management server.
pub struct Management {
    process: Supervised,
    pub pid: u32,
    pub store_url: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub log: PathBuf,
    heartbeat: String,
    env: Vec<(String, String)>,
    /// The address both listeners are on (127.0.0.1 unless started with `start_in_netns`).
    pub ip: String,
    /// The network namespace it runs in, if not the test's own.
    pub netns: Option<String>,
}

impl Management {
    pub fn start(dir: &TestDir, store_url: &str, heartbeat: &str) -> Management {
        Self::start_on(dir, store_url, heartbeat, free_port(), free_port(), &[])
    }

    /// `start` with extra environment (e.g. TLS files).
    pub fn start_with_env(
        dir: &TestDir,
        store_url: &str,
        heartbeat: &str,
        env: &[(String, String)],
    ) -> Management {
        Self::start_on(dir, store_url, heartbeat, free_port(), free_port(), env)
    }

    pub fn start_on(
        dir: &TestDir,
        store_url: &str,
        heartbeat: &str,
        grpc_port: u16,
        http_port: u16,
        env: &[(String, String)],
    ) -> Management {
        Self::start_full(
            dir,
            store_url,
            heartbeat,
            grpc_port,
            http_port,
            env,
            None,
            "127.0.0.1",
        )
    }

    /// Starts inside network namespace `netns`, both listeners on `ip` (an address of that
    /// namespace), so peers in other namespaces reach it. REST calls through `api` and
    /// `request_at` run inside the namespace.
    pub fn start_in_netns(
        dir: &TestDir,
        store_url: &str,
        heartbeat: &str,
        netns: &str,
        ip: &str,
        env: &[(String, String)],
    ) -> Management {
        Self::start_full(
            dir,
            store_url,
            heartbeat,
            free_port(),
            free_port(),
            env,
            Some(netns.to_string()),
            ip,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start_full(
        dir: &TestDir,
        store_url: &str,
        heartbeat: &str,
        grpc_port: u16,
        http_port: u16,
        env: &[(String, String)],
        netns: Option<String>,
        ip: &str,
    ) -> Management {
        static N: AtomicU32 = AtomicU32::new(0);
        let log = dir.0.join(format!(
            "management-{}.log",
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = match &netns {
            None => Command::new(binary()),
            Some(ns) => {
                // `ip netns exec` execs management, so the PID stays its own.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary());
                c
            }
        };
        let process = Supervised::spawn(
            cmd.args(["management", "serve"])
                .env("PORTCULLIS_STORE_URL", store_url)
                .env("PORTCULLIS_GRPC_ADDRESS", format!("{ip}:{grpc_port}"))
                .env("PORTCULLIS_HTTP_ADDRESS", format!("{ip}:{http_port}"))
                .env("PORTCULLIS_HEARTBEAT_INTERVAL", heartbeat)
                .env("RUST_LOG", "info")
                .envs(env.iter().map(|(k, v)| (k, v))),
            "management",
            log.clone(),
        );
        let m = Management {
            pid: process.pid,
            process,
            store_url: store_url.to_string(),
            grpc_port,
            http_port,
            log,
            heartbeat: heartbeat.to_string(),
            env: env.to_vec(),
            ip: ip.to_string(),
            netns: netns.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((401, _)) = request_at(
                netns.clone(),
                &m.ip,
                http_port,
                "GET",
                "/api/users",
                None,
                None,
            ) {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("management did not start; log:\n{}", m.log_text());
    }

    /// Stops (SIGTERM, then SIGKILL after 10 s) and starts again on the same ports and store.
    pub fn restart(&mut self, dir: &TestDir) {
        self.stop();
        let again = Management::start_full(
            dir,
            &self.store_url.clone(),
            &self.heartbeat.clone(),
            self.grpc_port,
            self.http_port,
            &self.env.clone(),
            self.netns.clone(),
            &self.ip.clone(),
        );
        *self = again;
    }

    pub fn stop(&mut self) {
        let _ = self.process.terminate(Duration::from_secs(10));
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.grpc_port)
    }

    /// Runs `portcullis management ARGS` on this server's store; returns stdout.
    fn cli(&self, args: &[&str]) -> String {
        let out = stdout_of(
            Command::new(binary())
                .arg("management")
                .args(args)
                .env("PORTCULLIS_STORE_URL", &self.store_url),
            &format!("management {args:?}"),
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Creates an account with an owner through the CLI; returns (account id, owner PAT).
    pub fn bootstrap(&self, email: &str) -> (String, String) {
        let text = self.cli(&["bootstrap", "--email", email]);
        let account = text
            .lines()
            .find_map(|l| l.strip_prefix("account "))
            .expect("account line")
            .trim()
            .to_string();
        (account, shown_once(&text))
    }

    /// A management-wide proxy token through the CLI.
    pub fn shared_token(&self, name: &str) -> String {
        shown_once(&self.cli(&["proxy-token", "--shared", "--name", name]))
    }

    pub fn api(&self, pat: &str) -> Api {
        Api {
            port: self.http_port,
            pat: pat.to_string(),
            ip: self.ip.clone(),
            netns: self.netns.clone(),
        }
    }
}

/// The REST API as one user sees it.
pub struct Api {
    pub port: u16,
    pub pat: String,
    /// Where management listens (127.0.0.1 unless it runs in a namespace).
    pub ip: String,
    pub netns: Option<String>,
}

impl Api {
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        request_at(
            self.netns.clone(),
            &self.ip,
            self.port,
            method,
            path,
            Some(&self.pat),
            body,
        )
        .expect("REST call")
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert_eq!(status, 200, "{method} {path} → {status}: {v}");
        v
    }

    pub fn create_proxy_token(&self, name: &str) -> (String, String) {
        let v = self.ok(
            "POST",
            "/api/reverse-proxies/proxy-tokens",
            Some(&serde_json::json!({"name": name, "expires_in": 0})),
        );
        (
            v["id"].as_str().expect("id").to_string(),
            v["plain_token"].as_str().expect("plain_token").to_string(),
        )
    }

    /// Creates an http service with one target on loopback; returns its id.
    pub fn create_service(&self, name: &str, domain: &str, port: u16) -> String {
        let v = self.ok(
            "POST",
            "/api/reverse-proxies/services",
            Some(&service_body(name, domain, port)),
        );
        v["id"].as_str().expect("id").to_string()
    }

    pub fn clusters(&self) -> Vec<Value> {
        self.ok("GET", "/api/reverse-proxies/clusters", None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// The secret the CLI prints once: what follows "(shown once): " on its line.
fn shown_once(text: &str) -> String {
    text.lines()
        .find_map(|l| l.split("(shown once): ").nth(1))
        .expect("a line with the secret")
        .trim()
        .to_string()
}

pub fn service_body(name: &str, domain: &str, port: u16) -> Value {
    serde_json::json!({
        "name": name,
        "domain": domain,
        "targets": [{"target_id": name, "target_type": "host", "protocol": "http",
                     "host": "127.0.0.1", "port": port}],
    })
}

/// `request` to `ip:port` from inside network namespace `netns` (the test's own when None).
pub fn request_at(
    netns: Option<String>,
    ip: &str,
    port: u16,
    method: &str,
    path: &str,
    pat: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    if netns.is_none() {
        return request_to(ip, port, method, path, pat, body);
    }
    let (ip, method, path) = (ip.to_string(), method.to_string(), path.to_string());
    let (pat, body) = (pat.map(str::to_string), body.cloned());
    crate::netns::run_in(netns, move || {
        request_to(&ip, port, &method, &path, pat.as_deref(), body.as_ref())
    })
}

/// One HTTP/1.1 request with `Connection: close`, bounded by a 10 s timeout.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    pat: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    request_to("127.0.0.1", port, method, path, pat, body)
}

fn request_to(
    ip: &str,
    port: u16,
    method: &str,
    path: &str,
    pat: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let mut s = TcpStream::connect((ip, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = pat
        .map(|p| format!("Authorization: Token {p}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let resp = crate::client::parse_response(&raw);
    let json = if resp.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&resp.body).unwrap_or(Value::String(resp.text()))
    };
    Ok((resp.status, json))
}
