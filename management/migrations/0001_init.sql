-- Portable between SQLite and PostgreSQL: TEXT, BIGINT (unix seconds, 0/1 flags).
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    email TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE personal_access_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hashed_token TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);

-- account_id NULL: a management-wide token (shared clusters).
CREATE TABLE proxy_tokens (
    id TEXT PRIMARY KEY,
    account_id TEXT REFERENCES accounts (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hashed_token TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);

-- account_id NULL: a shared cluster, visible to every account.
CREATE TABLE clusters (
    address TEXT PRIMARY KEY,
    account_id TEXT REFERENCES accounts (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL
);

CREATE TABLE proxies (
    cluster_address TEXT NOT NULL,
    proxy_id TEXT NOT NULL,
    token_id TEXT NOT NULL,
    version TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    connected_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    connected BIGINT NOT NULL,
    PRIMARY KEY (cluster_address, proxy_id)
);

CREATE TABLE services (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    domain TEXT NOT NULL UNIQUE,
    cluster_address TEXT NOT NULL,
    spec TEXT NOT NULL,
    enabled BIGINT NOT NULL,
    status TEXT NOT NULL,
    status_message TEXT,
    certificate_issued BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX services_cluster ON services (cluster_address);
CREATE INDEX proxy_tokens_account ON proxy_tokens (account_id);
