//! The two namespaces of the mesh workloads, `edge` (management, the proxies, the load) and
//! `site` (the agent, a plain wireguard-go, the targets), joined by one veth pair. Deleted on
//! drop, after every process still inside them is killed by PID. Traffic stays inside them.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Every namespace this harness's mesh part creates starts with this, then the harness's PID.
const PREFIX: &str = "pcmesh-";

pub const EDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 1);
pub const SITE_IP: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 2);

pub struct EdgeSite {
    pub edge: String,
    pub site: String,
    /// The edge's end of the veth pair: every packet between the namespaces crosses it.
    pub edge_if: String,
}

impl EdgeSite {
    pub fn create() -> Result<EdgeSite> {
        remove_stale();
        let pid = std::process::id();
        let pair = EdgeSite {
            edge: format!("{PREFIX}{pid}-edge"),
            site: format!("{PREFIX}{pid}-site"),
            edge_if: format!("pme{pid}"),
        };
        // The guard exists from here: whatever is made below is deleted on failure too.
        ip(&["netns", "add", &pair.edge])?;
        ip(&["netns", "add", &pair.site])?;
        let (e_if, s_if) = (pair.edge_if.clone(), format!("pms{pid}"));
        ip(&[
            "link", "add", &e_if, "netns", &pair.edge, "type", "veth", "peer", "name", &s_if,
            "netns", &pair.site,
        ])?;
        for (ns, dev, addr) in [(&pair.edge, &e_if, EDGE_IP), (&pair.site, &s_if, SITE_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for EdgeSite {
    fn drop(&mut self) {
        for ns in [&self.edge, &self.site] {
            for pid in pids_in(ns) {
                if pid != std::process::id() as i32 {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        for ns in [&self.edge, &self.site] {
            if std::path::Path::new(&format!("/run/netns/{ns}")).exists()
                && let Err(e) = ip(&["netns", "delete", ns])
            {
                eprintln!("bench: could not delete network namespace {ns}: {e:#}");
            }
        }
    }
}

fn pids_in(ns: &str) -> Vec<i32> {
    output("ip", &["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .take(1_000)
        .collect()
}

pub fn ip(args: &[&str]) -> Result<()> {
    output("ip", args).map(drop)
}

/// Runs `program args` (bounded by 20 s); its stdout, or an error with its stderr.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let mut c = Command::new(program);
    c.args(args);
    let out = crate::wrk::with_deadline(c, Duration::from_secs(20))
        .with_context(|| format!("{program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes `pcmesh-<pid>-*` namespaces whose harness is no longer running.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten().take(1_000) {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("bench: deleting network namespace {name} left by an earlier run");
            for p in pids_in(&name) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}

/// Runs `f` on a thread that has entered namespace `ns`; processes it starts are born there
/// too (a child inherits the forking thread's namespace).
pub use crate::l4::netns::within;

/// Packets `dev` in namespace `ns` has sent plus received so far.
pub fn packets(ns: &str, dev: &str) -> Result<u64> {
    let json = output("ip", &["-n", ns, "-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("ip -s -j link")?;
    let stats = &v[0]["stats64"];
    match (
        stats["rx"]["packets"].as_u64(),
        stats["tx"]["packets"].as_u64(),
    ) {
        (Some(rx), Some(tx)) => Ok(rx + tx),
        _ => bail!("no packet counters for {dev} in {ns}: {json}"),
    }
}
