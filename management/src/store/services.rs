//! Services: what a cluster publishes. The user-facing shape (targets, auth, settings) is kept as
//! JSON in `spec`; the columns are what queries filter on.

use sqlx::Row;

use super::{Store, StoreError, is_unique_violation, now};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceStatus {
    Pending,
    CertificatePending,
    Active,
    TunnelNotCreated,
    CertificateFailed,
    Error,
}

impl ServiceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::CertificatePending => "certificate_pending",
            Self::Active => "active",
            Self::TunnelNotCreated => "tunnel_not_created",
            Self::CertificateFailed => "certificate_failed",
            Self::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "certificate_pending" => Self::CertificatePending,
            "active" => Self::Active,
            "tunnel_not_created" => Self::TunnelNotCreated,
            "certificate_failed" => Self::CertificateFailed,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ServiceRecord {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub domain: String,
    pub cluster_address: String,
    pub spec: String,
    pub enabled: bool,
    pub status: ServiceStatus,
    pub status_message: Option<String>,
    pub certificate_issued: bool,
    pub created_at: i64,
    pub updated_at: i64,
    /// Where mesh peers reach a private service, as its proxy last reported it (JSON
    /// `{"tunnel_ip", "https_port"}`).
    pub inbound_listener: Option<String>,
}

/// sqlx takes only static SQL, so the column list is spliced in with `concat!`.
macro_rules! columns {
    () => {
        "id, account_id, name, domain, cluster_address, spec, enabled, status, \
         status_message, certificate_issued, created_at, updated_at"
    };
}

/// What a read takes besides [`columns`].
macro_rules! read_columns {
    () => {
        concat!(columns!(), ", inbound_listener")
    };
}

impl Store {
    /// Inserts a service; a domain already taken anywhere on the instance is a conflict.
    pub async fn insert_service(&self, s: &ServiceRecord) -> Result<(), StoreError> {
        let res = sqlx::query(concat!(
            "INSERT INTO services (",
            columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&s.id)
        .bind(&s.account_id)
        .bind(&s.name)
        .bind(&s.domain)
        .bind(&s.cluster_address)
        .bind(&s.spec)
        .bind(i64::from(s.enabled))
        .bind(s.status.as_str())
        .bind(s.status_message.as_deref())
        .bind(i64::from(s.certificate_issued))
        .bind(s.created_at)
        .bind(s.updated_at)
        .execute(self.pool())
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "domain {} is already taken",
                s.domain
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces a service's editable fields; false when the account has no such service.
    pub async fn update_service(&self, s: &ServiceRecord) -> Result<bool, StoreError> {
        let res = sqlx::query(
            "UPDATE services SET name = $1, domain = $2, cluster_address = $3, spec = $4, enabled = $5, \
             updated_at = $6 WHERE id = $7 AND account_id = $8",
        )
        .bind(&s.name)
        .bind(&s.domain)
        .bind(&s.cluster_address)
        .bind(&s.spec)
        .bind(i64::from(s.enabled))
        .bind(now())
        .bind(&s.id)
        .bind(&s.account_id)
        .execute(self.pool())
        .await;
        match res {
            Ok(r) => Ok(r.rows_affected() > 0),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "domain {} is already taken",
                s.domain
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_service(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<ServiceRecord>, StoreError> {
        let existing = self.service(account_id, id).await?;
        if existing.is_some() {
            sqlx::query("DELETE FROM services WHERE id = $1 AND account_id = $2")
                .bind(id)
                .bind(account_id)
                .execute(self.pool())
                .await?;
        }
        Ok(existing)
    }

    pub async fn service(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<ServiceRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM services WHERE id = $1 AND account_id = $2"
        ))
        .bind(id)
        .bind(account_id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(service_from_row).transpose()
    }

    /// The service published at `domain` (domains are unique on the instance).
    pub async fn service_by_domain(
        &self,
        domain: &str,
    ) -> Result<Option<ServiceRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM services WHERE domain = $1"
        ))
        .bind(domain)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(service_from_row).transpose()
    }

    pub async fn services(&self, account_id: &str) -> Result<Vec<ServiceRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM services WHERE account_id = $1 ORDER BY created_at, id"
        ))
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(service_from_row).collect()
    }

    /// The services a proxy of `cluster` receives: every account's on a shared cluster token,
    /// only `account_id`'s for an account token.
    pub async fn services_for_cluster(
        &self,
        cluster: &str,
        account_id: Option<&str>,
    ) -> Result<Vec<ServiceRecord>, StoreError> {
        let rows = match account_id {
            Some(a) => {
                sqlx::query(concat!("SELECT ", read_columns!(), " FROM services WHERE cluster_address = $1 AND account_id = $2 AND enabled = 1 ORDER BY id"))
                .bind(cluster)
                .bind(a)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(concat!("SELECT ", read_columns!(), " FROM services WHERE cluster_address = $1 AND enabled = 1 ORDER BY id"))
                .bind(cluster)
                .fetch_all(self.pool())
                .await?
            }
        };
        rows.iter().map(service_from_row).collect()
    }

    /// Records what a proxy reported for a service of `account_id`.
    pub async fn set_service_status(
        &self,
        account_id: &str,
        id: &str,
        status: ServiceStatus,
        message: Option<&str>,
        certificate_issued: bool,
        inbound_listener: Option<&str>,
    ) -> Result<bool, StoreError> {
        let res = sqlx::query(
            "UPDATE services SET status = $1, status_message = $2, certificate_issued = $3, \
             inbound_listener = $4 WHERE id = $5 AND account_id = $6",
        )
        .bind(status.as_str())
        .bind(message)
        .bind(i64::from(certificate_issued))
        .bind(inbound_listener)
        .bind(id)
        .bind(account_id)
        .execute(self.pool())
        .await?;
        Ok(res.rows_affected() > 0)
    }
}

fn service_from_row(row: &sqlx::any::AnyRow) -> Result<ServiceRecord, StoreError> {
    let status: String = row.try_get("status")?;
    let enabled: i64 = row.try_get("enabled")?;
    let cert: i64 = row.try_get("certificate_issued")?;
    Ok(ServiceRecord {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        domain: row.try_get("domain")?,
        cluster_address: row.try_get("cluster_address")?,
        spec: row.try_get("spec")?,
        enabled: enabled != 0,
        status: ServiceStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("service status {status:?}")))?,
        status_message: row.try_get("status_message")?,
        certificate_issued: cert != 0,
        inbound_listener: row.try_get("inbound_listener")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

#[cfg(test)]
impl ServiceRecord {
    /// The active service `svc1` (`app.proxy.example` in cluster `proxy.example`) of
    /// `account_id`, with `spec`, for tests.
    pub(crate) fn for_tests(account_id: &str, spec: &str) -> ServiceRecord {
        ServiceRecord {
            id: "svc1".into(),
            account_id: account_id.into(),
            name: "app".into(),
            domain: "app.proxy.example".into(),
            cluster_address: "proxy.example".into(),
            spec: spec.into(),
            enabled: true,
            status: ServiceStatus::Active,
            status_message: None,
            certificate_issued: false,
            created_at: 0,
            updated_at: 0,
            inbound_listener: None,
        }
    }
}
