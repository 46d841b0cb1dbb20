//! Starts the real `portcullis` binary for a test and stops it by PID, also on failure.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::certs::{TestCa, atomic_write};
use crate::process::Supervised;

/// Path of the proxy binary: `PORTCULLIS_BIN`, else next to the test executable's profile dir.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTCULLIS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/portcullis
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("portcullis");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p proxy` with the same profile, or `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// A port to listen on that is free now and no other test of this run will be handed.
///
/// Ports come from below the kernel's ephemeral range (32768+ here): a port taken from that
/// range can be grabbed as the source port of any outgoing connection (curl, the proxy's own
/// dials) before the server under test binds it. Each test process starts at its own offset and
/// walks the range with a shared counter, so parallel tests never pick the same port.
pub fn free_port() -> u16 {
    const FIRST: u32 = 12_000;
    const SPAN: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id().wrapping_mul(7919)) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN)
}

/// A fresh directory for one test; removed when dropped.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "portcullis-test-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            label
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct ProxyOptions {
    pub mappings: String,
    /// Names the default certificate covers.
    pub cert_names: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workers: usize,
    pub http_listener: bool,
    /// Run inside this network namespace, listening on `listen_ip`.
    pub netns: Option<String>,
    pub listen_ip: String,
    /// Fixed ports (picked with `free_port`), for peers that must know them before the start.
    pub https_port: Option<u16>,
    pub http_port: Option<u16>,
    /// A certificate directory of the caller's (shared by several proxies); default: the
    /// proxy's own.
    pub cert_dir: Option<PathBuf>,
    /// A command the proxy is started through (after `ip netns exec`), e.g. `setpriv` with
    /// capabilities dropped; it must exec the proxy so the PID stays the proxy's.
    pub command_prefix: Vec<String>,
}

impl ProxyOptions {
    pub fn new(mappings: impl Into<String>) -> Self {
        Self {
            mappings: mappings.into(),
            cert_names: vec!["*.test.internal".into(), "localhost".into()],
            env: Vec::new(),
            workers: 2,
            http_listener: false,
            netns: None,
            listen_ip: "127.0.0.1".into(),
            https_port: None,
            http_port: None,
            cert_dir: None,
            command_prefix: Vec::new(),
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
}

/// A running proxy.
pub struct Proxy {
    process: Supervised,
    pub pid: u32,
    pub dir: TestDir,
    pub ca: TestCa,
    pub https_port: u16,
    pub http_port: u16,
    pub health_port: u16,
    pub log: PathBuf,
    netns: Option<String>,
    cert_dir: PathBuf,
}

impl Proxy {
    pub fn start(opts: ProxyOptions) -> Proxy {
        let dir = TestDir::new("proxy");
        let ca = TestCa::new();
        let certs = opts.cert_dir.clone().unwrap_or_else(|| dir.0.join("certs"));
        let names: Vec<&str> = opts.cert_names.iter().map(String::as_str).collect();
        ca.write_leaf(&certs, "tls", &ca.leaf(&names));
        std::fs::write(dir.0.join("ca.pem"), &ca.pem).expect("ca file");
        let mappings = dir.0.join("mappings.toml");
        atomic_write(&mappings, opts.mappings.as_bytes());
        let https_port = opts.https_port.unwrap_or_else(free_port);
        let http_port = opts.http_port.unwrap_or_else(free_port);
        let health_port = free_port();
        let log = dir.0.join("proxy.log");
        let mut cmd = match (&opts.netns, opts.command_prefix.split_first()) {
            (None, None) => Command::new(binary()),
            (None, Some((first, rest))) => {
                let mut c = Command::new(first);
                c.args(rest).arg(binary());
                c
            }
            (Some(ns), _) => {
                // `ip netns exec` execs the proxy, so the PID stays the proxy's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .args(&opts.command_prefix)
                    .arg(binary());
                c
            }
        };
        cmd.arg("proxy")
            .env_remove("NB_PROXY_TOKEN")
            .env(
                "NB_PROXY_ADDRESS",
                format!("{}:{https_port}", opts.listen_ip),
            )
            .env(
                "NB_PROXY_HTTP_ADDRESS",
                if opts.http_listener {
                    format!("127.0.0.1:{http_port}")
                } else {
                    "off".to_string()
                },
            )
            .env(
                "NB_PROXY_HEALTH_ADDRESS",
                format!("127.0.0.1:{health_port}"),
            )
            .env("NB_PROXY_CERTIFICATE_DIRECTORY", &certs)
            .env("NB_PROXY_MAPPINGS_FILE", &mappings)
            .env("NB_PROXY_WORKERS", opts.workers.to_string())
            .env("NB_PROXY_RELOAD_INTERVAL", "200ms")
            .env("NB_PROXY_LOG_LEVEL", "debug");
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let process = Supervised::spawn(&mut cmd, "proxy", log.clone());
        let proxy = Proxy {
            pid: process.pid,
            process,
            dir,
            ca,
            https_port,
            http_port,
            health_port,
            log,
            netns: opts.netns.clone(),
            cert_dir: certs,
        };
        proxy.wait_healthy();
        proxy
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(h) = self.try_health()
                && h["status"] == "ok"
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("proxy did not become healthy; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// The network namespace the proxy runs in, if not the test's own.
    pub fn netns(&self) -> Option<String> {
        self.netns.clone()
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.0.join("ca.pem")
    }

    pub fn cert_dir(&self) -> PathBuf {
        self.cert_dir.clone()
    }

    /// Replaces the mappings file atomically.
    pub fn write_mappings(&self, toml: &str) {
        atomic_write(&self.dir.0.join("mappings.toml"), toml.as_bytes());
    }

    pub fn try_health(&self) -> Option<serde_json::Value> {
        let port = self.health_port;
        let body = crate::netns::run_in(self.netns.clone(), move || {
            crate::client::plain_get(("127.0.0.1", port), "/healthz")
        })
        .ok()?;
        serde_json::from_slice(&body).ok()
    }

    pub fn health(&self) -> serde_json::Value {
        self.try_health().expect("health endpoint answers")
    }

    /// True when the kernel fast path loaded; otherwise prints why the caller skips, and in CI
    /// (`CI` set) fails instead, since there it must load.
    pub fn fast_path_on(&self) -> bool {
        let state = self.health()["ebpf"].as_str().unwrap_or("").to_string();
        if state.starts_with("on") {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "in CI the fast path must load; /healthz says {state:?}; log:\n{}",
            self.log_text()
        );
        eprintln!("skipping: the kernel fast path is off here ({state})");
        false
    }

    /// Waits (bounded, 15 s) until `/healthz` satisfies `pred`.
    pub fn wait_health(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(h) = self.try_health()
                && pred(&h)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy never reached: {what}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) until the route table generation moves past `gen`.
    pub fn wait_table_generation_above(&self, generation: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.health()["route_table_generation"]
                .as_u64()
                .unwrap_or(0)
                > generation
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mappings were not reloaded; log:\n{}", self.log_text());
    }

    /// Peak resident memory of the proxy process so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        self.process
            .terminate(within)
            .unwrap_or_else(|| panic!("proxy did not exit within {within:?} after SIGTERM"))
    }

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https_port)
    }
}
