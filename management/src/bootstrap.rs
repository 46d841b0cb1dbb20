//! First-run set-up: an account with an owner and a personal access token.

use crate::store::{Role, Store, StoreError};

pub struct Bootstrapped {
    pub account_id: String,
    pub user_id: String,
    /// Shown once; only its hash is stored.
    pub pat: String,
}

pub async fn create_account(
    store: &Store,
    account_name: &str,
    email: &str,
) -> Result<Bootstrapped, StoreError> {
    let account = store.create_account(account_name).await?;
    let user = store.create_user(&account.id, email, Role::Owner).await?;
    let (_, pat) = store.create_pat(&user.id, "bootstrap", None).await?;
    Ok(Bootstrapped {
        account_id: account.id,
        user_id: user.id,
        pat,
    })
}
