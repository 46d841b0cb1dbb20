//! Runs wrk and reads back its whole latency distribution.
//!
//! wrk keeps a per-microsecond latency histogram; a `done` hook in Lua prints every non-empty
//! bucket (`latency(i)` gives value and count), and the harness records them into an
//! HdrHistogram, so percentiles come from every request, not from wrk's summary.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;

use crate::contestants::find_program;

const SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("PCS_SUMMARY %d %d %d %d %d %d %d %d\n", summary.requests,
    summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout))
  for i = 1, #latency do
    local value, count = latency(i)
    io.write(string.format("PCS_LAT %d %d\n", value, count))
  end
end
"#;

pub struct WrkLoad<'a> {
    pub url: String,
    pub connections: u32,
    pub duration: Duration,
    pub headers: Vec<String>,
    pub cpus: Option<&'a str>,
}

/// What one wrk run did.
#[derive(Debug)]
pub struct WrkOutcome {
    pub requests: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
    /// Responses with a status of 400 or more.
    pub bad_status: u64,
    pub latency_us: Histogram<u64>,
}

pub fn write_script(dir: &Path) -> Result<std::path::PathBuf> {
    let path = dir.join("latency-dump.lua");
    std::fs::write(&path, SCRIPT).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

pub fn run(load: &WrkLoad<'_>, script: &Path) -> Result<WrkOutcome> {
    let wrk = find_program("wrk")?;
    let mut cmd = crate::process::pinned(load.cpus, &wrk);
    cmd.args(["-t1", "-c"])
        .arg(load.connections.to_string())
        .arg("-d")
        // wrk takes whole seconds.
        .arg(format!(
            "{}s",
            load.duration.as_secs_f64().ceil().max(1.0) as u64
        ))
        .args(["--timeout", "10s", "-s"])
        .arg(script);
    for h in &load.headers {
        cmd.arg("-H").arg(h);
    }
    cmd.arg(&load.url);
    let output = with_deadline(cmd, load.duration + Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk {} failed ({}): {}{}",
            load.url,
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&stdout).with_context(|| format!("reading wrk's output for {}:\n{stdout}", load.url))
}

fn parse(stdout: &str) -> Result<WrkOutcome> {
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut summary: Option<Vec<u64>> = None;
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("PCS_SUMMARY ") {
            summary = Some(
                rest.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect(),
            );
        } else if let Some(rest) = line.strip_prefix("PCS_LAT ") {
            let mut it = rest
                .split_whitespace()
                .filter_map(|v| v.parse::<u64>().ok());
            if let (Some(value), Some(count)) = (it.next(), it.next()) {
                latency_us.saturating_record_n(value.max(1), count);
            }
        }
    }
    let s = summary.context("no summary line")?;
    if s.len() < 8 {
        bail!("short summary line");
    }
    Ok(WrkOutcome {
        requests: s[0],
        elapsed: Duration::from_micros(s[1]),
        bytes: s[2],
        socket_errors: s[3] + s[4] + s[5] + s[7],
        bad_status: s[6],
        latency_us,
    })
}

/// Runs a command to completion, killing it if it outlives `deadline`.
pub fn with_deadline(mut cmd: Command, deadline: Duration) -> Result<std::process::Output> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the load generator")?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the load generator ran past {deadline:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_summary_and_buckets() {
        let out = "Running 1s test\nPCS_SUMMARY 100 1000000 2048 1 0 0 3 0\nPCS_LAT 50 90\nPCS_LAT 900 10\n";
        let o = parse(out).unwrap();
        assert_eq!(o.requests, 100);
        assert_eq!(o.socket_errors, 1);
        assert_eq!(o.bad_status, 3);
        assert_eq!(o.latency_us.len(), 100);
        assert_eq!(o.latency_us.value_at_quantile(0.5), 50);
        assert!(o.latency_us.value_at_quantile(0.99) >= 899);
    }

    #[test]
    fn refuses_output_without_summary() {
        assert!(parse("wrk: connection refused\n").is_err());
    }
}
