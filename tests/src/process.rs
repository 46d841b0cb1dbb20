//! A child process a test started: stopped by PID when dropped (also when the test fails), and
//! its log printed when the test fails.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Runs `cmd` to completion and returns its stdout; panics with its stderr when it cannot run
/// or exits unsuccessfully.
pub fn stdout_of(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub struct Supervised {
    child: Option<Child>,
    pub pid: u32,
    label: &'static str,
    pub log: PathBuf,
}

impl Supervised {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(cmd: &mut Command, label: &'static str, log: PathBuf) -> Supervised {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        Supervised {
            pid: child.id(),
            child: Some(child),
            label,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `within`: the exit status, or `None` when it had to be
    /// killed. Later calls do nothing and return `None`.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}) ---\n{}",
                self.label,
                self.log.display(),
                self.log_text()
            );
        }
    }
}
