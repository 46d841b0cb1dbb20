//! `GET /api/events/proxy`: the account's access logs, newest first, filtered and paginated in
//! NetBird's shape (`ProxyAccessLogsResponse`).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde_json::json;

use super::{ApiError, ApiResult, AppState, Caller};
use crate::store::{AccessLogFilter, AccessLogRow};

const DEFAULT_PAGE_SIZE: i64 = 50;
const MAX_PAGE_SIZE: i64 = 100;
const KNOWN: &[&str] = &[
    "page",
    "page_size",
    "service_id",
    "status_code",
    "status",
    "user_id",
    "source_ip",
    "host",
    "method",
    "path",
    "start_date",
    "end_date",
];

fn bad(msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

fn int(q: &HashMap<String, String>, key: &str) -> ApiResult<Option<i64>> {
    q.get(key)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| bad(format!("{key} must be an integer, not {v:?}")))
        })
        .transpose()
}

fn time_ms(q: &HashMap<String, String>, key: &str) -> ApiResult<Option<i64>> {
    q.get(key)
        .map(|v| {
            humantime::parse_rfc3339_weak(v)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .ok_or_else(|| bad(format!("{key} must be an RFC 3339 time, not {v:?}")))
        })
        .transpose()
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<serde_json::Value>> {
    if let Some(unknown) = q.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown parameter {unknown:?}; known: {}",
            KNOWN.join(", ")
        )));
    }
    let page = int(&q, "page")?.unwrap_or(1);
    let page_size = int(&q, "page_size")?.unwrap_or(DEFAULT_PAGE_SIZE);
    if page < 1 || !(1..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(bad(format!(
            "page must be at least 1 and page_size 1 to {MAX_PAGE_SIZE}"
        )));
    }
    let success = match q.get("status").map(String::as_str) {
        None => None,
        Some("success") => Some(true),
        Some("failed") => Some(false),
        Some(other) => {
            return Err(bad(format!(
                "status must be success or failed, not {other:?}"
            )));
        }
    };
    let text = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let filter = AccessLogFilter {
        service_id: text("service_id"),
        status_code: int(&q, "status_code")?,
        success,
        user_id: text("user_id"),
        source_ip: text("source_ip"),
        host: text("host"),
        method: text("method"),
        path: text("path"),
        from_ms: time_ms(&q, "start_date")?,
        to_ms: time_ms(&q, "end_date")?,
    };
    let found = st
        .store
        .access_logs(caller.account(), &filter, page, page_size)
        .await?;
    let total_pages = (found.total + page_size - 1) / page_size;
    Ok(Json(json!({
        "data": found.rows.iter().map(entry_json).collect::<Vec<_>>(),
        "page": page,
        "page_size": page_size,
        "total_records": found.total,
        "total_pages": total_pages,
    })))
}

fn entry_json(r: &AccessLogRow) -> serde_json::Value {
    let timestamp = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.timestamp_ms.max(0) as u64),
    )
    .to_string();
    let metadata: serde_json::Value =
        serde_json::from_str(&r.metadata).unwrap_or_else(|_| json!({}));
    let reason = if r.status_code == 401
        || r.status_code == 429
        || !r.auth_success && r.status_code == 403
    {
        "authentication failed"
    } else {
        ""
    };
    json!({
        "id": r.id,
        "service_id": r.service_id,
        "timestamp": timestamp,
        "method": r.method,
        "host": r.host,
        "path": r.path,
        "duration_ms": r.duration_ms,
        "status_code": r.status_code,
        "source_ip": r.source_ip,
        "reason": reason,
        "user_id": r.user_id,
        "auth_method_used": r.auth_method,
        "auth_success": r.auth_success,
        "bytes_upload": r.bytes_upload,
        "bytes_download": r.bytes_download,
        "protocol": r.protocol,
        "metadata": metadata,
    })
}

/// Deletes access logs older than `retention_days` every hour (never when 0).
pub async fn prune_forever(store: crate::store::Store, retention_days: u32) {
    if retention_days == 0 {
        return;
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let cutoff_ms =
            (crate::store::now() - i64::from(retention_days) * 86_400).saturating_mul(1000);
        match store.prune_access_logs(cutoff_ms).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, retention_days, "old access logs deleted"),
            Err(e) => tracing::warn!(error = %e, "access logs not pruned"),
        }
    }
}
