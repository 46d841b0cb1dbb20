//! Proxy tokens: account-scoped (Bring Your Own Proxy) or management-wide (shared clusters).

use sqlx::Row;

use super::{Store, StoreError, now};
use crate::secrets;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProxyToken {
    pub id: String,
    /// `None` for a management-wide token.
    pub account_id: Option<String>,
    pub name: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked: bool,
}

impl ProxyToken {
    pub fn is_valid_at(&self, t: i64) -> bool {
        !self.revoked && self.expires_at.is_none_or(|e| e > t)
    }
}

/// sqlx takes only static SQL, so the column list is spliced in with `concat!`.
macro_rules! columns {
    () => {
        "id, account_id, name, created_at, expires_at, revoked_at"
    };
}

impl Store {
    /// Mints a token; returns the record and the plain token, which is not stored.
    pub async fn create_proxy_token(
        &self,
        account_id: Option<&str>,
        name: &str,
        expires_at: Option<i64>,
    ) -> Result<(ProxyToken, String), StoreError> {
        let id = secrets::new_id();
        let plain = secrets::new_token(secrets::PROXY_TOKEN_PREFIX);
        let created_at = now();
        sqlx::query(
            "INSERT INTO proxy_tokens (id, account_id, name, hashed_token, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(name)
        .bind(secrets::hash_token(&plain))
        .bind(created_at)
        .bind(expires_at)
        .execute(self.pool())
        .await?;
        Ok((
            ProxyToken {
                id,
                account_id: account_id.map(str::to_string),
                name: name.to_string(),
                created_at,
                expires_at,
                revoked: false,
            },
            plain,
        ))
    }

    /// Tokens of an account (or the management-wide ones for `None`), newest first.
    pub async fn list_proxy_tokens(
        &self,
        account_id: Option<&str>,
    ) -> Result<Vec<ProxyToken>, StoreError> {
        let rows = match account_id {
            Some(a) => {
                sqlx::query(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM proxy_tokens WHERE account_id = $1 ORDER BY created_at DESC, id"
                ))
                .bind(a)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM proxy_tokens WHERE account_id IS NULL ORDER BY created_at DESC, id"
                ))
                .fetch_all(self.pool())
                .await?
            }
        };
        rows.iter().map(token_from_row).collect()
    }

    /// Revokes a token of the account; false when there is no such token.
    pub async fn revoke_proxy_token(
        &self,
        account_id: Option<&str>,
        id: &str,
    ) -> Result<bool, StoreError> {
        let res = match account_id {
            Some(a) => {
                sqlx::query("UPDATE proxy_tokens SET revoked_at = $1 WHERE id = $2 AND account_id = $3 AND revoked_at IS NULL")
                    .bind(now())
                    .bind(id)
                    .bind(a)
                    .execute(self.pool())
                    .await?
            }
            None => {
                sqlx::query("UPDATE proxy_tokens SET revoked_at = $1 WHERE id = $2 AND account_id IS NULL AND revoked_at IS NULL")
                    .bind(now())
                    .bind(id)
                    .execute(self.pool())
                    .await?
            }
        };
        Ok(res.rows_affected() > 0)
    }

    /// The valid (known, not revoked, not expired) token with this plain value.
    pub async fn proxy_token_by_plain(
        &self,
        plain: &str,
    ) -> Result<Option<ProxyToken>, StoreError> {
        if !secrets::well_formed(plain, secrets::PROXY_TOKEN_PREFIX) {
            return Ok(None);
        }
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM proxy_tokens WHERE hashed_token = $1"
        ))
        .bind(secrets::hash_token(plain))
        .fetch_optional(self.pool())
        .await?;
        let token = row.as_ref().map(token_from_row).transpose()?;
        Ok(token.filter(|t| t.is_valid_at(now())))
    }

    /// Re-reads a token by id, for the periodic re-check of open streams.
    pub async fn proxy_token(&self, id: &str) -> Result<Option<ProxyToken>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM proxy_tokens WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(token_from_row).transpose()
    }
}

fn token_from_row(row: &sqlx::any::AnyRow) -> Result<ProxyToken, StoreError> {
    let revoked_at: Option<i64> = row.try_get("revoked_at")?;
    Ok(ProxyToken {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked: revoked_at.is_some(),
    })
}
