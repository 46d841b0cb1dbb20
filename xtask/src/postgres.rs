//! A throwaway PostgreSQL for the test run: its own data directory, loopback only, trust auth,
//! stopped by PID when the run ends, however it ends.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct TestPostgres {
    dir: PathBuf,
    pid: Option<i32>,
    pub url: String,
}

/// The newest installed server binaries (`/usr/lib/postgresql/<version>/bin`).
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// Runs a server binary as `postgres` when we are root (the server refuses to run as root).
fn as_postgres(bin: &Path, program: &str) -> Command {
    if super::is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

impl TestPostgres {
    pub fn start(target: &Path) -> Result<TestPostgres> {
        let bin =
            bin_dir().context("PostgreSQL server binaries not found under /usr/lib/postgresql")?;
        let dir = target.join("test-postgres");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if super::is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()?;
            if !status.success() {
                bail!("cannot hand {} to the postgres user", dir.display());
            }
        }
        let data = dir.join("data");
        let out = as_postgres(&bin, "initdb")
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "-D",
            ])
            .arg(&data)
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300",
            dir.display()
        );
        let out = as_postgres(&bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "30", "start"])
            .output()?;
        let mut pg = TestPostgres {
            dir: dir.clone(),
            pid: None,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        pg.pid = std::fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()));
        if !out.status.success() || pg.pid.is_none() {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            bail!(
                "PostgreSQL did not start: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!(
            "    PostgreSQL {} on 127.0.0.1:{port} (pid {})",
            bin.display(),
            pg.pid.unwrap_or(0)
        );
        Ok(pg)
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        // SIGINT is PostgreSQL's "fast" shutdown.
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
