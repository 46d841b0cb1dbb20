//! The proxies under test and the backend behind them: configured alike (one worker, keep-alive
//! to the backend, access logs off, the same certificate) and started pinned to their cores.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::certs::CertFiles;
use crate::process::{Server, wait_listening};

/// The Host every request carries; Portcullis routes by it.
pub const SERVICE_HOST: &str = "bench.local";
/// The same backend behind Portcullis' authentication gate (the other proxies do not check
/// Host, so they serve it like the open one).
pub const SESSION_HOST: &str = "session.bench.local";

/// The bench's session key: fixed, since it only ever signs tokens for a loopback run.
fn session_keys() -> proto::session::SessionKeyPair {
    proto::session::key_pair_from_seed(&[0x5e; 32])
}

/// `Cookie: nb_session=…` valid for [`SESSION_HOST`] for a day.
pub fn session_cookie_header() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let grant = proto::session::SessionGrant {
        user_id: "bench-user".into(),
        email: "bench@example.com".into(),
        domain: SESSION_HOST.into(),
        method: "password".into(),
        groups: vec!["g1".into()],
        group_names: vec!["bench".into()],
        max_age_secs: 86_400,
    };
    let token = proto::session::sign(
        &proto::session::SessionClaims::new(&grant, now),
        &session_keys().private_key,
    )
    .unwrap_or_default();
    format!("Cookie: {}={token}", proto::session::COOKIE_NAME)
}
/// Body of the small response.
pub fn small_body() -> Vec<u8> {
    b"portcullis-bench-"
        .iter()
        .copied()
        .cycle()
        .take(1024)
        .collect()
}
pub const LARGE_BODY_LEN: usize = 1 << 20;
/// Body of the large response: a pattern that a wrong offset would break.
pub fn large_body() -> Vec<u8> {
    (0..LARGE_BODY_LEN).map(|i| (i % 251) as u8).collect()
}
pub const SMALL_PATH: &str = "/small";
pub const LARGE_PATH: &str = "/1m";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Portcullis,
    Nginx,
    Haproxy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Portcullis => "portcullis",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }
}

/// A running proxy under test.
pub struct Contestant {
    pub kind: Kind,
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub server: Server,
    /// Every process whose CPU and memory count for this proxy.
    pub pids: Vec<u32>,
}

/// Where things run.
pub struct Placement {
    /// Cores for the proxy under test (`taskset -c`), or none on a one-core machine.
    pub proxy_cpus: Option<String>,
    /// Cores for the load generators and the backend.
    pub load_cpus: Option<String>,
}

pub struct Settings<'a> {
    pub dir: &'a Path,
    pub certs: &'a CertFiles,
    pub backend: SocketAddr,
    pub placement: &'a Placement,
    pub portcullis_bin: &'a Path,
    /// Client connections each proxy must accept at once (the idle workload).
    pub max_connections: usize,
}

pub fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not installed (cargo xtask bench installs it)"))
}

/// A free port below the ephemeral range, so no outgoing connection can grab it first.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 5_000) as u16;
    for _ in 0..5_000 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 7_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between 20000 and 32000")
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// The backend: nginx serving the two bodies from memory and page cache.
pub fn start_backend(dir: &Path, placement: &Placement) -> Result<(Server, SocketAddr)> {
    let dir = dir.join("backend");
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("1m"), large_body())?;
    let small = String::from_utf8(small_body()).expect("ascii body");
    let addr = loopback(free_port()?);
    let conf = dir.join("nginx.conf");
    write(
        &conf,
        &format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log warn;\nworker_rlimit_nofile 8192;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
             \x20 sendfile on;\n  tcp_nopush on;\n  default_type application/octet-stream;\n\
             \x20 server {{\n    listen {addr} backlog=4096;\n    root {www};\n\
             \x20   location = {SMALL_PATH} {{ return 200 \"{small}\"; }}\n  }}\n}}\n",
            dir = dir.display(),
            www = www.display(),
        ),
    )?;
    let mut server = Server::spawn(
        "backend nginx",
        placement.load_cpus.as_deref(),
        &find_program("nginx")?,
        &nginx_args(&dir, &conf),
        &[],
        dir.join("stderr.log"),
    )?;
    wait_listening(&mut server, addr)?;
    Ok((server, addr))
}

pub fn nginx_args(prefix: &Path, conf: &Path) -> Vec<String> {
    vec![
        "-p".into(),
        prefix.display().to_string(),
        "-c".into(),
        conf.display().to_string(),
        "-e".into(),
        prefix.join("error.log").display().to_string(),
    ]
}

pub fn start(kind: Kind, s: &Settings<'_>) -> Result<Contestant> {
    let dir = s.dir.join(kind.name());
    std::fs::create_dir_all(&dir)?;
    let https = loopback(free_port()?);
    let http = loopback(free_port()?);
    let cpus = s.placement.proxy_cpus.as_deref();
    let log = dir.join("stderr.log");
    let mut server = match kind {
        Kind::Portcullis => {
            let mappings = dir.join("mappings.toml");
            write(
                &mappings,
                &format!(
                    "[[service]]\nid = \"bench\"\ndomain = \"{SERVICE_HOST}\"\n\n\
                     [[service.path]]\npath = \"/\"\ntarget = \"http://{}\"\n\n\
                     [[service]]\nid = \"session\"\ndomain = \"{SESSION_HOST}\"\n\n\
                     [service.auth]\nsession_key = \"{}\"\npassword = true\n\n\
                     [[service.path]]\npath = \"/\"\ntarget = \"http://{}\"\n",
                    s.backend,
                    session_keys().public_key,
                    s.backend
                ),
            )?;
            let health = loopback(free_port()?);
            let env: Vec<(String, String)> = [
                ("NB_PROXY_ADDRESS", https.to_string()),
                ("NB_PROXY_HTTP_ADDRESS", http.to_string()),
                ("NB_PROXY_HTTP_MODE", "serve".into()),
                ("NB_PROXY_HEALTH_ADDRESS", health.to_string()),
                (
                    "NB_PROXY_CERTIFICATE_DIRECTORY",
                    s.certs.dir.display().to_string(),
                ),
                ("NB_PROXY_MAPPINGS_FILE", mappings.display().to_string()),
                ("NB_PROXY_WORKERS", "1".into()),
                (
                    "NB_PROXY_MAX_CONNECTIONS",
                    (s.max_connections + 100).to_string(),
                ),
                ("NB_PROXY_IDLE_TIMEOUT", "300s".into()),
                ("NB_PROXY_LOG_LEVEL", "warn".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            Server::spawn(
                "portcullis",
                cpus,
                s.portcullis_bin,
                &["proxy".into()],
                &env,
                log,
            )?
        }
        Kind::Nginx => {
            let conf = dir.join("nginx.conf");
            write(&conf, &nginx_proxy_conf(&dir, s, https, http))?;
            Server::spawn(
                "nginx",
                cpus,
                &find_program("nginx")?,
                &nginx_args(&dir, &conf),
                &[],
                log,
            )?
        }
        Kind::Haproxy => {
            let conf = dir.join("haproxy.cfg");
            write(&conf, &haproxy_conf(s, https, http))?;
            let args = vec!["-db".into(), "-f".into(), conf.display().to_string()];
            Server::spawn("haproxy", cpus, &find_program("haproxy")?, &args, &[], log)?
        }
    };
    wait_listening(&mut server, https)?;
    wait_listening(&mut server, http)?;
    let pids = server.process_tree();
    Ok(Contestant {
        kind,
        https,
        http,
        server,
        pids,
    })
}

fn nginx_proxy_conf(dir: &Path, s: &Settings<'_>, https: SocketAddr, http: SocketAddr) -> String {
    let tmp = dir.join("tmp");
    let _ = std::fs::create_dir_all(&tmp);
    let conns = s.max_connections + 1_000;
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile {nofile};\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections {conns}; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n\
         \x20 fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
         \x20 keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
         \x20 upstream backend {{\n    server {backend};\n    keepalive 128;\n\
         \x20   keepalive_requests 10000000;\n    keepalive_timeout 300s;\n  }}\n\
         \x20 server {{\n    listen {https} ssl;\n    listen {http};\n\
         \x20   ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
         \x20   ssl_protocols TLSv1.2 TLSv1.3;\n\
         \x20   location / {{\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n\
         \x20     proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
         \x20     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         \x20     proxy_set_header X-Forwarded-Proto $scheme;\n\
         \x20     proxy_max_temp_file_size 0;\n    }}\n  }}\n}}\n",
        nofile = (2 * conns + 100).min(20_000),
        dir = dir.display(),
        tmp = tmp.display(),
        backend = s.backend,
        cert = s.certs.cert.display(),
        key = s.certs.key.display(),
    )
}

fn haproxy_conf(s: &Settings<'_>, https: SocketAddr, http: SocketAddr) -> String {
    let conns = s.max_connections + 100;
    format!(
        "global\n  nbthread 1\n  maxconn {conns}\n  ulimit-n 20000\n\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n\
         \x20 timeout http-keep-alive 300s\n  maxconn {conns}\n\n\
         frontend fe\n  bind {https} ssl crt {combined} alpn http/1.1\n  bind {http}\n\
         \x20 option forwardfor\n\
         \x20 http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}\n\
         \x20 http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}\n\
         \x20 default_backend be\n\n\
         backend be\n  http-reuse always\n  server backend {backend}\n",
        combined = s.certs.combined.display(),
        backend = s.backend,
    )
}

/// `nginx -v`, `haproxy -v` and the like: the first line of what the program says.
pub fn version_of(program: &str, arg: &str) -> String {
    let Ok(path) = find_program(program) else {
        return "not installed".into();
    };
    std::process::Command::new(path)
        .arg(arg)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|e| format!("unknown ({e})"))
}
