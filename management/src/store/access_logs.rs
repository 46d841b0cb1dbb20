//! Access logs the proxies send: one row per request or L4 connection, listed newest first with
//! filters, and deleted after the retention period.

use sqlx::{AssertSqlSafe, Row};

use super::{Store, StoreError};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessLogRow {
    pub id: String,
    pub account_id: String,
    pub service_id: String,
    pub timestamp_ms: i64,
    pub method: String,
    pub host: String,
    pub path: String,
    pub duration_ms: i64,
    pub status_code: i64,
    pub source_ip: String,
    pub auth_method: String,
    pub user_id: String,
    pub auth_success: bool,
    pub bytes_upload: i64,
    pub bytes_download: i64,
    pub protocol: String,
    /// JSON object of string values.
    pub metadata: String,
}

/// Which rows to list. Every field narrows; `None` does not.
#[derive(Debug, Clone, Default)]
pub struct AccessLogFilter {
    pub service_id: Option<String>,
    pub status_code: Option<i64>,
    /// `Some(true)`: 2xx and 3xx; `Some(false)`: anything else.
    pub success: Option<bool>,
    pub user_id: Option<String>,
    pub source_ip: Option<String>,
    pub host: Option<String>,
    pub method: Option<String>,
    /// Substring of the path.
    pub path: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

pub struct AccessLogPage {
    pub rows: Vec<AccessLogRow>,
    pub total: i64,
}

const COLUMNS: &str = "id, account_id, service_id, timestamp_ms, method, host, path, duration_ms, \
     status_code, source_ip, auth_method, user_id, auth_success, bytes_upload, bytes_download, \
     protocol, metadata";

enum Param {
    Text(String),
    Int(i64),
}

impl Store {
    pub async fn insert_access_log(&self, r: &AccessLogRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO access_logs (id, account_id, service_id, timestamp_ms, method, host, path, \
             duration_ms, status_code, source_ip, auth_method, user_id, auth_success, bytes_upload, \
             bytes_download, protocol, metadata) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(&r.id)
        .bind(&r.account_id)
        .bind(&r.service_id)
        .bind(r.timestamp_ms)
        .bind(&r.method)
        .bind(&r.host)
        .bind(&r.path)
        .bind(r.duration_ms)
        .bind(r.status_code)
        .bind(&r.source_ip)
        .bind(&r.auth_method)
        .bind(&r.user_id)
        .bind(i64::from(r.auth_success))
        .bind(r.bytes_upload)
        .bind(r.bytes_download)
        .bind(&r.protocol)
        .bind(&r.metadata)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// One page (1-based) of an account's logs, newest first, and how many match in all.
    pub async fn access_logs(
        &self,
        account_id: &str,
        f: &AccessLogFilter,
        page: i64,
        page_size: i64,
    ) -> Result<AccessLogPage, StoreError> {
        let mut clauses = vec!["account_id = $1".to_string()];
        let mut params = vec![Param::Text(account_id.to_string())];
        let mut add = |clause: &str, p: Param| {
            params.push(p);
            clauses.push(clause.replace('?', &format!("${}", params.len())));
        };
        if let Some(v) = &f.service_id {
            add("service_id = ?", Param::Text(v.clone()));
        }
        if let Some(v) = f.status_code {
            add("status_code = ?", Param::Int(v));
        }
        match f.success {
            Some(true) => add("status_code >= ? AND status_code < 400", Param::Int(200)),
            Some(false) => add("(status_code < ? OR status_code >= 400)", Param::Int(200)),
            None => {}
        }
        if let Some(v) = &f.user_id {
            add("user_id = ?", Param::Text(v.clone()));
        }
        if let Some(v) = &f.source_ip {
            add("source_ip = ?", Param::Text(v.clone()));
        }
        if let Some(v) = &f.host {
            add("host = ?", Param::Text(v.to_ascii_lowercase()));
        }
        if let Some(v) = &f.method {
            add("method = ?", Param::Text(v.to_ascii_uppercase()));
        }
        if let Some(v) = &f.path {
            // The pattern's own wildcards are escaped so the filter is a plain substring.
            let escaped = v
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            add(
                "path LIKE ? ESCAPE '\\'",
                Param::Text(format!("%{escaped}%")),
            );
        }
        if let Some(v) = f.from_ms {
            add("timestamp_ms >= ?", Param::Int(v));
        }
        if let Some(v) = f.to_ms {
            add("timestamp_ms <= ?", Param::Int(v));
        }
        let filter = clauses.join(" AND ");
        let bind_all = |sql: String| {
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for p in &params {
                q = match p {
                    Param::Text(s) => q.bind(s.clone()),
                    Param::Int(i) => q.bind(*i),
                };
            }
            q
        };
        let total: i64 = bind_all(format!(
            "SELECT COUNT(*) AS n FROM access_logs WHERE {filter}"
        ))
        .fetch_one(self.pool())
        .await?
        .try_get("n")?;
        let offset = (page - 1).max(0) * page_size;
        let rows = bind_all(format!(
            "SELECT {COLUMNS} FROM access_logs WHERE {filter} \
             ORDER BY timestamp_ms DESC, id DESC LIMIT {page_size} OFFSET {offset}"
        ))
        .fetch_all(self.pool())
        .await?;
        let rows = rows.iter().map(row_to_log).collect::<Result<_, _>>()?;
        Ok(AccessLogPage { rows, total })
    }

    /// Deletes logs older than `before_ms`; returns how many.
    pub async fn prune_access_logs(&self, before_ms: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM access_logs WHERE timestamp_ms < $1")
            .bind(before_ms)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected())
    }
}

fn row_to_log(row: &sqlx::any::AnyRow) -> Result<AccessLogRow, StoreError> {
    let success: i64 = row.try_get("auth_success")?;
    Ok(AccessLogRow {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        service_id: row.try_get("service_id")?,
        timestamp_ms: row.try_get("timestamp_ms")?,
        method: row.try_get("method")?,
        host: row.try_get("host")?,
        path: row.try_get("path")?,
        duration_ms: row.try_get("duration_ms")?,
        status_code: row.try_get("status_code")?,
        source_ip: row.try_get("source_ip")?,
        auth_method: row.try_get("auth_method")?,
        user_id: row.try_get("user_id")?,
        auth_success: success != 0,
        bytes_upload: row.try_get("bytes_upload")?,
        bytes_download: row.try_get("bytes_download")?,
        protocol: row.try_get("protocol")?,
        metadata: row.try_get("metadata")?,
    })
}
