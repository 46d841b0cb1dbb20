//! The lock replicas sharing a certificate directory take before ordering a certificate, so
//! that each certificate is ordered once: `flock` on a file in the shared directory, or a
//! Kubernetes Lease (`NB_PROXY_CERT_LOCK_METHOD`).

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::AcmeError;
use super::lease::{HeldLease, LeaseLock};
use super::settings::LockMethod;

/// How often a busy file lock is tried again.
const FLOCK_RETRY: Duration = Duration::from_millis(200);

pub enum CertLock {
    File { dir: PathBuf },
    Lease(LeaseLock),
}

pub enum HeldLock {
    File(#[allow(dead_code)] Flock<File>),
    Lease(HeldLease),
}

impl CertLock {
    /// `auto` takes the Lease inside Kubernetes (KUBERNETES_SERVICE_HOST set), else flock.
    pub fn new(method: LockMethod, dir: PathBuf, identity: &str) -> Result<Self, AcmeError> {
        let in_kubernetes = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        match method {
            LockMethod::Flock => Ok(Self::File { dir }),
            LockMethod::Auto if !in_kubernetes => Ok(Self::File { dir }),
            LockMethod::Auto | LockMethod::K8sLease => LeaseLock::in_cluster(identity.to_string())
                .map(Self::Lease)
                .map_err(|e| AcmeError::Lock(format!("k8s-lease: {e}"))),
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Self::File { .. } => "flock",
            Self::Lease(_) => "k8s-lease",
        }
    }

    /// Waits at most `max_wait` for the lock called `name`.
    pub async fn acquire(&self, name: &str, max_wait: Duration) -> Result<HeldLock, AcmeError> {
        match self {
            Self::File { dir } => {
                let path = dir.join(format!("{name}.lock"));
                let deadline = Instant::now() + max_wait;
                loop {
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)
                        .map_err(|e| AcmeError::storage(&path, e))?;
                    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                        Ok(held) => return Ok(HeldLock::File(held)),
                        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
                        Err((_, e)) => {
                            return Err(AcmeError::Lock(format!("{}: {e}", path.display())));
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(AcmeError::Lock(format!(
                            "{} is held by another proxy for over {max_wait:?}",
                            path.display()
                        )));
                    }
                    tokio::time::sleep(FLOCK_RETRY).await;
                }
            }
            Self::Lease(lease) => lease
                .acquire(name, max_wait)
                .await
                .map(HeldLock::Lease)
                .map_err(|e| AcmeError::Lock(e.to_string())),
        }
    }
}

impl HeldLock {
    pub async fn release(self) {
        match self {
            // Closing the file releases the flock.
            Self::File(held) => drop(held),
            Self::Lease(held) => {
                if let Err(e) = held.release().await {
                    tracing::warn!(error = %e, "lease not released; it expires on its own");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_lock_is_exclusive_until_released() {
        let dir = std::env::temp_dir().join(format!("pc-acme-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = CertLock::new(LockMethod::Flock, dir.clone(), "me").unwrap();
        let held = lock
            .acquire("a.example", Duration::from_secs(1))
            .await
            .unwrap();
        let err = lock
            .acquire("a.example", Duration::from_millis(300))
            .await
            .err()
            .expect("busy");
        assert!(err.to_string().contains("held by another proxy"), "{err}");
        // Another name is independent.
        let other = lock
            .acquire("b.example", Duration::from_secs(1))
            .await
            .unwrap();
        held.release().await;
        other.release().await;
        lock.acquire("a.example", Duration::from_secs(1))
            .await
            .unwrap()
            .release()
            .await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
