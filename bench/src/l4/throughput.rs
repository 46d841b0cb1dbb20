//! TCP throughput and UDP packet rate through one L4 proxy: one iperf3 client run, with the
//! proxy's CPU and the CPU of everything the transfer touched read around it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::iperf::{self, Load};
use super::proxies::{L4Contestant, L4Kind, healthz, l4_counter};
use crate::process::{CpuTime, cpu_time, kernel_threads, tail, waited_children_cpu};
use crate::report::median;

const MIB: f64 = (1u64 << 20) as f64;

pub struct Env<'a> {
    /// The iperf3 server's PID (its CPU counts in "all CPU").
    pub target_pid: u32,
    pub load_cpus: Option<&'a str>,
    pub duration: Duration,
}

/// One TCP run through one proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpSample {
    pub round: usize,
    pub streams: u32,
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_per_sec: f64,
    /// Proxy CPU (user + system, every process of it) per MiB received by the server, in µs.
    pub proxy_cpu_us_per_mib: f64,
    pub proxy_user_us_per_mib: f64,
    /// The proxy, both iperf3 ends and the kernel threads (kworkers, ksoftirqd), per MiB: what
    /// the whole transfer cost, wherever the kernel did the forwarding.
    pub all_cpu_us_per_mib: f64,
    pub retransmits: u64,
    /// Portcullis: connections proxied and spliced during the run.
    pub connections: Option<u64>,
    pub spliced: Option<u64>,
}

/// One UDP run through one proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UdpSample {
    pub round: usize,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub seconds: f64,
    /// Datagrams the server received per second.
    pub packets_per_sec: f64,
    pub loss_percent: f64,
    /// Proxy CPU per datagram delivered to the server, in µs.
    pub proxy_cpu_us_per_packet: f64,
    pub proxy_user_us_per_packet: f64,
}

/// CPU readings taken before a run.
struct Before {
    proxy: CpuTime,
    all: CpuTime,
    kernel: Vec<u32>,
    health: Option<serde_json::Value>,
}

fn before(c: &L4Contestant, env: &Env<'_>) -> Result<Before> {
    let health = c.health.map(healthz).transpose()?;
    let kernel = kernel_threads();
    Ok(Before {
        proxy: cpu_time(&c.pids),
        all: all_cpu(c, env, &kernel),
        kernel,
        health,
    })
}

fn all_cpu(c: &L4Contestant, env: &Env<'_>, kernel: &[u32]) -> CpuTime {
    let mut pids = c.pids.clone();
    pids.push(env.target_pid);
    pids.extend_from_slice(kernel);
    let ours = cpu_time(&pids);
    let client = waited_children_cpu();
    CpuTime {
        user_us: ours.user_us + client.user_us,
        system_us: ours.system_us + client.system_us,
    }
}

pub fn tcp(c: &mut L4Contestant, streams: u32, env: &Env<'_>, round: usize) -> Result<TcpSample> {
    c.server.check_alive()?;
    let b = before(c, env)?;
    let out = iperf::run(&Load {
        target: c.listen,
        duration: env.duration,
        streams,
        udp: false,
        cpus: env.load_cpus,
    })?;
    let proxy = cpu_time(&c.pids).since(b.proxy);
    let all = all_cpu(c, env, &b.kernel).since(b.all);
    c.server.check_alive()?;
    if out.bytes_received == 0 {
        bail!(
            "no bytes reached the iperf3 server through {}; its log:\n{}",
            c.kind.name(),
            tail(&c.server.log)
        );
    }
    let (connections, spliced) = match (&b.health, c.health) {
        (Some(h0), Some(addr)) => {
            let h1 = healthz(addr)?;
            let d = |k: &str| l4_counter(&h1, k).saturating_sub(l4_counter(h0, k));
            (Some(d("connections")), Some(d("spliced")))
        }
        _ => (None, None),
    };
    if c.kind == L4Kind::PortcullisSplice && spliced == Some(0) {
        bail!(
            "the kernel fast path is on but none of the {} connections was spliced; log:\n{}",
            connections.unwrap_or(0),
            tail(&c.server.log)
        );
    }
    let mib = out.bytes_received as f64 / MIB;
    Ok(TcpSample {
        round,
        streams,
        bytes: out.bytes_received,
        seconds: out.seconds,
        gbit_per_sec: out.bytes_received as f64 * 8.0 / out.seconds.max(1e-6) / 1e9,
        proxy_cpu_us_per_mib: proxy.total_us() as f64 / mib,
        proxy_user_us_per_mib: proxy.user_us as f64 / mib,
        all_cpu_us_per_mib: all.total_us() as f64 / mib,
        retransmits: out.retransmits,
        connections,
        spliced,
    })
}

pub fn udp(c: &mut L4Contestant, env: &Env<'_>, round: usize) -> Result<UdpSample> {
    c.server.check_alive()?;
    let proxy_before = cpu_time(&c.pids);
    let out = iperf::run(&Load {
        target: c.listen,
        duration: env.duration,
        streams: 1,
        udp: true,
        cpus: env.load_cpus,
    })?;
    let proxy = cpu_time(&c.pids).since(proxy_before);
    c.server.check_alive()?;
    if out.packets_received == 0 {
        bail!(
            "no datagram reached the iperf3 server through {}; its log:\n{}",
            c.kind.name(),
            tail(&c.server.log)
        );
    }
    let received = out.packets_received as f64;
    let sent = out.packets_sent.max(out.packets_received) as f64;
    Ok(UdpSample {
        round,
        packets_sent: out.packets_sent,
        packets_received: out.packets_received,
        seconds: out.seconds,
        packets_per_sec: received / out.seconds.max(1e-6),
        loss_percent: (sent - received) / sent.max(1.0) * 100.0,
        proxy_cpu_us_per_packet: proxy.total_us() as f64 / received,
        proxy_user_us_per_packet: proxy.user_us as f64 / received,
    })
}

// === medians over the rounds ===

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct TcpMedians {
    pub gbit_per_sec: f64,
    pub proxy_cpu_us_per_mib: f64,
    pub proxy_user_us_per_mib: f64,
    pub all_cpu_us_per_mib: f64,
    pub retransmits: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TcpResult {
    pub streams: u32,
    pub samples: BTreeMap<L4Kind, Vec<TcpSample>>,
    pub medians: BTreeMap<L4Kind, TcpMedians>,
    /// Contestants that could not be measured here, and why.
    pub unavailable: BTreeMap<L4Kind, String>,
    /// Contestants whose runs failed (a bug to fix: the bench exits with an error).
    #[serde(default)]
    pub failed: BTreeMap<L4Kind, String>,
}

impl TcpResult {
    pub fn new(
        streams: u32,
        samples: BTreeMap<L4Kind, Vec<TcpSample>>,
        unavailable: BTreeMap<L4Kind, String>,
        failed: BTreeMap<L4Kind, String>,
    ) -> TcpResult {
        let medians = samples
            .iter()
            .map(|(k, v)| {
                let of = |g: &dyn Fn(&TcpSample) -> f64| {
                    median(v.iter().map(g).collect()).unwrap_or(0.0)
                };
                (
                    *k,
                    TcpMedians {
                        gbit_per_sec: of(&|s| s.gbit_per_sec),
                        proxy_cpu_us_per_mib: of(&|s| s.proxy_cpu_us_per_mib),
                        proxy_user_us_per_mib: of(&|s| s.proxy_user_us_per_mib),
                        all_cpu_us_per_mib: of(&|s| s.all_cpu_us_per_mib),
                        retransmits: of(&|s| s.retransmits as f64),
                    },
                )
            })
            .collect();
        TcpResult {
            streams,
            samples,
            medians,
            unavailable,
            failed,
        }
    }

    pub fn get(&self, k: L4Kind) -> Option<&TcpMedians> {
        self.medians.get(&k)
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct UdpMedians {
    pub packets_per_sec: f64,
    pub loss_percent: f64,
    pub proxy_cpu_us_per_packet: f64,
    pub proxy_user_us_per_packet: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UdpResult {
    pub samples: BTreeMap<L4Kind, Vec<UdpSample>>,
    pub medians: BTreeMap<L4Kind, UdpMedians>,
    pub unavailable: BTreeMap<L4Kind, String>,
    #[serde(default)]
    pub failed: BTreeMap<L4Kind, String>,
}

impl UdpResult {
    pub fn new(
        samples: BTreeMap<L4Kind, Vec<UdpSample>>,
        unavailable: BTreeMap<L4Kind, String>,
        failed: BTreeMap<L4Kind, String>,
    ) -> UdpResult {
        let medians = samples
            .iter()
            .map(|(k, v)| {
                let of = |g: &dyn Fn(&UdpSample) -> f64| {
                    median(v.iter().map(g).collect()).unwrap_or(0.0)
                };
                (
                    *k,
                    UdpMedians {
                        packets_per_sec: of(&|s| s.packets_per_sec),
                        loss_percent: of(&|s| s.loss_percent),
                        proxy_cpu_us_per_packet: of(&|s| s.proxy_cpu_us_per_packet),
                        proxy_user_us_per_packet: of(&|s| s.proxy_user_us_per_packet),
                    },
                )
            })
            .collect();
        UdpResult {
            samples,
            medians,
            unavailable,
            failed,
        }
    }
}
