//! Let's Encrypt's ACME test server, Pebble (Debian package `pebble`, 2.4), for ACME tests: a
//! real CA that validates http-01 and tls-alpn-01 challenges against the proxy on loopback.
//!
//! Two processes, both stopped by PID when the [`Pebble`] is dropped:
//! - `pebble-challtestsrv` as Pebble's DNS server only: it answers every `A` query with
//!   127.0.0.1 and every `AAAA` query with nothing, so any name a test orders resolves to
//!   loopback (its own challenge servers are off);
//! - `pebble`, on loopback ports of its own, with a listener certificate made here (the package
//!   ships none), its validation authority pointed at the proxy's ports
//!   ([`PebbleOptions::http_port`], [`PebbleOptions::tls_port`]) and made deterministic:
//!   `PEBBLE_VA_NOSLEEP=1` (no random 0-15 s sleep before each validation),
//!   `PEBBLE_WFE_NONCEREJECT=0` (no valid nonce rejected as `badNonce`; Pebble rejects 5 % by
//!   default), `PEBBLE_AUTHZREUSE=0` (every order gets fresh, pending authorizations, so a
//!   renewal really goes through a challenge again; Pebble reuses valid ones 50 % of the time
//!   by default). Every other `PEBBLE_*` variable of the test's environment is removed, and so
//!   are the proxy variables, so the validation authority never dials anything but loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::certs::TestCa;
use crate::client::{CurlResponse, parse_response, try_tls_connect};
use crate::process::Supervised;
use crate::proxy::{TestDir, free_port};

/// How long Pebble may take to come up (it generates two RSA-2048 keys first; the machine's
/// two cores are shared with parallel tests).
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct PebbleOptions {
    /// Port Pebble's VA connects to for http-01 (the proxy's plain-HTTP listener).
    pub http_port: u16,
    /// Port Pebble's VA connects to for tls-alpn-01 (the proxy's HTTPS listener).
    pub tls_port: u16,
    /// Validity of issued certificates; `None` = Pebble's default (157766400 s, about 5 years).
    /// Pebble counts whole seconds (a fraction is rounded up; at least 1 s): a certificate
    /// issued at `t` has notBefore = `t` (not backdated) and notAfter = `t + validity - 1 s`,
    /// i.e. exactly `validity` seconds with both ends inclusive, as RFC 5280 counts.
    pub validity: Option<Duration>,
}

/// A running Pebble with its DNS server.
pub struct Pebble {
    // Fields drop in order: the CA first, then its DNS server.
    pebble: Supervised,
    _dns: Supervised,
    listen_port: u16,
    management_port: u16,
    dns_port: u16,
    ca_file: PathBuf,
    roots_pem: String,
    roots_file: PathBuf,
}

impl Pebble {
    /// Starts `pebble-challtestsrv` and `pebble` and waits (bounded) until the directory and
    /// the management interface answer. `None` (with a printed reason) when the pebble
    /// binaries are missing and `CI` is unset; panics in CI.
    pub fn start(dir: &TestDir, opts: PebbleOptions) -> Option<Pebble> {
        let (Some(pebble_bin), Some(dns_bin)) =
            (find_program("pebble"), find_program("pebble-challtestsrv"))
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "pebble / pebble-challtestsrv are not installed in CI: run the tests through \
                 `cargo xtask test` (it installs the Debian package `pebble`)"
            );
            eprintln!(
                "skipping: pebble / pebble-challtestsrv not found on PATH \
                 (`apt-get install pebble`, or run `cargo xtask test`)"
            );
            return None;
        };
        let validity_secs = opts.validity.map(|v| {
            let secs = v.as_secs() + u64::from(v.subsec_nanos() > 0);
            assert!(secs >= 1, "Pebble's certificate validity is at least 1 s");
            secs
        });

        let work = dir.0.join("pebble");
        std::fs::create_dir_all(&work).expect("pebble dir");

        // Pebble's own listener (directory and management): a leaf for 127.0.0.1 and localhost
        // from a throwaway CA, which is what a client trusts to reach the directory.
        let ca = TestCa::new();
        let leaf = ca.leaf(&["127.0.0.1", "localhost"]);
        let ca_file = work.join("listener-ca.pem");
        let cert_file = work.join("listener.crt");
        let key_file = work.join("listener.key");
        std::fs::write(&ca_file, &ca.pem).expect("pebble listener CA");
        std::fs::write(&cert_file, &leaf.cert_pem).expect("pebble listener certificate");
        std::fs::write(&key_file, &leaf.key_pem).expect("pebble listener key");

        let listen_port = free_port();
        let management_port = free_port();
        let dns_port = free_port();
        let dns_management_port = free_port();

        let mut pebble_cfg = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{listen_port}"),
            "managementListenAddress": format!("127.0.0.1:{management_port}"),
            "certificate": cert_file,
            "privateKey": key_file,
            "httpPort": opts.http_port,
            "tlsPort": opts.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(secs) = validity_secs {
            // Pebble 2.4 reads `certificateValidityPeriod` (seconds) and logs "Using
            // certificate validity period of N seconds" (checked below).
            pebble_cfg["certificateValidityPeriod"] = secs.into();
        }
        let config_file = work.join("pebble-config.json");
        std::fs::write(
            &config_file,
            serde_json::to_vec_pretty(&serde_json::json!({ "pebble": pebble_cfg }))
                .expect("pebble config"),
        )
        .expect("pebble config file");

        let mut dns_cmd = Command::new(dns_bin);
        dns_cmd
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .arg("-dns01")
            .arg(format!("127.0.0.1:{dns_port}"))
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .arg("-management")
            .arg(format!("127.0.0.1:{dns_management_port}"));
        let mut dns = Supervised::spawn(
            &mut dns_cmd,
            "pebble-challtestsrv",
            work.join("challtestsrv.log"),
        );
        // It serves DNS on TCP and UDP on the same port; TCP is what can be probed.
        wait_for(&mut dns, "pebble-challtestsrv's DNS port", || {
            tcp_connects(dns_port).then_some(())
        });

        let mut pebble_cmd = Command::new(pebble_bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PEBBLE_") {
                pebble_cmd.env_remove(key);
            }
        }
        for var in [
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
        ] {
            pebble_cmd.env_remove(var);
        }
        pebble_cmd
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .arg("-config")
            .arg(&config_file)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            .arg("-strict=false");
        let mut pebble = Supervised::spawn(&mut pebble_cmd, "pebble", work.join("pebble.log"));

        let ca_pem = ca.pem.clone();
        wait_for(&mut pebble, "Pebble's ACME directory", || {
            https_get(&ca_pem, listen_port, "/dir")
                .ok()
                .filter(|r| r.status == 200 && r.text().contains("newOrder"))
                .map(drop)
        });
        let roots_pem = wait_for(&mut pebble, "Pebble's management /roots/0", || {
            https_get(&ca_pem, management_port, "/roots/0")
                .ok()
                .filter(|r| r.status == 200 && r.text().contains("-----BEGIN CERTIFICATE-----"))
                .map(|r| r.text())
        });
        let roots_file = work.join("issuing-root.pem");
        std::fs::write(&roots_file, &roots_pem).expect("issuing root file");

        // Pebble logs each setting it took at start (all before it listens): a version that
        // ignores one fails here rather than by a flaky test later.
        let log = pebble.log_text();
        let mut expected = vec![
            "Disabling random VA sleeps".to_string(),
            "Configured to reject 0% of good nonces".to_string(),
            "Configured to attempt authz reuse for each identifier 0% of the time".to_string(),
        ];
        if let Some(secs) = validity_secs {
            expected.push(format!(
                "Using certificate validity period of {secs} seconds"
            ));
        }
        for line in &expected {
            assert!(
                log.contains(line.as_str()),
                "Pebble did not log {line:?}: this version does not take a setting the harness \
                 relies on\n{log}"
            );
        }

        Some(Pebble {
            pebble,
            _dns: dns,
            listen_port,
            management_port,
            dns_port,
            ca_file,
            roots_pem,
            roots_file,
        })
    }

    /// The ACME directory: `https://127.0.0.1:PORT/dir`.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.listen_port)
    }

    /// PEM file that verifies the directory's own TLS listener (and the management
    /// interface's): the CA of a certificate for `127.0.0.1` and `localhost`.
    pub fn directory_ca_file(&self) -> PathBuf {
        self.ca_file.clone()
    }

    /// Pebble's issuing root (management `/roots/0`), what a client must trust to verify
    /// issued certificates. Pebble makes a new one at every start; the chains it issues are
    /// leaf + one intermediate, without the root.
    pub fn issuing_roots_pem(&self) -> String {
        self.roots_pem.clone()
    }

    /// [`Pebble::issuing_roots_pem`] as a file.
    pub fn issuing_roots_file(&self) -> PathBuf {
        self.roots_file.clone()
    }

    /// Pebble's management interface: `https://127.0.0.1:PORT` (`/roots/0`,
    /// `/intermediates/0`, `/cert-status-by-serial/<hex>`), verified by
    /// [`Pebble::directory_ca_file`].
    pub fn management_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.management_port)
    }

    /// The DNS server Pebble resolves names with (every name is 127.0.0.1).
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.dns_port))
    }

    /// Number of new orders Pebble accepted. Pebble logs "There are now N orders in the db"
    /// for each one before it answers the newOrder request (so an order the client has seen
    /// created is counted), and it never deletes orders: the count is the largest N logged
    /// on a complete line.
    pub fn order_count(&self) -> usize {
        orders_in_log(&self.log_text())
    }

    /// Pebble's log (stdout and stderr) so far.
    pub fn log_text(&self) -> String {
        self.pebble.log_text()
    }
}

/// The largest N of "There are now N orders in the db" on the complete lines of `log`.
fn orders_in_log(log: &str) -> usize {
    let complete = log.rfind('\n').map_or("", |end| &log[..end]);
    complete
        .lines()
        .filter_map(|line| {
            let rest = line.split_once("There are now ")?.1;
            rest.strip_suffix(" orders in the db")?.trim().parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// `name` on `PATH`, as `command -v` would find it.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether the process has exited (a zombie, or gone): its state in `/proc/PID/stat`.
fn has_exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // "PID (comm) STATE ...": comm may hold spaces and parentheses, so look after the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_none_or(|state| state == "Z" || state == "X")
}

/// Polls `probe` every 50 ms until it yields, for at most [`START_TIMEOUT`]; panics (with the
/// process's log) when the process exits first or time runs out.
fn wait_for<T>(process: &mut Supervised, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            !has_exited(process.pid),
            "{what}: the process exited\n{}",
            process.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "{what}: no answer within {START_TIMEOUT:?}\n{}",
            process.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tcp_connects(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

/// One HTTP/1.0 GET over TLS to `https://127.0.0.1:PORT/path`, trusting `ca_pem` (so no
/// chunked body, and the server closes when done).
fn https_get(ca_pem: &str, port: u16, path: &str) -> std::io::Result<CurlResponse> {
    let mut stream = try_tls_connect(ca_pem, "127.0.0.1", port)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )?;
    stream.flush()?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            // A close without close_notify ends the response just the same.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    if !raw.starts_with(b"HTTP/") || !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(parse_response(&raw))
}

#[cfg(test)]
mod tests {
    use super::orders_in_log;

    #[test]
    fn order_count_reads_complete_lines_only() {
        let log = "Pebble 2026/01/01 00:00:00 Added order \"a\" to the db\n\
                   Pebble 2026/01/01 00:00:00 There are now 1 orders in the db\n\
                   Pebble 2026/01/01 00:00:01 There are now 2 orders in the db\n\
                   Pebble 2026/01/01 00:00:02 There are now 3 ord";
        assert_eq!(orders_in_log(log), 2);
        assert_eq!(orders_in_log(""), 0);
        assert_eq!(orders_in_log("There are now 7 orders in the db"), 0);
    }
}
