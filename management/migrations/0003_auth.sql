-- Service authentication and access logs (issue #9). Portable between SQLite and PostgreSQL.
-- Only argon2id hashes of passwords, PINs and header values are stored; header_auths is JSON
-- [{"header", "hashed_value"}]. The session private key never leaves management.
CREATE TABLE service_auth (
    service_id TEXT PRIMARY KEY REFERENCES services (id) ON DELETE CASCADE,
    password_hash TEXT,
    pin_hash TEXT,
    header_auths TEXT NOT NULL,
    session_private_key TEXT NOT NULL,
    session_public_key TEXT NOT NULL,
    max_session_age BIGINT NOT NULL
);

-- One row per request or L4 connection a proxy reported. timestamp_ms: unix milliseconds.
CREATE TABLE access_logs (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    service_id TEXT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    method TEXT NOT NULL,
    host TEXT NOT NULL,
    path TEXT NOT NULL,
    duration_ms BIGINT NOT NULL,
    status_code BIGINT NOT NULL,
    source_ip TEXT NOT NULL,
    auth_method TEXT NOT NULL,
    user_id TEXT NOT NULL,
    auth_success BIGINT NOT NULL,
    bytes_upload BIGINT NOT NULL,
    bytes_download BIGINT NOT NULL,
    protocol TEXT NOT NULL,
    metadata TEXT NOT NULL
);

CREATE INDEX access_logs_account_time ON access_logs (account_id, timestamp_ms);
CREATE INDEX access_logs_service ON access_logs (service_id);
