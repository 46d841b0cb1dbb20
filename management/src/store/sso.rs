//! Single sign-on records: the account's OpenID Connect provider, groups, users made by a
//! sign-in, and sign-ins waiting for the provider's callback.

use sqlx::Row;

use super::{Role, Store, StoreError, User, is_unique_violation, now};
use crate::secrets;

/// At most this many sign-ins of one account wait for their callback; the oldest make room for
/// new ones, so abandoned sign-ins (anyone can start one at a proxy) neither fill the store nor
/// lock out the next person.
pub const MAX_PENDING_SIGN_INS: i64 = 10_000;

#[derive(Clone, PartialEq, Eq)]
pub struct IdentityProvider {
    pub account_id: String,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub groups_claim: String,
}

impl std::fmt::Debug for IdentityProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityProvider")
            .field("account_id", &self.account_id)
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("groups_claim", &self.groups_claim)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Group {
    pub id: String,
    pub name: String,
    /// `api` (made by a person) or `jwt` (made from a sign-in's groups claim).
    pub issued: String,
}

/// A sign-in between `GetOIDCURL` and the callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSignIn {
    pub account_id: String,
    pub service_id: String,
    pub redirect_url: String,
    pub nonce: String,
    pub code_verifier: String,
    pub expires_at: i64,
}

/// Who signed in, as the provider vouched.
#[derive(Debug, Clone)]
pub struct SignedInUser {
    pub subject: String,
    pub email: String,
    pub group_names: Vec<String>,
}

impl Store {
    pub async fn identity_provider(
        &self,
        account_id: &str,
    ) -> Result<Option<IdentityProvider>, StoreError> {
        let row = sqlx::query(
            "SELECT account_id, issuer, client_id, client_secret, groups_claim \
             FROM identity_providers WHERE account_id = $1",
        )
        .bind(account_id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(IdentityProvider {
                account_id: r.try_get("account_id")?,
                issuer: r.try_get("issuer")?,
                client_id: r.try_get("client_id")?,
                client_secret: r.try_get("client_secret")?,
                groups_claim: r.try_get("groups_claim")?,
            })
        })
        .transpose()
    }

    pub async fn put_identity_provider(&self, p: &IdentityProvider) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("DELETE FROM identity_providers WHERE account_id = $1")
            .bind(&p.account_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO identity_providers \
             (account_id, issuer, client_id, client_secret, groups_claim, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&p.account_id)
        .bind(&p.issuer)
        .bind(&p.client_id)
        .bind(&p.client_secret)
        .bind(&p.groups_claim)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn delete_identity_provider(&self, account_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM identity_providers WHERE account_id = $1")
            .bind(account_id)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn groups(&self, account_id: &str) -> Result<Vec<Group>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, issued FROM account_groups WHERE account_id = $1 ORDER BY name, id",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(group_from_row).collect()
    }

    /// Creates a group; a name the account already has is a conflict.
    pub async fn create_group(
        &self,
        account_id: &str,
        name: &str,
        issued: &str,
    ) -> Result<Group, StoreError> {
        let id = secrets::new_id();
        let done = sqlx::query(
            "INSERT INTO account_groups (id, account_id, name, issued, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(name)
        .bind(issued)
        .bind(now())
        .execute(self.pool())
        .await;
        match done {
            Ok(_) => Ok(Group {
                id,
                name: name.to_string(),
                issued: issued.to_string(),
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "a group named {name:?} already exists"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_group(&self, account_id: &str, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM account_groups WHERE account_id = $1 AND id = $2")
            .bind(account_id)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The account's groups of these names, creating (as `jwt`) those it lacks.
    pub async fn ensure_groups(
        &self,
        account_id: &str,
        names: &[String],
    ) -> Result<Vec<Group>, StoreError> {
        let mut existing = self.groups(account_id).await?;
        for name in names {
            if existing.iter().any(|g| &g.name == name) {
                continue;
            }
            match self.create_group(account_id, name, "jwt").await {
                Ok(g) => existing.push(g),
                // Another sign-in made it at the same moment.
                Err(StoreError::Conflict(_)) => {
                    existing = self.groups(account_id).await?;
                }
                Err(e) => return Err(e),
            }
        }
        existing.retain(|g| names.contains(&g.name));
        Ok(existing)
    }

    /// The user of this provider subject, created on the first sign-in (role `user`); its
    /// email and group names follow the provider on every sign-in.
    pub async fn sign_in_user(
        &self,
        account_id: &str,
        who: &SignedInUser,
    ) -> Result<User, StoreError> {
        let groups = serde_json::to_string(&who.group_names)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let t = now();
        for _ in 0..2 {
            let found = sqlx::query(
                "SELECT id, role FROM users WHERE account_id = $1 AND idp_subject = $2",
            )
            .bind(account_id)
            .bind(&who.subject)
            .fetch_optional(self.pool())
            .await?;
            if let Some(row) = found {
                let id: String = row.try_get("id")?;
                let role: String = row.try_get("role")?;
                sqlx::query(
                    "UPDATE users SET email = $1, idp_groups = $2, last_login = $3 WHERE id = $4",
                )
                .bind(&who.email)
                .bind(&groups)
                .bind(t)
                .bind(&id)
                .execute(self.pool())
                .await?;
                return Ok(User {
                    id,
                    account_id: account_id.to_string(),
                    email: who.email.clone(),
                    role: Role::parse(&role)
                        .ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
                });
            }
            let id = secrets::new_id();
            let inserted = sqlx::query(
                "INSERT INTO users (id, account_id, email, role, created_at, idp_subject, \
                 idp_groups, last_login) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&id)
            .bind(account_id)
            .bind(&who.email)
            .bind(Role::User.as_str())
            .bind(t)
            .bind(&who.subject)
            .bind(&groups)
            .bind(t)
            .execute(self.pool())
            .await;
            match inserted {
                Ok(_) => {
                    return Ok(User {
                        id,
                        account_id: account_id.to_string(),
                        email: who.email.clone(),
                        role: Role::User,
                    });
                }
                // The same person signed in twice at once: take the other's row.
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(
            "the user changed while signing in; try again".into(),
        ))
    }

    /// Stores a sign-in under the hash of its state. Expired ones are cleared first; an account
    /// with [`MAX_PENDING_SIGN_INS`] waiting loses its oldest.
    pub async fn insert_pending_sign_in(
        &self,
        state_hash: &str,
        p: &PendingSignIn,
    ) -> Result<(), StoreError> {
        self.insert_pending_sign_in_within(state_hash, p, MAX_PENDING_SIGN_INS)
            .await
    }

    async fn insert_pending_sign_in_within(
        &self,
        state_hash: &str,
        p: &PendingSignIn,
        cap: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sso_logins WHERE expires_at < $1")
            .bind(now())
            .execute(self.pool())
            .await?;
        let waiting: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sso_logins WHERE account_id = $1")
                .bind(&p.account_id)
                .fetch_one(self.pool())
                .await?;
        if waiting >= cap {
            let excess = waiting - cap + 1;
            sqlx::query(
                "DELETE FROM sso_logins WHERE state_hash IN (SELECT state_hash FROM sso_logins \
                 WHERE account_id = $1 ORDER BY expires_at, state_hash LIMIT $2)",
            )
            .bind(&p.account_id)
            .bind(excess)
            .execute(self.pool())
            .await?;
        }
        sqlx::query(
            "INSERT INTO sso_logins (state_hash, account_id, service_id, redirect_url, nonce, \
             code_verifier, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(state_hash)
        .bind(&p.account_id)
        .bind(&p.service_id)
        .bind(&p.redirect_url)
        .bind(&p.nonce)
        .bind(&p.code_verifier)
        .bind(p.expires_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Takes (removes) the sign-in of this state hash: a state works once, on any replica.
    pub async fn take_pending_sign_in(
        &self,
        state_hash: &str,
    ) -> Result<Option<PendingSignIn>, StoreError> {
        let row = sqlx::query(
            "SELECT account_id, service_id, redirect_url, nonce, code_verifier, expires_at \
             FROM sso_logins WHERE state_hash = $1",
        )
        .bind(state_hash)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let taken = sqlx::query("DELETE FROM sso_logins WHERE state_hash = $1")
            .bind(state_hash)
            .execute(self.pool())
            .await?;
        if taken.rows_affected() != 1 {
            // Another callback with the same state won the race.
            return Ok(None);
        }
        Ok(Some(PendingSignIn {
            account_id: row.try_get("account_id")?,
            service_id: row.try_get("service_id")?,
            redirect_url: row.try_get("redirect_url")?,
            nonce: row.try_get("nonce")?,
            code_verifier: row.try_get("code_verifier")?,
            expires_at: row.try_get("expires_at")?,
        }))
    }
}

fn group_from_row(row: &sqlx::any::AnyRow) -> Result<Group, StoreError> {
    Ok(Group {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        issued: row.try_get("issued")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[tokio::test]
    async fn sign_ins_are_taken_once_and_users_made_once() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap().id;
        let who = SignedInUser {
            subject: "alice".into(),
            email: "alice@example.com".into(),
            group_names: vec!["staff".into()],
        };
        let first = store.sign_in_user(&a, &who).await.unwrap();
        let again = store
            .sign_in_user(
                &a,
                &SignedInUser {
                    email: "alice@new.example".into(),
                    ..who.clone()
                },
            )
            .await
            .unwrap();
        assert_eq!(first.id, again.id);
        assert_eq!(again.email, "alice@new.example");
        assert_eq!(first.role, Role::User);

        let groups = store
            .ensure_groups(&a, &["staff".into(), "ops".into()])
            .await
            .unwrap();
        assert_eq!(groups.len(), 2);
        assert!(groups.iter().all(|g| g.issued == "jwt"));
        let same = store.ensure_groups(&a, &["staff".into()]).await.unwrap();
        assert_eq!(same.len(), 1);
        assert!(groups.contains(&same[0]));
        assert!(matches!(
            store.create_group(&a, "staff", "api").await,
            Err(StoreError::Conflict(_))
        ));
    }

    #[tokio::test]
    async fn a_pending_sign_in_is_taken_once() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap().id;
        store
            .insert_service(&crate::store::ServiceRecord {
                id: "svc".into(),
                account_id: a.clone(),
                name: "app".into(),
                domain: "app.example".into(),
                cluster_address: "example".into(),
                spec: "{}".into(),
                enabled: true,
                status: crate::store::ServiceStatus::Active,
                status_message: None,
                certificate_issued: false,
                created_at: 0,
                updated_at: 0,
                inbound_listener: None,
            })
            .await
            .unwrap();
        let pending = PendingSignIn {
            account_id: a.clone(),
            service_id: "svc".into(),
            redirect_url: "https://app.example/".into(),
            nonce: "n".into(),
            code_verifier: "v".into(),
            expires_at: now() + 600,
        };
        store.insert_pending_sign_in("h1", &pending).await.unwrap();
        assert_eq!(
            store.take_pending_sign_in("h1").await.unwrap(),
            Some(pending.clone())
        );
        assert_eq!(store.take_pending_sign_in("h1").await.unwrap(), None);
        assert_eq!(store.take_pending_sign_in("nope").await.unwrap(), None);
        // Expired ones are cleared by the next insert.
        let old = PendingSignIn {
            expires_at: now() - 1,
            ..pending.clone()
        };
        store.insert_pending_sign_in("h2", &old).await.unwrap();
        store.insert_pending_sign_in("h3", &pending).await.unwrap();
        assert_eq!(store.take_pending_sign_in("h2").await.unwrap(), None);
        assert!(store.take_pending_sign_in("h3").await.unwrap().is_some());
        // Full: the oldest makes room.
        for (i, h) in ["a", "b", "c"].into_iter().enumerate() {
            let p = PendingSignIn {
                expires_at: now() + 600 + i as i64,
                ..pending.clone()
            };
            store.insert_pending_sign_in_within(h, &p, 2).await.unwrap();
        }
        assert_eq!(store.take_pending_sign_in("a").await.unwrap(), None);
        assert!(store.take_pending_sign_in("b").await.unwrap().is_some());
        assert!(store.take_pending_sign_in("c").await.unwrap().is_some());
    }
}
