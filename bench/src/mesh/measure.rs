//! One measured run over one path: iperf3 (one TCP stream) or wrk (HTTPS keep-alive, 1 KiB),
//! from the edge namespace, with the CPU of the edge's and the site's tunnel processes read
//! around it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::MeshWorkload;
use super::net::{packets, within};
use super::setup::MeshContestant;
use crate::contestants::find_program;
use crate::process::{CpuTime, cpu_time, pinned};
use crate::wrk::{self, WrkLoad};

const MIB: f64 = (1u64 << 20) as f64;
/// wrk connections of the HTTPS workload (as workload 1 of the HTTP part).
pub const CONNECTIONS: u32 = 64;

/// One run. "op" is a MiB received (TCP) or a request (HTTPS).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshSample {
    pub round: usize,
    pub ops: f64,
    pub seconds: f64,
    /// Gbit/s (TCP) or requests/s (HTTPS).
    pub rate: f64,
    /// CPU of the edge's tunnel end per op, µs: the proxy with its wireguard-go child (TUN), the
    /// proxy alone (in-process), the edge wireguard-go (baseline).
    pub edge_cpu_us_per_op: f64,
    pub edge_user_us_per_op: f64,
    /// CPU of the site's tunnel end per op, µs: the agent with its wireguard-go, or the
    /// baseline's site wireguard-go.
    pub site_cpu_us_per_op: f64,
    #[serde(default)]
    pub p50_us: Option<f64>,
    #[serde(default)]
    pub p99_us: Option<f64>,
    #[serde(default)]
    pub retransmits: Option<u64>,
    /// WireGuard packets between edge and site (both ways) per op.
    #[serde(default)]
    pub tunnel_packets_per_op: Option<f64>,
    /// Management's CPU per op, µs (it runs on the load CPUs).
    #[serde(default)]
    pub management_cpu_us_per_op: Option<f64>,
}

/// A process and every process below it, whichever of its threads started them.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 64 {
        let p = out[i];
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default();
        for t in tasks.iter().take(4_096) {
            let children =
                std::fs::read_to_string(format!("/proc/{p}/task/{}/children", t.to_string_lossy()))
                    .unwrap_or_default();
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|s| s.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    out.sort_unstable();
    out.dedup();
    out
}

pub struct Env<'a> {
    pub ns: &'a str,
    /// The edge's veth: during a run almost only the tunnel's UDP packets cross it (besides the
    /// agent's few gRPC messages to management).
    pub edge_if: &'a str,
    /// Management, which stores an access-log entry per request through a proxy.
    pub management_pid: u32,
    pub load_cpus: Option<&'a str>,
    pub duration: Duration,
    pub script: &'a Path,
}

pub fn run(w: MeshWorkload, c: &MeshContestant, env: &Env<'_>, round: usize) -> Result<MeshSample> {
    let (edge, site) = (tree(c.edge_pid), tree(c.site_pid));
    let packets_before = packets(env.ns, env.edge_if)?;
    let management = [env.management_pid];
    // Management may still be storing access logs of the previous run: that is not this run's.
    wait_until_idle(&management);
    let (e0, s0, m0) = (cpu_time(&edge), cpu_time(&site), cpu_time(&management));
    let done = match w {
        MeshWorkload::Tcp => tcp(c.tcp, env)?,
        MeshWorkload::Https => https(c, env)?,
    };
    let e = cpu_time(&edge).since(e0);
    let s = cpu_time(&site).since(s0);
    // ...and what this run left it to store is.
    wait_until_idle(&management);
    let m = cpu_time(&management).since(m0);
    let tunnel_packets = packets(env.ns, env.edge_if)?.saturating_sub(packets_before);
    let mut sample = sample(round, done, e, s);
    sample.tunnel_packets_per_op = Some(tunnel_packets as f64 / sample.ops.max(1e-9));
    sample.management_cpu_us_per_op = Some(m.total_us() as f64 / sample.ops.max(1e-9));
    Ok(sample)
}

/// Waits (at most 10 s) until `pids` use under 5 % of a CPU over a quarter of a second.
fn wait_until_idle(pids: &[u32]) {
    const WINDOW: Duration = Duration::from_millis(250);
    for _ in 0..40 {
        let before = cpu_time(pids);
        std::thread::sleep(WINDOW);
        if cpu_time(pids).since(before).total_us() < WINDOW.as_micros() as u64 / 20 {
            return;
        }
    }
    eprintln!("bench: management did not go idle within 10 s; its CPU is counted as it is");
}

/// What a run completed.
pub struct Done {
    pub ops: f64,
    pub seconds: f64,
    pub rate: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub retransmits: Option<u64>,
}

fn sample(round: usize, d: Done, edge: CpuTime, site: CpuTime) -> MeshSample {
    let ops = d.ops.max(1e-9);
    MeshSample {
        round,
        ops: d.ops,
        seconds: d.seconds,
        rate: d.rate,
        edge_cpu_us_per_op: edge.total_us() as f64 / ops,
        edge_user_us_per_op: edge.user_us as f64 / ops,
        site_cpu_us_per_op: site.total_us() as f64 / ops,
        p50_us: d.p50_us,
        p99_us: d.p99_us,
        retransmits: d.retransmits,
        tunnel_packets_per_op: None,
        management_cpu_us_per_op: None,
    }
}

/// `iperf3 -c` (one stream) from the edge; an error unless the server received bytes.
pub fn tcp(target: SocketAddr, env: &Env<'_>) -> Result<Done> {
    let secs = env.duration.as_secs_f64().ceil().max(1.0) as u64;
    let what = format!("iperf3 to {target} ({secs} s, 1 stream)");
    let output = within(env.ns, || {
        let mut cmd = pinned(env.load_cpus, &find_program("iperf3")?);
        cmd.args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
        ])
        .args([
            "-t",
            &secs.to_string(),
            "--json",
            "--connect-timeout",
            "5000",
        ]);
        crate::wrk::with_deadline(cmd, Duration::from_secs(secs + 30))
    })
    .with_context(|| what.clone())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = parse_iperf(&stdout);
    match parsed {
        Ok(d) if output.status.success() && d.ops > 0.0 => Ok(d),
        Ok(_) => bail!("{what}: no bytes received ({})", output.status),
        Err(e) => bail!(
            "{what} failed ({}): {e:#}; stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}

fn parse_iperf(stdout: &str) -> Result<Done> {
    let doc: Value = serde_json::from_str(stdout).context("iperf3 printed no JSON")?;
    if let Some(e) = doc.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let end = doc.get("end").context("no \"end\" section")?;
    let received = end.get("sum_received").context("no \"sum_received\"")?;
    let bytes = received["bytes"].as_f64().context("no bytes received")?;
    let seconds = received["seconds"].as_f64().context("no duration")?;
    Ok(Done {
        ops: bytes / MIB,
        seconds,
        rate: bytes * 8.0 / seconds.max(1e-6) / 1e9,
        p50_us: None,
        p99_us: None,
        retransmits: end["sum_sent"]["retransmits"].as_u64(),
    })
}

/// wrk, HTTPS keep-alive, 1 KiB responses; any socket error or error status fails the run.
fn https(c: &MeshContestant, env: &Env<'_>) -> Result<Done> {
    let load = WrkLoad {
        url: c.https_url.clone(),
        connections: CONNECTIONS,
        duration: env.duration,
        headers: vec![format!("Host: {}", c.host)],
        cpus: env.load_cpus,
    };
    let out = within(env.ns, || wrk::run(&load, env.script))?;
    if out.socket_errors > 0 || out.bad_status > 0 || out.requests == 0 {
        bail!(
            "wrk {} (Host {}): {} requests, {} socket errors, {} error statuses",
            c.https_url,
            c.host,
            out.requests,
            out.socket_errors,
            out.bad_status
        );
    }
    let seconds = out.elapsed.as_secs_f64().max(1e-6);
    Ok(Done {
        ops: out.requests as f64,
        seconds,
        rate: out.requests as f64 / seconds,
        p50_us: Some(out.latency_us.value_at_quantile(0.5) as f64),
        p99_us: Some(out.latency_us.value_at_quantile(0.99) as f64),
        retransmits: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iperf_tcp_summary() {
        let d = parse_iperf(
            r#"{"end":{"sum_sent":{"bytes":2097152,"seconds":1.0,"retransmits":3},
                "sum_received":{"bytes":1048576,"seconds":1.0}}}"#,
        )
        .unwrap();
        assert_eq!(d.ops, 1.0);
        assert_eq!(d.retransmits, Some(3));
        assert!((d.rate - 8.0 * 1048576.0 / 1e9).abs() < 1e-9);
        assert!(parse_iperf(r#"{"error":"unable to connect"}"#).is_err());
    }
}
