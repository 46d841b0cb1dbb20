//! The access-log pipeline: workers push one entry per request or L4 connection into a bounded
//! queue without waiting; the control thread sends them to management (`SendAccessLog`, a few
//! at a time, each bounded in time). Whatever cannot be queued or sent is counted as dropped:
//! logging never blocks or slows a request.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use proto::AccessLog;
use proto::proxy_service_client::ProxyServiceClient;
use tokio::sync::{Semaphore, mpsc};

use crate::control::management::ManagementLink;

/// Entries waiting to be sent.
pub const QUEUE: usize = 4096;
/// Sends in flight at once.
const IN_FLIGHT: usize = 8;
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct AccessLogStats {
    pub queued: AtomicU64,
    pub sent: AtomicU64,
    /// Lost: the queue was full, or management did not take them.
    pub dropped: AtomicU64,
    /// Of the dropped, those management refused or did not answer.
    pub failed: AtomicU64,
}

impl AccessLogStats {
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "queued": self.queued.load(Ordering::Relaxed),
            "sent": self.sent.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
        })
    }
}

#[derive(Clone)]
pub struct AccessLogQueue {
    tx: mpsc::Sender<AccessLog>,
    pub stats: Arc<AccessLogStats>,
}

impl AccessLogQueue {
    pub fn new() -> (Self, mpsc::Receiver<AccessLog>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx,
                stats: Arc::default(),
            },
            rx,
        )
    }

    /// Queues an entry, filling in its time and id; never waits.
    pub fn push(&self, mut entry: AccessLog) {
        if entry.timestamp.is_none() {
            entry.timestamp = Some(prost_types::Timestamp::from(SystemTime::now()));
        }
        if entry.log_id.is_empty() {
            entry.log_id = new_log_id();
        }
        match self.tx.try_send(entry) {
            Ok(()) => self.stats.queued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn new_log_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Sends queued entries with `send` until the queue closes.
pub async fn run<F, Fut>(mut rx: mpsc::Receiver<AccessLog>, stats: Arc<AccessLogStats>, send: F)
where
    F: Fn(AccessLog) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // The first failure is worth a log line; the counters tell the rest.
    let warned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    while let Some(entry) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let fut = send(entry);
        let stats = stats.clone();
        let warned = warned.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let error = match tokio::time::timeout(SEND_TIMEOUT, fut).await {
                Ok(Ok(())) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(Err(e)) => e,
                Err(_) => "timed out".to_string(),
            };
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            stats.failed.fetch_add(1, Ordering::Relaxed);
            if !warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %error, "access log not delivered to management; losses are counted in /healthz access_log.dropped");
            }
        });
    }
}

/// The real sender: `SendAccessLog` over the management link.
pub async fn run_to_management(
    rx: mpsc::Receiver<AccessLog>,
    stats: Arc<AccessLogStats>,
    link: ManagementLink,
) {
    let client = ProxyServiceClient::new(link.endpoint().connect_lazy());
    let link = Arc::new(link);
    run(rx, stats, move |entry| {
        let mut client = client.clone();
        let req = link.authorized(proto::SendAccessLogRequest { log: Some(entry) });
        async move {
            client
                .send_access_log(req)
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_drops_and_failures_count() {
        let (q, rx) = AccessLogQueue::new();
        for _ in 0..QUEUE + 10 {
            q.push(AccessLog::default());
        }
        assert_eq!(q.stats.dropped.load(Ordering::Relaxed), 10);
        assert_eq!(q.stats.queued.load(Ordering::Relaxed), QUEUE as u64);
        let stats = q.stats.clone();
        drop(q);
        let ok = std::sync::Arc::new(AtomicU64::new(0));
        let seen = ok.clone();
        run(rx, stats.clone(), move |e: AccessLog| {
            let n = seen.fetch_add(1, Ordering::Relaxed);
            async move {
                assert!(e.timestamp.is_some() && e.log_id.len() == 16);
                if n.is_multiple_of(2) {
                    Ok(())
                } else {
                    Err("down".into())
                }
            }
        })
        .await;
        // Let the last spawned sends finish.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while stats.sent.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed)
                < QUEUE as u64
            {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert_eq!(stats.sent.load(Ordering::Relaxed), QUEUE as u64 / 2);
        assert_eq!(stats.failed.load(Ordering::Relaxed), QUEUE as u64 / 2);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 10 + QUEUE as u64 / 2);
    }
}
