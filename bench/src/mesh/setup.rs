//! The testbed of the mesh workloads: namespaces, a plain wireguard-go pair (the baseline), the
//! real management, two proxies (TUN and in-process backends), a real `portcullis agent`, the
//! targets behind it, and the services that tie them together. Everything started here is
//! stopped by PID when the [`Bed`] is dropped, then the namespaces are deleted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::MeshPath;
use super::api::{Api, poll, request};
use super::net::{EDGE_IP, EdgeSite, SITE_IP, ip, output, within};
use crate::certs::{self, CertFiles};
use crate::contestants::{SMALL_PATH, find_program, nginx_args, small_body, write};
use crate::process::{Server, tail};

/// The baseline tunnel's addresses (a /24 of their own, apart from the mesh's 100.64.0.0/10).
const BASE_EDGE_TUN: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 1);
const BASE_SITE_TUN: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 2);
const BASE_EDGE_WG_PORT: u16 = 51_901;
const BASE_SITE_WG_PORT: u16 = 51_902;
const MGMT_GRPC: u16 = 7_001;
const MGMT_HTTP: u16 = 7_002;
/// iperf3 servers at the site (one on each tunnel address) and the HTTP target ports.
const IPERF_PORT: u16 = 5_201;
const HTTP_TARGET_PORT: u16 = 8_080;
const HTTPS_TARGET_PORT: u16 = 8_443;

/// One way through the tunnel, as the load generator in `edge` sees it.
pub struct MeshContestant {
    pub path: MeshPath,
    /// Where iperf3 connects: the proxy's L4 port, or the site's iperf3 over the tunnel.
    pub tcp: SocketAddr,
    /// What wrk requests (an IP URL) and the Host it sends.
    pub https_url: String,
    pub host: String,
    /// The edge process whose tree is measured (the proxy with its wireguard-go, or the
    /// baseline's edge wireguard-go).
    pub edge_pid: u32,
    /// The site process whose tree carries this path's tunnel there (the agent with its
    /// wireguard-go, or the baseline's site wireguard-go).
    pub site_pid: u32,
}

pub struct Bed {
    /// Every process started, in start order; stopped by PID in reverse order on drop.
    servers: Vec<Server>,
    pub contestants: Vec<MeshContestant>,
    /// The agent's tunnel address, for the report.
    pub agent_ip: IpAddr,
    /// Paths that never carried the check request (a bug to fix: reported, the bench fails).
    pub failed: std::collections::BTreeMap<MeshPath, String>,
    pub net: EdgeSite,
    /// Management's PID: the proxies send it an access-log entry per request.
    pub management_pid: u32,
}

impl Drop for Bed {
    fn drop(&mut self) {
        while let Some(s) = self.servers.pop() {
            drop(s);
        }
    }
}

impl Bed {
    /// Fails with the log of whichever process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for s in &mut self.servers {
            s.check_alive()?;
        }
        Ok(())
    }
}

pub struct Settings<'a> {
    pub dir: &'a Path,
    pub portcullis_bin: &'a Path,
    pub proxy_cpus: Option<&'a str>,
    pub load_cpus: Option<&'a str>,
}

fn spawn_in(
    ns: &str,
    label: &str,
    cpus: Option<&str>,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    log: PathBuf,
) -> Result<Server> {
    within(ns, || Server::spawn(label, cpus, program, args, env, log))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn env(v: &[(&str, String)]) -> Vec<(String, String)> {
    v.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

pub fn start(s: &Settings<'_>) -> Result<Bed> {
    let net = EdgeSite::create().context("creating the edge and site namespaces")?;
    let mut bed = Bed {
        servers: Vec::new(),
        contestants: Vec::new(),
        agent_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        failed: Default::default(),
        net,
        management_pid: 0,
    };
    let pid = std::process::id();
    let dir = s.dir;

    // === the baseline: wireguard-go ↔ wireguard-go ===
    let (e_if, s_if) = (format!("pmbe{pid}"), format!("pmbs{pid}"));
    let (e_key, e_pub) = keypair(dir, "edge")?;
    let (s_key, s_pub) = keypair(dir, "site")?;
    let edge_ns = bed.net.edge.clone();
    let site_ns = bed.net.site.clone();
    for (ns, iface, cpus) in [
        (&edge_ns, &e_if, s.proxy_cpus),
        (&site_ns, &s_if, s.load_cpus),
    ] {
        let server = spawn_in(
            ns,
            &format!("wireguard-go {iface}"),
            cpus,
            &find_program("wireguard-go")?,
            &strings(&["-f", iface]),
            &env(&[("LOG_LEVEL", "error".into())]),
            dir.join(format!("wireguard-go-{iface}.log")),
        )?;
        bed.servers.push(server);
        wait_uapi(iface, bed.servers.last_mut().expect("pushed"))?;
    }
    let (edge_wg_pid, site_wg_pid) = (bed.servers[0].pid(), bed.servers[1].pid());
    for (iface, key, port, peer, peer_tun, peer_ip, peer_port) in [
        (
            &e_if,
            &e_key,
            BASE_EDGE_WG_PORT,
            &s_pub,
            BASE_SITE_TUN,
            SITE_IP,
            BASE_SITE_WG_PORT,
        ),
        (
            &s_if,
            &s_key,
            BASE_SITE_WG_PORT,
            &e_pub,
            BASE_EDGE_TUN,
            EDGE_IP,
            BASE_EDGE_WG_PORT,
        ),
    ] {
        output(
            "wg",
            &[
                "set",
                iface,
                "private-key",
                &key.display().to_string(),
                "listen-port",
                &port.to_string(),
                "peer",
                peer,
                "allowed-ips",
                &format!("{peer_tun}/32"),
                "endpoint",
                &format!("{peer_ip}:{peer_port}"),
            ],
        )?;
    }
    for (ns, iface, addr) in [
        (&edge_ns, &e_if, BASE_EDGE_TUN),
        (&site_ns, &s_if, BASE_SITE_TUN),
    ] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", iface])?;
        ip(&["-n", ns, "link", "set", iface, "up"])?;
    }

    // === management ===
    let bin = s.portcullis_bin;
    let store = format!("sqlite://{}", dir.join("management.db").display());
    let mgmt_http = SocketAddr::from((EDGE_IP, MGMT_HTTP));
    let grpc_url = format!("http://{EDGE_IP}:{MGMT_GRPC}");
    let server = spawn_in(
        &edge_ns,
        "management",
        s.load_cpus,
        bin,
        &strings(&["management", "serve"]),
        &env(&[
            ("PORTCULLIS_STORE_URL", store.clone()),
            ("PORTCULLIS_GRPC_ADDRESS", format!("{EDGE_IP}:{MGMT_GRPC}")),
            ("PORTCULLIS_HTTP_ADDRESS", mgmt_http.to_string()),
            ("PORTCULLIS_HEARTBEAT_INTERVAL", "1s".into()),
            ("RUST_LOG", "info".into()),
        ]),
        dir.join("management.log"),
    )?;
    bed.management_pid = server.pid();
    bed.servers.push(server);
    let up = poll(Duration::from_secs(20), || {
        matches!(
            request(&edge_ns, mgmt_http, "GET", "/api/users", None, None),
            Ok((401, _))
        )
        .then_some(())
    });
    if up.is_none() {
        bail!(
            "management did not answer on {mgmt_http} within 20 s; log:\n{}",
            tail(&dir.join("management.log"))
        );
    }
    let pat = bootstrap(bin, &store)?;
    let api = Api {
        ns: edge_ns.clone(),
        addr: mgmt_http,
        pat,
    };
    let token = api.ok(
        "POST",
        "/api/reverse-proxies/proxy-tokens",
        Some(&json!({"name": "bench", "expires_in": 0})),
    )?["plain_token"]
        .as_str()
        .context("no plain_token")?
        .to_string();

    // === the proxies, one cluster each ===
    let proxies = [
        (
            MeshPath::Tun,
            "tun.bench",
            "tun",
            8_444u16,
            9_001u16,
            15_201u16,
        ),
        (
            MeshPath::InProcess,
            "inproc.bench",
            "in-process",
            8_445,
            9_002,
            15_202,
        ),
    ];
    let mut proxy_pids = Vec::new();
    for (path, cluster, backend, https_port, health_port, _) in proxies {
        let pdir = dir.join(path.name());
        std::fs::create_dir_all(&pdir)?;
        let certs = certs::write(&pdir.join("certs"), &format!("app.{cluster}"))?;
        let mappings = pdir.join("mappings.toml");
        write(&mappings, "")?;
        let log = pdir.join("proxy.log");
        let server = spawn_in(
            &edge_ns,
            &format!("portcullis ({backend})"),
            s.proxy_cpus,
            bin,
            &strings(&["proxy"]),
            &env(&[
                ("NB_PROXY_ADDRESS", format!("{EDGE_IP}:{https_port}")),
                ("NB_PROXY_HTTP_ADDRESS", "off".into()),
                (
                    "NB_PROXY_HEALTH_ADDRESS",
                    format!("127.0.0.1:{health_port}"),
                ),
                (
                    "NB_PROXY_CERTIFICATE_DIRECTORY",
                    certs.dir.display().to_string(),
                ),
                ("NB_PROXY_MAPPINGS_FILE", mappings.display().to_string()),
                ("NB_PROXY_WORKERS", "1".into()),
                ("NB_PROXY_LOG_LEVEL", "info".into()),
                ("NB_PROXY_MANAGEMENT_ADDRESS", grpc_url.clone()),
                ("NB_PROXY_TOKEN", token.clone()),
                ("NB_PROXY_ALLOW_INSECURE", "true".into()),
                ("NB_PROXY_DOMAIN", cluster.into()),
                ("PORTCULLIS_MESH_BACKEND", backend.into()),
                ("PORTCULLIS_WG_ENDPOINT_HOST", EDGE_IP.to_string()),
                ("PORTCULLIS_EBPF", "off".into()),
            ]),
            log.clone(),
        )?;
        bed.servers.push(server);
        let i = bed.servers.len() - 1;
        let health = SocketAddr::from(([127, 0, 0, 1], health_port));
        wait_health(&edge_ns, health, &mut bed.servers[i], |h| {
            h["initial_sync_complete"] == true
                && h["mesh"]["backend"]
                    .as_str()
                    .is_some_and(|b| b.starts_with(backend))
        })
        .with_context(|| format!("proxy with the {backend} backend"))?;
        proxy_pids.push((bed.servers[i].pid(), certs));
    }

    // === the agent at the site ===
    let key = api.ok(
        "POST",
        "/api/setup-keys",
        Some(&json!({"name": "bench-site", "type": "reusable"})),
    )?["key"]
        .as_str()
        .context("no setup key")?
        .to_string();
    let agent_log = dir.join("agent.log");
    let agent_if = format!("pma{pid}");
    let server = spawn_in(
        &site_ns,
        "portcullis agent",
        s.load_cpus,
        bin,
        &strings(&[
            "agent",
            "--management",
            &grpc_url,
            "--allow-insecure",
            "--state-dir",
            &dir.join("agent-state").display().to_string(),
            "--name",
            "site",
            "--interface",
            &agent_if,
            "--backend",
            "tun",
            "--log-level",
            "info",
        ]),
        &env(&[("PORTCULLIS_AGENT_SETUP_KEY", key)]),
        agent_log.clone(),
    )?;
    bed.servers.push(server);
    let agent_pid = bed.servers.last().expect("pushed").pid();
    let peer = poll(Duration::from_secs(30), || {
        api.ok("GET", "/api/peers", None)
            .ok()?
            .as_array()?
            .iter()
            .find(|p| p["name"] == "site")
            .cloned()
    })
    .with_context(|| {
        format!(
            "the agent's peer never registered; agent log:\n{}",
            tail(&agent_log)
        )
    })?;
    let peer_id = peer["id"].as_str().context("peer id")?.to_string();
    let agent_ip: IpAddr = peer["tunnel_ip"]
        .as_str()
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no tunnel_ip in {peer}"))?;
    bed.agent_ip = agent_ip;

    // === the targets at the site ===
    // The agent adds its tunnel address when its interface is up: wait until it can be bound.
    let bound = poll(Duration::from_secs(30), || {
        within(&site_ns, || {
            Ok(std::net::TcpListener::bind((agent_ip, HTTP_TARGET_PORT)).is_ok())
        })
        .ok()
        .filter(|ok| *ok)
    });
    if bound.is_none() {
        bail!(
            "the agent's tunnel address {agent_ip} never appeared in the site; agent log:\n{}",
            tail(&agent_log)
        );
    }
    let site_certs = certs::write(&dir.join("site-certs"), "app.base.bench")?;
    let nginx = start_site_nginx(dir, &site_ns, agent_ip, &site_certs, s.load_cpus)?;
    bed.servers.push(nginx);
    for (label, addr) in [("mesh", agent_ip), ("baseline", BASE_SITE_TUN.into())] {
        let server = spawn_in(
            &site_ns,
            &format!("iperf3 server ({label})"),
            s.load_cpus,
            &find_program("iperf3")?,
            &strings(&[
                "-s",
                "-B",
                &addr.to_string(),
                "-p",
                &IPERF_PORT.to_string(),
                "--rcv-timeout",
                "10000",
            ]),
            &[],
            dir.join(format!("iperf3-{label}.log")),
        )?;
        bed.servers.push(server);
    }

    // === the services: HTTP and L4 TCP with the agent's peer as target ===
    // Management resolves a peer target to the peer's tunnel address; this management's
    // validation still wants a host written, so the same address is given.
    let agent_host = agent_ip.to_string();
    for (path, cluster, _, _, _, l4_port) in proxies {
        for body in [
            json!({"name": format!("app-{}", path.name()), "domain": format!("app.{cluster}"),
                   "targets": [{"target_type": "peer", "target_id": peer_id, "host": agent_host,
                                "protocol": "http", "port": HTTP_TARGET_PORT}]}),
            json!({"name": format!("tcp-{}", path.name()), "domain": format!("tcp.{cluster}"),
                   "mode": "tcp", "listen_port": l4_port,
                   "targets": [{"target_type": "peer", "target_id": peer_id, "host": agent_host,
                                "protocol": "tcp", "port": IPERF_PORT}]}),
        ] {
            let mut last = String::new();
            let created = poll(Duration::from_secs(30), || {
                match api.ok("POST", "/api/reverse-proxies/services", Some(&body)) {
                    Ok(_) => Some(()),
                    Err(e) => {
                        last = format!("{e:#}");
                        None
                    }
                }
            });
            if created.is_none() {
                bail!("creating service {}: {last}", body["name"]);
            }
        }
    }

    // === the contestants, each checked end to end ===
    bed.contestants.push(MeshContestant {
        path: MeshPath::Baseline,
        tcp: SocketAddr::from((BASE_SITE_TUN, IPERF_PORT)),
        https_url: format!("https://{BASE_SITE_TUN}:{HTTPS_TARGET_PORT}{SMALL_PATH}"),
        host: "app.base.bench".into(),
        edge_pid: edge_wg_pid,
        site_pid: site_wg_pid,
    });
    check_body(
        &edge_ns,
        &site_certs,
        "app.base.bench",
        BASE_SITE_TUN.into(),
        HTTPS_TARGET_PORT,
    )
    .context("HTTPS over the plain wireguard-go tunnel")?;
    for ((path, cluster, _, https_port, health_port, l4_port), (proxy_pid, certs)) in
        proxies.into_iter().zip(proxy_pids)
    {
        let health_addr = SocketAddr::from(([127, 0, 0, 1], health_port));
        let host = format!("app.{cluster}");
        let mut last = String::new();
        let ok = poll(Duration::from_secs(30), || {
            match check_body(&edge_ns, &certs, &host, EDGE_IP.into(), https_port) {
                Ok(()) => Some(()),
                Err(e) => {
                    last = format!("{e:#}");
                    None
                }
            }
        });
        if ok.is_none() {
            let health = request(&edge_ns, health_addr, "GET", "/healthz", None, None)
                .map(|(_, h)| h["mesh"].to_string())
                .unwrap_or_else(|e| format!("{e:#}"));
            let log = std::fs::read_to_string(dir.join(path.name()).join("proxy.log"))
                .unwrap_or_default();
            let mesh_lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("target unreachable"))
                .take(40)
                .collect();
            let why = format!(
                "{host} did not answer the 1 KiB body through the {} proxy within 30 s; last: \
                 {last}\n/healthz mesh: {health}\nwg show {agent_if}:\n{}\nproxy log (first \
                 lines):\n{}\nagent log:\n{}",
                path.label(),
                output("wg", &["show", &agent_if]).unwrap_or_else(|e| format!("{e:#}")),
                mesh_lines.join("\n"),
                tail(&agent_log)
            );
            eprintln!("bench: mesh path {} FAILED to come up: {why}", path.label());
            // The report gets the first line; the diagnostics above went to stderr.
            let health_short = request(&edge_ns, health_addr, "GET", "/healthz", None, None)
                .map(|(_, h)| {
                    h["mesh"]["accounts"]
                        .as_object()
                        .and_then(|a| a.values().next())
                        .map(|a| a["peers"].to_string())
                        .unwrap_or_default()
                })
                .unwrap_or_default();
            bed.failed.insert(
                path,
                format!(
                    "setup: {host} answered 502 \"target unreachable\" for 30 s: the proxy \
                     never saw its tunnel to the agent up (its /healthz peers: {health_short})"
                ),
            );
        }
        bed.contestants.push(MeshContestant {
            path,
            tcp: SocketAddr::from((EDGE_IP, l4_port)),
            https_url: format!("https://{EDGE_IP}:{https_port}{SMALL_PATH}"),
            host,
            edge_pid: proxy_pid,
            site_pid: agent_pid,
        });
    }
    bed.check_alive()?;
    Ok(bed)
}

/// A WireGuard key pair: the private key in a 0600 file, the public key in base64.
fn keypair(dir: &Path, label: &str) -> Result<(PathBuf, String)> {
    use std::os::unix::fs::PermissionsExt;
    let private = output("wg", &["genkey"])?.trim().to_string();
    let path = dir.join(format!("wg-{label}.key"));
    std::fs::write(&path, format!("{private}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let mut c = std::process::Command::new("sh");
    c.arg("-c").arg(format!("wg pubkey < '{}'", path.display()));
    let out = crate::wrk::with_deadline(c, Duration::from_secs(10))?;
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || public.len() != 44 {
        bail!("wg pubkey failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((path, public))
}

/// Waits (bounded) until wireguard-go has opened its UAPI socket.
fn wait_uapi(iface: &str, server: &mut Server) -> Result<()> {
    let socket = format!("/var/run/wireguard/{iface}.sock");
    for _ in 0..250 {
        server.check_alive()?;
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    bail!(
        "wireguard-go did not open {socket} within 10 s; log:\n{}",
        tail(&server.log)
    )
}

/// `portcullis management bootstrap`: the owner's PAT.
fn bootstrap(bin: &Path, store: &str) -> Result<String> {
    let mut c = std::process::Command::new(bin);
    c.args(["management", "bootstrap", "--email", "bench@example.test"])
        .env("PORTCULLIS_STORE_URL", store);
    let out = crate::wrk::with_deadline(c, Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "management bootstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .find_map(|l| l.split("(shown once): ").nth(1))
        .map(|s| s.trim().to_string())
        .context("management bootstrap printed no PAT")
}

fn wait_health(
    ns: &str,
    addr: SocketAddr,
    server: &mut Server,
    ready: impl Fn(&Value) -> bool,
) -> Result<()> {
    let mut last = Value::Null;
    for _ in 0..150 {
        server.check_alive()?;
        if let Ok((200, h)) = request(ns, addr, "GET", "/healthz", None, None) {
            if ready(&h) {
                return Ok(());
            }
            last = h;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "not ready within 30 s; /healthz: {last}\nlog:\n{}",
        tail(&server.log)
    )
}

/// nginx at the site: the plain-HTTP target on the agent's tunnel address (behind the proxies)
/// and the HTTPS server of the baseline on the plain tunnel's address, both the 1 KiB body.
fn start_site_nginx(
    dir: &Path,
    ns: &str,
    agent_ip: IpAddr,
    certs: &CertFiles,
    cpus: Option<&str>,
) -> Result<Server> {
    let ndir = dir.join("site-nginx");
    std::fs::create_dir_all(&ndir)?;
    let small = String::from_utf8(small_body()).expect("ascii body");
    let conf = ndir.join("nginx.conf");
    write(
        &conf,
        &format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nworker_rlimit_nofile 8192;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
             \x20 client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             \x20 server {{\n    listen {agent_ip}:{HTTP_TARGET_PORT};\n\
             \x20   location = {SMALL_PATH} {{ return 200 \"{small}\"; }}\n  }}\n\
             \x20 server {{\n    listen {BASE_SITE_TUN}:{HTTPS_TARGET_PORT} ssl;\n\
             \x20   ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
             \x20   ssl_protocols TLSv1.2 TLSv1.3;\n\
             \x20   location = {SMALL_PATH} {{ return 200 \"{small}\"; }}\n  }}\n}}\n",
            d = ndir.display(),
            cert = certs.cert.display(),
            key = certs.key.display(),
        ),
    )?;
    let mut server = spawn_in(
        ns,
        "site nginx",
        cpus,
        &find_program("nginx")?,
        &nginx_args(&ndir, &conf),
        &[],
        ndir.join("stderr.log"),
    )?;
    for addr in [
        SocketAddr::new(agent_ip, HTTP_TARGET_PORT),
        SocketAddr::from((BASE_SITE_TUN, HTTPS_TARGET_PORT)),
    ] {
        let ok = poll(Duration::from_secs(15), || {
            within(ns, || {
                Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
            })
            .ok()
            .filter(|ok| *ok)
        });
        if ok.is_none() {
            server.check_alive()?;
            bail!(
                "site nginx is not listening on {addr}; log:\n{}",
                tail(&server.log)
            );
        }
    }
    Ok(server)
}

/// One HTTPS GET with curl from the edge (certificate verified, name resolved to `ip`): the
/// answer must be 200 with the 1 KiB body, byte for byte.
fn check_body(ns: &str, certs: &CertFiles, host: &str, ip: IpAddr, port: u16) -> Result<()> {
    let url = format!("https://{host}:{port}{SMALL_PATH}");
    let out = within(ns, || {
        let mut c = std::process::Command::new(find_program("curl")?);
        c.args([
            "-sS",
            "--http1.1",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cacert")
        .arg(certs.dir.join("ca.pem"))
        .arg("--resolve")
        .arg(format!("{host}:{port}:{ip}"))
        .arg(&url);
        crate::wrk::with_deadline(c, Duration::from_secs(20))
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    if !out.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if code != "200" || body.as_bytes() != small_body().as_slice() {
        bail!(
            "curl {url}: status {code}, {} bytes: {:?}",
            body.len(),
            body.chars().take(200).collect::<String>()
        );
    }
    Ok(())
}
