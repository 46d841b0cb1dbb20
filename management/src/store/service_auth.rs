//! The secret half of a service's authentication: argon2id hashes and the session key pair.
//! Never part of a REST answer; proxies get only the hashes of header values and the public key.

use sqlx::Row;

use super::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeaderHash {
    pub header: String,
    pub hashed_value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAuthRow {
    pub password_hash: Option<String>,
    pub pin_hash: Option<String>,
    pub header_auths: Vec<HeaderHash>,
    pub session_private_key: String,
    pub session_public_key: String,
    pub max_session_age: i64,
    /// Single sign-on: `None` off, else the group ids allowed in (empty: anyone who signs in).
    pub sso_groups: Option<Vec<String>>,
}

impl Store {
    pub async fn service_auth(
        &self,
        service_id: &str,
    ) -> Result<Option<ServiceAuthRow>, StoreError> {
        let row = sqlx::query(
            "SELECT password_hash, pin_hash, header_auths, session_private_key, \
             session_public_key, max_session_age, sso_groups FROM service_auth \
             WHERE service_id = $1",
        )
        .bind(service_id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let headers: String = row.try_get("header_auths")?;
        let sso: Option<String> = row.try_get("sso_groups")?;
        let sso_groups = sso
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("service_auth.sso_groups: {e}")))?;
        Ok(Some(ServiceAuthRow {
            password_hash: row.try_get("password_hash")?,
            pin_hash: row.try_get("pin_hash")?,
            header_auths: serde_json::from_str(&headers)
                .map_err(|e| StoreError::Corrupt(format!("service_auth.header_auths: {e}")))?,
            session_private_key: row.try_get("session_private_key")?,
            session_public_key: row.try_get("session_public_key")?,
            max_session_age: row.try_get("max_session_age")?,
            sso_groups,
        }))
    }

    /// Stores (`Some`) or removes (`None`) a service's authentication.
    pub async fn put_service_auth(
        &self,
        service_id: &str,
        auth: Option<&ServiceAuthRow>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("DELETE FROM service_auth WHERE service_id = $1")
            .bind(service_id)
            .execute(&mut *tx)
            .await?;
        if let Some(a) = auth {
            let headers = serde_json::to_string(&a.header_auths)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let sso = a
                .sso_groups
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query(
                "INSERT INTO service_auth (service_id, password_hash, pin_hash, header_auths, \
                 session_private_key, session_public_key, max_session_age, sso_groups) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(service_id)
            .bind(a.password_hash.as_deref())
            .bind(a.pin_hash.as_deref())
            .bind(headers)
            .bind(&a.session_private_key)
            .bind(&a.session_public_key)
            .bind(a.max_session_age)
            .bind(sso)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The service of `domain` with its authentication, for session checks.
    pub async fn service_auth_by_domain(
        &self,
        domain: &str,
    ) -> Result<Option<(super::ServiceRecord, Option<ServiceAuthRow>)>, StoreError> {
        let Some(record) = self.service_by_domain(domain).await? else {
            return Ok(None);
        };
        let auth = self.service_auth(&record.id).await?;
        Ok(Some((record, auth)))
    }
}
