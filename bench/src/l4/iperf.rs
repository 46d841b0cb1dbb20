//! iperf3: the target of the L4 workloads (one server on loopback) and the load through each
//! proxy (one client run per measurement, read back from `--json`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::contestants::{find_program, free_port};
use crate::process::{Server, pinned, wait_listening};

/// UDP payload per datagram: small, so the proxies' per-packet cost dominates.
pub const UDP_PAYLOAD: u32 = 64;

/// `iperf3 -s` on a loopback port, on the load cores; restarted on the same port after a failed
/// run, so a test the server still thinks is running cannot block the next one.
pub struct TargetServer {
    server: Option<Server>,
    pub addr: SocketAddr,
    dir: PathBuf,
    cpus: Option<String>,
    starts: u32,
}

impl TargetServer {
    pub fn start(dir: &Path, cpus: Option<&str>) -> Result<TargetServer> {
        let mut target = TargetServer {
            server: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            dir: dir.to_path_buf(),
            cpus: cpus.map(str::to_string),
            starts: 0,
        };
        target.restart()?;
        Ok(target)
    }

    pub fn pid(&self) -> u32 {
        self.server.as_ref().map_or(0, Server::pid)
    }

    /// Stops the running server (by PID) and starts a new one on the same port.
    pub fn restart(&mut self) -> Result<()> {
        drop(self.server.take());
        self.starts += 1;
        let log = self.dir.join(format!("iperf3-server-{}.log", self.starts));
        self.server = Some(spawn(log, self.addr, self.cpus.as_deref())?);
        Ok(())
    }
}

fn spawn(log: PathBuf, addr: SocketAddr, cpus: Option<&str>) -> Result<Server> {
    let args = vec![
        "-s".into(),
        "-p".into(),
        addr.port().to_string(),
        "-B".into(),
        addr.ip().to_string(),
        // A test whose client vanished ends after 10 s instead of blocking the next one.
        "--rcv-timeout".into(),
        "10000".into(),
    ];
    let mut server = Server::spawn(
        "iperf3 server",
        cpus,
        &find_program("iperf3")?,
        &args,
        &[],
        log,
    )?;
    wait_listening(&mut server, addr)?;
    Ok(server)
}

/// One client run.
pub struct Load<'a> {
    pub target: SocketAddr,
    pub duration: Duration,
    /// TCP streams (`-P`); UDP always uses one.
    pub streams: u32,
    pub udp: bool,
    pub cpus: Option<&'a str>,
}

/// What the server received, as the client reports it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub bytes_received: u64,
    pub seconds: f64,
    /// TCP: retransmitted segments.
    pub retransmits: u64,
    /// UDP: datagrams the client sent.
    pub packets_sent: u64,
    /// UDP: datagrams the server received.
    pub packets_received: u64,
}

pub fn run(load: &Load<'_>) -> Result<Outcome> {
    let mut cmd = pinned(load.cpus, &find_program("iperf3")?);
    let secs = load.duration.as_secs_f64().ceil().max(1.0) as u64;
    cmd.args(["-c", &load.target.ip().to_string(), "-p"])
        .arg(load.target.port().to_string())
        .args([
            "-t",
            &secs.to_string(),
            "--json",
            "--connect-timeout",
            "5000",
        ]);
    if load.udp {
        cmd.args(["-u", "-b", "0", "-l", &UDP_PAYLOAD.to_string()]);
    } else {
        cmd.args(["-P", &load.streams.to_string()]);
    }
    let what = format!(
        "iperf3 {} to {} ({} s{})",
        if load.udp { "UDP" } else { "TCP" },
        load.target,
        secs,
        if load.udp {
            String::new()
        } else {
            format!(", {} streams", load.streams)
        }
    );
    let output = crate::wrk::with_deadline(cmd, Duration::from_secs(secs + 30))
        .with_context(|| what.clone())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let outcome = parse(&stdout, load.udp);
    if !output.status.success() || outcome.is_err() {
        let reason = outcome
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_else(|| "no error in its JSON".into());
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "{what} failed: {reason} (iperf3 {}){}",
            output.status,
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!("; stderr: {}", stderr.trim())
            }
        );
    }
    outcome
}

fn parse(stdout: &str, udp: bool) -> Result<Outcome> {
    let doc: Value = serde_json::from_str(stdout).context("iperf3 printed no JSON")?;
    if let Some(e) = doc.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let end = doc.get("end").context("no \"end\" section")?;
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let received = end
        .get("sum_received")
        .context("no \"sum_received\" section")?;
    let sent = end.get("sum_sent").context("no \"sum_sent\" section")?;
    let bytes_received = num(received, "bytes").context("no bytes received")? as u64;
    let seconds = num(received, "seconds").context("no duration")?;
    let (packets_sent, packets_received) = if udp {
        // `packets` is the highest sequence number the server saw; the lost ones are missing.
        let seen = num(received, "packets").unwrap_or(0.0) as u64;
        let lost = num(received, "lost_packets").unwrap_or(0.0) as u64;
        (
            num(sent, "packets").unwrap_or(0.0) as u64,
            seen.saturating_sub(lost),
        )
    } else {
        (0, 0)
    };
    Ok(Outcome {
        bytes_received,
        seconds,
        retransmits: num(sent, "retransmits").unwrap_or(0.0) as u64,
        packets_sent,
        packets_received,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcp_and_udp_summaries() {
        let tcp = r#"{"end":{"sum_sent":{"bytes":2000,"seconds":1.0,"retransmits":3},
            "sum_received":{"bytes":1000,"seconds":1.0}}}"#;
        let o = parse(tcp, false).unwrap();
        assert_eq!((o.bytes_received, o.retransmits), (1000, 3));
        let udp = r#"{"end":{"sum_sent":{"bytes":6400,"seconds":1.0,"packets":100},
            "sum_received":{"bytes":3200,"seconds":1.0,"packets":100,"lost_packets":50}}}"#;
        let o = parse(udp, true).unwrap();
        assert_eq!((o.packets_sent, o.packets_received), (100, 50));
    }

    #[test]
    fn an_error_field_fails() {
        let e = parse(r#"{"error":"unable to connect"}"#, false).unwrap_err();
        assert!(e.to_string().contains("unable to connect"));
    }
}
