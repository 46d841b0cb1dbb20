//! The L4 part of the bench (issue #5): TCP throughput and UDP packet rate through Portcullis
//! (with and without the kernel splice), HAProxy and nginx, and Portcullis's XDP filter against
//! nftables at dropping a flood.
//!
//! - `proxies`: the L4 contestants and their configs; `iperf`: the target and the load;
//!   `throughput`: one measured run, and the medians of the rounds.
//! - `netns`, `flood`, `drop`, `bpf_stats`: the namespaces, the UDP flood, one measured drop
//!   run, the XDP program's own run time.
//! - `report`: medians, ratios, targets, Markdown.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use crate::contestants::Placement;
use crate::machine::Machine;

mod bpf_stats;
mod drop;
mod flood;
mod iperf;
pub(crate) mod netns;
mod proxies;
pub mod report;
mod throughput;

use proxies::{L4Contestant, L4Kind};
use report::{L4Effort, L4Report};
use throughput::{TcpResult, UdpResult};

/// TCP stream counts of the throughput workload.
const STREAMS: [u32; 2] = [1, 64];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Workload {
    Tcp,
    Udp,
    Drop,
}

pub const ALL: [L4Workload; 3] = [L4Workload::Tcp, L4Workload::Udp, L4Workload::Drop];

impl L4Workload {
    pub fn id(self) -> &'static str {
        match self {
            L4Workload::Tcp => "l4-tcp",
            L4Workload::Udp => "l4-udp",
            L4Workload::Drop => "xdp-drop",
        }
    }

    pub fn parse(s: &str) -> Option<L4Workload> {
        ALL.into_iter().find(|w| w.id() == s)
    }

    /// Programs the workload needs.
    pub fn tools(self) -> &'static [&'static str] {
        match self {
            L4Workload::Tcp | L4Workload::Udp => &["iperf3", "nginx", "haproxy", "taskset"],
            L4Workload::Drop => &["ip", "nft", "taskset"],
        }
    }
}

pub struct Settings<'a> {
    pub dir: &'a Path,
    pub portcullis_bin: &'a Path,
    pub placement: &'a Placement,
    pub effort: L4Effort,
}

pub fn run(selected: &[L4Workload], s: &Settings<'_>, machine: Machine) -> Result<L4Report> {
    let dir = s.dir.join("l4");
    std::fs::create_dir_all(&dir)?;
    let mut report = L4Report {
        machine,
        effort: s.effort,
        tcp: Vec::new(),
        udp: None,
        drop: None,
        targets: Vec::new(),
    };
    let tcp = selected.contains(&L4Workload::Tcp);
    let udp = selected.contains(&L4Workload::Udp);
    if tcp || udp {
        let mut target = iperf::TargetServer::start(&dir, s.placement.load_cpus.as_deref())?;
        let mut proxies: Vec<L4Contestant> = proxies::ALL
            .into_iter()
            .map(|k| {
                proxies::start(
                    k,
                    &dir,
                    s.portcullis_bin,
                    target.addr,
                    s.placement.proxy_cpus.as_deref(),
                )
                .with_context(|| format!("starting {}", k.name()))
            })
            .collect::<Result<_>>()?;
        for p in &proxies {
            if let Some(why) = &p.unavailable {
                eprintln!("bench: {}: {why}", p.kind.label());
            }
        }
        if tcp {
            for streams in STREAMS {
                let id = format!("l4-tcp/{streams}");
                let unavailable: BTreeMap<L4Kind, String> = proxies
                    .iter()
                    .filter_map(|p| p.unavailable.clone().map(|why| (p.kind, why)))
                    .collect();
                let (samples, failed) = rounds(
                    &mut proxies,
                    &mut target,
                    s,
                    &id,
                    |p| p.unavailable.is_none(),
                    |p, env, round| throughput::tcp(p, streams, env, round),
                    |t| {
                        format!(
                            "{:>7.2} Gbit/s  {:>7.1} µs proxy CPU/MiB  {:>7.1} µs all CPU/MiB{}",
                            t.gbit_per_sec,
                            t.proxy_cpu_us_per_mib,
                            t.all_cpu_us_per_mib,
                            t.spliced
                                .map(|n| format!("  {n}/{} spliced", t.connections.unwrap_or(0)))
                                .unwrap_or_default()
                        )
                    },
                )?;
                report
                    .tcp
                    .push(TcpResult::new(streams, samples, unavailable, failed));
            }
        }
        if udp {
            let mut unavailable = BTreeMap::new();
            unavailable.insert(
                L4Kind::Haproxy,
                "n/a: HAProxy 2.6's community edition does not proxy UDP".to_string(),
            );
            // UDP is never spliced: one Portcullis (the default settings) stands for both.
            let (samples, failed) = rounds(
                &mut proxies,
                &mut target,
                s,
                "l4-udp",
                |p| p.kind.does_udp() && p.kind != L4Kind::PortcullisCopy,
                throughput::udp,
                |u| {
                    format!(
                        "{:>9.0} datagrams/s  {:>5.1} % lost  {:>6.2} µs proxy CPU/datagram",
                        u.packets_per_sec, u.loss_percent, u.proxy_cpu_us_per_packet
                    )
                },
            )?;
            report.udp = Some(UdpResult::new(samples, unavailable, failed));
        }
    }
    if selected.contains(&L4Workload::Drop) {
        report.drop = Some(drop_rounds(s)?);
    }
    Ok(report)
}

/// The proxies of round `round`, in turn: who goes first rotates.
fn rotation(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + round) % n)
}

type Samples<S> = BTreeMap<L4Kind, Vec<S>>;

/// One warm-up run per proxy, then the rounds. A proxy whose run fails is left out of the rest
/// of the workload (its samples too: figures from the runs that happened to pass would flatter
/// it) and named in the second map; the iperf3 server is restarted after a failure.
fn rounds<S>(
    proxies: &mut [L4Contestant],
    target: &mut iperf::TargetServer,
    s: &Settings<'_>,
    id: &str,
    runs: impl Fn(&L4Contestant) -> bool,
    measure: impl Fn(&mut L4Contestant, &throughput::Env<'_>, usize) -> Result<S>,
    describe: impl Fn(&S) -> String,
) -> Result<(Samples<S>, BTreeMap<L4Kind, String>)> {
    let mut samples: Samples<S> = BTreeMap::new();
    let mut failed: BTreeMap<L4Kind, String> = BTreeMap::new();
    let warm_up = !s.effort.warmup.is_zero();
    // Round `None` is the warm-up.
    let schedule = warm_up
        .then_some(None)
        .into_iter()
        .chain((0..s.effort.rounds).map(Some));
    for round in schedule {
        for i in rotation(proxies.len(), round.unwrap_or(0)) {
            let p = &mut proxies[i];
            if !runs(p) || failed.contains_key(&p.kind) {
                continue;
            }
            let env = throughput::Env {
                target_pid: target.pid(),
                load_cpus: s.placement.load_cpus.as_deref(),
                duration: if round.is_some() {
                    s.effort.duration
                } else {
                    s.effort.warmup
                },
            };
            let when = round.map_or("warm-up".to_string(), |r| format!("round {}", r + 1));
            match measure(p, &env, round.unwrap_or(0)) {
                Ok(sample) => {
                    if round.is_some() {
                        eprintln!(
                            "bench: {id:<10} {when} {:<18} {}",
                            p.kind.name(),
                            describe(&sample)
                        );
                        samples.entry(p.kind).or_default().push(sample);
                    }
                }
                Err(e) => {
                    let why = format!("{when}: {e:#}");
                    eprintln!("bench: {id} through {} FAILED in {why}", p.kind.name());
                    samples.remove(&p.kind);
                    failed.insert(p.kind, why);
                    p.server
                        .check_alive()
                        .with_context(|| format!("{} died during {id}", p.kind.name()))?;
                    target.restart()?;
                }
            }
        }
    }
    Ok((samples, failed))
}

fn drop_rounds(s: &Settings<'_>) -> Result<drop::DropResult> {
    if !nix::unistd::geteuid().is_root() {
        let why = "needs root (network namespaces, nftables, XDP): skipped";
        eprintln!("bench: xdp-drop {why}");
        let mut result = drop::DropResult::new(BTreeMap::new());
        result.unavailable = drop::FILTERS
            .iter()
            .map(|f| (*f, why.to_string()))
            .collect();
        return Ok(result);
    }
    let pair = netns::NetnsPair::create().context("creating the network namespaces")?;
    let settings = drop::Settings {
        dir: s.dir,
        portcullis_bin: s.portcullis_bin,
        proxy_cpus: s.placement.proxy_cpus.as_deref(),
        sender_cpu: s.placement.load_cpus.as_deref().and_then(first_cpu),
        duration: s.effort.duration,
        warmup: s.effort.warmup,
    };
    let mut samples: BTreeMap<drop::Filter, Vec<drop::DropSample>> = BTreeMap::new();
    let mut unavailable = BTreeMap::new();
    let mut failed = BTreeMap::new();
    let mut xdp_state = None;
    for round in 0..s.effort.rounds {
        for i in rotation(drop::FILTERS.len(), round) {
            let f = drop::FILTERS[i];
            if unavailable.contains_key(&f) || failed.contains_key(&f) {
                continue;
            }
            match drop::run_one(f, &pair, &settings, round) {
                Err(e) => {
                    let why = format!("round {}: {e:#}", round + 1);
                    eprintln!("bench: xdp-drop with {} FAILED in {why}", f.name());
                    samples.remove(&f);
                    failed.insert(f, why);
                }
                Ok(drop::Outcome::Measured(sample, state)) => {
                    eprintln!(
                        "bench: xdp-drop   round {} {:<12} {:>9.0} sent/s {:>9.0} dropped/s  {:>6.0} ns softirq/drop  {:>6.0} ns sender/packet",
                        round + 1,
                        f.name(),
                        sample.sent_per_sec,
                        sample.dropped_per_sec,
                        sample.softirq_ns_per_drop,
                        sample.sender_ns_per_packet
                    );
                    if f == drop::Filter::Xdp {
                        xdp_state = Some(state);
                    }
                    samples.entry(f).or_default().push(sample);
                }
                Ok(drop::Outcome::Unavailable(why)) => {
                    eprintln!("bench: xdp-drop: {why}");
                    unavailable.insert(f, why);
                }
            }
        }
    }
    let mut result = drop::DropResult::new(samples);
    result.unavailable = unavailable;
    result.failed = failed;
    result.xdp_state = xdp_state;
    Ok(result)
}

/// The first CPU of a `taskset` list ("0", "0-2", "0,1").
fn first_cpu(list: &str) -> Option<usize> {
    list.split([',', '-']).next()?.trim().parse().ok()
}
