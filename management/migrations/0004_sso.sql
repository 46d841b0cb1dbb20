-- Single sign-on (issue #9). Portable between SQLite and PostgreSQL.
-- One OpenID Connect provider per account. The client secret is needed in plain text at every
-- code exchange, so it is stored as given and never shown again over REST.
CREATE TABLE identity_providers (
    account_id TEXT PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    issuer TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_secret TEXT NOT NULL,
    groups_claim TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- issued: 'api' (made by a person) or 'jwt' (made from a sign-in's groups claim).
CREATE TABLE account_groups (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    issued TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (account_id, name)
);

-- Users made by single sign-on: the provider's subject, and the group names of the last sign-in
-- (JSON array).
ALTER TABLE users ADD COLUMN idp_subject TEXT;
ALTER TABLE users ADD COLUMN idp_groups TEXT;
ALTER TABLE users ADD COLUMN last_login BIGINT;
CREATE UNIQUE INDEX users_idp_subject ON users (account_id, idp_subject);

-- NULL: single sign-on off; else a JSON array of the group ids allowed in ('[]': anyone who signs in).
ALTER TABLE service_auth ADD COLUMN sso_groups TEXT;

-- Sign-ins between GetOIDCURL and the provider's callback; the state is stored as a SHA-256 hash
-- and each row is used once.
CREATE TABLE sso_logins (
    state_hash TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    service_id TEXT NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    redirect_url TEXT NOT NULL,
    nonce TEXT NOT NULL,
    code_verifier TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sso_logins_expiry ON sso_logins (expires_at);
