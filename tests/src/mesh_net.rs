//! The WireGuard mesh testbed: a public namespace (management, proxies, clients), a NAT router
//! in front of private sites, sites that run `portcullis agent` or a stock `wireguard-go`, and
//! LANs behind the sites. Everything is created by the test and removed when dropped (also when
//! the test fails): namespaces deleted, every process left in them killed by PID.
//!
//! ```text
//!  pub 10.77.0.1 ── 10.77.0.254 router ─┬─ 192.168.77.1 ── 192.168.77.2 site0 ── 10.88.0.1 ── lan (10.88.0.2, .3)
//!  (no route to the private side)        ├─ 192.168.78.1 ── 192.168.78.2 site1 ── …
//!                                        └─ …  (masquerades 192.168.0.0/16 towards pub)
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::client::{CurlResponse, parse_response};
use crate::netns::{ip, run_in};
use crate::process::Supervised;
use crate::proxy::binary;

/// The public namespace's address: management, the proxies and their WireGuard listen here.
pub const PUB_IP: &str = "10.77.0.1";
const ROUTER_PUB_IP: &str = "10.77.0.254";

/// Why the mesh tests cannot run here, if so (not root, no wireguard-go, no TUN, …).
pub fn skip_reason() -> Option<String> {
    if !crate::netns::is_root() {
        return Some("not root (network namespaces and TUN devices need it)".into());
    }
    for tool in ["wireguard-go", "wg", "wg-quick", "nft", "curl", "setpriv"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

/// Runs `program args` to completion: stdout, or an error with stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// Runs `program args` inside namespace `ns` (`ip netns exec`).
pub fn run_ns(ns: &str, program: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Feeds `rules` to `nft -f -` inside `ns`.
pub fn nft_ns(ns: &str, rules: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .map_err(|e| format!("nft stdin: {e}"))?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `wg show IFACE` (the UAPI socket folder is shared by every namespace), or why not.
pub fn wg_show(iface: &str) -> String {
    match run("wg", &["show", iface]) {
        Ok(s) => s,
        Err(e) => format!("<wg show {iface}: {e}>"),
    }
}

/// The topology of one test.
pub struct MeshNet {
    tag: String,
    pub pub_ns: String,
    pub router_ns: String,
    /// Every namespace, in creation order (deleted in reverse).
    namespaces: Vec<String>,
    sites: u8,
    lans: u8,
}

/// A private namespace behind the router.
#[derive(Clone, Debug)]
pub struct Site {
    pub ns: String,
    /// Its address on the router's side (192.168.x.2).
    pub ip: String,
}

impl MeshNet {
    pub fn new() -> Result<MeshNet, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = MeshNet {
            pub_ns: format!("pcm{tag}pub"),
            router_ns: format!("pcm{tag}rtr"),
            tag,
            namespaces: Vec::new(),
            sites: 0,
            lans: 0,
        };
        let (pub_ns, router_ns) = (net.pub_ns.clone(), net.router_ns.clone());
        net.add_ns(&pub_ns)?;
        net.add_ns(&router_ns)?;
        let (p0, r0) = (format!("m{}p", net.tag), format!("m{}r", net.tag));
        veth(&pub_ns, &p0, &router_ns, &r0)?;
        ip(&[
            "-n",
            &pub_ns,
            "addr",
            "add",
            &format!("{PUB_IP}/24"),
            "dev",
            &p0,
        ])?;
        ip(&["-n", &pub_ns, "link", "set", &p0, "up"])?;
        ip(&[
            "-n",
            &router_ns,
            "addr",
            "add",
            &format!("{ROUTER_PUB_IP}/24"),
            "dev",
            &r0,
        ])?;
        ip(&["-n", &router_ns, "link", "set", &r0, "up"])?;
        run_ns(&router_ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // The private side dials out; pub sees only the router's address and has no route back.
        nft_ns(
            &router_ns,
            &format!(
                "table ip portcullis_test_nat {{\n\
                 \tchain nat_postrouting {{\n\
                 \t\ttype nat hook postrouting priority 100; policy accept;\n\
                 \t\toifname \"{r0}\" ip saddr 192.168.0.0/16 masquerade\n\
                 \t}}\n\
                 \tchain filter_forward {{\n\
                 \t\ttype filter hook forward priority 0; policy accept;\n\
                 \t\tiifname \"{r0}\" ct state new drop\n\
                 \t}}\n\
                 }}\n"
            ),
        )?;
        Ok(net)
    }

    fn add_ns(&mut self, ns: &str) -> Result<(), String> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// A new namespace behind the router (192.168.(77+i).2/24, default route via the router).
    pub fn add_site(&mut self, label: &str) -> Result<Site, String> {
        let i = self.sites;
        self.sites += 1;
        let ns = format!("pcm{}{label}", self.tag);
        self.add_ns(&ns)?;
        let (s_if, r_if) = (format!("m{}s{i}", self.tag), format!("m{}g{i}", self.tag));
        veth(&ns, &s_if, &self.router_ns, &r_if)?;
        let net = format!("192.168.{}", 77 + u32::from(i));
        let site_ip = format!("{net}.2");
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{site_ip}/24"),
            "dev",
            &s_if,
        ])?;
        ip(&["-n", &ns, "link", "set", &s_if, "up"])?;
        ip(&[
            "-n",
            &self.router_ns,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            &r_if,
        ])?;
        ip(&["-n", &self.router_ns, "link", "set", &r_if, "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{net}.1"),
        ])?;
        Ok(Site { ns, ip: site_ip })
    }

    /// A LAN namespace behind `site`: `prefix.1/24` on the site's side, `prefix.N/24` for each
    /// of `hosts` on the LAN's one interface, default route via the site. The site does not
    /// forward by itself: the agent has to turn that on.
    pub fn add_lan(&mut self, site: &Site, prefix: &str, hosts: &[u8]) -> Result<String, String> {
        let i = self.lans;
        self.lans += 1;
        let ns = format!("pcm{}lan{i}", self.tag);
        self.add_ns(&ns)?;
        let (l_if, g_if) = (format!("m{}l{i}", self.tag), format!("m{}h{i}", self.tag));
        veth(&ns, &l_if, &site.ns, &g_if)?;
        for h in hosts {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{prefix}.{h}/24"),
                "dev",
                &l_if,
            ])?;
        }
        ip(&["-n", &ns, "link", "set", &l_if, "up"])?;
        ip(&[
            "-n",
            &site.ns,
            "addr",
            "add",
            &format!("{prefix}.1/24"),
            "dev",
            &g_if,
        ])?;
        ip(&["-n", &site.ns, "link", "set", &g_if, "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{prefix}.1"),
        ])?;
        Ok(ns)
    }

    /// A name for a WireGuard interface, unique on the machine (≤ 15 bytes).
    pub fn iface_name(&self, label: &str) -> String {
        let name = format!("w{}{label}", self.tag);
        assert!(name.len() <= 15, "interface name {name} is too long");
        name
    }

    /// `ip addr` and `ip route` of every namespace, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for ns in &self.namespaces {
            for what in [&["-brief", "addr"][..], &["route"][..]] {
                let mut args = vec!["-n", ns.as_str()];
                args.extend_from_slice(what);
                out.push_str(&format!(
                    "[{ns}] ip {}:\n{}\n",
                    what.join(" "),
                    run("ip", &args).unwrap_or_else(|e| e)
                ));
            }
        }
        out
    }
}

fn veth(ns_a: &str, a: &str, ns_b: &str, b: &str) -> Result<(), String> {
    ip(&[
        "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b,
    ])
}

/// PIDs of the processes in namespace `ns`.
fn pids_in(ns: &str) -> Vec<i32> {
    run("ip", &["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

impl Drop for MeshNet {
    fn drop(&mut self) {
        // Whatever the test started in its namespaces and did not stop (a wireguard-go whose
        // parent was killed, say) is killed by PID, then the namespaces go.
        for ns in &self.namespaces {
            for pid in pids_in(ns) {
                if pid as u32 != std::process::id() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

// === clients ===

/// curl from inside `ns` to `https://host:port/path`, the name resolving to `ip`, trusting
/// `ca`, bounded by `--max-time 15`. `Err` when curl itself failed (timeout, refused, …).
pub fn curl_in(
    ns: &str,
    ca: &Path,
    host: &str,
    ip: &str,
    port: u16,
    path: &str,
) -> Result<CurlResponse, String> {
    curl_in_with(ns, ca, host, ip, port, path, &[])
}

/// [`curl_in`] sending extra request headers (`Name: value`).
pub fn curl_in_with(
    ns: &str,
    ca: &Path,
    host: &str,
    ip: &str,
    port: u16,
    path: &str,
    headers: &[&str],
) -> Result<CurlResponse, String> {
    let url = format!("https://{host}:{port}{path}");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "-i", "--http1.1"])
        .args(["--max-time", "15", "--connect-timeout", "5"])
        .args(headers.iter().flat_map(|h| ["-H", h]))
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:{ip}"))
        .arg(&url)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "curl {url} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_response(&out.stdout))
}

/// A TCP connection attempt from inside `ns`, bounded by `timeout`.
pub fn tcp_connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    run_in(Some(ns.to_string()), move || {
        TcpStream::connect_timeout(&addr, timeout).map(drop)
    })
}

// === an HTTP target ===

/// A minimal HTTP/1.1 server (keep-alive, GET only) that answers every request with its body.
/// Its socket is created inside a namespace and bound to one address there; stopped on drop.
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `addr` inside `ns`, retrying until `within` passes (the address may appear on an
    /// interface a moment later).
    pub fn start_in(ns: &str, addr: SocketAddr, body: &str, within: Duration) -> HttpServer {
        let deadline = Instant::now() + within;
        let listener = loop {
            let res = run_in(Some(ns.to_string()), move || TcpListener::bind(addr));
            match res {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot bind {addr} in {ns} within {within:?}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (s, a, c, body) = (
            Arc::clone(&stop),
            Arc::clone(&accepted),
            Arc::clone(&conns),
            body.to_string(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let _ = stream.set_nonblocking(false);
                        if let Ok(clone) = stream.try_clone() {
                            c.lock().unwrap_or_else(|p| p.into_inner()).push(clone);
                        }
                        let body = body.clone();
                        std::thread::spawn(move || serve(stream, &body));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        HttpServer {
            addr,
            stop,
            accepted,
            conns,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// `{X-NetBird-User}` and `{X-NetBird-Groups}` in a body become the request's values of those
/// headers (`-` when absent), so a test sees the identity the proxy passed on.
fn with_identity(body: &str, head: &str) -> String {
    let mut out = body.to_string();
    for name in ["X-NetBird-User", "X-NetBird-Groups"] {
        let placeholder = format!("{{{name}}}");
        if !out.contains(&placeholder) {
            continue;
        }
        let values: Vec<&str> = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect();
        let value = if values.is_empty() {
            "-".to_string()
        } else {
            values.join("|")
        };
        out = out.replace(&placeholder, &value);
    }
    out
}

fn serve(mut stream: TcpStream, body: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            let body = with_identity(body, &String::from_utf8_lossy(&head));
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

// === portcullis agent ===

/// `portcullis agent` in a site namespace: started, stopped and started again with the same
/// state directory; every run logs to its own file.
pub struct Agent {
    pub ns: String,
    pub label: String,
    pub state_dir: PathBuf,
    pub interface: String,
    management: String,
    log_dir: PathBuf,
    runs: u32,
    process: Option<Supervised>,
    logs: Vec<PathBuf>,
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn new(
        ns: &str,
        label: &str,
        interface: &str,
        management_grpc_url: &str,
        dir: &Path,
    ) -> Agent {
        Agent {
            ns: ns.to_string(),
            label: label.to_string(),
            state_dir: dir.join(format!("agent-{label}-state")),
            interface: interface.to_string(),
            management: management_grpc_url.to_string(),
            log_dir: dir.to_path_buf(),
            runs: 0,
            process: None,
            logs: Vec::new(),
            env: Vec::new(),
        }
    }

    /// An extra environment variable for every start.
    pub fn with_env(mut self, name: &str, value: &str) -> Agent {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Starts the agent (`setup_key` only for the first registration).
    pub fn start(&mut self, setup_key: Option<&str>) {
        assert!(self.process.is_none(), "agent {} already runs", self.label);
        let log = self
            .log_dir
            .join(format!("agent-{}-{}.log", self.label, self.runs));
        self.runs += 1;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(binary())
            .arg("agent")
            .args(["--management", &self.management, "--allow-insecure"])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--name", &self.label, "--interface", &self.interface])
            .args(["--backend", "tun", "--log-level", "debug"])
            .env_remove("PORTCULLIS_AGENT_SETUP_KEY")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(key) = setup_key {
            // Through the environment, as an operator would keep it out of `ps`.
            cmd.env("PORTCULLIS_AGENT_SETUP_KEY", key);
        }
        self.logs.push(log.clone());
        self.process = Some(Supervised::spawn(&mut cmd, "agent", log));
    }

    /// SIGTERM (the agent removes its interface), SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.terminate(Duration::from_secs(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_some()
    }

    /// Every run's log, concatenated.
    pub fn log_text(&self) -> String {
        self.logs
            .iter()
            .map(|l| {
                format!(
                    "--- {} ---\n{}",
                    l.display(),
                    std::fs::read_to_string(l).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("agent.json")
    }

    /// The agent's state file, parsed (panics when absent).
    pub fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state_file())
            .unwrap_or_else(|e| panic!("{}: {e}", self.state_file().display()));
        serde_json::from_str(&text).expect("agent.json is JSON")
    }

    pub fn state_mode(&self) -> u32 {
        std::fs::metadata(self.state_file())
            .expect("agent.json")
            .permissions()
            .mode()
            & 0o777
    }

    pub fn wg_show(&self) -> String {
        wg_show(&self.interface)
    }

    /// Waits until the agent's interface has `n` peers with a handshake (bounded).
    pub fn wait_handshakes(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let show = self.wg_show();
            let done = show.matches("latest handshake").count() >= n;
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent {}: fewer than {n} peers with a handshake within {within:?}:\n{show}\n{}",
                self.label,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every log file of this agent.
    pub fn logs(&self) -> &[PathBuf] {
        &self.logs
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent {} wg show ---\n{}\n--- agent {} logs ---\n{}",
                self.label,
                self.wg_show(),
                self.label,
                self.log_text()
            );
        }
        // SIGTERM first so it removes its interface and its wireguard-go.
        self.stop();
    }
}

// === a stock WireGuard peer ===

/// `wireguard-go -f IFACE` in a namespace, configured from a wg-quick file with `wg setconf`,
/// the address added with `ip addr`: what a user does with management's wg-quick config on a
/// machine of their own.
pub struct StockPeer {
    pub ns: String,
    pub iface: String,
    process: Supervised,
}

impl StockPeer {
    pub fn start(ns: &str, iface: &str, wg_quick: &str, dir: &Path) -> Result<StockPeer, String> {
        let log = dir.join(format!("wireguard-go-{iface}.log"));
        let process = Supervised::spawn(
            Command::new("ip")
                .args(["netns", "exec", ns, "wireguard-go", "-f", iface])
                .env("LOG_LEVEL", "debug"),
            "wireguard-go",
            log,
        );
        let peer = StockPeer {
            ns: ns.to_string(),
            iface: iface.to_string(),
            process,
        };
        let socket = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "wireguard-go did not open {}: {}",
                    socket.display(),
                    peer.process.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peer.apply(wg_quick, dir)?;
        ip(&["-n", ns, "link", "set", iface, "up"])?;
        Ok(peer)
    }

    /// Replaces the interface's configuration (`wg-quick strip` + `wg setconf`) and adds the
    /// config's addresses.
    pub fn apply(&self, wg_quick: &str, dir: &Path) -> Result<(), String> {
        // wg-quick names the interface after the file.
        let conf_dir = dir.join(format!("wgq-{}", self.iface));
        std::fs::create_dir_all(&conf_dir).map_err(|e| e.to_string())?;
        let conf = conf_dir.join(format!("{}.conf", self.iface));
        std::fs::write(&conf, wg_quick).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        let stripped = run("wg-quick", &["strip", &conf.display().to_string()])?;
        let plain = conf_dir.join("plain.conf");
        std::fs::write(&plain, stripped).map_err(|e| e.to_string())?;
        run(
            "wg",
            &["setconf", &self.iface, &plain.display().to_string()],
        )?;
        for addr in wg_quick_addresses(wg_quick) {
            // Already there when applied again.
            let _ = ip(&["-n", &self.ns, "addr", "add", &addr, "dev", &self.iface]);
        }
        let _ = std::fs::remove_file(&plain);
        let _ = std::fs::remove_file(&conf);
        Ok(())
    }

    pub fn wg_show(&self) -> String {
        wg_show(&self.iface)
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// The `Address = …` entries of a wg-quick config.
pub fn wg_quick_addresses(conf: &str) -> Vec<String> {
    conf.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim().eq_ignore_ascii_case("address")).then(|| v.to_string())
        })
        .flat_map(|v| {
            v.split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The value of the first `key = value` line of a wg-quick config.
pub fn wg_quick_value(conf: &str, key: &str) -> Option<String> {
    conf.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        // Base64 keys end in '=': split at the first '=' only.
        k.trim()
            .eq_ignore_ascii_case(key)
            .then(|| v.trim().to_string())
    })
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `within`; `None` on timeout.
pub fn poll<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
