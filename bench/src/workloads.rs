//! The five workloads and how one run of each is measured against one proxy.

use std::time::Duration;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::client;
use crate::contestants::{Contestant, LARGE_PATH, SERVICE_HOST, SMALL_PATH};
use crate::process::{cpu_time, rss_kib};
use crate::wrk::{self, WrkLoad};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    #[serde(rename = "https-keepalive")]
    HttpsKeepAlive,
    TlsHandshake,
    LargeResponse,
    IdleTls,
    #[serde(rename = "http-keepalive")]
    HttpKeepAlive,
    #[serde(rename = "https-session")]
    HttpsSession,
}

pub const ALL: [Workload; 6] = [
    Workload::HttpsKeepAlive,
    Workload::TlsHandshake,
    Workload::LargeResponse,
    Workload::IdleTls,
    Workload::HttpKeepAlive,
    Workload::HttpsSession,
];

impl Workload {
    pub fn id(self) -> &'static str {
        match self {
            Workload::HttpsKeepAlive => "https-keepalive",
            Workload::TlsHandshake => "tls-handshake",
            Workload::LargeResponse => "large-response",
            Workload::IdleTls => "idle-tls",
            Workload::HttpKeepAlive => "http-keepalive",
            Workload::HttpsSession => "https-session",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Workload::HttpsKeepAlive => "1. HTTPS keep-alive, 1 KiB responses, 64 connections",
            Workload::TlsHandshake => {
                "2. New TLS 1.3 connection per request (ECDSA P-256), 64 clients"
            }
            Workload::LargeResponse => "3. HTTPS 1 MiB responses, 8 connections",
            Workload::IdleTls => "4. Idle keep-alive TLS connections (RSS per connection)",
            Workload::HttpKeepAlive => "5. Plain HTTP keep-alive, 1 KiB responses, 64 connections",
            Workload::HttpsSession => {
                "6. HTTPS keep-alive with a session cookie (Portcullis checks it), 1 KiB, 64 connections"
            }
        }
    }

    /// What one operation is, for "CPU µs per …" and "… per second".
    pub fn op(self) -> &'static str {
        match self {
            Workload::HttpsKeepAlive | Workload::HttpKeepAlive | Workload::HttpsSession => {
                "request"
            }
            Workload::TlsHandshake => "handshake",
            Workload::LargeResponse => "MiB",
            Workload::IdleTls => "connection",
        }
    }

    /// "requests/s", "MiB/s", …
    pub fn rate(self) -> String {
        match self.op() {
            "MiB" => "MiB/s".to_string(),
            op => format!("{op}s/s"),
        }
    }

    pub fn parse(s: &str) -> Option<Workload> {
        ALL.into_iter().find(|w| w.id() == s)
    }
}

/// How hard and how long each run pushes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Effort {
    pub duration: Duration,
    pub warmup: Duration,
    pub idle_connections: usize,
}

/// One measured run of one workload against one proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    /// Operations completed (requests, handshakes, MiB, connections).
    pub ops: f64,
    pub ops_per_sec: f64,
    /// Proxy CPU (user + system) per operation, in µs.
    pub cpu_us_per_op: f64,
    /// The user-space part of it: the proxy's own code, as opposed to the kernel's TCP work.
    pub user_us_per_op: f64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
    /// Resident memory per idle connection, in KiB (idle workload only).
    pub rss_kib_per_conn: Option<f64>,
    pub errors: u64,
}

pub struct Env<'a> {
    pub script: &'a std::path::Path,
    pub load_cpus: Option<&'a str>,
    pub tls: &'a tokio_rustls::TlsConnector,
    pub rt: &'a tokio::runtime::Runtime,
    pub effort: Effort,
}

pub fn run(w: Workload, c: &mut Contestant, env: &Env<'_>, round: usize) -> Result<Sample> {
    c.server.check_alive()?;
    let sample = match w {
        Workload::IdleTls => idle(c, env, round)?,
        _ => with_wrk(w, c, env, round)?,
    };
    c.server.check_alive()?;
    Ok(sample)
}

fn with_wrk(w: Workload, c: &Contestant, env: &Env<'_>, round: usize) -> Result<Sample> {
    let host = format!("Host: {SERVICE_HOST}");
    let (url, connections, headers) = match w {
        Workload::HttpsKeepAlive => (format!("https://{}{SMALL_PATH}", c.https), 64, vec![host]),
        Workload::TlsHandshake => (
            format!("https://{}{SMALL_PATH}", c.https),
            64,
            vec![host, "Connection: close".to_string()],
        ),
        Workload::LargeResponse => (format!("https://{}{LARGE_PATH}", c.https), 8, vec![host]),
        Workload::HttpKeepAlive => (format!("http://{}{SMALL_PATH}", c.http), 64, vec![host]),
        // A 401 (a cookie the gate refused) counts as a bad status and fails the run.
        Workload::HttpsSession => (
            format!("https://{}{SMALL_PATH}", c.https),
            64,
            vec![
                format!("Host: {}", crate::contestants::SESSION_HOST),
                crate::contestants::session_cookie_header(),
            ],
        ),
        Workload::IdleTls => unreachable!("not a wrk workload"),
    };
    let mut load = WrkLoad {
        url,
        connections,
        duration: env.effort.warmup,
        headers,
        cpus: env.load_cpus,
    };
    if !env.effort.warmup.is_zero() {
        let warm = wrk::run(&load, env.script)?;
        check_clean(c, w, warm.requests, warm.socket_errors, warm.bad_status)?;
    }
    load.duration = env.effort.duration;
    let cpu_before = cpu_time(&c.pids);
    let out = wrk::run(&load, env.script)?;
    let spent = cpu_time(&c.pids).since(cpu_before);
    let cpu = spent.total_us() as f64;
    check_clean(c, w, out.requests, out.socket_errors, out.bad_status)?;
    let secs = out.elapsed.as_secs_f64().max(1e-6);
    let ops = match w {
        Workload::LargeResponse => out.bytes as f64 / (1u64 << 20) as f64,
        _ => out.requests as f64,
    };
    Ok(Sample {
        round,
        ops,
        ops_per_sec: ops / secs,
        cpu_us_per_op: cpu / ops.max(1e-9),
        user_us_per_op: spent.user_us as f64 / ops.max(1e-9),
        p50_us: Some(out.latency_us.value_at_quantile(0.5)),
        p99_us: Some(out.latency_us.value_at_quantile(0.99)),
        p999_us: Some(out.latency_us.value_at_quantile(0.999)),
        rss_kib_per_conn: None,
        errors: out.socket_errors + out.bad_status,
    })
}

/// Every request of a run must have been answered, and well.
fn check_clean(
    c: &Contestant,
    w: Workload,
    requests: u64,
    socket_errors: u64,
    bad: u64,
) -> Result<()> {
    if requests == 0 || socket_errors > 0 || bad > 0 {
        bail!(
            "{} answered {} badly: {requests} requests, {socket_errors} socket errors, {bad} error \
             statuses; its log:\n{}",
            c.kind.name(),
            w.id(),
            crate::process::tail(&c.server.log)
        );
    }
    Ok(())
}

fn idle(c: &Contestant, env: &Env<'_>, round: usize) -> Result<Sample> {
    let count = env.effort.idle_connections;
    let rss_before = rss_kib(&c.pids);
    let cpu_before = cpu_time(&c.pids);
    let started = std::time::Instant::now();
    let held = env
        .rt
        .block_on(client::open_idle(c.https, env.tls, count, SMALL_PATH))?;
    let elapsed = started.elapsed();
    // Let the proxy settle (buffers shrink, timers fire) before reading its memory.
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_kib(&c.pids);
    let spent = cpu_time(&c.pids).since(cpu_before);
    let cpu = spent.total_us() as f64;
    let opened = held.len();
    drop(held);
    // Give the proxy time to see the closes before the next run.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Sample {
        round,
        ops: opened as f64,
        ops_per_sec: opened as f64 / elapsed.as_secs_f64().max(1e-6),
        cpu_us_per_op: cpu / (opened.max(1) as f64),
        user_us_per_op: spent.user_us as f64 / (opened.max(1) as f64),
        p50_us: None,
        p99_us: None,
        p999_us: None,
        rss_kib_per_conn: Some(rss_after.saturating_sub(rss_before) as f64 / opened.max(1) as f64),
        errors: (count - opened) as u64,
    })
}

/// Before any load: each proxy serves both bodies byte for byte over HTTPS and plain HTTP.
pub fn check_answers(c: &Contestant, env: &Env<'_>) -> Result<()> {
    use crate::contestants::{large_body, small_body};
    let expected = [(SMALL_PATH, small_body()), (LARGE_PATH, large_body())];
    for (path, body) in &expected {
        for (label, addr, tls) in [("HTTPS", c.https, Some(env.tls)), ("HTTP", c.http, None)] {
            let (status, got) = env.rt.block_on(client::get(addr, tls, path))?;
            if status != 200 || &got != body {
                bail!(
                    "{} over {label} answered {path} with status {status} and {} bytes (want 200 and \
                     the backend's {} bytes)",
                    c.kind.name(),
                    got.len(),
                    body.len()
                );
            }
        }
    }
    Ok(())
}
