//! Medians across rounds, ratios against nginx and HAProxy, the targets, and the Markdown and
//! JSON files they are written to.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::contestants::Kind;
use crate::l4::report::L4Report;
use crate::machine::Machine;
use crate::workloads::{Effort, Sample, Workload};

/// The whole report: the HTTP part (the workloads of issue #4) and the L4 part (issue #5). Either
/// may be missing; a run of only one part keeps the other from the previous report.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effort: Option<Effort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<usize>,
    #[serde(default)]
    pub workloads: Vec<WorkloadResult>,
    /// Computed from the medians when written.
    #[serde(default, skip_deserializing)]
    pub targets: Vec<Target>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<L4Report>,
    /// The mesh part (issue #8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::mesh::report::MeshReport>,
}

impl Report {
    /// The report at `path`, if there is one that this harness can read.
    pub fn load(path: &Path) -> Result<Option<Report>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not a report this harness wrote", path.display()))
    }

    fn has_http(&self) -> bool {
        self.machine.is_some() && !self.workloads.is_empty()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub workload: Workload,
    pub title: String,
    pub samples: BTreeMap<String, Vec<Sample>>,
    pub medians: BTreeMap<String, Medians>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Medians {
    pub ops_per_sec: f64,
    pub cpu_us_per_op: f64,
    pub user_us_per_op: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub rss_kib_per_conn: Option<f64>,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

impl WorkloadResult {
    pub fn new(workload: Workload, samples: BTreeMap<&'static str, Vec<Sample>>) -> Self {
        let medians = samples
            .iter()
            .map(|(proxy, s)| {
                let of =
                    |f: &dyn Fn(&Sample) -> Option<f64>| median(s.iter().filter_map(f).collect());
                (
                    proxy.to_string(),
                    Medians {
                        ops_per_sec: of(&|s| Some(s.ops_per_sec)).unwrap_or(0.0),
                        cpu_us_per_op: of(&|s| Some(s.cpu_us_per_op)).unwrap_or(0.0),
                        user_us_per_op: of(&|s| Some(s.user_us_per_op)).unwrap_or(0.0),
                        p50_us: of(&|s| s.p50_us.map(|v| v as f64)),
                        p99_us: of(&|s| s.p99_us.map(|v| v as f64)),
                        p999_us: of(&|s| s.p999_us.map(|v| v as f64)),
                        rss_kib_per_conn: of(&|s| s.rss_kib_per_conn),
                    },
                )
            })
            .collect();
        WorkloadResult {
            workload,
            title: workload.title().to_string(),
            samples: samples
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            medians,
        }
    }

    fn get(&self, kind: Kind) -> Option<&Medians> {
        self.medians.get(kind.name())
    }
}

/// A goal from issue #4 or #5, checked against the medians.
#[derive(Debug, Serialize)]
pub struct Target {
    pub workload: String,
    pub goal: String,
    /// Portcullis's value divided by the reference's.
    pub measured_ratio: Option<f64>,
    pub wanted_ratio: f64,
    /// Whether a higher ratio is better (throughput) or a lower one (latency, memory).
    pub higher_is_better: bool,
    pub met: Option<bool>,
    /// What the reader needs to weigh the result (why it was not measured, what bounds it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Target {
    pub fn gap(&self) -> String {
        let result = self.result();
        match &self.note {
            Some(note) => format!("{result}; {note}"),
            None => result,
        }
    }

    fn result(&self) -> String {
        match (self.met, self.measured_ratio) {
            (None, _) | (_, None) => "not measured".into(),
            (Some(true), Some(r)) => format!("met ({r:.2}×)"),
            (Some(false), Some(r)) => {
                let short = if self.higher_is_better {
                    (self.wanted_ratio - r) / self.wanted_ratio * 100.0
                } else {
                    (r - self.wanted_ratio) / self.wanted_ratio * 100.0
                };
                format!(
                    "**missed**: {r:.2}× against {:.2}× wanted ({short:.0} % short)",
                    self.wanted_ratio
                )
            }
        }
    }
}

pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn target(
    workload: &str,
    goal: &str,
    measured: Option<f64>,
    wanted: f64,
    higher: bool,
) -> Target {
    let met = measured.map(|r| if higher { r >= wanted } else { r <= wanted });
    Target {
        workload: workload.to_string(),
        goal: goal.to_string(),
        measured_ratio: measured,
        wanted_ratio: wanted,
        higher_is_better: higher,
        met,
        note: None,
    }
}

pub fn targets(results: &[WorkloadResult]) -> Vec<Target> {
    let mut out = Vec::new();
    let open_cpu = results
        .iter()
        .find(|r| r.workload == Workload::HttpsKeepAlive)
        .and_then(|r| r.get(Kind::Portcullis))
        .map(|m| m.cpu_us_per_op);
    for r in results {
        let p = r.get(Kind::Portcullis);
        let n = r.get(Kind::Nginx);
        let h = r.get(Kind::Haproxy);
        let rps = |m: Option<&Medians>| m.map(|m| m.ops_per_sec);
        let p99 = |m: Option<&Medians>| m.and_then(|m| m.p99_us);
        let w = r.workload.id();
        match r.workload {
            Workload::HttpsKeepAlive => {
                out.push(target(
                    w,
                    "requests/s ≥ 1.2× nginx",
                    ratio(rps(p), rps(n)),
                    1.2,
                    true,
                ));
                out.push(target(
                    w,
                    "requests/s ≥ 1.2× HAProxy",
                    ratio(rps(p), rps(h)),
                    1.2,
                    true,
                ));
                out.push(target(
                    w,
                    "p99 ≤ nginx's",
                    ratio(p99(p), p99(n)),
                    1.0,
                    false,
                ));
                out.push(target(
                    w,
                    "p99 ≤ HAProxy's",
                    ratio(p99(p), p99(h)),
                    1.0,
                    false,
                ));
            }
            Workload::TlsHandshake => {
                out.push(target(
                    w,
                    "handshakes/s ≥ 1.0× nginx",
                    ratio(rps(p), rps(n)),
                    1.0,
                    true,
                ));
            }
            Workload::LargeResponse => {
                let best = match (rps(n), rps(h)) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                out.push(target(
                    w,
                    "MiB/s ≥ 1.0× the better of nginx and HAProxy",
                    ratio(rps(p), best),
                    1.0,
                    true,
                ));
            }
            Workload::IdleTls => {
                let rss = |m: Option<&Medians>| m.and_then(|m| m.rss_kib_per_conn);
                out.push(target(
                    w,
                    "RSS per idle TLS connection ≤ nginx's",
                    ratio(rss(p), rss(n)),
                    1.0,
                    false,
                ));
            }
            Workload::HttpKeepAlive => {
                out.push(target(
                    w,
                    "requests/s ≥ 1.3× nginx",
                    ratio(rps(p), rps(n)),
                    1.3,
                    true,
                ));
            }
            Workload::HttpsSession => {
                out.push(target(
                    w,
                    "CPU µs/request ≤ 1.10× Portcullis without auth (https-keepalive)",
                    ratio(p.map(|m| m.cpu_us_per_op), open_cpu),
                    1.10,
                    false,
                ));
            }
        }
    }
    out
}

/// Writes `<stem>.json` and `<stem>.md`, the targets computed afresh.
pub fn write(dir: &Path, stem: &str, report: &mut Report) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    report.targets = targets(&report.workloads);
    if let Some(l4) = report.l4.as_mut() {
        l4.targets = l4.compute_targets();
    }
    if let Some(mesh) = report.mesh.as_mut() {
        mesh.targets = mesh.compute_targets();
    }
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(dir.join(format!("{stem}.json")), json + "\n")?;
    std::fs::write(dir.join(format!("{stem}.md")), markdown(report))?;
    Ok(())
}

/// Reads one metric out of a proxy's medians.
type MetricOf = Box<dyn Fn(&Medians) -> Option<f64>>;

pub fn fmt(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 1000.0 => format!("{v:.0}"),
        Some(v) if v >= 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

pub fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}×"))
}

/// The whole report in Markdown: the HTTP part, then the L4 part.
pub fn markdown(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Portcullis against nginx and HAProxy\n");
    if let (true, Some(machine), Some(effort), Some(rounds)) = (
        report.has_http(),
        &report.machine,
        &report.effort,
        report.rounds,
    ) {
        http_markdown(
            &mut s,
            machine,
            effort,
            rounds,
            &report.workloads,
            &report.targets,
        );
    }
    if let Some(l4) = &report.l4 {
        crate::l4::report::markdown(&mut s, l4);
    }
    if let Some(mesh) = &report.mesh {
        crate::mesh::report::markdown(&mut s, mesh);
    }
    s
}

fn http_markdown(
    s: &mut String,
    machine: &Machine,
    effort: &Effort,
    rounds: usize,
    results: &[WorkloadResult],
    targets: &[Target],
) {
    let _ = writeln!(
        s,
        "Measured {} on {} ({} cores, {}), {}, kernel {}. {}. Portcullis {}, {}, {}, load from {}.\n",
        machine.date_utc,
        machine.cpu,
        machine.cores,
        machine.memory,
        machine.os,
        machine.kernel,
        machine.placement,
        machine.portcullis,
        machine.nginx,
        machine.haproxy,
        machine.wrk
    );
    let _ = writeln!(
        s,
        "Each figure is the median of {rounds} rounds; within a round the proxies take turns. Runs last \
         {:?} after a {:?} warm-up; the idle workload holds {} connections. Proxy CPU is user + system \
         time from `/proc/<pid>/stat` over the run, divided by the operations completed; latency \
         percentiles come from every request (wrk's per-µs histogram, recorded into HdrHistogram). \
         Ratios are Portcullis / peer: below 1 is better for CPU, latency and memory, above 1 for \
         throughput.\n",
        effort.duration, effort.warmup, effort.idle_connections
    );
    let _ = writeln!(
        s,
        "## Targets of issues #4 and #9\n\n| workload | target | result |\n|---|---|---|"
    );
    for t in targets {
        let _ = writeln!(s, "| {} | {} | {} |", t.workload, t.goal, t.gap());
    }
    let _ = writeln!(s);
    for r in results {
        let _ = writeln!(s, "## {}\n", r.title);
        let _ = writeln!(
            s,
            "| | Portcullis | nginx | HAProxy | Portcullis/nginx | Portcullis/HAProxy |\n|---|---|---|---|---|---|"
        );
        let op = r.workload.op();
        let rows: Vec<(String, MetricOf)> = match r.workload {
            Workload::IdleTls => vec![
                (
                    "RSS KiB per idle connection".into(),
                    Box::new(|m: &Medians| m.rss_kib_per_conn),
                ),
                (
                    "proxy CPU µs per connection (handshake + 1 request)".into(),
                    Box::new(|m: &Medians| Some(m.cpu_us_per_op)),
                ),
                (
                    "… of which user space".into(),
                    Box::new(|m: &Medians| Some(m.user_us_per_op)),
                ),
                (
                    "connections opened/s".into(),
                    Box::new(|m: &Medians| Some(m.ops_per_sec)),
                ),
            ],
            _ => vec![
                (
                    format!("proxy CPU µs per {op}"),
                    Box::new(|m: &Medians| Some(m.cpu_us_per_op)),
                ),
                (
                    "… of which user space (proxy code and TLS; the rest is kernel)".to_string(),
                    Box::new(|m: &Medians| Some(m.user_us_per_op)),
                ),
                (
                    r.workload.rate(),
                    Box::new(|m: &Medians| Some(m.ops_per_sec)),
                ),
                ("p50 latency µs".into(), Box::new(|m: &Medians| m.p50_us)),
                ("p99 latency µs".into(), Box::new(|m: &Medians| m.p99_us)),
                ("p99.9 latency µs".into(), Box::new(|m: &Medians| m.p999_us)),
            ],
        };
        for (label, f) in rows {
            let v = |k: Kind| r.get(k).and_then(&f);
            let (p, n, h) = (v(Kind::Portcullis), v(Kind::Nginx), v(Kind::Haproxy));
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} | {} | {} |",
                fmt(p),
                fmt(n),
                fmt(h),
                fmt_ratio(ratio(p, n)),
                fmt_ratio(ratio(p, h))
            );
        }
        let _ = writeln!(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ops_per_sec: f64, p99: u64) -> Sample {
        Sample {
            round: 0,
            ops: 1.0,
            ops_per_sec,
            cpu_us_per_op: 10.0,
            user_us_per_op: 2.0,
            p50_us: Some(1),
            p99_us: Some(p99),
            p999_us: Some(p99),
            rss_kib_per_conn: None,
            errors: 0,
        }
    }

    #[test]
    fn medians_and_targets_follow_the_samples() {
        let mut samples = BTreeMap::new();
        samples.insert(
            "portcullis",
            vec![sample(130.0, 90), sample(120.0, 100), sample(500.0, 80)],
        );
        samples.insert("nginx", vec![sample(100.0, 100)]);
        samples.insert("haproxy", vec![sample(110.0, 95)]);
        let r = WorkloadResult::new(Workload::HttpsKeepAlive, samples);
        assert_eq!(r.medians["portcullis"].ops_per_sec, 130.0);
        assert_eq!(r.medians["portcullis"].p99_us, Some(90.0));
        let t = targets(&[r]);
        assert_eq!(t[0].met, Some(true), "130/100 ≥ 1.2");
        assert_eq!(t[1].met, Some(false), "130/110 < 1.2");
        assert!(t[1].gap().contains("missed"));
        assert_eq!(t[2].met, Some(true), "p99 90 ≤ 100");
        assert_eq!(t[3].met, Some(true), "p99 90 ≤ 95");
    }

    #[test]
    fn the_committed_report_can_be_merged_into() {
        let text = include_str!("../results/latest.json");
        let r: Report = serde_json::from_str(text).expect("latest.json reads back");
        assert!(r.has_http());
    }

    #[test]
    fn even_count_median_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
