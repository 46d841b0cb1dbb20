//! The mesh part of the bench (issue #8): a single TCP stream and HTTPS keep-alive requests with
//! 1 KiB responses through Portcullis over its WireGuard mesh to a target behind a real
//! `portcullis agent` (TUN backend and in-process backend), against the same traffic over a
//! plain `wireguard-go` ↔ `wireguard-go` tunnel between the same two namespaces.
//!
//! - `net`: the `edge` and `site` namespaces; `setup`: everything started in them;
//!   `api`: management's REST and `/healthz`;
//! - `measure`: one run; `profile`: where a proxy's CPU goes; `report`: medians, ratios,
//!   the target, Markdown.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::contestants::Placement;
use crate::machine::Machine;

mod api;
mod measure;
mod net;
mod profile;
pub mod report;
mod setup;

use report::{MeshEffort, MeshReport, MeshResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MeshWorkload {
    #[serde(rename = "mesh-tcp")]
    Tcp,
    #[serde(rename = "mesh-https")]
    Https,
}

pub const ALL: [MeshWorkload; 2] = [MeshWorkload::Tcp, MeshWorkload::Https];

impl MeshWorkload {
    pub fn id(self) -> &'static str {
        match self {
            MeshWorkload::Tcp => "mesh-tcp",
            MeshWorkload::Https => "mesh-https",
        }
    }

    pub fn parse(s: &str) -> Option<MeshWorkload> {
        ALL.into_iter().find(|w| w.id() == s)
    }

    /// Programs the workload needs (besides portcullis).
    pub fn tools(self) -> &'static [&'static str] {
        match self {
            MeshWorkload::Tcp => &[
                "wireguard-go",
                "wg",
                "ip",
                "iperf3",
                "nginx",
                "curl",
                "taskset",
            ],
            MeshWorkload::Https => &[
                "wireguard-go",
                "wg",
                "ip",
                "wrk",
                "nginx",
                "curl",
                "taskset",
            ],
        }
    }
}

/// The three ways from the edge to the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeshPath {
    Baseline,
    Tun,
    InProcess,
}

pub const PATHS: [MeshPath; 3] = [MeshPath::Baseline, MeshPath::Tun, MeshPath::InProcess];

impl MeshPath {
    pub fn name(self) -> &'static str {
        match self {
            MeshPath::Baseline => "baseline",
            MeshPath::Tun => "tun",
            MeshPath::InProcess => "in-process",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            MeshPath::Baseline => "wireguard-go ↔ wireguard-go",
            MeshPath::Tun => "Portcullis, TUN",
            MeshPath::InProcess => "Portcullis, in-process",
        }
    }
}

pub struct Settings<'a> {
    pub dir: &'a Path,
    pub portcullis_bin: &'a Path,
    pub placement: &'a Placement,
    pub effort: MeshEffort,
    pub script: &'a Path,
}

pub fn run(selected: &[MeshWorkload], s: &Settings<'_>, machine: Machine) -> Result<MeshReport> {
    let mut report = MeshReport {
        machine,
        effort: s.effort,
        agent_ip: String::new(),
        tcp: None,
        https: None,
        profiles: Vec::new(),
        targets: Vec::new(),
        skipped: None,
    };
    if !nix::unistd::geteuid().is_root() {
        let why = "needs root (network namespaces, TUN devices): skipped".to_string();
        eprintln!("bench: mesh workloads {why}");
        report.skipped = Some(why);
        return Ok(report);
    }
    let dir = s.dir.join("mesh");
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    let started = std::time::Instant::now();
    let mut bed = setup::start(&setup::Settings {
        dir: &dir,
        portcullis_bin: s.portcullis_bin,
        proxy_cpus: s.placement.proxy_cpus.as_deref(),
        load_cpus: s.placement.load_cpus.as_deref(),
    })
    .context("setting up the mesh testbed")?;
    report.agent_ip = bed.agent_ip.to_string();
    eprintln!(
        "bench: mesh testbed up in {:.1?} (agent {}); {} of {} paths answer the 1 KiB body",
        started.elapsed(),
        bed.agent_ip,
        bed.contestants.len() - bed.failed.len(),
        bed.contestants.len()
    );
    let edge = bed.net.edge.clone();
    let edge_if = bed.net.edge_if.clone();
    let management_pid = bed.management_pid;
    for &w in selected {
        let result = rounds(w, &mut bed, &edge, &edge_if, s)?;
        match w {
            MeshWorkload::Tcp => report.tcp = Some(result),
            MeshWorkload::Https => report.https = Some(result),
        }
        // Where the proxies' CPU goes: one more run each, profiled.
        for path in [MeshPath::InProcess, MeshPath::Tun] {
            let Some(c) = bed
                .contestants
                .iter()
                .find(|c| c.path == path && !bed.failed.contains_key(&path))
            else {
                continue;
            };
            let env = measure::Env {
                ns: &edge,
                edge_if: &edge_if,
                management_pid,
                load_cpus: s.placement.load_cpus.as_deref(),
                duration: s.effort.duration,
                script: s.script,
            };
            match profile::profile(w, c, &env, &dir) {
                Ok(p) => {
                    eprintln!(
                        "bench: {:<10} profiled {:<22} {}",
                        w.id(),
                        path.label(),
                        p.perf_note.as_deref().unwrap_or("perf ok")
                    );
                    report.profiles.push(p);
                }
                Err(e) => {
                    let why = format!("profiled run: {e:#}");
                    eprintln!("bench: {} through {} FAILED in {why}", w.id(), path.label());
                    let r = match w {
                        MeshWorkload::Tcp => report.tcp.as_mut(),
                        MeshWorkload::Https => report.https.as_mut(),
                    };
                    if let Some(r) = r {
                        r.failed.entry(path).or_insert(why);
                    }
                }
            }
        }
    }
    drop(bed);
    Ok(report)
}

/// One warm-up run per path, then the rounds, the paths taking turns (who goes first rotates).
/// A path whose run fails is left out of the rest of the workload and named in `failed`.
fn rounds(
    w: MeshWorkload,
    bed: &mut setup::Bed,
    edge: &str,
    edge_if: &str,
    s: &Settings<'_>,
) -> Result<MeshResult> {
    let mut samples: BTreeMap<MeshPath, Vec<measure::MeshSample>> = BTreeMap::new();
    let mut failed: BTreeMap<MeshPath, String> = bed.failed.clone();
    let schedule = (!s.effort.warmup.is_zero())
        .then_some(None)
        .into_iter()
        .chain((0..s.effort.rounds).map(Some));
    for round in schedule {
        let n = bed.contestants.len();
        for i in 0..n {
            let c = &bed.contestants[(i + round.unwrap_or(0)) % n];
            if failed.contains_key(&c.path) {
                continue;
            }
            let env = measure::Env {
                ns: edge,
                edge_if,
                management_pid: bed.management_pid,
                load_cpus: s.placement.load_cpus.as_deref(),
                duration: round.map_or(s.effort.warmup, |_| s.effort.duration),
                script: s.script,
            };
            let when = round.map_or("warm-up".to_string(), |r| format!("round {}", r + 1));
            let path = c.path;
            match measure::run(w, c, &env, round.unwrap_or(0)) {
                Ok(sample) => {
                    if round.is_some() {
                        eprintln!(
                            "bench: {:<10} {when} {:<28} {:>9.2} {}  {:>8.1} µs edge CPU/{}  {:>8.1} µs site CPU/{}",
                            w.id(),
                            path.label(),
                            sample.rate,
                            report::rate_unit(w),
                            sample.edge_cpu_us_per_op,
                            report::op(w),
                            sample.site_cpu_us_per_op,
                            report::op(w),
                        );
                        samples.entry(path).or_default().push(sample);
                    }
                }
                Err(e) => {
                    let why = format!("{when}: {e:#}");
                    eprintln!("bench: {} through {} FAILED in {why}", w.id(), path.label());
                    samples.remove(&path);
                    failed.insert(path, why);
                }
            }
            bed.check_alive()
                .with_context(|| format!("a process died during {}", w.id()))?;
            // Let the tunnels drain between runs (wrk leaves 64 connections closing).
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(MeshResult::new(w, samples, failed))
}
