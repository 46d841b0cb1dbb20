//! The `wireguard-go` child that carries a TUN-backed interface: started in the foreground by us
//! (so wireguard-control never spawns a daemon we cannot track), tied to our life, stopped by PID.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::DeviceError;

/// Where wireguard-go puts its UAPI sockets. The folder is shared by every network namespace.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// wireguard-go opens its socket within milliseconds; a loaded CI machine may take longer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped wireguard-go may take to remove its interface before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(10);
/// Longest line of wireguard-go output passed on to the log.
const MAX_LINE: u64 = 4096;

pub fn socket_path(name: &str) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{name}.sock"))
}

/// A running `wireguard-go -f <name>`.
pub struct WgGo {
    name: String,
    child: Child,
}

impl WgGo {
    /// Starts wireguard-go and returns once its UAPI socket accepts connections.
    pub fn start(name: &str) -> Result<WgGo, DeviceError> {
        let mut child = spawn(name)?;
        pipe_to_log(name, child.stdout.take());
        pipe_to_log(name, child.stderr.take());
        let mut me = WgGo {
            name: name.to_string(),
            child,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let socket = socket_path(name);
        loop {
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(DeviceError::WireguardGoExited {
                    name: name.to_string(),
                    status: status.to_string(),
                });
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Ok(me);
            }
            if Instant::now() >= deadline {
                // `me` drops here: the child is stopped.
                return Err(DeviceError::NotReady {
                    name: name.to_string(),
                    waited: READY_TIMEOUT,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM lets wireguard-go remove its interface and socket; SIGKILL if it does not.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            self.remove_socket();
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                _ => {
                    tracing::warn!(interface = %self.name, "wireguard-go did not stop on SIGTERM; killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        self.remove_socket();
    }

    /// A killed wireguard-go leaves its socket behind; a stale one would make the next
    /// wireguard-control call for this name spawn a daemon of its own.
    fn remove_socket(&self) {
        let _ = std::fs::remove_file(socket_path(&self.name));
    }
}

impl Drop for WgGo {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the spawner thread is asked to do.
struct SpawnRequest {
    name: String,
    reply: mpsc::Sender<std::io::Result<Child>>,
}

/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process.
/// Callers run on short-lived threads (tokio's blocking pool retires idle threads), so every
/// wireguard-go is forked by one thread that lives as long as the process.
fn spawn(name: &str) -> Result<Child, DeviceError> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawn_error = |source: std::io::Error| DeviceError::SpawnWireguardGo {
        name: name.to_string(),
        source,
    };
    let sender = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            let started = std::thread::Builder::new()
                .name("wireguard-go-spawner".into())
                .spawn(move || {
                    // Ends when every sender is gone, i.e. never: the sender is a static.
                    for req in rx {
                        let _ = req.reply.send(command(&req.name).spawn());
                    }
                });
            if let Err(e) = started {
                tracing::error!(error = %e, "cannot start the wireguard-go spawner thread");
            }
            Mutex::new(tx)
        })
        .lock()
        .map_err(|_| spawn_error(std::io::Error::other("spawner lock poisoned")))?
        .clone();
    let (reply, answer) = mpsc::channel();
    sender
        .send(SpawnRequest {
            name: name.to_string(),
            reply,
        })
        .map_err(|_| spawn_error(std::io::Error::other("the spawner thread is gone")))?;
    answer
        .recv_timeout(READY_TIMEOUT)
        .map_err(|_| spawn_error(std::io::Error::other("the spawner thread did not answer")))?
        .map_err(spawn_error)
}

fn command(name: &str) -> Command {
    let mut cmd = Command::new("wireguard-go");
    // Our environment holds secrets (the proxy token, the pre-shared key, a setup key) that
    // the child has no use for and would expose in its /proc environ: it gets only its own
    // settings and the Go runtime's.
    cmd.env_clear().envs(
        std::env::vars_os()
            .filter(|(k, _)| k == "LOG_LEVEL" || k.to_string_lossy().starts_with("GO")),
    );
    cmd.arg("-f")
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let parent = std::process::id();
    // SAFETY: runs between fork and exec; prctl, getppid and _exit are async-signal-safe and
    // nothing here allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
            // The parent may have died before the prctl took effect: then nobody will signal.
            if u32::try_from(nix::unistd::getppid().as_raw()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd
}

/// wireguard-go logs to stdout/stderr; lines go to our log at debug. The thread ends when the
/// child closes its pipes (it exits).
fn pipe_to_log(name: &str, pipe: Option<impl Read + Send + 'static>) {
    let Some(pipe) = pipe else { return };
    let name = name.to_string();
    let started = std::thread::Builder::new()
        .name(format!("wg-go-log-{name}"))
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end();
                        if !text.is_empty() {
                            tracing::debug!(interface = %name, "wireguard-go: {text}");
                        }
                    }
                }
            }
        });
    if let Err(e) = started {
        tracing::debug!(error = %e, "cannot start a thread for wireguard-go's output");
    }
}
