//! The mesh part of the report: medians, ratios to the plain wireguard-go tunnel, the target of
//! issue #8, the proxies' profiles, Markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::measure::{CONNECTIONS, MeshSample};
use super::profile::Profile;
use super::{MeshPath, MeshWorkload, PATHS};
use crate::machine::Machine;
use crate::report::{Target, fmt, fmt_ratio, median, ratio, target};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MeshEffort {
    pub rounds: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MeshReport {
    pub machine: Machine,
    pub effort: MeshEffort,
    #[serde(default)]
    pub agent_ip: String,
    #[serde(default)]
    pub tcp: Option<MeshResult>,
    #[serde(default)]
    pub https: Option<MeshResult>,
    #[serde(default)]
    pub profiles: Vec<Profile>,
    /// Computed from the medians when written.
    #[serde(default, skip_deserializing)]
    pub targets: Vec<Target>,
    /// Why nothing was measured (not root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct MeshMedians {
    pub rate: f64,
    pub edge_cpu_us_per_op: f64,
    pub edge_user_us_per_op: f64,
    pub site_cpu_us_per_op: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub retransmits: Option<f64>,
    #[serde(default)]
    pub tunnel_packets_per_op: Option<f64>,
    #[serde(default)]
    pub management_cpu_us_per_op: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MeshResult {
    pub workload: MeshWorkload,
    pub samples: BTreeMap<MeshPath, Vec<MeshSample>>,
    pub medians: BTreeMap<MeshPath, MeshMedians>,
    /// Paths whose runs failed (a bug to fix: the bench exits with an error).
    #[serde(default)]
    pub failed: BTreeMap<MeshPath, String>,
}

impl MeshResult {
    pub fn new(
        workload: MeshWorkload,
        samples: BTreeMap<MeshPath, Vec<MeshSample>>,
        failed: BTreeMap<MeshPath, String>,
    ) -> MeshResult {
        let medians = samples
            .iter()
            .map(|(k, v)| {
                let of = |g: &dyn Fn(&MeshSample) -> Option<f64>| {
                    median(v.iter().filter_map(g).collect())
                };
                (
                    *k,
                    MeshMedians {
                        rate: of(&|s| Some(s.rate)).unwrap_or(0.0),
                        edge_cpu_us_per_op: of(&|s| Some(s.edge_cpu_us_per_op)).unwrap_or(0.0),
                        edge_user_us_per_op: of(&|s| Some(s.edge_user_us_per_op)).unwrap_or(0.0),
                        site_cpu_us_per_op: of(&|s| Some(s.site_cpu_us_per_op)).unwrap_or(0.0),
                        p50_us: of(&|s| s.p50_us),
                        p99_us: of(&|s| s.p99_us),
                        retransmits: of(&|s| s.retransmits.map(|r| r as f64)),
                        tunnel_packets_per_op: of(&|s| s.tunnel_packets_per_op),
                        management_cpu_us_per_op: of(&|s| s.management_cpu_us_per_op),
                    },
                )
            })
            .collect();
        MeshResult {
            workload,
            samples,
            medians,
            failed,
        }
    }

    fn get(&self, p: MeshPath) -> Option<&MeshMedians> {
        self.medians.get(&p)
    }
}

pub fn rate_unit(w: MeshWorkload) -> &'static str {
    match w {
        MeshWorkload::Tcp => "Gbit/s",
        MeshWorkload::Https => "requests/s",
    }
}

pub fn op(w: MeshWorkload) -> &'static str {
    match w {
        MeshWorkload::Tcp => "MiB",
        MeshWorkload::Https => "request",
    }
}

fn title(w: MeshWorkload) -> String {
    match w {
        MeshWorkload::Tcp => "Mesh: one TCP stream (iperf3) to the site".into(),
        MeshWorkload::Https => format!(
            "Mesh: HTTPS keep-alive, 1 KiB responses, {CONNECTIONS} connections (wrk) to the site"
        ),
    }
}

/// Wanted: the TUN backend's throughput over the plain tunnel's.
pub const TUN_OVER_BASELINE: f64 = 1.0;

impl MeshReport {
    pub fn results(&self) -> impl Iterator<Item = &MeshResult> {
        self.tcp.iter().chain(self.https.iter())
    }

    pub fn compute_targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        for r in self.results() {
            let rate = |p| r.get(p).map(|m| m.rate);
            let mut t = target(
                r.workload.id(),
                &format!("TUN {} ≥ 1.0× baseline", rate_unit(r.workload)),
                ratio(rate(MeshPath::Tun), rate(MeshPath::Baseline)),
                TUN_OVER_BASELINE,
                true,
            );
            t.note = [MeshPath::Tun, MeshPath::Baseline].iter().find_map(|p| {
                r.failed
                    .get(p)
                    .map(|why| format!("{} failed: {why}", p.label()))
            });
            out.push(t);
        }
        out
    }

    /// Every run that failed, one line each: the bench exits with an error when there is any.
    pub fn failures(&self) -> Vec<String> {
        self.results()
            .flat_map(|r| {
                r.failed
                    .iter()
                    .map(|(p, why)| format!("{} through {}: {why}", r.workload.id(), p.label()))
            })
            .collect()
    }
}

/// Appends the mesh part to the report's Markdown.
pub fn markdown(s: &mut String, r: &MeshReport) {
    let m = &r.machine;
    let e = &r.effort;
    let _ = writeln!(
        s,
        "# Mesh: through the WireGuard mesh against a plain wireguard-go tunnel\n"
    );
    if let Some(why) = &r.skipped {
        let _ = writeln!(s, "Not measured: {why}.\n");
        return;
    }
    let _ = writeln!(
        s,
        "Measured {} on {} ({} cores), kernel {}; load average {} as the run began (other work on \
         the machine skews these figures). Placement: {}. Portcullis {}, {}, {}, {}.\n",
        m.date_utc,
        m.cpu,
        m.cores,
        m.kernel,
        if m.load_average.is_empty() {
            "unknown"
        } else {
            &m.load_average
        },
        m.placement,
        m.portcullis,
        m.nginx,
        m.iperf3,
        m.wrk
    );
    let _ = writeln!(
        s,
        "Two network namespaces joined by a veth pair: `edge` (management, the proxies, the load \
         generators) and `site` (the targets). The same traffic takes three paths from `edge` to \
         `site`:\n\n\
         - **baseline**: a plain `wireguard-go` in each namespace (keys from `wg genkey`, both ends \
         set with `wg set`); iperf3 and wrk connect straight to the site's tunnel address; the \
         HTTPS server is nginx at the site (TLS 1.3, ECDSA P-256), so TLS ends at the far end;\n\
         - **Portcullis, TUN** (`PORTCULLIS_MESH_BACKEND=tun`) and **Portcullis, in-process** \
         (`in-process`: boringtun + smoltcp inside the proxy): two proxies registered with a real \
         `portcullis management serve` (one cluster each), a real `portcullis agent --backend tun` \
         at the site (tunnel address {agent}, registered with a setup key); iperf3 goes through \
         an L4 `tcp` service and wrk through an HTTP service, both with the agent's peer as \
         target. The proxy terminates TLS (same certificate type) and forwards plain HTTP over the \
         tunnel to nginx on the agent's tunnel address. The baseline therefore also carries TLS \
         across the tunnel and does its TLS work at the site, on the load core: a difference in \
         the baseline's disfavour for requests/s.\n\n\
         Each figure is the median of {} rounds of {:?}; within a round the paths take turns; \
         each path had one unmeasured {:?} warm-up run per workload. \"Edge CPU\" is user + system \
         time from `/proc/<pid>/stat` of the edge's tunnel end, per MiB received or per request: \
         the proxy and its `wireguard-go` child (TUN), the proxy alone (in-process: WireGuard runs \
         in its threads), the edge `wireguard-go` (baseline; it does no proxying and no TLS). \
         \"Site CPU\" is the site's tunnel end: the agent with its `wireguard-go`, or the \
         baseline's site `wireguard-go`. Ratios are path / baseline.\n",
        e.rounds,
        e.duration,
        e.warmup,
        agent = if r.agent_ip.is_empty() {
            "from management"
        } else {
            &r.agent_ip
        },
    );
    let _ = writeln!(
        s,
        "## Target of issue #8\n\n| workload | target | result |\n|---|---|---|"
    );
    for t in r.compute_targets() {
        let _ = writeln!(s, "| {} | {} | {} |", t.workload, t.goal, t.gap());
    }
    let in_process: Vec<String> = r
        .results()
        .map(|res| {
            let rate = |p| res.get(p).map(|m| m.rate);
            format!(
                "{} {}",
                res.workload.id(),
                fmt_ratio(ratio(rate(MeshPath::InProcess), rate(MeshPath::Baseline)))
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "\nIn-process backend / baseline: {} (no target; its profile is below).\n",
        in_process.join(", ")
    );
    for res in r.results() {
        result_markdown(s, res);
    }
    if !r.profiles.is_empty() {
        profiles_markdown(s, &r.profiles);
    }
}

type MeshMetric = fn(&MeshMedians) -> Option<f64>;

fn result_markdown(s: &mut String, r: &MeshResult) {
    let w = r.workload;
    let _ = writeln!(s, "## {}\n", title(w));
    let _ = writeln!(
        s,
        "| | {} | {} | {} | TUN/baseline | in-process/baseline |\n|---|---|---|---|---|---|",
        MeshPath::Baseline.label(),
        MeshPath::Tun.label(),
        MeshPath::InProcess.label()
    );
    let mut rows: Vec<(String, MeshMetric)> = vec![
        (rate_unit(w).to_string(), |m| Some(m.rate)),
        (format!("edge CPU µs per {}", op(w)), |m| {
            Some(m.edge_cpu_us_per_op)
        }),
        ("… of which user space".into(), |m| {
            Some(m.edge_user_us_per_op)
        }),
        (format!("site CPU µs per {}", op(w)), |m| {
            Some(m.site_cpu_us_per_op)
        }),
        (
            format!(
                "management CPU µs per {} (access log, until idle again; on the load CPUs)",
                op(w)
            ),
            |m| m.management_cpu_us_per_op,
        ),
        (
            format!("WireGuard packets per {} (both ways)", op(w)),
            |m| m.tunnel_packets_per_op,
        ),
    ];
    match w {
        MeshWorkload::Tcp => rows.push(("TCP retransmits (sender)".into(), |m| m.retransmits)),
        MeshWorkload::Https => {
            rows.push(("p50 latency µs".into(), |m| m.p50_us));
            rows.push(("p99 latency µs".into(), |m| m.p99_us));
        }
    }
    for (label, f) in rows {
        let v = |p: MeshPath| r.get(p).and_then(f);
        let (b, t, i) = (
            v(MeshPath::Baseline),
            v(MeshPath::Tun),
            v(MeshPath::InProcess),
        );
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} | {} |",
            fmt(b),
            fmt(t),
            fmt(i),
            fmt_ratio(ratio(t, b)),
            fmt_ratio(ratio(i, b))
        );
    }
    let _ = writeln!(s);
    for p in PATHS {
        if let Some(why) = r.failed.get(&p) {
            let _ = writeln!(s, "**{} failed**: {why}\n", p.label());
        }
    }
}

fn profiles_markdown(s: &mut String, profiles: &[Profile]) {
    let _ = writeln!(
        s,
        "## Where the proxies' CPU goes\n\n\
         One more run per workload and backend, with the CPU of every thread read from \
         `/proc/<pid>/task/*/stat` around it (µs per MiB or per request; \"process/thread\") and, \
         where `perf` works, `perf record -F 999` on the proxy (and its `wireguard-go`): share of \
         samples by binary, and the heaviest symbols.\n"
    );
    for p in profiles {
        let per = op(p.workload);
        let _ = writeln!(
            s,
            "### {} over {} ({:.2} {} in this run)\n",
            p.workload.id(),
            p.path.label(),
            p.rate,
            rate_unit(p.workload)
        );
        let (u, sy) = p.threads.iter().fold((0.0, 0.0), |(u, s), t| {
            (u + t.user_us_per_op, s + t.system_us_per_op)
        });
        let _ = writeln!(
            s,
            "| thread | user µs/{per} | system µs/{per} |\n|---|---|---|\n| **all** | {} | {} |",
            fmt(Some(u)),
            fmt(Some(sy))
        );
        for t in p.threads.iter().take(12) {
            let _ = writeln!(
                s,
                "| `{}` | {} | {} |",
                t.name,
                fmt(Some(t.user_us_per_op)),
                fmt(Some(t.system_us_per_op))
            );
        }
        let _ = writeln!(s);
        if let Some(note) = &p.perf_note {
            let _ = writeln!(s, "No perf profile: {note}.\n");
        }
        if !p.perf_dso.is_empty() {
            let dso: Vec<String> = p
                .perf_dso
                .iter()
                .map(|(pct, d)| format!("{d} {pct:.1} %"))
                .collect();
            let _ = writeln!(s, "perf samples by binary: {}.\n", dso.join(", "));
            let _ = writeln!(s, "| % of samples | binary and symbol |\n|---|---|");
            for (pct, sym) in p.perf_symbols.iter().take(15) {
                let _ = writeln!(s, "| {pct:.2} | `{}` |", sym.replace('|', "\\|"));
            }
            let _ = writeln!(s);
        }
    }
}
