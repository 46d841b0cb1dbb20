//! Access logs from proxies: NetBird's `SendAccessLog` (one entry a call) and our
//! `SendAccessLogs` (many a call, `portcullis.logs.v1`). Both check that the token may act on
//! the entry's account and that the service is that account's, so a proxy cannot write into
//! another account's logs, and both store through the batching writer.

use std::collections::HashMap;

use proto::AccessLog;
use proto::logs::proxy_access_logs_server::ProxyAccessLogs;
use proto::logs::{RefusedLog, SendAccessLogsRequest, SendAccessLogsResponse};
use tonic::{Request, Response, Status};

use super::ProxyServiceImpl;
use super::access_log_writer::{Queued, WriteError};
use super::auth::{check_scope, store_error};
use crate::store::{AccessLogRow, ProxyToken, now};

/// Most entries one `SendAccessLogs` call may carry.
pub const MAX_ENTRIES_PER_CALL: usize = 1024;

/// Longest text kept per field: logs are evidence, not a place to store payloads.
const MAX_FIELD: usize = 2048;

pub async fn send_access_log(
    svc: &ProxyServiceImpl,
    token: &ProxyToken,
    log: Option<AccessLog>,
) -> Result<(), Status> {
    let log = log.ok_or_else(|| Status::invalid_argument("log is required"))?;
    check_entry(svc, token, &log).await?;
    svc.access_logs
        .write(row_of(log))
        .await
        .map_err(write_status)
}

pub async fn send_access_logs(
    svc: &ProxyServiceImpl,
    token: &ProxyToken,
    logs: Vec<AccessLog>,
) -> Result<SendAccessLogsResponse, Status> {
    if logs.len() > MAX_ENTRIES_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "{} entries in one call; at most {MAX_ENTRIES_PER_CALL}",
            logs.len()
        )));
    }
    let mut refused = Vec::new();
    let mut queued: Vec<(u32, Queued)> = Vec::with_capacity(logs.len());
    // One store read per service of the batch, not per entry: a batch is mostly one service.
    let mut services: HashMap<(String, String), Result<(), Status>> = HashMap::new();
    let mut first_write_error = None;
    for (index, log) in (0u32..).zip(logs) {
        let key = (log.account_id.clone(), log.service_id.clone());
        let allowed = match services.get(&key) {
            Some(known) => known.clone(),
            None => {
                let verdict = check_entry(svc, token, &log).await;
                services.insert(key, verdict.clone());
                verdict
            }
        };
        if let Err(status) = allowed {
            refused.push(refusal(index, &status));
            continue;
        }
        match svc.access_logs.enqueue(row_of(log)) {
            Ok(q) => queued.push((index, q)),
            Err(e) => {
                let status = write_status(e);
                refused.push(refusal(index, &status));
                first_write_error.get_or_insert(status);
            }
        }
    }
    let mut stored = 0usize;
    for (index, q) in queued {
        match q.stored().await {
            Ok(()) => stored += 1,
            Err(e) => {
                let status = write_status(e);
                refused.push(refusal(index, &status));
                first_write_error.get_or_insert(status);
            }
        }
    }
    // Nothing taken because of management itself (busy, store down): say so for the whole
    // call, so the proxy sees a retryable status rather than a list of refusals.
    if stored == 0
        && let Some(status) = first_write_error
    {
        return Err(status);
    }
    refused.sort_by_key(|r| r.index);
    Ok(SendAccessLogsResponse { refused })
}

#[tonic::async_trait]
impl ProxyAccessLogs for ProxyServiceImpl {
    async fn send_access_logs(
        &self,
        request: Request<SendAccessLogsRequest>,
    ) -> Result<Response<SendAccessLogsResponse>, Status> {
        let token = self.authenticate(&request).await?;
        send_access_logs(self, &token, request.into_inner().logs)
            .await
            .map(Response::new)
    }
}

/// The token may act on the entry's account, and the service is that account's.
async fn check_entry(
    svc: &ProxyServiceImpl,
    token: &ProxyToken,
    log: &AccessLog,
) -> Result<(), Status> {
    check_scope(token, &log.account_id)?;
    svc.store
        .service(&log.account_id, &log.service_id)
        .await
        .map_err(store_error)?
        .map(|_| ())
        .ok_or_else(|| Status::not_found(format!("service {} not found", log.service_id)))
}

fn refusal(index: u32, status: &Status) -> RefusedLog {
    RefusedLog {
        index,
        reason: format!("{:?}: {}", status.code(), status.message()),
    }
}

fn write_status(e: WriteError) -> Status {
    match e {
        WriteError::Busy => Status::resource_exhausted(e.to_string()),
        WriteError::Stopped => Status::unavailable(e.to_string()),
        WriteError::Store(e) => store_error(e),
    }
}

fn clip(s: String) -> String {
    if s.len() <= MAX_FIELD {
        return s;
    }
    s[..s.floor_char_boundary(MAX_FIELD)].to_string()
}

fn row_of(log: AccessLog) -> AccessLogRow {
    let timestamp_ms = log
        .timestamp
        .map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
        .unwrap_or_else(|| now() * 1000);
    let metadata = serde_json::to_string(&log.metadata).unwrap_or_else(|_| "{}".into());
    AccessLogRow {
        id: crate::secrets::new_time_ordered_id(),
        account_id: log.account_id,
        service_id: log.service_id,
        timestamp_ms,
        method: clip(log.method),
        host: clip(log.host.to_ascii_lowercase()),
        path: clip(log.path),
        duration_ms: log.duration_ms.max(0),
        status_code: i64::from(log.response_code),
        source_ip: clip(log.source_ip),
        auth_method: clip(log.auth_mechanism),
        user_id: clip(log.user_id),
        auth_success: log.auth_success,
        bytes_upload: log.bytes_upload.max(0),
        bytes_download: log.bytes_download.max(0),
        protocol: clip(log.protocol),
        metadata: clip(metadata),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::store::{ServiceRecord, test_store};

    struct World {
        svc: ProxyServiceImpl,
        account: String,
        service: String,
        own: ProxyToken,
        other: ProxyToken,
        shared: ProxyToken,
    }

    async fn world() -> World {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap().id;
        let b = store.create_account("b").await.unwrap().id;
        let service = ServiceRecord::for_tests(&a, "{}");
        store.insert_service(&service).await.unwrap();
        let (own, other, shared) = crate::grpc::test_tokens(&store, &a, &b).await;
        World {
            svc: ProxyServiceImpl::for_tests(store),
            account: a,
            service: service.id,
            own,
            other,
            shared,
        }
    }

    fn entry(w: &World, path: &str) -> AccessLog {
        AccessLog {
            account_id: w.account.clone(),
            service_id: w.service.clone(),
            path: path.into(),
            ..AccessLog::default()
        }
    }

    async fn stored_paths(w: &World) -> Vec<String> {
        let page = w
            .svc
            .store
            .access_logs(&w.account, &Default::default(), Default::default(), 1, 100)
            .await
            .unwrap();
        let mut paths: Vec<String> = page.rows.into_iter().map(|r| r.path).collect();
        paths.sort();
        paths
    }

    #[tokio::test]
    async fn access_logs_are_stored_for_own_services_only() {
        let w = world().await;
        let log = AccessLog {
            timestamp: Some(prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 250_000_000,
            }),
            log_id: "ignored".into(),
            host: "APP.proxy.example".into(),
            duration_ms: 12,
            method: "POST".into(),
            response_code: 401,
            source_ip: "192.0.2.9".into(),
            auth_mechanism: "password".into(),
            user_id: String::new(),
            auth_success: false,
            bytes_upload: 10,
            bytes_download: -5,
            protocol: "http".into(),
            metadata: [("crowdsec_verdict".to_string(), "ban".to_string())].into(),
            ..entry(&w, "/x")
        };
        send_access_log(&w.svc, &w.own, Some(log.clone()))
            .await
            .unwrap();
        let e = send_access_log(&w.svc, &w.other, Some(log.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = send_access_log(
            &w.svc,
            &w.shared,
            Some(AccessLog {
                service_id: "nope".into(),
                ..log.clone()
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = send_access_log(&w.svc, &w.own, None).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let page = w
            .svc
            .store
            .access_logs(&w.account, &Default::default(), Default::default(), 1, 10)
            .await
            .unwrap();
        assert_eq!(page.total, 1);
        let r = &page.rows[0];
        assert_eq!(r.timestamp_ms, 1_767_225_600_250);
        assert_eq!(r.host, "app.proxy.example");
        assert_eq!((r.status_code, r.duration_ms), (401, 12));
        assert_eq!((r.bytes_upload, r.bytes_download), (10, 0));
        assert_eq!(r.auth_method, "password");
        assert!(!r.auth_success);
        assert_eq!(r.metadata, r#"{"crowdsec_verdict":"ban"}"#);
        assert_ne!(r.id, "ignored");
    }

    #[tokio::test]
    async fn a_batch_stores_its_good_entries_and_names_the_refused_ones() {
        let w = world().await;
        let batch = vec![
            entry(&w, "/a"),
            AccessLog {
                service_id: "nope".into(),
                ..entry(&w, "/unknown-service")
            },
            entry(&w, "/b"),
            AccessLog {
                account_id: "someone-else".into(),
                ..entry(&w, "/other-account")
            },
            entry(&w, "/c"),
        ];
        let answer = send_access_logs(&w.svc, &w.own, batch.clone())
            .await
            .unwrap();
        let refused: Vec<(u32, &str)> = answer
            .refused
            .iter()
            .map(|r| (r.index, r.reason.split(':').next().unwrap()))
            .collect();
        assert_eq!(refused, vec![(1, "NotFound"), (3, "PermissionDenied")]);
        assert_eq!(stored_paths(&w).await, vec!["/a", "/b", "/c"]);

        // A token of another account has every entry refused, and nothing is stored.
        let answer = send_access_logs(&w.svc, &w.other, batch).await.unwrap();
        assert_eq!(answer.refused.len(), 5);
        assert_eq!(stored_paths(&w).await.len(), 3);
    }

    #[tokio::test]
    async fn an_oversized_batch_is_refused_whole() {
        let w = world().await;
        let batch = vec![entry(&w, "/x"); MAX_ENTRIES_PER_CALL + 1];
        let e = send_access_logs(&w.svc, &w.shared, batch)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(stored_paths(&w).await.is_empty());
        let full = vec![entry(&w, "/x"); MAX_ENTRIES_PER_CALL];
        let answer = send_access_logs(&w.svc, &w.shared, full).await.unwrap();
        assert!(answer.refused.is_empty());
        let page = w
            .svc
            .store
            .access_logs(&w.account, &Default::default(), Default::default(), 1, 1)
            .await
            .unwrap();
        assert_eq!(page.total, MAX_ENTRIES_PER_CALL as i64);
    }
}
