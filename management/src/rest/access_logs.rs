//! `GET /api/events/proxy`: the account's access logs, newest first, filtered and paginated in
//! NetBird's shape (`ProxyAccessLogsResponse`).
//!
//! Parameters are NetBird's (`page`, `page_size`, `sort_by`, `sort_order`, `search`, `source_ip`,
//! `host`, `path`, `user_id`, `user_email`, `user_name`, `method`, `status`, `status_code`,
//! `start_date`, `end_date`) plus ours, `service_id`. An empty value counts as absent and a
//! `page_size` above 100 is lowered to 100 (as NetBird does); a value that cannot be read is a 400
//! naming it, and so is an unknown parameter.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde_json::json;

use super::{ApiError, ApiResult, AppState, Caller};
use crate::store::{AccessLogFilter, AccessLogRow, AccessLogSort};

const DEFAULT_PAGE_SIZE: i64 = 50;
const MAX_PAGE_SIZE: i64 = 100;
const KNOWN: &[&str] = &[
    "page",
    "page_size",
    "sort_by",
    "sort_order",
    "search",
    "service_id",
    "status_code",
    "status",
    "user_id",
    "user_email",
    "user_name",
    "source_ip",
    "host",
    "method",
    "path",
    "start_date",
    "end_date",
];

/// A parsed query: which rows, sorted how, which page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogQuery {
    pub filter: AccessLogFilter,
    pub sort: AccessLogSort,
    pub page: i64,
    pub page_size: i64,
}

/// Reads the query parameters; `Err` is the message of a 400.
pub fn parse_query(q: &HashMap<String, String>) -> Result<LogQuery, String> {
    if let Some(unknown) = q.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!(
            "unknown parameter {unknown:?}; known: {}",
            KNOWN.join(", ")
        ));
    }
    let text = |k: &str| q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let int = |key: &str| -> Result<Option<i64>, String> {
        text(key)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| format!("{key} must be an integer, not {v:?}"))
            })
            .transpose()
    };
    let time_ms = |key: &str| -> Result<Option<i64>, String> {
        text(key)
            .map(|v| {
                humantime::parse_rfc3339_weak(v)
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .and_then(|d| i64::try_from(d.as_millis()).ok())
                    .ok_or_else(|| {
                        format!("{key} must be an RFC 3339 time (2026-01-31T12:00:00Z), not {v:?}")
                    })
            })
            .transpose()
    };
    let page = int("page")?.unwrap_or(1);
    if page < 1 {
        return Err("page must be at least 1".into());
    }
    let page_size = int("page_size")?.unwrap_or(DEFAULT_PAGE_SIZE);
    if page_size < 1 {
        return Err(format!("page_size must be 1 to {MAX_PAGE_SIZE}"));
    }
    let page_size = page_size.min(MAX_PAGE_SIZE);
    let success = match text("status") {
        None => None,
        Some("success") => Some(true),
        Some("failed") => Some(false),
        Some(other) => return Err(format!("status must be success or failed, not {other:?}")),
    };
    let status_code = int("status_code")?;
    if status_code.is_some_and(|c| !(0..=999).contains(&c)) {
        return Err("status_code must be 0 to 999".into());
    }
    let sort = AccessLogSort {
        column: match text("sort_by") {
            None => "timestamp",
            Some(s) => AccessLogSort::COLUMNS
                .iter()
                .copied()
                .find(|c| *c == s)
                .ok_or_else(|| {
                    format!(
                        "sort_by must be one of {}, not {s:?}",
                        AccessLogSort::COLUMNS.join(", ")
                    )
                })?,
        },
        ascending: match text("sort_order").map(str::to_ascii_lowercase).as_deref() {
            None | Some("desc") => false,
            Some("asc") => true,
            Some(other) => return Err(format!("sort_order must be asc or desc, not {other:?}")),
        },
    };
    // Users who sign in with a password, PIN or header have no e-mail or name: those filters
    // match the user id.
    let user = [text("user_email"), text("user_name")]
        .into_iter()
        .flatten()
        .next()
        .map(str::to_string);
    let filter = AccessLogFilter {
        service_id: text("service_id").map(str::to_string),
        status_code,
        success,
        user_id: text("user_id").map(str::to_string),
        user,
        source_ip: text("source_ip").map(str::to_string),
        host: text("host").map(str::to_string),
        method: text("method").map(str::to_string),
        path: text("path").map(str::to_string),
        search: text("search").map(str::to_string),
        from_ms: time_ms("start_date")?,
        to_ms: time_ms("end_date")?,
    };
    if let (Some(from), Some(to)) = (filter.from_ms, filter.to_ms)
        && from > to
    {
        return Err("start_date must not be after end_date".into());
    }
    Ok(LogQuery {
        filter,
        sort,
        page,
        page_size,
    })
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<serde_json::Value>> {
    let query = parse_query(&q).map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, m))?;
    let found = st
        .store
        .access_logs(
            caller.account(),
            &query.filter,
            query.sort,
            query.page,
            query.page_size,
        )
        .await?;
    Ok(Json(page_json(&found.rows, found.total, &query)))
}

fn page_json(rows: &[AccessLogRow], total: i64, q: &LogQuery) -> serde_json::Value {
    json!({
        "data": rows.iter().map(entry_json).collect::<Vec<_>>(),
        "page": q.page,
        "page_size": q.page_size,
        "total_records": total,
        "total_pages": (total + q.page_size - 1) / q.page_size,
    })
}

/// One entry in NetBird's `ProxyAccessLog` shape (plus `auth_success`).
pub fn entry_json(r: &AccessLogRow) -> serde_json::Value {
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

/// The cutoff (unix milliseconds) before which logs are deleted, `None` when kept forever.
pub fn retention_cutoff_ms(now_unix: i64, retention_days: u32) -> Option<i64> {
    (retention_days > 0)
        .then(|| (now_unix - i64::from(retention_days) * 86_400).saturating_mul(1000))
}

/// Deletes access logs older than `retention_days` at start and then every hour (never when 0).
pub async fn prune_forever(store: crate::store::Store, retention_days: u32) {
    if retention_days == 0 {
        tracing::info!("access logs are kept forever (retention 0 days)");
        return;
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cutoff_ms) = retention_cutoff_ms(crate::store::now(), retention_days) else {
            return;
        };
        match store.prune_access_logs(cutoff_ms).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, retention_days, "old access logs deleted"),
            Err(e) => tracing::warn!(error = %e, "access logs not pruned"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<LogQuery, String> {
        parse_query(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_and_netbird_parameters() {
        let d = q(&[]).unwrap();
        assert_eq!((d.page, d.page_size), (1, 50));
        assert_eq!(d.sort, AccessLogSort::default());
        assert_eq!(d.filter, AccessLogFilter::default());
        // What NetBird's dashboard sends, empty values included.
        let n = q(&[
            ("page", "2"),
            ("page_size", "500"),
            ("sort_by", "status_code"),
            ("sort_order", "ASC"),
            ("search", "api"),
            ("status", "failed"),
            ("status_code", ""),
            ("user_email", "pin-user"),
            ("start_date", "2026-01-01T00:00:00Z"),
            ("end_date", "2026-01-02T00:00:00+00:00"),
        ])
        .unwrap();
        assert_eq!((n.page, n.page_size), (2, 100));
        assert_eq!(n.sort.column, "status_code");
        assert!(n.sort.ascending);
        assert_eq!(n.filter.search.as_deref(), Some("api"));
        assert_eq!(n.filter.success, Some(false));
        assert_eq!(n.filter.status_code, None);
        assert_eq!(n.filter.user.as_deref(), Some("pin-user"));
        assert_eq!(n.filter.from_ms, Some(1_767_225_600_000));
        assert_eq!(n.filter.to_ms, Some(1_767_312_000_000));
    }

    #[test]
    fn bad_parameters_are_named() {
        for (pairs, needle) in [
            (vec![("page", "0")], "page must"),
            (vec![("page", "x")], "page must be an integer"),
            (vec![("page_size", "0")], "page_size"),
            (vec![("status", "ok")], "status must"),
            (vec![("status_code", "abc")], "status_code"),
            (vec![("start_date", "yesterday")], "start_date"),
            (vec![("sort_by", "password")], "sort_by"),
            (vec![("sort_order", "up")], "sort_order"),
            (vec![("bogus", "1")], "unknown parameter"),
            (
                vec![
                    ("start_date", "2026-02-01T00:00:00Z"),
                    ("end_date", "2026-01-01T00:00:00Z"),
                ],
                "after end_date",
            ),
        ] {
            let e = q(&pairs).unwrap_err();
            assert!(e.contains(needle), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn entries_have_netbird_fields() {
        let row = AccessLogRow {
            id: "l1".into(),
            service_id: "s1".into(),
            timestamp_ms: 1_767_225_600_123,
            method: "GET".into(),
            status_code: 401,
            metadata: r#"{"crowdsec_verdict":"ban"}"#.into(),
            ..Default::default()
        };
        let v = entry_json(&row);
        assert_eq!(v["timestamp"], "2026-01-01T00:00:00.123Z");
        assert_eq!(v["metadata"]["crowdsec_verdict"], "ban");
        assert_eq!(v["reason"], "authentication failed");
        for key in [
            "id",
            "service_id",
            "method",
            "host",
            "path",
            "duration_ms",
            "status_code",
            "source_ip",
            "user_id",
            "auth_method_used",
            "bytes_upload",
            "bytes_download",
            "protocol",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        let page = page_json(
            &[row],
            101,
            &LogQuery {
                page: 1,
                page_size: 50,
                ..Default::default()
            },
        );
        assert_eq!(page["total_pages"], 3);
        assert_eq!(page["total_records"], 101);
    }

    #[test]
    fn retention_cutoff() {
        assert_eq!(retention_cutoff_ms(1_000_000, 0), None);
        assert_eq!(
            retention_cutoff_ms(1_000_000, 1),
            Some((1_000_000 - 86_400) * 1000)
        );
    }
}
