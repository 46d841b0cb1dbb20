//! Access logs the proxies send: one row per request or L4 connection, listed newest first with
//! filters, and deleted after the retention period.

use sqlx::{AssertSqlSafe, Row};

use super::{Engine, Store, StoreError};

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessLogFilter {
    pub service_id: Option<String>,
    pub status_code: Option<i64>,
    /// `Some(true)`: 2xx and 3xx; `Some(false)`: anything else.
    pub success: Option<bool>,
    pub user_id: Option<String>,
    /// Substring of the user id (NetBird's `user_email` / `user_name`: ours have neither).
    pub user: Option<String>,
    pub source_ip: Option<String>,
    pub host: Option<String>,
    pub method: Option<String>,
    /// Substring of the path.
    pub path: Option<String>,
    /// Case-insensitive substring of the id, host, path, source address or user id.
    pub search: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

/// The order of a listing: `column` is one of [`AccessLogSort::COLUMNS`]; ties go newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLogSort {
    pub column: &'static str,
    pub ascending: bool,
}

impl Default for AccessLogSort {
    fn default() -> Self {
        Self {
            column: "timestamp",
            ascending: false,
        }
    }
}

impl AccessLogSort {
    /// NetBird's `sort_by` values (`url`: host, then path) and our column names.
    pub const COLUMNS: &'static [&'static str] = &[
        "timestamp",
        "url",
        "host",
        "path",
        "method",
        "status_code",
        "duration",
        "duration_ms",
        "source_ip",
        "user_id",
        "auth_method",
        "auth_method_used",
        "bytes_upload",
        "bytes_download",
        "protocol",
        "service_id",
    ];

    fn order_by(self) -> String {
        let dir = if self.ascending { "ASC" } else { "DESC" };
        let cols: &[&str] = match self.column {
            "url" => &["host", "path"],
            "host" => &["host"],
            "path" => &["path"],
            "method" => &["method"],
            "status_code" => &["status_code"],
            "duration" | "duration_ms" => &["duration_ms"],
            "source_ip" => &["source_ip"],
            "user_id" => &["user_id"],
            "auth_method" | "auth_method_used" => &["auth_method"],
            "bytes_upload" => &["bytes_upload"],
            "bytes_download" => &["bytes_download"],
            "protocol" => &["protocol"],
            "service_id" => &["service_id"],
            _ => &["timestamp_ms"],
        };
        let mut parts: Vec<String> = cols.iter().map(|c| format!("{c} {dir}")).collect();
        if cols != ["timestamp_ms"] {
            parts.push("timestamp_ms DESC".into());
        }
        parts.push(format!("id {dir}"));
        parts.join(", ")
    }
}

/// `%v%` for LIKE with the pattern's own wildcards escaped (ESCAPE '\\').
fn contains_pattern(v: &str) -> String {
    let escaped = v
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
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

/// Values per row of `access_logs`.
const COLUMN_COUNT: usize = 17;
/// Rows per INSERT statement. A batch is split into statements of these sizes, so only five
/// statement texts exist and each connection's statement cache keeps them prepared; a
/// statement per batch length was parsed anew for nearly every batch.
const STATEMENT_SIZES: [usize; 5] = [MAX_ROWS_PER_INSERT, 64, 16, 4, 1];
/// Rows in one INSERT: 256 × 17 parameters stays far below SQLite's and PostgreSQL's limits.
const MAX_ROWS_PER_INSERT: usize = 256;

/// The largest statement size that fits `remaining` rows.
fn statement_size(remaining: usize) -> usize {
    STATEMENT_SIZES
        .into_iter()
        .find(|size| *size <= remaining)
        .unwrap_or(1)
}

/// `INSERT … VALUES (…), (…)` for `rows` rows. SQLite gets anonymous `?` parameters: sqlx looks
/// each numbered one up by name, and SQLite's lookup scans every name, so `$n` cost O(n²) and
/// 4,352 parameters took most of management's CPU. PostgreSQL takes only `$n`.
fn insert_sql(engine: Engine, rows: usize) -> String {
    use std::fmt::Write;
    let mut sql = String::with_capacity(64 + COLUMNS.len() + rows * COLUMN_COUNT * 6);
    let _ = write!(sql, "INSERT INTO access_logs ({COLUMNS}) VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..COLUMN_COUNT {
            if column > 0 {
                sql.push_str(", ");
            }
            match engine {
                Engine::Sqlite => sql.push('?'),
                Engine::Postgres => {
                    let _ = write!(sql, "${}", row * COLUMN_COUNT + column + 1);
                }
            }
        }
        sql.push(')');
    }
    sql
}

impl Store {
    pub async fn insert_access_log(&self, r: &AccessLogRow) -> Result<(), StoreError> {
        self.insert_access_logs(&[r]).await
    }

    /// Inserts `rows` in one transaction (statements of at most [`MAX_ROWS_PER_INSERT`] rows): all
    /// or none.
    pub async fn insert_access_logs(&self, rows: &[&AccessLogRow]) -> Result<(), StoreError> {
        match rows.len() {
            0 => return Ok(()),
            // One statement is its own transaction.
            1 => return self.insert_rows(self.pool(), rows).await,
            _ => {}
        }
        let mut tx = self.pool().begin().await?;
        let mut rest = rows;
        while !rest.is_empty() {
            let size = statement_size(rest.len());
            let (now, later) = rest.split_at(size);
            self.insert_rows(&mut *tx, now).await?;
            rest = later;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert_rows<'e, E>(
        &self,
        executor: E,
        rows: &[&AccessLogRow],
    ) -> Result<(), StoreError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let mut query = sqlx::query(AssertSqlSafe(insert_sql(self.engine, rows.len())));
        for r in rows {
            query = query
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
                .bind(&r.metadata);
        }
        query.execute(executor).await?;
        Ok(())
    }

    /// One page (1-based) of an account's logs, newest first, and how many match in all.
    pub async fn access_logs(
        &self,
        account_id: &str,
        f: &AccessLogFilter,
        sort: AccessLogSort,
        page: i64,
        page_size: i64,
    ) -> Result<AccessLogPage, StoreError> {
        let mut clauses = vec!["account_id = $1".to_string()];
        let mut params = vec![Param::Text(account_id.to_string())];
        let mut add = |clause: &str, p: Param| {
            params.push(p);
            let n = format!("${}", params.len());
            clauses.push(clause.replace('?', &n));
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
            add("path LIKE ? ESCAPE '\\'", Param::Text(contains_pattern(v)));
        }
        if let Some(v) = &f.user {
            add(
                "LOWER(user_id) LIKE ? ESCAPE '\\'",
                Param::Text(contains_pattern(&v.to_lowercase())),
            );
        }
        if let Some(v) = &f.search {
            // One parameter for every column (`$n` may repeat in SQLite and PostgreSQL).
            add(
                "(LOWER(id) LIKE ? ESCAPE '\\' OR LOWER(host) LIKE ? ESCAPE '\\' \
                 OR LOWER(path) LIKE ? ESCAPE '\\' OR LOWER(source_ip) LIKE ? ESCAPE '\\' \
                 OR LOWER(user_id) LIKE ? ESCAPE '\\')",
                Param::Text(contains_pattern(&v.to_lowercase())),
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
             ORDER BY {} LIMIT {page_size} OFFSET {offset}",
            sort.order_by()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[test]
    fn batches_split_into_the_few_cached_statement_sizes() {
        for len in 1..=4 * MAX_ROWS_PER_INSERT {
            let mut rest = len;
            let mut statements = 0;
            while rest > 0 {
                let size = statement_size(rest);
                assert!(STATEMENT_SIZES.contains(&size) && size <= rest);
                rest -= size;
                statements += 1;
            }
            let most = len / MAX_ROWS_PER_INSERT + 12;
            assert!(
                statements <= most,
                "{len} rows took {statements} statements"
            );
        }
        let sqlite = insert_sql(Engine::Sqlite, 2);
        assert!(sqlite.ends_with(&format!(
            "VALUES ({q}), ({q})",
            q = vec!["?"; COLUMN_COUNT].join(", ")
        )));
        let postgres = insert_sql(Engine::Postgres, 2);
        assert!(postgres.contains("VALUES ($1, $2, "), "{postgres}");
        assert!(postgres.ends_with(", $33, $34)"), "{postgres}");
    }

    fn row(id: &str, account: &str, ts: i64, status: i64, path: &str, user: &str) -> AccessLogRow {
        AccessLogRow {
            id: id.into(),
            account_id: account.into(),
            service_id: format!("svc-{account}"),
            timestamp_ms: ts,
            method: "GET".into(),
            host: "app.example".into(),
            path: path.into(),
            status_code: status,
            source_ip: "192.0.2.1".into(),
            user_id: user.into(),
            metadata: "{}".into(),
            ..Default::default()
        }
    }

    async fn ids(store: &Store, account: &str, f: AccessLogFilter) -> Vec<String> {
        store
            .access_logs(account, &f, AccessLogSort::default(), 1, 100)
            .await
            .unwrap()
            .rows
            .into_iter()
            .map(|r| r.id)
            .collect()
    }

    #[tokio::test]
    async fn filters_pages_sorting_and_pruning() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap().id;
        let b = store.create_account("b").await.unwrap().id;
        for r in [
            row("l1", &a, 1_000, 200, "/api/items", "password-user"),
            row("l2", &a, 2_000, 401, "/login", ""),
            row("l3", &a, 3_000, 302, "/100%_done", "pin-user"),
            row("l4", &a, 4_000, 502, "/api/items/7", "header-user"),
            row("l5", &b, 5_000, 200, "/api/items", "password-user"),
        ] {
            store.insert_access_log(&r).await.unwrap();
        }
        // Newest first, only the caller's account.
        assert_eq!(
            ids(&store, &a, AccessLogFilter::default()).await,
            ["l4", "l3", "l2", "l1"]
        );
        let f = |g: fn(&mut AccessLogFilter)| {
            let mut f = AccessLogFilter::default();
            g(&mut f);
            f
        };
        assert_eq!(
            ids(&store, &a, f(|f| f.success = Some(true))).await,
            ["l3", "l1"]
        );
        assert_eq!(
            ids(&store, &a, f(|f| f.success = Some(false))).await,
            ["l4", "l2"]
        );
        assert_eq!(
            ids(&store, &a, f(|f| f.status_code = Some(401))).await,
            ["l2"]
        );
        assert_eq!(
            ids(&store, &a, f(|f| f.path = Some("/api".into()))).await,
            ["l4", "l1"]
        );
        // LIKE wildcards in the filter are literal.
        assert_eq!(
            ids(&store, &a, f(|f| f.path = Some("%_".into()))).await,
            ["l3"]
        );
        assert_eq!(
            ids(&store, &a, f(|f| f.search = Some("PIN-".into()))).await,
            ["l3"]
        );
        assert_eq!(
            ids(&store, &a, f(|f| f.search = Some("items/".into()))).await,
            ["l4"]
        );
        assert_eq!(
            ids(&store, &a, f(|f| f.user = Some("header".into()))).await,
            ["l4"]
        );
        assert_eq!(
            ids(&store, &a, f(|f| f.user_id = Some("password-user".into()))).await,
            ["l1"]
        );
        assert_eq!(
            ids(
                &store,
                &a,
                f(|f| {
                    f.from_ms = Some(2_000);
                    f.to_ms = Some(3_000);
                    f.host = Some("APP.example".into());
                    f.method = Some("get".into());
                })
            )
            .await,
            ["l3", "l2"]
        );
        assert!(
            ids(&store, &a, f(|f| f.service_id = Some("other".into())))
                .await
                .is_empty()
        );
        // Pages and totals.
        let p = store
            .access_logs(
                &a,
                &AccessLogFilter::default(),
                AccessLogSort::default(),
                2,
                3,
            )
            .await
            .unwrap();
        assert_eq!(p.total, 4);
        assert_eq!(p.rows.len(), 1);
        assert_eq!(p.rows[0].id, "l1");
        // Sorting.
        let sorted = store
            .access_logs(
                &a,
                &AccessLogFilter::default(),
                AccessLogSort {
                    column: "status_code",
                    ascending: true,
                },
                1,
                10,
            )
            .await
            .unwrap();
        let codes: Vec<i64> = sorted.rows.iter().map(|r| r.status_code).collect();
        assert_eq!(codes, [200, 302, 401, 502]);
        // Every documented sort column is valid SQL.
        for column in AccessLogSort::COLUMNS {
            store
                .access_logs(
                    &a,
                    &AccessLogFilter::default(),
                    AccessLogSort {
                        column,
                        ascending: false,
                    },
                    1,
                    10,
                )
                .await
                .unwrap();
        }
        // Retention: everything before the cutoff goes, in every account.
        assert_eq!(store.prune_access_logs(3_000).await.unwrap(), 2);
        assert_eq!(
            ids(&store, &a, AccessLogFilter::default()).await,
            ["l4", "l3"]
        );
        assert_eq!(ids(&store, &b, AccessLogFilter::default()).await, ["l5"]);
    }
}
