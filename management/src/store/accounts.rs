//! Accounts, users with roles, and personal access tokens.

use sqlx::Row;

use super::{Store, StoreError, now};
use crate::secrets;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }

    /// Network admins and owners manage proxies, tokens and services.
    pub fn can_manage(self) -> bool {
        self >= Role::Admin
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Account {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct User {
    pub id: String,
    pub account_id: String,
    pub email: String,
    pub role: Role,
}

impl Store {
    pub async fn create_account(&self, name: &str) -> Result<Account, StoreError> {
        let id = secrets::new_id();
        sqlx::query("INSERT INTO accounts (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&id)
            .bind(name)
            .bind(now())
            .execute(self.pool())
            .await?;
        Ok(Account {
            id,
            name: name.to_string(),
        })
    }

    pub async fn create_user(
        &self,
        account_id: &str,
        email: &str,
        role: Role,
    ) -> Result<User, StoreError> {
        let id = secrets::new_id();
        sqlx::query("INSERT INTO users (id, account_id, email, role, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&id)
            .bind(account_id)
            .bind(email)
            .bind(role.as_str())
            .bind(now())
            .execute(self.pool())
            .await?;
        Ok(User {
            id,
            account_id: account_id.to_string(),
            email: email.to_string(),
            role,
        })
    }

    pub async fn list_users(&self, account_id: &str) -> Result<Vec<User>, StoreError> {
        let rows = sqlx::query("SELECT id, account_id, email, role FROM users WHERE account_id = $1 ORDER BY created_at, id")
            .bind(account_id)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(user_from_row).collect()
    }

    pub async fn user(&self, account_id: &str, user_id: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(
            "SELECT id, account_id, email, role FROM users WHERE account_id = $1 AND id = $2",
        )
        .bind(account_id)
        .bind(user_id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// The earliest owner on the instance, if any (first-run detection for `portcullis up`).
    pub async fn first_owner(&self) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(
            "SELECT id, account_id, email, role FROM users WHERE role = 'owner' ORDER BY created_at, id LIMIT 1",
        )
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Creates a personal access token; returns its id and the plain token (shown once).
    pub async fn create_pat(
        &self,
        user_id: &str,
        name: &str,
        expires_at: Option<i64>,
    ) -> Result<(String, String), StoreError> {
        let id = secrets::new_id();
        let plain = secrets::new_token(secrets::PAT_PREFIX);
        sqlx::query(
            "INSERT INTO personal_access_tokens (id, user_id, name, hashed_token, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(name)
        .bind(secrets::hash_token(&plain))
        .bind(now())
        .bind(expires_at)
        .execute(self.pool())
        .await?;
        Ok((id, plain))
    }

    /// The user a personal access token belongs to, when the token is known and not expired.
    pub async fn user_by_pat(&self, plain: &str) -> Result<Option<User>, StoreError> {
        if !secrets::well_formed(plain, secrets::PAT_PREFIX) {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT u.id, u.account_id, u.email, u.role FROM personal_access_tokens t \
             JOIN users u ON u.id = t.user_id \
             WHERE t.hashed_token = $1 AND (t.expires_at IS NULL OR t.expires_at > $2)",
        )
        .bind(secrets::hash_token(plain))
        .bind(now())
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }
}

pub(super) fn user_from_row(row: &sqlx::any::AnyRow) -> Result<User, StoreError> {
    let role: String = row.try_get("role")?;
    Ok(User {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        email: row.try_get("email")?,
        role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
    })
}
