//! The WireGuard mesh of an account: its tunnel range, its peers (agents, stock WireGuard
//! "manual" peers, proxies) with their tunnel IPs, and the one-time tokens a proxy redeems with
//! `CreateProxyPeer`.
//!
//! Tunnel IPs are unique per account only (two accounts may use the same range). A new peer gets
//! the lowest free host address of the range; two concurrent allocations that pick the same
//! address collide on the `(account_id, tunnel_ip)` constraint and the loser retries.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use sqlx::Row;

use super::{Store, StoreError, is_unique_violation, now};
use crate::secrets;

/// The range a new account gets (NetBird's CGNAT range).
pub const DEFAULT_TUNNEL_RANGE: &str = "100.64.0.0/10";
/// How long a one-time proxy-peer token is valid.
pub const PROXY_PEER_TOKEN_TTL_SECS: i64 = 24 * 3600;
/// An unused one-time token superseded by a newer one for the same service and proxy is kept
/// this long (a proxy may still be redeeming it), then pruned.
const SUPERSEDED_GRACE_SECS: i64 = 300;
/// Attempts at a free tunnel IP before giving up (each loses only to a concurrent insert).
const ALLOCATION_ATTEMPTS: usize = 16;

// === CIDR ranges ===

/// A network in CIDR notation with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn ip_bits(ip: IpAddr) -> u32 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn u128_to_ip(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX)))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

impl Cidr {
    /// Parses `addr/prefix`, clearing host bits (`10.0.0.7/24` → `10.0.0.0/24`).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix)"))?;
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 or IPv6 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        let bits = ip_bits(ip);
        if u32::from(prefix) > bits {
            return Err(format!("prefix /{prefix} is too long for {ip}"));
        }
        let host_bits = bits - u32::from(prefix);
        let mask = if host_bits >= 128 {
            0
        } else {
            !((1u128 << host_bits) - 1)
        };
        let network = u128_to_ip(ip_to_u128(ip) & mask, ip.is_ipv4());
        Ok(Cidr { network, prefix })
    }

    /// A tunnel range: a CIDR with room for at least two hosts.
    pub fn parse_range(s: &str) -> Result<Cidr, String> {
        let c = Cidr::parse(s)?;
        if c.host_count() < 2 {
            return Err(format!("tunnel range {c} has room for fewer than 2 peers"));
        }
        Ok(c)
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn host_bits(&self) -> u32 {
        ip_bits(self.network) - u32::from(self.prefix)
    }

    /// Offset of the last address of the range.
    fn last_offset(&self) -> u128 {
        let hb = self.host_bits();
        if hb >= 128 {
            u128::MAX
        } else {
            (1u128 << hb) - 1
        }
    }

    /// First and last offset a peer may get: not the network address, and for IPv4 not the
    /// broadcast address.
    fn host_offsets(&self) -> (u128, u128) {
        let last = self.last_offset();
        let last = if self.network.is_ipv4() {
            last.saturating_sub(1)
        } else {
            last
        };
        (1, last)
    }

    pub fn host_count(&self) -> u128 {
        let (first, last) = self.host_offsets();
        if last >= first { last - first + 1 } else { 0 }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.network.is_ipv4() {
            return false;
        }
        let hb = self.host_bits();
        if hb >= 128 {
            return true;
        }
        (ip_to_u128(ip) >> hb) == (ip_to_u128(self.network) >> hb)
    }

    /// `ip/prefix` with this range's prefix length (a peer's tunnel address).
    pub fn address_of(&self, ip: IpAddr) -> String {
        format!("{ip}/{}", self.prefix)
    }

    /// The lowest host address of the range not in `used`.
    pub fn lowest_free(&self, used: &[IpAddr]) -> Option<IpAddr> {
        let base = ip_to_u128(self.network);
        let (first, last) = self.host_offsets();
        let mut offsets: Vec<u128> = used
            .iter()
            .filter(|ip| self.contains(**ip))
            .map(|ip| ip_to_u128(*ip) - base)
            .collect();
        offsets.sort_unstable();
        offsets.dedup();
        let mut candidate = first;
        for off in offsets {
            if off < candidate {
                continue;
            }
            if off == candidate {
                candidate = candidate.checked_add(1)?;
            } else {
                break;
            }
        }
        (candidate <= last).then(|| u128_to_ip(base + candidate, self.network.is_ipv4()))
    }
}

/// `ip/32` or `ip/128`: a single address as an allowed IP.
pub fn host_route(ip: IpAddr) -> String {
    format!("{ip}/{}", ip_bits(ip))
}

// === WireGuard keys ===

/// True for a base64 (standard, padded) 32-byte key, as `wg` prints it.
pub fn is_wg_key(s: &str) -> bool {
    s.len() == 44
        && base64::engine::general_purpose::STANDARD
            .decode(s)
            .is_ok_and(|b| b.len() == 32)
}

/// A fresh Curve25519 key pair as `(private, public)`, base64 like `wg genkey | wg pubkey`.
/// The private key is handed out once and never stored or logged.
pub fn generate_wg_keypair() -> (String, String) {
    let mut bytes = [0u8; 32];
    // A failing system RNG leaves no safe way to mint keys.
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("system random number generator");
    let secret = x25519_dalek::StaticSecret::from(bytes);
    let public = x25519_dalek::PublicKey::from(&secret);
    let b64 = base64::engine::general_purpose::STANDARD;
    (b64.encode(secret.to_bytes()), b64.encode(public.as_bytes()))
}

// === peers ===

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    /// A machine running `portcullis agent`.
    Agent,
    /// A stock WireGuard peer configured with the wg-quick file management renders.
    Manual,
    /// A proxy's WireGuard identity in this account.
    Proxy,
}

impl PeerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Agent => "agent",
            PeerKind::Manual => "manual",
            PeerKind::Proxy => "proxy",
        }
    }

    pub fn parse(s: &str) -> Option<PeerKind> {
        Some(match s {
            "agent" => PeerKind::Agent,
            "manual" => PeerKind::Manual,
            "proxy" => PeerKind::Proxy,
            _ => return None,
        })
    }
}

/// A mesh peer. Holds no secret (the peer token is stored hashed and not loaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub public_key: String,
    pub tunnel_ip: IpAddr,
    pub kind: PeerKind,
    pub proxy_id: Option<String>,
    pub cluster_address: Option<String>,
    pub listen_port: Option<i64>,
    pub endpoint_host: Option<String>,
    pub setup_key_id: Option<String>,
    pub connected: bool,
    pub last_seen: Option<i64>,
    pub created_at: i64,
    /// The user the peer belongs to (NetBird-only services), if any.
    pub user_id: Option<String>,
    /// The groups the peer is in itself (ids).
    pub groups: Vec<String>,
}

impl MeshPeer {
    /// `host:port` of a proxy's WireGuard, once the proxy reported it.
    pub fn endpoint(&self) -> Option<String> {
        let host = self.endpoint_host.as_deref().filter(|h| !h.is_empty())?;
        let port = self.listen_port.filter(|p| (1..=65535).contains(p))?;
        Some(if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        })
    }
}

/// What a new peer is made of; the tunnel IP is allocated on insert.
pub struct NewPeer<'a> {
    pub account_id: &'a str,
    pub name: &'a str,
    pub public_key: &'a str,
    pub kind: PeerKind,
    pub proxy_id: Option<&'a str>,
    pub cluster_address: Option<&'a str>,
    /// The SHA-256 of an agent's peer token (never the plain token).
    pub hashed_token: Option<String>,
    pub setup_key_id: Option<&'a str>,
}

/// sqlx takes only static SQL, so the column list is spliced in with `concat!`.
macro_rules! columns {
    () => {
        "id, account_id, name, public_key, tunnel_ip, kind, proxy_id, cluster_address, \
         listen_port, endpoint_host, setup_key_id, connected, last_seen, created_at"
    };
}

/// What a read takes besides [`columns`]: who the peer belongs to, its groups.
macro_rules! read_columns {
    () => {
        concat!(columns!(), ", user_id, peer_groups")
    };
}

impl Store {
    /// The account's tunnel range; `None` when there is no such account.
    pub async fn tunnel_range(&self, account_id: &str) -> Result<Option<Cidr>, StoreError> {
        let row = sqlx::query("SELECT tunnel_range FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?;
        match row {
            Some(r) => {
                let s: String = r.try_get("tunnel_range")?;
                Cidr::parse(&s)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(format!("tunnel range: {e}")))
            }
            None => Ok(None),
        }
    }

    /// Changes the tunnel range; a conflict once the account has any peer.
    pub async fn set_tunnel_range(&self, account_id: &str, range: &Cidr) -> Result<(), StoreError> {
        let res = sqlx::query(
            "UPDATE accounts SET tunnel_range = $1 WHERE id = $2 \
             AND NOT EXISTS (SELECT 1 FROM mesh_peers WHERE account_id = $3)",
        )
        .bind(range.to_string())
        .bind(account_id)
        .bind(account_id)
        .execute(self.pool())
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::Conflict(
                "the tunnel range can only be changed while the account has no peers".into(),
            ));
        }
        Ok(())
    }

    /// Inserts a peer at the lowest free tunnel IP of its account's range.
    pub async fn insert_mesh_peer(&self, p: &NewPeer<'_>) -> Result<MeshPeer, StoreError> {
        let range = self
            .tunnel_range(p.account_id)
            .await?
            .ok_or_else(|| StoreError::Conflict("the account does not exist".into()))?;
        for _ in 0..ALLOCATION_ATTEMPTS {
            let used = self.used_tunnel_ips(p.account_id).await?;
            let ip = range.lowest_free(&used).ok_or_else(|| {
                StoreError::Conflict(format!("the tunnel range {range} has no free address"))
            })?;
            let id = secrets::new_id();
            let created_at = now();
            let res = sqlx::query(concat!(
                "INSERT INTO mesh_peers (",
                columns!(),
                ", hashed_token) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, $9, 0, NULL, $10, $11)"
            ))
            .bind(&id)
            .bind(p.account_id)
            .bind(p.name)
            .bind(p.public_key)
            .bind(ip.to_string())
            .bind(p.kind.as_str())
            .bind(p.proxy_id)
            .bind(p.cluster_address)
            .bind(p.setup_key_id)
            .bind(created_at)
            .bind(p.hashed_token.as_deref())
            .execute(self.pool())
            .await;
            match res {
                Ok(_) => {
                    return Ok(MeshPeer {
                        id,
                        account_id: p.account_id.to_string(),
                        name: p.name.to_string(),
                        public_key: p.public_key.to_string(),
                        tunnel_ip: ip,
                        kind: p.kind,
                        proxy_id: p.proxy_id.map(str::to_string),
                        cluster_address: p.cluster_address.map(str::to_string),
                        listen_port: None,
                        endpoint_host: None,
                        setup_key_id: p.setup_key_id.map(str::to_string),
                        connected: false,
                        last_seen: None,
                        created_at,
                        user_id: None,
                        groups: Vec::new(),
                    });
                }
                Err(e) if is_unique_violation(&e) => {
                    if self
                        .mesh_peer_by_key(p.account_id, p.public_key)
                        .await?
                        .is_some()
                    {
                        return Err(StoreError::Conflict(
                            "this public key is already used by a peer of the account".into(),
                        ));
                    }
                    if let Some(proxy_id) = p.proxy_id
                        && self.proxy_peer(p.account_id, proxy_id).await?.is_some()
                    {
                        return Err(StoreError::Conflict(format!(
                            "proxy {proxy_id} already has a peer in this account"
                        )));
                    }
                    // Another peer took this address meanwhile: take the next one.
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(
            "could not allocate a tunnel IP; try again".into(),
        ))
    }

    async fn used_tunnel_ips(&self, account_id: &str) -> Result<Vec<IpAddr>, StoreError> {
        let rows = sqlx::query("SELECT tunnel_ip FROM mesh_peers WHERE account_id = $1")
            .bind(account_id)
            .fetch_all(self.pool())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let s: String = r.try_get("tunnel_ip")?;
            out.push(
                s.parse()
                    .map_err(|_| StoreError::Corrupt(format!("tunnel ip {s:?}")))?,
            );
        }
        Ok(out)
    }

    /// Every peer of the account, oldest first.
    pub async fn mesh_peers(&self, account_id: &str) -> Result<Vec<MeshPeer>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM mesh_peers WHERE account_id = $1 ORDER BY created_at, id"
        ))
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(peer_from_row).collect()
    }

    pub async fn mesh_peer(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<MeshPeer>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM mesh_peers WHERE account_id = $1 AND id = $2"
        ))
        .bind(account_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(peer_from_row).transpose()
    }

    pub async fn mesh_peer_by_tunnel_ip(
        &self,
        account_id: &str,
        tunnel_ip: IpAddr,
    ) -> Result<Option<MeshPeer>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM mesh_peers WHERE account_id = $1 AND tunnel_ip = $2"
        ))
        .bind(account_id)
        .bind(tunnel_ip.to_string())
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(peer_from_row).transpose()
    }

    pub async fn mesh_peer_by_key(
        &self,
        account_id: &str,
        public_key: &str,
    ) -> Result<Option<MeshPeer>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM mesh_peers WHERE account_id = $1 AND public_key = $2"
        ))
        .bind(account_id)
        .bind(public_key)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(peer_from_row).transpose()
    }

    /// The peer of proxy `proxy_id` in the account.
    pub async fn proxy_peer(
        &self,
        account_id: &str,
        proxy_id: &str,
    ) -> Result<Option<MeshPeer>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM mesh_peers WHERE account_id = $1 AND proxy_id = $2 AND kind = 'proxy'"
        ))
        .bind(account_id)
        .bind(proxy_id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(peer_from_row).transpose()
    }

    /// Every account peer of proxy `proxy_id`, across accounts.
    pub async fn peers_of_proxy(&self, proxy_id: &str) -> Result<Vec<MeshPeer>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM mesh_peers WHERE proxy_id = $1 AND kind = 'proxy' ORDER BY account_id"
        ))
        .bind(proxy_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(peer_from_row).collect()
    }

    /// Deletes a peer (its network resources go with it); returns what was deleted.
    pub async fn delete_mesh_peer(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<MeshPeer>, StoreError> {
        let Some(peer) = self.mesh_peer(account_id, id).await? else {
            return Ok(None);
        };
        // Explicitly, not only by ON DELETE CASCADE, so it holds even if foreign keys are off.
        sqlx::query("DELETE FROM network_resources WHERE peer_id = $1 AND account_id = $2")
            .bind(id)
            .bind(account_id)
            .execute(self.pool())
            .await?;
        sqlx::query("DELETE FROM mesh_peers WHERE id = $1 AND account_id = $2")
            .bind(id)
            .bind(account_id)
            .execute(self.pool())
            .await?;
        Ok(Some(peer))
    }

    /// Creates the peer of proxy `proxy_id` in the account, or gives the existing one a new key
    /// and cluster (keeping its tunnel IP). Returns the peer and whether anything changed.
    pub async fn upsert_proxy_peer(
        &self,
        account_id: &str,
        proxy_id: &str,
        cluster_address: &str,
        public_key: &str,
    ) -> Result<(MeshPeer, bool), StoreError> {
        for _ in 0..2 {
            if let Some(mut existing) = self.proxy_peer(account_id, proxy_id).await? {
                if existing.public_key == public_key
                    && existing.cluster_address.as_deref() == Some(cluster_address)
                {
                    return Ok((existing, false));
                }
                let res = sqlx::query(
                    "UPDATE mesh_peers SET public_key = $1, cluster_address = $2 WHERE id = $3",
                )
                .bind(public_key)
                .bind(cluster_address)
                .bind(&existing.id)
                .execute(self.pool())
                .await;
                match res {
                    Ok(_) => {}
                    Err(e) if is_unique_violation(&e) => {
                        return Err(StoreError::Conflict(
                            "this public key is already used by another peer of the account".into(),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
                existing.public_key = public_key.to_string();
                existing.cluster_address = Some(cluster_address.to_string());
                return Ok((existing, true));
            }
            let new = NewPeer {
                account_id,
                name: proxy_id,
                public_key,
                kind: PeerKind::Proxy,
                proxy_id: Some(proxy_id),
                cluster_address: Some(cluster_address),
                hashed_token: None,
                setup_key_id: None,
            };
            match self.insert_mesh_peer(&new).await {
                Ok(p) => return Ok((p, true)),
                // A concurrent call created it: update that one instead.
                Err(StoreError::Conflict(_))
                    if self.proxy_peer(account_id, proxy_id).await?.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict(
            "the proxy peer changed concurrently; try again".into(),
        ))
    }

    /// Records where a proxy's WireGuard for the account listens. `None`: no proxy peer with
    /// this key; `Some(changed)` otherwise.
    pub async fn set_proxy_endpoint(
        &self,
        account_id: &str,
        proxy_id: &str,
        public_key: &str,
        listen_port: u16,
        host: &str,
    ) -> Result<Option<bool>, StoreError> {
        let Some(peer) = self.proxy_peer(account_id, proxy_id).await? else {
            return Ok(None);
        };
        if peer.public_key != public_key {
            return Ok(None);
        }
        if peer.listen_port == Some(i64::from(listen_port))
            && peer.endpoint_host.as_deref() == Some(host)
        {
            return Ok(Some(false));
        }
        sqlx::query(
            "UPDATE mesh_peers SET listen_port = $1, endpoint_host = $2 WHERE id = $3 AND public_key = $4",
        )
        .bind(i64::from(listen_port))
        .bind(host)
        .bind(&peer.id)
        .bind(public_key)
        .execute(self.pool())
        .await?;
        Ok(Some(true))
    }

    /// Replaces an agent's peer token (stored hashed).
    pub async fn set_peer_token(&self, peer_id: &str, plain: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE mesh_peers SET hashed_token = $1 WHERE id = $2")
            .bind(secrets::hash_token(plain))
            .bind(peer_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The agent whose current peer token this is.
    pub async fn agent_by_token(&self, plain: &str) -> Result<Option<MeshPeer>, StoreError> {
        if !secrets::well_formed(plain, secrets::PEER_TOKEN_PREFIX) {
            return Ok(None);
        }
        let row = sqlx::query(concat!(
            "SELECT ",
            read_columns!(),
            " FROM mesh_peers WHERE hashed_token = $1 AND kind = 'agent'"
        ))
        .bind(secrets::hash_token(plain))
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(peer_from_row).transpose()
    }

    /// Marks an agent's Sync stream open or closed; either way it was just seen.
    pub async fn set_peer_connected(
        &self,
        peer_id: &str,
        connected: bool,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE mesh_peers SET connected = $1, last_seen = $2 WHERE id = $3")
            .bind(i64::from(connected))
            .bind(now())
            .bind(peer_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    // === one-time proxy-peer tokens ===

    /// Mints one one-time token per `(account_id, service_id)` for the proxy `proxy_id` of
    /// `cluster_address`, in the same order. Prunes used, expired and long-superseded tokens.
    pub async fn issue_proxy_peer_tokens(
        &self,
        cluster_address: &str,
        proxy_id: &str,
        services: &[(&str, &str)],
    ) -> Result<Vec<String>, StoreError> {
        let t = now();
        let mut tx = self.pool().begin().await?;
        sqlx::query("DELETE FROM proxy_peer_tokens WHERE expires_at <= $1 OR used_at IS NOT NULL")
            .bind(t)
            .execute(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(services.len());
        for (account_id, service_id) in services {
            sqlx::query(
                "DELETE FROM proxy_peer_tokens WHERE account_id = $1 AND service_id = $2 \
                 AND proxy_id = $3 AND created_at < $4",
            )
            .bind(*account_id)
            .bind(*service_id)
            .bind(proxy_id)
            .bind(t - SUPERSEDED_GRACE_SECS)
            .execute(&mut *tx)
            .await?;
            let plain = secrets::new_token(secrets::PROXY_PEER_TOKEN_PREFIX);
            sqlx::query(
                "INSERT INTO proxy_peer_tokens (hashed_token, account_id, service_id, cluster_address, \
                 proxy_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(secrets::hash_token(&plain))
            .bind(*account_id)
            .bind(*service_id)
            .bind(cluster_address)
            .bind(proxy_id)
            .bind(t)
            .bind(t + PROXY_PEER_TOKEN_TTL_SECS)
            .execute(&mut *tx)
            .await?;
            out.push(plain);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Redeems a one-time token issued for this account, service and cluster; returns the
    /// proxy it was issued to. `None`: unknown, expired, used, or bound to something else.
    pub async fn consume_proxy_peer_token(
        &self,
        plain: &str,
        account_id: &str,
        service_id: &str,
        cluster_address: &str,
    ) -> Result<Option<String>, StoreError> {
        if !secrets::well_formed(plain, secrets::PROXY_PEER_TOKEN_PREFIX) {
            return Ok(None);
        }
        let hashed = secrets::hash_token(plain);
        let t = now();
        let row = sqlx::query(
            "SELECT proxy_id FROM proxy_peer_tokens WHERE hashed_token = $1 AND account_id = $2 \
             AND service_id = $3 AND cluster_address = $4 AND used_at IS NULL AND expires_at > $5",
        )
        .bind(&hashed)
        .bind(account_id)
        .bind(service_id)
        .bind(cluster_address)
        .bind(t)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let proxy_id: String = row.try_get("proxy_id")?;
        let res = sqlx::query(
            "UPDATE proxy_peer_tokens SET used_at = $1 WHERE hashed_token = $2 AND used_at IS NULL",
        )
        .bind(t)
        .bind(&hashed)
        .execute(self.pool())
        .await?;
        Ok((res.rows_affected() == 1).then_some(proxy_id))
    }
}

fn peer_from_row(row: &sqlx::any::AnyRow) -> Result<MeshPeer, StoreError> {
    let kind: String = row.try_get("kind")?;
    let ip: String = row.try_get("tunnel_ip")?;
    let connected: i64 = row.try_get("connected")?;
    Ok(MeshPeer {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        public_key: row.try_get("public_key")?,
        tunnel_ip: ip
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("tunnel ip {ip:?}")))?,
        kind: PeerKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("peer kind {kind:?}")))?,
        proxy_id: row.try_get("proxy_id")?,
        cluster_address: row.try_get("cluster_address")?,
        listen_port: row.try_get("listen_port")?,
        endpoint_host: row.try_get("endpoint_host")?,
        setup_key_id: row.try_get("setup_key_id")?,
        connected: connected != 0,
        last_seen: row.try_get("last_seen")?,
        created_at: row.try_get("created_at")?,
        user_id: row.try_get("user_id")?,
        groups: super::mesh_access::ids_from(
            row.try_get("peer_groups")?,
            "mesh_peers.peer_groups",
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_are_normalised_and_checked() {
        assert_eq!(
            Cidr::parse("10.0.0.7/24").unwrap().to_string(),
            "10.0.0.0/24"
        );
        assert_eq!(Cidr::parse("fd00::1/64").unwrap().to_string(), "fd00::/64");
        assert!(Cidr::parse("10.0.0.0").is_err());
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse_range("10.0.0.0/30").is_ok());
        assert!(Cidr::parse_range("10.0.0.0/31").is_err());
        assert!(Cidr::parse_range("fd00::/127").is_err());
        assert!(Cidr::parse_range("fd00::/126").is_ok());
        let r = Cidr::parse("100.64.0.0/10").unwrap();
        assert!(r.contains(ip("100.127.255.254")));
        assert!(!r.contains(ip("100.128.0.1")));
    }

    #[test]
    fn lowest_free_skips_network_and_broadcast() {
        let r = Cidr::parse("10.0.0.0/30").unwrap();
        assert_eq!(r.lowest_free(&[]), Some(ip("10.0.0.1")));
        assert_eq!(r.lowest_free(&[ip("10.0.0.1")]), Some(ip("10.0.0.2")));
        assert_eq!(r.lowest_free(&[ip("10.0.0.1"), ip("10.0.0.2")]), None);
        assert_eq!(r.lowest_free(&[ip("10.0.0.2")]), Some(ip("10.0.0.1")));
        let v6 = Cidr::parse("fd00::/126").unwrap();
        assert_eq!(
            v6.lowest_free(&[ip("fd00::1"), ip("fd00::2")]),
            Some(ip("fd00::3"))
        );
    }

    #[test]
    fn generated_keys_are_wg_keys() {
        let (private, public) = generate_wg_keypair();
        assert!(is_wg_key(&private) && is_wg_key(&public));
        assert_ne!(private, public);
        assert!(!is_wg_key("not a key"));
    }

    fn manual<'a>(account: &'a str, name: &'a str, key: &'a str) -> NewPeer<'a> {
        NewPeer {
            account_id: account,
            name,
            public_key: key,
            kind: PeerKind::Manual,
            proxy_id: None,
            cluster_address: None,
            hashed_token: None,
            setup_key_id: None,
        }
    }

    #[tokio::test]
    async fn allocation_is_lowest_free_per_account() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        let b = store.create_account("b").await.unwrap();
        let p1 = store
            .insert_mesh_peer(&manual(&a.id, "p1", "k1"))
            .await
            .unwrap();
        let p2 = store
            .insert_mesh_peer(&manual(&a.id, "p2", "k2"))
            .await
            .unwrap();
        let p3 = store
            .insert_mesh_peer(&manual(&a.id, "p3", "k3"))
            .await
            .unwrap();
        assert_eq!(p1.tunnel_ip, ip("100.64.0.1"));
        assert_eq!(p2.tunnel_ip, ip("100.64.0.2"));
        assert_eq!(p3.tunnel_ip, ip("100.64.0.3"));
        // Another account with the same range starts at the same first address.
        let q1 = store
            .insert_mesh_peer(&manual(&b.id, "q1", "k1"))
            .await
            .unwrap();
        assert_eq!(q1.tunnel_ip, ip("100.64.0.1"));
        // A freed address is reused first.
        store
            .delete_mesh_peer(&a.id, &p2.id)
            .await
            .unwrap()
            .unwrap();
        let p4 = store
            .insert_mesh_peer(&manual(&a.id, "p4", "k4"))
            .await
            .unwrap();
        assert_eq!(p4.tunnel_ip, ip("100.64.0.2"));
        // A duplicate key in the same account is a conflict.
        assert!(matches!(
            store.insert_mesh_peer(&manual(&a.id, "dup", "k1")).await,
            Err(StoreError::Conflict(_))
        ));
        // The range can change only while the account has no peers.
        let small = Cidr::parse_range("10.9.0.0/30").unwrap();
        assert!(store.set_tunnel_range(&a.id, &small).await.is_err());
        let c = store.create_account("c").await.unwrap();
        store.set_tunnel_range(&c.id, &small).await.unwrap();
        let c1 = store
            .insert_mesh_peer(&manual(&c.id, "c1", "k1"))
            .await
            .unwrap();
        let c2 = store
            .insert_mesh_peer(&manual(&c.id, "c2", "k2"))
            .await
            .unwrap();
        assert_eq!(
            (c1.tunnel_ip, c2.tunnel_ip),
            (ip("10.9.0.1"), ip("10.9.0.2"))
        );
        assert!(
            store
                .insert_mesh_peer(&manual(&c.id, "c3", "k3"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn concurrent_allocations_get_distinct_addresses() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store = store.clone();
            let account = a.id.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("key{i}");
                store
                    .insert_mesh_peer(&manual(&account, "p", &key))
                    .await
                    .unwrap()
                    .tunnel_ip
            }));
        }
        let mut ips = Vec::new();
        for t in tasks {
            ips.push(t.await.unwrap());
        }
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 8);
        assert_eq!(ips[7], ip("100.64.0.8"));
    }

    #[tokio::test]
    async fn proxy_peer_tokens_are_one_time() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        let tokens = store
            .issue_proxy_peer_tokens("proxy.example", "px1", &[(&a.id, "svc1")])
            .await
            .unwrap();
        let t = &tokens[0];
        // Bound to its service and cluster.
        assert_eq!(
            store
                .consume_proxy_peer_token(t, &a.id, "svc2", "proxy.example")
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .consume_proxy_peer_token(t, &a.id, "svc1", "other.example")
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .consume_proxy_peer_token(t, &a.id, "svc1", "proxy.example")
                .await
                .unwrap()
                .as_deref(),
            Some("px1")
        );
        // Second use fails.
        assert_eq!(
            store
                .consume_proxy_peer_token(t, &a.id, "svc1", "proxy.example")
                .await
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn proxy_peers_keep_their_ip_on_key_change() {
        let store = test_store().await;
        let a = store.create_account("a").await.unwrap();
        store
            .insert_mesh_peer(&manual(&a.id, "m", "km"))
            .await
            .unwrap();
        let (p, changed) = store
            .upsert_proxy_peer(&a.id, "px1", "proxy.example", "kp1")
            .await
            .unwrap();
        assert!(changed);
        assert_eq!(p.tunnel_ip, ip("100.64.0.2"));
        let (same, changed) = store
            .upsert_proxy_peer(&a.id, "px1", "proxy.example", "kp1")
            .await
            .unwrap();
        assert!(!changed);
        assert_eq!(same.id, p.id);
        let (rotated, changed) = store
            .upsert_proxy_peer(&a.id, "px1", "proxy.example", "kp2")
            .await
            .unwrap();
        assert!(changed);
        assert_eq!(
            (rotated.id.as_str(), rotated.tunnel_ip),
            (p.id.as_str(), p.tunnel_ip)
        );
        assert_eq!(store.peers_of_proxy("px1").await.unwrap().len(), 1);
        // Endpoint: only for the registered key.
        assert_eq!(
            store
                .set_proxy_endpoint(&a.id, "px1", "kp1", 51820, "1.2.3.4")
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .set_proxy_endpoint(&a.id, "px1", "kp2", 51820, "1.2.3.4")
                .await
                .unwrap(),
            Some(true)
        );
        let p = store.proxy_peer(&a.id, "px1").await.unwrap().unwrap();
        assert_eq!(p.endpoint().as_deref(), Some("1.2.3.4:51820"));
    }
}
