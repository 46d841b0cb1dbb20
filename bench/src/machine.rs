//! What the numbers were measured on.

use serde::Serialize;

use crate::contestants::version_of;

#[derive(Debug, Serialize)]
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
    /// How the cores were shared out.
    pub placement: String,
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
        placement,
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
