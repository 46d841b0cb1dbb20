//! Dropping a flood from a blocked source: Portcullis's XDP filter against an nftables rule.
//!
//! Two network namespaces joined by a veth pair. The receiver runs Portcullis with a UDP service
//! whose `blocked_cidrs` holds the sender's address; the sender floods that port. Either the
//! XDP filter (attached to the receiver's veth) drops the flood, or, with the kernel fast path
//! off, an nftables rule `ip saddr <sender> udp dport <port> counter drop` in the input hook
//! (and, for reference, the same rule in the netdev ingress hook, netfilter's earliest).
//!
//! The receiving side's CPU is the machine's softirq time (`/proc/stat`) during the flood: on a
//! veth pair the receive path, XDP and netfilter alike, runs in the NET_RX softirq of the CPU
//! that sent the packet, and nothing else on the machine moves many packets meanwhile.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::netns::{NetnsPair, within};
use super::proxies::{L4Service, ebpf_state, healthz, mappings, portcullis_env, wait_healthy_with};
use super::{bpf_stats, flood};
use crate::contestants::{find_program, write};
use crate::process::{Server, cpu_time};

/// The blocked UDP port inside the receiver namespace (its own, so fixed numbers are safe).
const PORT: u16 = 5301;
const HEALTH: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8081);
const HTTPS_PORT: u16 = 8443;
const NFT_TABLE: &str = "pcbench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filter {
    Xdp,
    NftInput,
    NftIngress,
}

pub const FILTERS: [Filter; 3] = [Filter::Xdp, Filter::NftInput, Filter::NftIngress];

impl Filter {
    pub fn name(self) -> &'static str {
        match self {
            Filter::Xdp => "xdp",
            Filter::NftInput => "nft-input",
            Filter::NftIngress => "nft-ingress",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Filter::Xdp => "XDP (Portcullis)",
            Filter::NftInput => "nftables, input hook",
            Filter::NftIngress => "nftables, ingress hook",
        }
    }
}

/// One flood against one filter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropSample {
    pub round: usize,
    pub sent: u64,
    pub dropped: u64,
    pub seconds: f64,
    pub sent_per_sec: f64,
    pub dropped_per_sec: f64,
    /// Softirq CPU of the whole machine during the flood, per dropped packet, in ns.
    pub softirq_ns_per_drop: f64,
    /// CPU of the sending thread per packet sent, in ns (includes the softirq work the kernel
    /// charged to it: see `flood::Flood::cpu`).
    pub sender_ns_per_packet: f64,
    /// CPU Portcullis itself spent during the flood, in µs (it should see none of it).
    pub receiver_proxy_cpu_us: u64,
    /// `sendmmsg` calls refused (device or neighbour queue full).
    pub failed_send_calls: u64,
    /// XDP only: the program's own run time per packet (kernel BPF statistics), measured during
    /// the warm-up flood when there is one, so the statistics' cost stays out of the measured run.
    #[serde(default)]
    pub xdp_program_ns_per_packet: Option<f64>,
}

pub struct Settings<'a> {
    pub dir: &'a Path,
    pub portcullis_bin: &'a Path,
    pub proxy_cpus: Option<&'a str>,
    pub sender_cpu: Option<usize>,
    pub duration: Duration,
    pub warmup: Duration,
}

/// What a run found: a sample, or why the filter cannot run here.
pub enum Outcome {
    Measured(DropSample, String),
    Unavailable(String),
}

pub fn run_one(
    filter: Filter,
    pair: &NetnsPair,
    s: &Settings<'_>,
    round: usize,
) -> Result<Outcome> {
    let dir = s.dir.join("drop").join(filter.name());
    std::fs::create_dir_all(&dir)?;
    let mut receiver = start_receiver(filter, pair, s, &dir)?;
    let rx = pair.receiver_ns.clone();
    let doc = wait_healthy_with(&mut receiver, &format!("{PORT}/udp"), || {
        within(&rx, || healthz(HEALTH))
    })?;
    let state = ebpf_state(&doc);
    if filter == Filter::Xdp {
        if !state.starts_with("on") {
            let reason = state.strip_prefix("off: ").unwrap_or(&state);
            return Ok(Outcome::Unavailable(format!("XDP unavailable: {reason}")));
        }
        if xdp_dropped(&doc).is_none() {
            bail!("the fast path is on ({state}) but /healthz has no XDP counters for {PORT}/udp");
        }
    }
    let _table = match filter {
        Filter::Xdp => None,
        Filter::NftInput | Filter::NftIngress => Some(NftTable::add(filter, pair, &dir)?),
    };
    let to = SocketAddrV4::new(pair.receiver_ip, PORT);
    let flood_for = |d: Duration| {
        within(&pair.sender_ns, || {
            flood::run(pair.sender_ip, to, d, s.sender_cpu)
        })
    };
    let pids = receiver.process_tree();
    // The XDP program's own cost, from the kernel's statistics: read over the warm-up flood when
    // there is one (statistics cost two clock reads per program run: they stay out of the
    // measured flood), else over the measured flood itself.
    let xdp = filter == Filter::Xdp;
    let mut program_ns = None;
    if !s.warmup.is_zero() {
        let stats = xdp.then(bpf_stats::enable);
        let before = bpf_stats::xdp_runs(receiver.pid());
        flood_for(s.warmup)?;
        if stats.is_some() {
            program_ns = per_run(before, bpf_stats::xdp_runs(receiver.pid()));
        }
    }
    let stats = (xdp && s.warmup.is_zero()).then(bpf_stats::enable);
    let before = bpf_stats::xdp_runs(receiver.pid());
    let m = measure(filter, pair, s, &pids, flood_for)?;
    if stats.is_some() {
        program_ns = per_run(before, bpf_stats::xdp_runs(receiver.pid()));
    }
    drop(stats);
    finish(filter, m, &mut receiver, program_ns, state, round)
}

/// ns per run between two readings of the XDP program's statistics.
fn per_run(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let runs = after.1.checked_sub(before.1).filter(|n| *n > 0)?;
    Some(after.0.saturating_sub(before.0) as f64 / runs as f64)
}

/// What one measured flood read.
struct Measured {
    flood: flood::Flood,
    dropped: u64,
    softirq_us: u64,
    proxy_us: u64,
}

fn measure(
    filter: Filter,
    pair: &NetnsPair,
    s: &Settings<'_>,
    pids: &[u32],
    flood_for: impl Fn(Duration) -> Result<flood::Flood>,
) -> Result<Measured> {
    let dropped_before = dropped(filter, pair)?;
    let softirq_before = softirq_us()?;
    let proxy_before = cpu_time(pids);
    let flood = flood_for(s.duration)?;
    let softirq_us = softirq_us()?.saturating_sub(softirq_before);
    let proxy_us = cpu_time(pids).since(proxy_before).total_us();
    let dropped = dropped(filter, pair)?.saturating_sub(dropped_before);
    Ok(Measured {
        flood,
        dropped,
        softirq_us,
        proxy_us,
    })
}

fn finish(
    filter: Filter,
    m: Measured,
    receiver: &mut Server,
    xdp_program_ns_per_packet: Option<f64>,
    state: String,
    round: usize,
) -> Result<Outcome> {
    receiver.check_alive()?;
    let Measured {
        flood: f,
        dropped,
        softirq_us: softirq,
        proxy_us,
    } = m;
    if f.sent == 0 {
        bail!("the flood sent nothing ({} calls refused)", f.failed_calls);
    }
    if dropped == 0 {
        bail!(
            "{} dropped nothing of {} packets from a blocked source",
            filter.label(),
            f.sent
        );
    }
    let secs = f.elapsed.as_secs_f64().max(1e-6);
    Ok(Outcome::Measured(
        DropSample {
            round,
            sent: f.sent,
            dropped,
            seconds: secs,
            sent_per_sec: f.sent as f64 / secs,
            dropped_per_sec: dropped as f64 / secs,
            softirq_ns_per_drop: softirq as f64 * 1_000.0 / dropped as f64,
            sender_ns_per_packet: f.cpu.total_us() as f64 * 1_000.0 / f.sent as f64,
            receiver_proxy_cpu_us: proxy_us,
            failed_send_calls: f.failed_calls,
            xdp_program_ns_per_packet,
        },
        state,
    ))
}

/// Portcullis in the receiver namespace, with the XDP filter on its veth or the fast path off.
fn start_receiver(
    filter: Filter,
    pair: &NetnsPair,
    s: &Settings<'_>,
    dir: &Path,
) -> Result<Server> {
    let file = dir.join("mappings.toml");
    write(
        &file,
        &mappings(&[L4Service {
            id: "flood",
            mode: "udp",
            port: PORT,
            // Nothing listens there: every packet of the flood is to be dropped before it.
            target: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9),
            blocked: Some(IpAddr::V4(pair.sender_ip)),
        }]),
    )?;
    let fast_path: Vec<(&str, String)> = match filter {
        Filter::Xdp => vec![
            ("PORTCULLIS_EBPF", "auto".into()),
            ("PORTCULLIS_XDP_INTERFACES", pair.receiver_if.clone()),
            ("PORTCULLIS_L4_SPLICE", "off".into()),
        ],
        Filter::NftInput | Filter::NftIngress => vec![("PORTCULLIS_EBPF", "off".into())],
    };
    let env = portcullis_env(
        dir,
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        HTTPS_PORT,
        HEALTH,
        &file,
        &fast_path,
    )?;
    let mut args = pair.exec_in_receiver();
    args.push(s.portcullis_bin.display().to_string());
    args.push("proxy".into());
    Server::spawn(
        &format!("portcullis receiver ({})", filter.name()),
        s.proxy_cpus,
        &find_program("ip")?,
        &args,
        &env,
        dir.join("stderr.log"),
    )
}

fn xdp_dropped(doc: &Value) -> Option<u64> {
    doc.get("l4")?
        .get("xdp")?
        .get(format!("{PORT}/udp"))?
        .get("dropped_packets")?
        .as_u64()
}

/// Packets the filter has dropped so far.
fn dropped(filter: Filter, pair: &NetnsPair) -> Result<u64> {
    match filter {
        Filter::Xdp => {
            let doc = within(&pair.receiver_ns, || healthz(HEALTH))?;
            xdp_dropped(&doc).context("the XDP counters left /healthz")
        }
        Filter::NftInput | Filter::NftIngress => {
            let out = nft(pair, &["-j", "list", "table", family(filter), NFT_TABLE])?;
            let doc: Value = serde_json::from_str(&out).context("nft -j printed no JSON")?;
            Ok(counter_packets(&doc))
        }
    }
}

/// Sum of the packets of every rule counter in `nft -j` output.
fn counter_packets(doc: &Value) -> u64 {
    doc.get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| item.pointer("/rule/expr").and_then(Value::as_array))
        .flatten()
        .filter_map(|e| e.pointer("/counter/packets").and_then(Value::as_u64))
        .sum()
}

fn family(filter: Filter) -> &'static str {
    if filter == Filter::NftIngress {
        "netdev"
    } else {
        "inet"
    }
}

/// The nftables table of a run, deleted when dropped.
struct NftTable<'a> {
    pair: &'a NetnsPair,
    family: &'static str,
}

impl<'a> NftTable<'a> {
    fn add(filter: Filter, pair: &'a NetnsPair, dir: &Path) -> Result<NftTable<'a>> {
        let rule = format!("ip saddr {} udp dport {PORT} counter drop", pair.sender_ip);
        let ruleset = match filter {
            Filter::NftIngress => format!(
                "table netdev {NFT_TABLE} {{\n  chain ingress {{\n    type filter hook ingress \
                 device \"{}\" priority 0; policy accept;\n    {rule}\n  }}\n}}\n",
                pair.receiver_if
            ),
            _ => format!(
                "table inet {NFT_TABLE} {{\n  chain input {{\n    type filter hook input priority \
                 0; policy accept;\n    {rule}\n  }}\n}}\n"
            ),
        };
        let file = dir.join("ruleset.nft");
        write(&file, &ruleset)?;
        nft(pair, &["-f", &file.display().to_string()])?;
        Ok(NftTable {
            pair,
            family: family(filter),
        })
    }
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = nft(self.pair, &["delete", "table", self.family, NFT_TABLE]);
    }
}

/// `nft ARGS` inside the receiver namespace; its stdout.
fn nft(pair: &NetnsPair, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(find_program("ip")?);
    cmd.args(pair.exec_in_receiver())
        .arg(find_program("nft")?)
        .args(args);
    let out = crate::wrk::with_deadline(cmd, Duration::from_secs(10))
        .with_context(|| format!("nft {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "nft {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Softirq time of all CPUs so far (`/proc/stat`), in µs.
fn softirq_us() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    // cpu user nice system idle iowait irq softirq …
    let ticks: u64 = line
        .split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .context("no softirq field in /proc/stat")?;
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as u64;
    Ok(ticks * 1_000_000 / per_sec)
}

/// Medians of one filter's samples.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct DropMedians {
    pub sent_per_sec: f64,
    pub dropped_per_sec: f64,
    pub softirq_ns_per_drop: f64,
    pub sender_ns_per_packet: f64,
    /// Dropped / sent: below 1 when packets were lost before the filter.
    pub dropped_share: f64,
    #[serde(default)]
    pub xdp_program_ns_per_packet: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DropResult {
    pub port: u16,
    /// `/healthz`'s `ebpf` field during the XDP runs.
    pub xdp_state: Option<String>,
    pub samples: BTreeMap<Filter, Vec<DropSample>>,
    pub medians: BTreeMap<Filter, DropMedians>,
    pub unavailable: BTreeMap<Filter, String>,
    /// Filters whose runs failed (a bug to fix: the bench exits with an error).
    #[serde(default)]
    pub failed: BTreeMap<Filter, String>,
}

impl DropResult {
    pub fn new(port_samples: BTreeMap<Filter, Vec<DropSample>>) -> DropResult {
        use crate::report::median;
        let medians = port_samples
            .iter()
            .map(|(f, v)| {
                let of = |g: &dyn Fn(&DropSample) -> f64| {
                    median(v.iter().map(g).collect()).unwrap_or(0.0)
                };
                (
                    *f,
                    DropMedians {
                        sent_per_sec: of(&|s| s.sent_per_sec),
                        dropped_per_sec: of(&|s| s.dropped_per_sec),
                        softirq_ns_per_drop: of(&|s| s.softirq_ns_per_drop),
                        sender_ns_per_packet: of(&|s| s.sender_ns_per_packet),
                        dropped_share: of(&|s| s.dropped as f64 / s.sent.max(1) as f64),
                        xdp_program_ns_per_packet: median(
                            v.iter()
                                .filter_map(|s| s.xdp_program_ns_per_packet)
                                .collect(),
                        ),
                    },
                )
            })
            .collect();
        DropResult {
            port: PORT,
            xdp_state: None,
            samples: port_samples,
            medians,
            unavailable: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Whether every filter dropped (nearly) all the sender produced: then no filter was pushed
    /// to its limit, and packets per second measure the sender's core (sending and dropping).
    pub fn sender_bound(&self) -> bool {
        !self.medians.is_empty() && self.medians.values().all(|m| m.dropped_share >= 0.99)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_rule_counters_from_nft_json() {
        let doc: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},{"table":{"name":"pcbench"}},
            {"rule":{"expr":[{"match":{}},{"counter":{"packets":7,"bytes":420}},{"drop":null}]}}]}"#,
        )
        .unwrap();
        assert_eq!(counter_packets(&doc), 7);
    }
}
