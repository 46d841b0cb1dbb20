-- The WireGuard mesh (issue #8). Portable between SQLite and PostgreSQL: TEXT, BIGINT (unix
-- seconds, 0/1 flags). Tunnel IPs are unique per account only: two accounts may share a range.
ALTER TABLE accounts ADD COLUMN tunnel_range TEXT NOT NULL DEFAULT '100.64.0.0/10';

-- key_type: 'one-off' or 'reusable'. Only the SHA-256 of the key is stored.
CREATE TABLE setup_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hashed_key TEXT NOT NULL UNIQUE,
    key_type TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT,
    used_times BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE INDEX setup_keys_account ON setup_keys (account_id);

-- kind: 'agent', 'manual' or 'proxy'. Proxies: proxy_id, cluster_address, listen_port,
-- endpoint_host. Agents: hashed_token (peer token), setup_key_id, connected, last_seen.
-- NULLs are distinct in UNIQUE constraints on both engines, so (account_id, proxy_id) is unique
-- only among proxy peers.
CREATE TABLE mesh_peers (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    public_key TEXT NOT NULL,
    tunnel_ip TEXT NOT NULL,
    kind TEXT NOT NULL,
    proxy_id TEXT,
    cluster_address TEXT,
    listen_port BIGINT,
    endpoint_host TEXT,
    hashed_token TEXT UNIQUE,
    setup_key_id TEXT,
    connected BIGINT NOT NULL DEFAULT 0,
    last_seen BIGINT,
    created_at BIGINT NOT NULL,
    UNIQUE (account_id, public_key),
    UNIQUE (account_id, tunnel_ip),
    UNIQUE (account_id, proxy_id)
);

CREATE INDEX mesh_peers_proxy ON mesh_peers (proxy_id);

-- kind: 'host' (an IP), 'subnet' (a normalised CIDR) or 'domain' (a DNS name).
CREATE TABLE network_resources (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    peer_id TEXT NOT NULL REFERENCES mesh_peers (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    address TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX network_resources_account ON network_resources (account_id);
CREATE INDEX network_resources_peer ON network_resources (peer_id);

-- One-time tokens sent in ProxyMapping.auth_token for CreateProxyPeer, bound to the account,
-- service, cluster and proxy they were issued to. Used and expired rows are pruned.
CREATE TABLE proxy_peer_tokens (
    hashed_token TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    service_id TEXT NOT NULL,
    cluster_address TEXT NOT NULL,
    proxy_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);

CREATE INDEX proxy_peer_tokens_expiry ON proxy_peer_tokens (expires_at);
CREATE INDEX proxy_peer_tokens_proxy ON proxy_peer_tokens (account_id, service_id, proxy_id);
