//! Two network namespaces joined by a veth pair, made for the drop workload and deleted when the
//! guard is dropped (also when a run fails or panics). Traffic stays inside them.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Every namespace this harness creates starts with this, followed by the harness's PID.
const PREFIX: &str = "pcbench-";

/// A sender namespace and a receiver namespace, one veth end in each.
pub struct NetnsPair {
    pub sender_ns: String,
    pub receiver_ns: String,
    pub sender_if: String,
    pub receiver_if: String,
    pub sender_ip: Ipv4Addr,
    pub receiver_ip: Ipv4Addr,
}

impl NetnsPair {
    /// Creates the pair; namespaces left behind by an earlier harness that died are removed first.
    pub fn create() -> Result<NetnsPair> {
        remove_stale();
        let pid = std::process::id();
        let pair = NetnsPair {
            sender_ns: format!("{PREFIX}{pid}-tx"),
            receiver_ns: format!("{PREFIX}{pid}-rx"),
            // Interface names have at most 15 bytes: "pcb" + at most 7 digits + 1.
            sender_if: format!("pcb{pid}t"),
            receiver_if: format!("pcb{pid}r"),
            sender_ip: Ipv4Addr::new(10, 213, 0, 1),
            receiver_ip: Ipv4Addr::new(10, 213, 0, 2),
        };
        // From here on the guard deletes whatever was made, also if a later step fails.
        ip(&["netns", "add", &pair.sender_ns])?;
        ip(&["netns", "add", &pair.receiver_ns])?;
        ip(&[
            "link",
            "add",
            &pair.sender_if,
            "netns",
            &pair.sender_ns,
            "type",
            "veth",
            "peer",
            "name",
            &pair.receiver_if,
            "netns",
            &pair.receiver_ns,
        ])?;
        for (ns, dev, addr) in [
            (&pair.sender_ns, &pair.sender_if, pair.sender_ip),
            (&pair.receiver_ns, &pair.receiver_if, pair.receiver_ip),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// `program` run inside the receiver namespace (`ip netns exec` execs it: same PID).
    pub fn exec_in_receiver(&self) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.receiver_ns.clone()]
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the peer.
        for ns in [&self.sender_ns, &self.receiver_ns] {
            if !std::path::Path::new(&format!("/run/netns/{ns}")).exists() {
                continue;
            }
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("bench: could not delete network namespace {ns}: {e:#}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = crate::wrk::with_deadline(
        {
            let mut c = Command::new("ip");
            c.args(args);
            c
        },
        Duration::from_secs(10),
    )
    .with_context(|| format!("ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes `pcbench-<pid>-*` namespaces whose harness is no longer running.
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
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}

/// Runs `f` on a thread that has entered namespace `ns`, so its sockets live there. Only that
/// thread changes namespace; it ends with `f`.
pub fn within<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("enter network namespace {ns}"))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("a thread in network namespace {ns} panicked"))
    })
}
