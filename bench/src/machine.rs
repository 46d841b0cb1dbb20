//! What the numbers were measured on.

use serde::{Deserialize, Serialize};

use crate::contestants::version_of;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub date_utc: String,
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub kernel: String,
    pub os: String,
    pub portcullis: String,
    pub nginx: String,
    pub haproxy: String,
    pub wrk: String,
    /// The L4 part's load generator and packet filter.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iperf3: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nft: String,
    /// How the cores were shared out.
    pub placement: String,
    /// `/proc/loadavg` when the run started: anything else running skews the figures.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub load_average: String,
}

pub fn describe(portcullis_bin: &std::path::Path, placement: String) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    Machine {
        date_utc: command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        cpu: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory: field(&meminfo, "MemTotal").unwrap_or_else(|| "unknown".into()),
        kernel: command_line("uname", &["-r"]),
        os: os_release
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "unknown".into()),
        portcullis: format!(
            "{} ({})",
            command_line(&portcullis_bin.display().to_string(), &["--version"]),
            command_line("git", &["rev-parse", "--short", "HEAD"])
        ),
        nginx: version_of("nginx", "-v"),
        haproxy: version_of("haproxy", "-v")
            .split(" - ")
            .next()
            .unwrap_or_default()
            .to_string(),
        wrk: version_of("wrk", "--version"),
        iperf3: version_of("iperf3", "--version"),
        nft: version_of("nft", "--version"),
        placement,
        load_average: std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
    }
}

fn field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
