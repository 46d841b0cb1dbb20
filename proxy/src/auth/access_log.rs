//! The access-log pipeline: workers push one entry per request or L4 connection into a bounded
//! queue without waiting; the control thread sends them to management in batches (our
//! `SendAccessLogs`; NetBird's one-entry `SendAccessLog` when management answers
//! `UNIMPLEMENTED`), a few calls at a time, each bounded in time. A call per request cost both
//! sides far more CPU than the entry itself. Whatever cannot be queued or sent is counted as
//! dropped: logging never blocks or slows a request.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use prost::Message;
use proto::AccessLog;
use proto::logs::proxy_access_logs_client::ProxyAccessLogsClient;
use proto::logs::{RefusedLog, SendAccessLogsRequest};
use proto::proxy_service_client::ProxyServiceClient;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::control::management::ManagementLink;

/// Entries waiting to be sent.
pub const QUEUE: usize = 4096;
/// Calls in flight at once.
const IN_FLIGHT: usize = 4;
/// Most entries one call carries (management takes up to 1,024).
const MAX_BATCH: usize = 512;
/// Most encoded bytes one call carries.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// How long a batch waits for more entries once it has one: a few milliseconds of delay in the
/// log buy far fewer calls under load.
const LINGER: Duration = Duration::from_millis(100);
/// How long a management that lacks `SendAccessLogs` gets one entry per call before batches
/// are tried again.
const RETRY_BATCHES_AFTER: Duration = Duration::from_secs(600);
/// How often the queue is looked at while lingering.
const LINGER_STEP: Duration = Duration::from_millis(5);
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

/// 16 hex digits. An id, not a secret (management assigns its own row ids): a per-thread
/// generator seeded once, where the system's made a `getrandom` call per request.
fn new_log_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Where entries go: management, by batch where it can.
pub trait Transport: Send + Sync + 'static {
    /// Our `SendAccessLogs`: the entries refused one by one, or the call's failure.
    fn send_many(
        &self,
        logs: Vec<AccessLog>,
    ) -> impl Future<Output = Result<Vec<RefusedLog>, Status>> + Send;
    /// NetBird's `SendAccessLog`, one entry.
    fn send_one(&self, log: AccessLog) -> impl Future<Output = Result<(), Status>> + Send;
}

/// What became of a batch.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    sent: u64,
    failed: u64,
    /// One reason for the failures, for the log.
    error: Option<String>,
}

impl Outcome {
    fn add(&mut self, other: Outcome) {
        self.sent += other.sent;
        self.failed += other.failed;
        if self.error.is_none() {
            self.error = other.error;
        }
    }
}

/// Sends queued entries through `transport` until the queue closes: whatever is queued when a
/// send slot is free, plus what arrives within [`LINGER`] unless that already made a full
/// batch, up to [`MAX_BATCH`] entries a call.
pub async fn run<T: Transport>(
    mut rx: mpsc::Receiver<AccessLog>,
    stats: Arc<AccessLogStats>,
    transport: T,
) {
    let delivery = Arc::new(Delivery::new(transport, RETRY_BATCHES_AFTER));
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // The first failure is worth a log line; the counters tell the rest.
    let warned = Arc::new(AtomicBool::new(false));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        if batch.len() < MAX_BATCH {
            // Poll rather than wait on the queue: a waiting receiver is woken by every entry a
            // worker queues, a cross-thread wakeup per request. Stop early once a full batch is
            // waiting, so a fast stream of entries does not fill the queue meanwhile.
            let linger_until = tokio::time::Instant::now() + LINGER;
            while batch.len() + rx.len() < MAX_BATCH && tokio::time::Instant::now() < linger_until {
                tokio::time::sleep(LINGER_STEP).await;
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(entry) => batch.push(entry),
                    Err(_) => break,
                }
            }
        }
        let delivery = delivery.clone();
        let stats = stats.clone();
        let warned = warned.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let outcome = delivery.deliver(batch).await;
            stats.sent.fetch_add(outcome.sent, Ordering::Relaxed);
            stats.dropped.fetch_add(outcome.failed, Ordering::Relaxed);
            stats.failed.fetch_add(outcome.failed, Ordering::Relaxed);
            if let Some(error) = outcome.error
                && !warned.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(error = %error, "access log not delivered to management; losses are counted in /healthz access_log.dropped");
            }
        });
    }
}

struct Delivery<T> {
    transport: T,
    /// Since when management has answered `SendAccessLogs` with `UNIMPLEMENTED` (a NetBird
    /// management); `None` while it takes batches.
    unbatched_since: Mutex<Option<Instant>>,
    /// How long entries go one by one before batches are tried again (management may have been
    /// replaced by one that takes them).
    retry_batches_after: Duration,
}

impl<T: Transport> Delivery<T> {
    fn new(transport: T, retry_batches_after: Duration) -> Self {
        Self {
            transport,
            unbatched_since: Mutex::new(None),
            retry_batches_after,
        }
    }

    fn unbatched_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.unbatched_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn deliver(&self, batch: Vec<AccessLog>) -> Outcome {
        let try_batches = match *self.unbatched_since() {
            None => true,
            Some(since) => since.elapsed() >= self.retry_batches_after,
        };
        if !try_batches {
            return self.deliver_one_by_one(batch).await;
        }
        match self.deliver_batched(batch).await {
            Ok(outcome) => {
                if self.unbatched_since().take().is_some() {
                    tracing::info!("management takes access logs in batches again");
                }
                outcome
            }
            Err((so_far, rest)) => {
                if self.unbatched_since().replace(Instant::now()).is_none() {
                    tracing::info!(
                        "management does not take access logs in batches (a NetBird management?); sending one entry per call"
                    );
                }
                let mut outcome = self.deliver_one_by_one(rest).await;
                outcome.add(so_far);
                outcome
            }
        }
    }

    /// `Err` gives back what became of the chunks sent so far and the entries not yet sent,
    /// when management has no `SendAccessLogs`.
    async fn deliver_batched(
        &self,
        batch: Vec<AccessLog>,
    ) -> Result<Outcome, (Outcome, Vec<AccessLog>)> {
        let mut outcome = Outcome::default();
        let mut chunks = chunks_of_bounded_size(batch).into_iter();
        while let Some(chunk) = chunks.next() {
            let entries = chunk.len() as u64;
            match within_timeout(self.transport.send_many(chunk.clone())).await {
                Ok(refused) => {
                    let refused_count = (refused.len() as u64).min(entries);
                    outcome.sent += entries - refused_count;
                    outcome.failed += refused_count;
                    if let Some(r) = refused.first() {
                        outcome.error.get_or_insert_with(|| r.reason.clone());
                    }
                }
                Err(status) if status.code() == Code::Unimplemented && outcome.sent == 0 => {
                    let mut rest = chunk;
                    rest.extend(chunks.flatten());
                    return Err((outcome, rest));
                }
                Err(status) => {
                    outcome.failed += entries;
                    outcome.error.get_or_insert_with(|| describe(&status));
                    if unreachable(&status) {
                        outcome.failed += chunks.map(|c| c.len() as u64).sum::<u64>();
                        break;
                    }
                }
            }
        }
        Ok(outcome)
    }

    async fn deliver_one_by_one(&self, batch: Vec<AccessLog>) -> Outcome {
        let mut outcome = Outcome::default();
        let mut entries = batch.into_iter();
        // NetBird's one-entry calls go out a few at a time, as its own proxy sends them.
        loop {
            let wave: Vec<_> = entries
                .by_ref()
                .take(IN_FLIGHT)
                .map(|log| within_timeout(self.transport.send_one(log)))
                .collect();
            if wave.is_empty() {
                return outcome;
            }
            let mut all_unreachable = true;
            for result in join_all(wave).await {
                match result {
                    Ok(()) => {
                        outcome.sent += 1;
                        all_unreachable = false;
                    }
                    Err(status) => {
                        outcome.failed += 1;
                        all_unreachable &= unreachable(&status);
                        outcome.error.get_or_insert_with(|| describe(&status));
                    }
                }
            }
            if all_unreachable {
                outcome.failed += entries.count() as u64;
                return outcome;
            }
        }
    }
}

/// Management is down or hung: the rest of the batch would only wait for the same answer.
fn unreachable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
}

/// Bounds one call in time; a batch gives up at the first call that finds management down or
/// hung, so a slot is held for at most about [`SEND_TIMEOUT`].
async fn within_timeout<T>(call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(SEND_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("timed out")))
}

/// Splits a batch so that no call comes near gRPC's default 4 MiB message limit, whatever the
/// entries' paths and metadata hold.
fn chunks_of_bounded_size(batch: Vec<AccessLog>) -> Vec<Vec<AccessLog>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for log in batch {
        let len = log.encoded_len();
        if !chunk.is_empty() && bytes + len > MAX_BATCH_BYTES {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += len;
        chunk.push(log);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The real transport: the management link, our `SendAccessLogs` and NetBird's `SendAccessLog`.
pub struct ManagementTransport {
    batched: ProxyAccessLogsClient<Channel>,
    single: ProxyServiceClient<Channel>,
    link: ManagementLink,
}

impl ManagementTransport {
    pub fn new(link: ManagementLink) -> Self {
        let channel = link.endpoint().connect_lazy();
        Self {
            batched: ProxyAccessLogsClient::new(channel.clone()),
            single: ProxyServiceClient::new(channel),
            link,
        }
    }
}

impl Transport for ManagementTransport {
    async fn send_many(&self, logs: Vec<AccessLog>) -> Result<Vec<RefusedLog>, Status> {
        let req = self.link.authorized(SendAccessLogsRequest { logs });
        let answer = self.batched.clone().send_access_logs(req).await?;
        Ok(answer.into_inner().refused)
    }

    async fn send_one(&self, log: AccessLog) -> Result<(), Status> {
        let req = self
            .link
            .authorized(proto::SendAccessLogRequest { log: Some(log) });
        self.single.clone().send_access_log(req).await.map(|_| ())
    }
}

/// The access-log pipeline to management.
pub async fn run_to_management(
    rx: mpsc::Receiver<AccessLog>,
    stats: Arc<AccessLogStats>,
    link: ManagementLink,
) {
    run(rx, stats, ManagementTransport::new(link)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Management as seen by the pipeline: refuses entries whose path is odd, and may lack the
    /// batched call like a NetBird management.
    #[derive(Default)]
    struct FakeManagement {
        netbird: bool,
        down: bool,
        batched_calls: AtomicU64,
        single_calls: AtomicU64,
    }

    fn refused(log: &AccessLog) -> bool {
        log.path.parse::<u64>().unwrap() % 2 == 1
    }

    impl Transport for Arc<FakeManagement> {
        async fn send_many(&self, logs: Vec<AccessLog>) -> Result<Vec<RefusedLog>, Status> {
            self.batched_calls.fetch_add(1, Ordering::Relaxed);
            if self.down {
                return Err(Status::unavailable("connection refused"));
            }
            if self.netbird {
                return Err(Status::unimplemented("unknown service"));
            }
            Ok((0u32..)
                .zip(&logs)
                .filter(|(_, log)| refused(log))
                .map(|(index, _)| RefusedLog {
                    index,
                    reason: "NotFound: service".into(),
                })
                .collect())
        }

        async fn send_one(&self, log: AccessLog) -> Result<(), Status> {
            self.single_calls.fetch_add(1, Ordering::Relaxed);
            if self.down {
                return Err(Status::unavailable("connection refused"));
            }
            assert!(log.timestamp.is_some() && log.log_id.len() == 16);
            if refused(&log) {
                Err(Status::not_found("service"))
            } else {
                Ok(())
            }
        }
    }

    /// Fills the queue past its limit and runs the pipeline to the end.
    async fn deliver_a_full_queue(management: Arc<FakeManagement>) -> Arc<AccessLogStats> {
        let (q, rx) = AccessLogQueue::new();
        for n in 0..QUEUE + 10 {
            q.push(AccessLog {
                path: n.to_string(),
                ..AccessLog::default()
            });
        }
        assert_eq!(q.stats.dropped.load(Ordering::Relaxed), 10);
        assert_eq!(q.stats.queued.load(Ordering::Relaxed), QUEUE as u64);
        let stats = q.stats.clone();
        drop(q);
        run(rx, stats.clone(), management).await;
        // Let the last spawned sends finish.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while stats.sent.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed)
                < QUEUE as u64
            {
                tokio::task::yield_now().await;
            }
        })
        .await;
        stats
    }

    fn assert_half_refused(stats: &AccessLogStats) {
        assert_eq!(stats.sent.load(Ordering::Relaxed), QUEUE as u64 / 2);
        assert_eq!(stats.failed.load(Ordering::Relaxed), QUEUE as u64 / 2);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 10 + QUEUE as u64 / 2);
    }

    #[tokio::test]
    async fn queued_entries_go_in_full_batches_and_refusals_count_as_drops() {
        let management = Arc::new(FakeManagement::default());
        let stats = deliver_a_full_queue(management.clone()).await;
        assert_half_refused(&stats);
        assert_eq!(
            management.batched_calls.load(Ordering::Relaxed),
            (QUEUE / MAX_BATCH) as u64,
            "a full queue leaves in calls of {MAX_BATCH} entries"
        );
        assert_eq!(management.single_calls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_netbird_management_gets_one_entry_per_call() {
        let management = Arc::new(FakeManagement {
            netbird: true,
            ..FakeManagement::default()
        });
        let stats = deliver_a_full_queue(management.clone()).await;
        assert_half_refused(&stats);
        assert_eq!(
            management.single_calls.load(Ordering::Relaxed),
            QUEUE as u64
        );
        // Calls already under way when the first UNIMPLEMENTED came back may have tried too.
        let tried = management.batched_calls.load(Ordering::Relaxed);
        assert!(
            (1..=IN_FLIGHT as u64).contains(&tried),
            "{tried} batched calls"
        );
    }

    #[tokio::test]
    async fn batches_are_tried_again_after_a_while() {
        let entry = || AccessLog {
            path: "0".into(),
            timestamp: Some(prost_types::Timestamp::default()),
            log_id: "0".repeat(16),
            ..AccessLog::default()
        };
        let netbird = Arc::new(FakeManagement {
            netbird: true,
            ..FakeManagement::default()
        });
        let delivery = Delivery::new(netbird.clone(), Duration::from_secs(600));
        assert_eq!(delivery.deliver(vec![entry()]).await.sent, 1);
        assert_eq!(delivery.deliver(vec![entry()]).await.sent, 1);
        assert_eq!(
            netbird.batched_calls.load(Ordering::Relaxed),
            1,
            "not retried yet"
        );
        assert_eq!(netbird.single_calls.load(Ordering::Relaxed), 2);

        // Management was replaced by ours: with no wait, the next batch finds that out.
        let ours = Arc::new(FakeManagement::default());
        let delivery = Delivery::new(ours.clone(), Duration::ZERO);
        *delivery.unbatched_since() = Some(Instant::now());
        assert_eq!(delivery.deliver(vec![entry(), entry()]).await.sent, 2);
        assert_eq!(ours.batched_calls.load(Ordering::Relaxed), 1);
        assert_eq!(ours.single_calls.load(Ordering::Relaxed), 0);
        assert!(delivery.unbatched_since().is_none());
    }

    #[tokio::test]
    async fn entries_queued_close_together_share_one_call() {
        let management = Arc::new(FakeManagement::default());
        let (q, rx) = AccessLogQueue::new();
        let stats = q.stats.clone();
        let pipeline = tokio::spawn(run(rx, stats.clone(), management.clone()));
        for n in [0, 2, 4] {
            q.push(AccessLog {
                path: n.to_string(),
                ..AccessLog::default()
            });
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while stats.sent.load(Ordering::Relaxed) < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(stats.sent.load(Ordering::Relaxed), 3);
        assert_eq!(management.batched_calls.load(Ordering::Relaxed), 1);
        drop(q);
        pipeline.await.unwrap();
    }

    #[tokio::test]
    async fn a_batch_gives_up_at_the_first_call_that_finds_management_down() {
        let management = Arc::new(FakeManagement {
            down: true,
            ..FakeManagement::default()
        });
        let stats = deliver_a_full_queue(management.clone()).await;
        assert_eq!(stats.sent.load(Ordering::Relaxed), 0);
        assert_eq!(stats.failed.load(Ordering::Relaxed), QUEUE as u64);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 10 + QUEUE as u64);
        assert_eq!(
            management.batched_calls.load(Ordering::Relaxed),
            (QUEUE / MAX_BATCH) as u64,
            "one call per batch"
        );
    }

    #[test]
    fn large_entries_are_split_below_the_message_limit() {
        let big = |n: usize| AccessLog {
            path: format!("/{n}/{}", "x".repeat(300 * 1024)),
            ..AccessLog::default()
        };
        let batch: Vec<AccessLog> = (0..10).map(big).collect();
        let chunks = chunks_of_bounded_size(batch.clone());
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        for chunk in &chunks {
            let bytes: usize = chunk.iter().map(|l| l.encoded_len()).sum();
            assert!(bytes <= MAX_BATCH_BYTES, "{bytes} bytes in one call");
        }
        assert_eq!(chunks.concat(), batch, "every entry, in order");
        // One entry over the limit still goes, alone.
        let huge = AccessLog {
            path: "y".repeat(MAX_BATCH_BYTES + 1),
            ..AccessLog::default()
        };
        assert_eq!(chunks_of_bounded_size(vec![huge.clone()]), vec![vec![huge]]);
    }
}
