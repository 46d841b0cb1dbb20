//! Runs a system tool (`ip`, `nft`) with explicit arguments, no shell, and a deadline: a tool
//! that hangs must not hang the mesh with it.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `ip`/`nft` may take; they answer in milliseconds unless the host is in trouble.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most output kept of one stream: the tools we run print a few lines.
const MAX_OUTPUT: u64 = 1 << 20;
const POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot run `{command}`: {source} — is it installed and on PATH?")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` did not finish within {timeout:?}; it was killed")]
    Timeout { command: String, timeout: Duration },
    #[error("waiting for `{command}`: {source}")]
    Wait {
        command: String,
        source: std::io::Error,
    },
}

/// Runs `program args…`, feeding `stdin` if given; returns its stdout when it exits with 0.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CmdError> {
    run_with_timeout(program, args, stdin, DEFAULT_TIMEOUT)
}

pub fn run_with_timeout(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, CmdError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CmdError::Spawn {
            command: command.clone(),
            source,
        })?;
    let input = child.stdin.take();
    let out = child.stdout.take();
    let err = child.stderr.take();
    // Pipes are drained on their own threads so a chatty tool cannot fill a pipe and stall
    // while this thread waits for it to exit.
    let (status, stdout, stderr) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || {
            if let (Some(mut pipe), Some(text)) = (input, stdin) {
                // A tool that exits early closes its end: that shows in its status, not here.
                let _ = pipe.write_all(text.as_bytes());
            }
        });
        let stdout = scope.spawn(move || drain(out));
        let stderr = scope.spawn(move || drain(err));
        let status = wait(&mut child, timeout);
        if status.is_err() {
            // Killing closes the pipes, so the drain threads finish.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = writer.join();
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        (status, stdout, stderr)
    });
    match status {
        Ok(status) if status.success() => Ok(stdout),
        Ok(status) => Err(CmdError::Failed {
            command,
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        }),
        Err(None) => Err(CmdError::Timeout { command, timeout }),
        Err(Some(source)) => Err(CmdError::Wait { command, source }),
    }
}

/// `Err(None)`: the deadline passed.
fn wait(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus, Option<std::io::Error>> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() >= deadline => return Err(None),
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => return Err(Some(e)),
        }
    }
}

fn drain(pipe: Option<impl Read>) -> String {
    let mut text = String::new();
    if let Some(pipe) = pipe {
        let mut bytes = Vec::new();
        let _ = pipe.take(MAX_OUTPUT).read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_failure_and_timeout_are_told_apart() {
        assert_eq!(run("cat", &[], Some("hello")).expect("cat runs"), "hello");
        let err = run("sh", &["-c", "echo nope >&2; exit 3"], None).expect_err("fails");
        let text = err.to_string();
        assert!(text.contains("sh -c") && text.contains("nope"), "{text}");
        let err = run_with_timeout("sleep", &["5"], None, Duration::from_millis(100))
            .expect_err("times out");
        assert!(matches!(err, CmdError::Timeout { .. }));
        let err = run("portcullis-no-such-tool", &[], None).expect_err("missing");
        assert!(matches!(err, CmdError::Spawn { .. }));
    }
}
