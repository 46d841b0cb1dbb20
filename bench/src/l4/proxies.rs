//! The L4 proxies under test: Portcullis with and without the kernel splice, HAProxy in TCP
//! mode and nginx's `stream` module, each forwarding one port (TCP, and UDP where the proxy can)
//! to the iperf3 server, one worker, pinned like the HTTP contestants.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::contestants::{find_program, free_port, loopback, nginx_args, write};
use crate::process::{Server, tail, wait_listening};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum L4Kind {
    PortcullisSplice,
    PortcullisCopy,
    Haproxy,
    Nginx,
}

pub const ALL: [L4Kind; 4] = [
    L4Kind::PortcullisSplice,
    L4Kind::PortcullisCopy,
    L4Kind::Haproxy,
    L4Kind::Nginx,
];

impl L4Kind {
    pub fn name(self) -> &'static str {
        match self {
            L4Kind::PortcullisSplice => "portcullis-splice",
            L4Kind::PortcullisCopy => "portcullis-copy",
            L4Kind::Haproxy => "haproxy",
            L4Kind::Nginx => "nginx",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            L4Kind::PortcullisSplice => "Portcullis, splice",
            L4Kind::PortcullisCopy => "Portcullis, copy",
            L4Kind::Haproxy => "HAProxy",
            L4Kind::Nginx => "nginx",
        }
    }

    /// Whether it forwards UDP (HAProxy 2.6's community edition does not).
    pub fn does_udp(self) -> bool {
        self != L4Kind::Haproxy
    }
}

/// A running L4 proxy: TCP (and UDP) on `listen`, forwarding to the iperf3 server.
pub struct L4Contestant {
    pub kind: L4Kind,
    pub listen: SocketAddr,
    pub server: Server,
    pub pids: Vec<u32>,
    /// Portcullis's health listener.
    pub health: Option<SocketAddr>,
    /// Why this contestant cannot be measured as what it claims to be (the splice without the
    /// kernel fast path).
    pub unavailable: Option<String>,
}

/// One L4 service of a Portcullis mappings file.
pub struct L4Service<'a> {
    pub id: &'a str,
    pub mode: &'a str,
    pub port: u16,
    pub target: SocketAddr,
    pub blocked: Option<IpAddr>,
}

pub fn mappings(services: &[L4Service<'_>]) -> String {
    let mut out = String::new();
    for s in services {
        out.push_str(&format!(
            "[[service]]\nid = \"{id}\"\ndomain = \"{id}.bench.test\"\nmode = \"{mode}\"\n\
             listen_port = {port}\n",
            id = s.id,
            mode = s.mode,
            port = s.port
        ));
        if let Some(ip) = s.blocked {
            out.push_str(&format!("blocked_cidrs = [\"{ip}/32\"]\n"));
        }
        out.push_str(&format!("\n[[service.path]]\ntarget = \"{}\"\n", s.target));
        if s.mode == "udp" {
            out.push_str("session_idle_timeout = \"30s\"\n");
        }
        out.push('\n');
    }
    out
}

/// Environment for `portcullis proxy` serving only L4 ports (on `ip`).
pub fn portcullis_env(
    dir: &Path,
    ip: IpAddr,
    https_port: u16,
    health: SocketAddr,
    mappings_file: &Path,
    fast_path: &[(&str, String)],
) -> Result<Vec<(String, String)>> {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    let mut env: Vec<(String, String)> = [
        (
            "NB_PROXY_ADDRESS",
            SocketAddr::new(ip, https_port).to_string(),
        ),
        ("NB_PROXY_HTTP_ADDRESS", "off".into()),
        ("NB_PROXY_HEALTH_ADDRESS", health.to_string()),
        (
            "NB_PROXY_CERTIFICATE_DIRECTORY",
            certs.display().to_string(),
        ),
        (
            "NB_PROXY_MAPPINGS_FILE",
            mappings_file.display().to_string(),
        ),
        ("NB_PROXY_WORKERS", "1".into()),
        ("NB_PROXY_LOG_LEVEL", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(fast_path.iter().map(|(k, v)| (k.to_string(), v.clone())));
    Ok(env)
}

pub fn start(
    kind: L4Kind,
    dir: &Path,
    portcullis_bin: &Path,
    target: SocketAddr,
    cpus: Option<&str>,
) -> Result<L4Contestant> {
    let dir = dir.join(kind.name());
    std::fs::create_dir_all(&dir)?;
    let listen = loopback(free_port()?);
    let log = dir.join("stderr.log");
    let mut health = None;
    let mut server = match kind {
        L4Kind::PortcullisSplice | L4Kind::PortcullisCopy => {
            let file = dir.join("mappings.toml");
            write(
                &file,
                &mappings(&[
                    L4Service {
                        id: "iperf-tcp",
                        mode: "tcp",
                        port: listen.port(),
                        target,
                        blocked: None,
                    },
                    L4Service {
                        id: "iperf-udp",
                        mode: "udp",
                        port: listen.port(),
                        target,
                        blocked: None,
                    },
                ]),
            )?;
            let splice = if kind == L4Kind::PortcullisSplice {
                "on"
            } else {
                "off"
            };
            let h = loopback(free_port()?);
            health = Some(h);
            let env = portcullis_env(
                &dir,
                listen.ip(),
                free_port()?,
                h,
                &file,
                &[
                    ("PORTCULLIS_EBPF", "auto".into()),
                    ("PORTCULLIS_L4_SPLICE", splice.into()),
                ],
            )?;
            Server::spawn(
                kind.name(),
                cpus,
                portcullis_bin,
                &["proxy".into()],
                &env,
                log,
            )?
        }
        L4Kind::Haproxy => {
            let conf = dir.join("haproxy.cfg");
            write(&conf, &haproxy_conf(listen, target))?;
            let args = vec!["-db".into(), "-f".into(), conf.display().to_string()];
            Server::spawn("haproxy", cpus, &find_program("haproxy")?, &args, &[], log)?
        }
        L4Kind::Nginx => {
            let conf = dir.join("nginx.conf");
            write(&conf, &nginx_conf(&dir, listen, target)?)?;
            Server::spawn(
                "nginx",
                cpus,
                &find_program("nginx")?,
                &nginx_args(&dir, &conf),
                &[],
                log,
            )?
        }
    };
    wait_listening(&mut server, listen)?;
    let mut unavailable = None;
    if let Some(h) = health {
        let doc = wait_healthy(&mut server, h, &format!("{}/udp", listen.port()))?;
        let state = ebpf_state(&doc);
        if kind == L4Kind::PortcullisSplice && !state.starts_with("on") {
            let reason = state.strip_prefix("off: ").unwrap_or(&state);
            unavailable = Some(format!("splice unavailable: {reason}"));
        }
    }
    let pids = server.process_tree();
    Ok(L4Contestant {
        kind,
        listen,
        server,
        pids,
        health,
        unavailable,
    })
}

fn haproxy_conf(listen: SocketAddr, target: SocketAddr) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 1000\n\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n\
         \x20 maxconn 1000\n\n\
         frontend fe\n  bind {listen}\n  default_backend be\n\n\
         backend be\n  server iperf {target}\n"
    )
}

/// Where Debian's dynamic `stream` module lives (package libnginx-mod-stream).
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

fn nginx_conf(dir: &Path, listen: SocketAddr, target: SocketAddr) -> Result<String> {
    let load = if Path::new(NGINX_STREAM_MODULE).is_file() {
        format!("load_module {NGINX_STREAM_MODULE};\n")
    } else if nginx_has_static_stream() {
        String::new()
    } else {
        bail!("nginx has no stream module: install libnginx-mod-stream (cargo xtask bench does)");
    };
    Ok(format!(
        "{load}daemon off;\nmaster_process on;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
         stream {{\n\
         \x20 server {{\n    listen {listen};\n    proxy_pass {target};\n  }}\n\
         \x20 server {{\n    listen {listen} udp;\n    proxy_pass {target};\n\
         \x20   proxy_timeout 30s;\n  }}\n}}\n",
        dir = dir.display(),
    ))
}

fn nginx_has_static_stream() -> bool {
    find_program("nginx")
        .ok()
        .and_then(|p| std::process::Command::new(p).arg("-V").output().ok())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stderr)
                .split_whitespace()
                .any(|f| f == "--with-stream")
        })
}

/// `/healthz` of a Portcullis on `addr`, parsed.
pub fn healthz(addr: SocketAddr) -> Result<Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect to the health listener {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.take(1 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("no body in the /healthz answer")?;
    serde_json::from_str(body).with_context(|| format!("/healthz is not JSON: {body}"))
}

/// Waits (bounded) until `/healthz` answers and lists `port` (`"5301/udp"`) among the L4 ports.
pub fn wait_healthy(server: &mut Server, addr: SocketAddr, port: &str) -> Result<Value> {
    wait_healthy_with(server, port, || healthz(addr))
}

/// The same, reading `/healthz` with `fetch` (for a Portcullis in another namespace).
pub fn wait_healthy_with(
    server: &mut Server,
    port: &str,
    mut fetch: impl FnMut() -> Result<Value>,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        server.check_alive()?;
        let last = match fetch() {
            Ok(doc) if l4_ports(&doc).iter().any(|p| p == port) => return Ok(doc),
            Ok(doc) => format!("L4 ports {:?}", l4_ports(&doc)),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "{} does not serve {port} after 15 s ({last}); log:\n{}",
                server.label,
                tail(&server.log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn l4_ports(doc: &Value) -> Vec<String> {
    doc.pointer("/l4/ports")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The `ebpf` field of `/healthz`: "on: …" or "off: <reason>".
pub fn ebpf_state(doc: &Value) -> String {
    doc.get("ebpf")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string()
}

/// A counter under `/l4` of `/healthz` (`spliced`, `connections`, …).
pub fn l4_counter(doc: &Value, name: &str) -> u64 {
    doc.pointer(&format!("/l4/{name}"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}
