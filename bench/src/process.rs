//! Processes the harness starts: each one is stopped by PID when dropped, also when a run fails,
//! and its CPU time and memory are read from `/proc`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A started server (proxy or backend), pinned to `cpus` when given.
pub struct Server {
    child: Child,
    pub label: String,
    pub log: PathBuf,
}

impl Server {
    pub fn spawn(
        label: &str,
        cpus: Option<&str>,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: PathBuf,
    ) -> Result<Server> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = pinned(cpus, program);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {label} ({})", program.display()))?;
        Ok(Server {
            child,
            label: label.to_string(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); log {}:\n{}",
                self.label,
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }

    /// The server's process and every process below it (nginx's workers).
    pub fn process_tree(&self) -> Vec<u32> {
        let mut tree = vec![self.pid()];
        let mut i = 0;
        while i < tree.len() && tree.len() < 64 {
            let parent = tree[i];
            tree.extend(children_of(parent));
            i += 1;
        }
        tree
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `program` started under `taskset -c cpus` (taskset execs, so the PID is the program's).
pub fn pinned(cpus: Option<&str>, program: &Path) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Kernel threads (children of kthreadd): kworkers and ksoftirqd, which do the kernel's share of
/// forwarding (a sockmap splice's sends run in kworkers).
pub fn kernel_threads() -> Vec<u32> {
    children_of(2)
}

/// User and system CPU of every child process this harness has waited for (load generators
/// that have exited), in microseconds.
pub fn waited_children_cpu() -> CpuTime {
    use nix::sys::resource::{UsageWho, getrusage};
    let Ok(u) = getrusage(UsageWho::RUSAGE_CHILDREN) else {
        return CpuTime::default();
    };
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    CpuTime {
        user_us: us(u.user_time()),
        system_us: us(u.system_time()),
    }
}

/// CPU time of a set of processes, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user_us: u64,
    pub system_us: u64,
}

impl CpuTime {
    /// What was spent between `earlier` and `self`.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user_us: self.user_us.saturating_sub(earlier.user_us),
            system_us: self.system_us.saturating_sub(earlier.system_us),
        }
    }

    pub fn total_us(self) -> u64 {
        self.user_us + self.system_us
    }
}

/// User and system CPU time of the processes (every thread, exited ones included).
pub fn cpu_time(pids: &[u32]) -> CpuTime {
    let ticks_per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as u64;
    let (user, system) = pids
        .iter()
        .filter_map(|pid| cpu_ticks(*pid))
        .fold((0, 0), |(u, s), (pu, ps)| (u + pu, s + ps));
    CpuTime {
        user_us: user * 1_000_000 / ticks_per_sec,
        system_us: system * 1_000_000 / ticks_per_sec,
    }
}

fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// Resident memory of the processes, in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// The last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits (bounded) until something accepts TCP connections on `addr`.
pub fn wait_listening(server: &mut Server, addr: std::net::SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        server.check_alive()?;
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} is not listening on {addr} after 15 s; log:\n{}",
                server.label,
                tail(&server.log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
