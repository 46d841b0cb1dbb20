//! Access logs arrive from every proxy, one entry a `SendAccessLog` call or many a
//! `SendAccessLogs` call. Stored one by one, each would be a transaction of its own (on SQLite
//! a WAL sync each) and a pool connection each, which capped how many requests per second
//! management could log. The writer stores whatever has queued meanwhile in one transaction and
//! answers each row once it is stored, so an OK still means stored. A batch that fails is stored
//! again row by row, so a bad row (its account deleted meanwhile) fails only its own entry.

use tokio::sync::{mpsc, oneshot};

use crate::store::{AccessLogRow, Store, StoreError};

/// Rows waiting to be stored; a call that finds the queue full is refused at once.
const QUEUE: usize = 8_192;
/// Rows stored in one transaction (one commit, and on SQLite one WAL sync).
const ROWS_PER_TRANSACTION: usize = 1_024;

#[derive(Clone)]
pub struct AccessLogWriter {
    queue: mpsc::Sender<Pending>,
}

struct Pending {
    row: AccessLogRow,
    stored: oneshot::Sender<Result<(), StoreError>>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{QUEUE} access logs are already waiting to be stored")]
    Busy,
    #[error("the access-log writer has stopped")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AccessLogWriter {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(store: Store) -> AccessLogWriter {
        let (queue, rows) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store, rows));
        AccessLogWriter { queue }
    }

    /// Stores `row`; returns once it is stored (or refused).
    pub async fn write(&self, row: AccessLogRow) -> Result<(), WriteError> {
        self.enqueue(row)?.stored().await
    }

    /// Queues `row` without waiting; the answer tells when it is stored. Many rows queued
    /// back to back go into the same statement.
    pub fn enqueue(&self, row: AccessLogRow) -> Result<Queued, WriteError> {
        let (stored, outcome) = oneshot::channel();
        self.queue
            .try_send(Pending { row, stored })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => WriteError::Busy,
                mpsc::error::TrySendError::Closed(_) => WriteError::Stopped,
            })?;
        Ok(Queued(outcome))
    }
}

/// A queued row.
pub struct Queued(oneshot::Receiver<Result<(), StoreError>>);

impl Queued {
    /// Returns once the row is stored (or refused).
    pub async fn stored(self) -> Result<(), WriteError> {
        self.0.await.map_err(|_| WriteError::Stopped)??;
        Ok(())
    }
}

async fn write_batches(store: Store, mut rows: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(ROWS_PER_TRANSACTION);
    while rows.recv_many(&mut batch, ROWS_PER_TRANSACTION).await > 0 {
        let all: Vec<&AccessLogRow> = batch.iter().map(|p| &p.row).collect();
        match store.insert_access_logs(&all).await {
            Ok(()) => {
                for p in batch.drain(..) {
                    let _ = p.stored.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, rows = batch.len(), "access-log batch refused; storing its rows one by one");
                for p in batch.drain(..) {
                    let outcome = store.insert_access_log(&p.row).await;
                    let _ = p.stored.send(outcome);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    fn row(account: &str, n: usize) -> AccessLogRow {
        AccessLogRow {
            id: format!("log-{account}-{n}"),
            account_id: account.to_string(),
            service_id: "svc".into(),
            timestamp_ms: 1_700_000_000_000 + n as i64,
            method: "GET".into(),
            path: format!("/{n}"),
            ..AccessLogRow::default()
        }
    }

    #[tokio::test]
    async fn concurrent_calls_are_all_stored_and_a_bad_row_fails_alone() {
        let store = test_store().await;
        let account = store.create_account("a").await.unwrap().id;
        let writer = AccessLogWriter::start(store.clone());
        // More calls at once than one transaction takes, so several batches form.
        let calls: Vec<_> = (0..ROWS_PER_TRANSACTION + 500)
            .map(|n| {
                let writer = writer.clone();
                let r = if n == 300 {
                    row("no-such-account", n)
                } else {
                    row(&account, n)
                };
                tokio::spawn(async move { writer.write(r).await })
            })
            .collect();
        let mut refused = Vec::new();
        for (n, call) in calls.into_iter().enumerate() {
            if call.await.unwrap().is_err() {
                refused.push(n);
            }
        }
        assert_eq!(refused, vec![300], "only the row of no account is refused");
        let (stored,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM access_logs")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(stored as usize, ROWS_PER_TRANSACTION + 499);
    }
}
