//! Where a proxy's CPU goes during one extra (unmeasured) run: per thread (and per process:
//! the proxy, its wireguard-go) user and system time from `/proc/<pid>/task/*/stat`, and, when
//! `perf` works here, a flat sampled profile (by binary and by symbol).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::measure::{self, Env, tree};
use super::setup::MeshContestant;
use super::{MeshPath, MeshWorkload};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub workload: MeshWorkload,
    pub path: MeshPath,
    /// Ops (MiB or requests) completed during the profiled run, and its rate.
    pub ops: f64,
    pub rate: f64,
    /// Per thread name ("process/thread"): user and system µs per op.
    pub threads: Vec<ThreadCpu>,
    /// `perf report --sort dso`: percent of samples per binary.
    #[serde(default)]
    pub perf_dso: Vec<(f64, String)>,
    /// `perf report --sort dso,sym`: the heaviest symbols.
    #[serde(default)]
    pub perf_symbols: Vec<(f64, String)>,
    /// Why there is no perf profile, if there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perf_note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadCpu {
    pub name: String,
    pub user_us_per_op: f64,
    pub system_us_per_op: f64,
}

/// (process/thread name) → (user, system) ticks of every thread of `pids`.
fn thread_ticks(pids: &[u32]) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for pid in pids {
        let pname = comm(&format!("/proc/{pid}/stat")).unwrap_or_else(|| pid.to_string());
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten().take(4_096) {
            let path = t.path().join("stat");
            let Ok(stat) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let name = stat
                .find('(')
                .map(|o| stat[o + 1..close].to_string())
                .unwrap_or_default();
            let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            let (Some(u), Some(s)) = (
                fields.get(11).and_then(|v| v.parse::<u64>().ok()),
                fields.get(12).and_then(|v| v.parse::<u64>().ok()),
            ) else {
                continue;
            };
            let e = out.entry(format!("{pname}/{name}")).or_default();
            e.0 += u;
            e.1 += s;
        }
    }
    out
}

fn comm(stat_path: &str) -> Option<String> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    Some(stat[stat.find('(')? + 1..stat.rfind(')')?].to_string())
}

/// One run of `w` over `c` with the proxy's threads read around it and `perf record` attached.
pub fn profile(w: MeshWorkload, c: &MeshContestant, env: &Env<'_>, dir: &Path) -> Result<Profile> {
    let pids = tree(c.edge_pid);
    let data = dir.join(format!("perf-{}-{}.data", w.id(), c.path.name()));
    let perf = crate::contestants::find_program("perf").ok();
    let secs = env.duration.as_secs_f64().ceil().max(1.0) as u64;
    let mut recorder = perf.as_ref().and_then(|perf| {
        let list = pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = crate::process::pinned(env.load_cpus, perf);
        cmd.args(["record", "-q", "-F", "999", "-p", &list, "-o"])
            .arg(&data)
            .args(["--", "sleep", &secs.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.spawn().ok()
    });
    let before = thread_ticks(&pids);
    let run = measure::run(w, c, env, 0);
    let after = thread_ticks(&pids);
    let mut perf_note = None;
    let recorded = match recorder.as_mut() {
        None => {
            perf_note = Some("perf is not installed (Debian: linux-perf)".to_string());
            false
        }
        Some(child) => wait_bounded(child, Duration::from_secs(secs + 30)),
    };
    let run = run.with_context(|| format!("profiled {} run over {}", w.id(), c.path.label()))?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    let per_op = |t: u64| t as f64 * 1e6 / ticks / run.ops.max(1e-9);
    let mut threads: Vec<ThreadCpu> = after
        .iter()
        .map(|(name, (u, s))| {
            let (u0, s0) = before.get(name).copied().unwrap_or((0, 0));
            ThreadCpu {
                name: name.clone(),
                user_us_per_op: per_op(u.saturating_sub(u0)),
                system_us_per_op: per_op(s.saturating_sub(s0)),
            }
        })
        .filter(|t| t.user_us_per_op + t.system_us_per_op > 0.0)
        .collect();
    threads.sort_by(|a, b| {
        (b.user_us_per_op + b.system_us_per_op).total_cmp(&(a.user_us_per_op + a.system_us_per_op))
    });
    let (mut perf_dso, mut perf_symbols) = (Vec::new(), Vec::new());
    if let (Some(perf), true) = (&perf, recorded) {
        match (
            report(perf, &data, "dso", 0.5),
            report(perf, &data, "dso,sym", 1.0),
        ) {
            (Ok(d), Ok(s)) if !d.is_empty() => {
                perf_dso = d;
                perf_symbols = s.into_iter().take(25).collect();
            }
            (Err(e), _) | (_, Err(e)) => perf_note = Some(format!("perf report failed: {e:#}")),
            _ => perf_note = Some("perf recorded no samples".to_string()),
        }
    } else if perf.is_some() && perf_note.is_none() {
        let err = recorder
            .as_mut()
            .and_then(|c| c.stderr.take())
            .map(|mut e| {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut e, &mut s);
                s
            })
            .unwrap_or_default();
        perf_note = Some(format!("perf record failed: {}", err.trim()));
    }
    let _ = std::fs::remove_file(&data);
    Ok(Profile {
        workload: w,
        path: c.path,
        ops: run.ops,
        rate: run.rate,
        threads,
        perf_dso,
        perf_symbols,
        perf_note,
    })
}

/// Waits for `child` at most `deadline` (killed after); whether it exited successfully.
fn wait_bounded(child: &mut std::process::Child, deadline: Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if start.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// `perf report --stdio` sorted by `keys`: (percent, the rest of the line), above `limit` %.
fn report(perf: &Path, data: &Path, keys: &str, limit: f64) -> Result<Vec<(f64, String)>> {
    let mut cmd = Command::new(perf);
    cmd.args([
        "report",
        "--stdio",
        "--no-children",
        "-g",
        "none",
        "--sort",
        keys,
    ])
    .arg("--percent-limit")
    .arg(limit.to_string())
    .arg("-i")
    .arg(data);
    let out = crate::wrk::with_deadline(cmd, Duration::from_secs(180))?;
    if !out.status.success() {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let l = l.trim();
            let (pct, rest) = l.split_once('%')?;
            let pct: f64 = pct.trim().parse().ok()?;
            Some((pct, rest.split_whitespace().collect::<Vec<_>>().join(" ")))
        })
        .collect())
}
