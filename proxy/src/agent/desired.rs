//! Management's `AgentConfig`, checked and resolved into what the interface and the firewall
//! take. A malformed proxy entry is skipped with a warning rather than failing the whole
//! configuration: the other proxies keep working.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use proto::mesh::AgentConfig;
use wireguard_control::Key;

use crate::mesh::device::PeerSpec;

/// How long one proxy endpoint's DNS lookup may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("management sent a bad tunnel address {0:?}")]
    TunnelAddress(String),
}

#[derive(Debug, Clone)]
pub struct Desired {
    pub address: IpNet,
    pub peers: Vec<PeerSpec>,
    /// The proxies' tunnel addresses: the only sources forwarded to `routed`.
    pub proxy_sources: Vec<IpNet>,
    pub routed: Vec<IpNet>,
}

pub async fn resolve(config: &AgentConfig) -> Result<Desired, ConfigError> {
    let address: IpNet = config
        .tunnel_address
        .trim()
        .parse()
        .map_err(|_| ConfigError::TunnelAddress(config.tunnel_address.clone()))?;
    let mut peers = Vec::with_capacity(config.proxies.len());
    let mut proxy_sources = Vec::new();
    for proxy in &config.proxies {
        let Ok(public_key) = Key::from_base64(proxy.public_key.trim()) else {
            tracing::warn!(key = %proxy.public_key, "skipping a proxy with a bad public key");
            continue;
        };
        let allowed_ips: Vec<IpNet> = proxy
            .allowed_ips
            .iter()
            .filter_map(|s| match s.trim().parse::<IpNet>() {
                Ok(net) => Some(net),
                Err(_) => {
                    tracing::warn!(proxy = %proxy.public_key, allowed_ip = %s, "skipping a bad allowed IP");
                    None
                }
            })
            .collect();
        proxy_sources.extend(allowed_ips.iter().copied());
        let endpoint = endpoint(&proxy.public_key, &proxy.endpoint).await;
        let keepalive = u16::try_from(proxy.persistent_keepalive)
            .ok()
            .filter(|s| *s > 0);
        peers.push(PeerSpec {
            public_key,
            allowed_ips,
            endpoint,
            persistent_keepalive: keepalive,
            // The agent's own setting, filled in when applied.
            preshared_key: None,
        });
    }
    let routed = config
        .routed_networks
        .iter()
        .filter_map(|s| match s.trim().parse::<IpNet>() {
            Ok(net) => Some(net.trunc()),
            Err(_) => {
                tracing::warn!(network = %s, "skipping a bad routed network");
                None
            }
        })
        .collect();
    Ok(Desired {
        address,
        peers,
        proxy_sources,
        routed,
    })
}

/// "host:port" → an address; DNS names are resolved (first answer, IPv4 preferred since most
/// proxies publish one). Empty or unresolvable: no endpoint (the peer is still configured).
async fn endpoint(proxy: &str, text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr);
    }
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(text)).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            let pick = addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or_else(|| addrs.first())
                .copied();
            if pick.is_none() {
                tracing::warn!(%proxy, endpoint = %text, "the proxy's endpoint resolves to nothing");
            }
            pick
        }
        Ok(Err(e)) => {
            tracing::warn!(%proxy, endpoint = %text, error = %e, "cannot resolve the proxy's endpoint");
            None
        }
        Err(_) => {
            tracing::warn!(%proxy, endpoint = %text, "resolving the proxy's endpoint timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::mesh::ProxyPeer;

    #[tokio::test]
    async fn proxies_and_networks_are_parsed() {
        let key = Key::generate_private().get_public().to_base64();
        let config = AgentConfig {
            tunnel_address: "100.64.0.7/10".into(),
            proxies: vec![
                ProxyPeer {
                    public_key: key.clone(),
                    endpoint: "127.0.0.1:51820".into(),
                    allowed_ips: vec!["100.64.0.1/32".into()],
                    persistent_keepalive: 25,
                },
                ProxyPeer {
                    public_key: Key::generate_private().get_public().to_base64(),
                    endpoint: String::new(),
                    allowed_ips: vec!["100.64.0.2/32".into(), "junk".into()],
                    persistent_keepalive: 0,
                },
                ProxyPeer {
                    public_key: "not a key".into(),
                    ..Default::default()
                },
            ],
            routed_networks: vec!["10.20.0.9/24".into()],
        };
        let d = resolve(&config).await.expect("valid");
        assert_eq!(d.address.to_string(), "100.64.0.7/10");
        assert_eq!(d.peers.len(), 2);
        assert_eq!(d.peers[0].public_key.to_base64(), key);
        assert_eq!(
            d.peers[0].endpoint,
            Some("127.0.0.1:51820".parse().expect("addr"))
        );
        assert_eq!(d.peers[0].persistent_keepalive, Some(25));
        assert_eq!(d.peers[1].endpoint, None);
        assert_eq!(d.peers[1].persistent_keepalive, None);
        assert_eq!(d.peers[1].allowed_ips.len(), 1);
        assert_eq!(d.proxy_sources.len(), 2);
        assert_eq!(d.routed[0].to_string(), "10.20.0.0/24");
        let localhost = endpoint("p", "localhost:51820").await.expect("resolves");
        assert_eq!(localhost.port(), 51820);

        let bad = AgentConfig {
            tunnel_address: "nope".into(),
            ..Default::default()
        };
        assert!(resolve(&bad).await.is_err());
    }
}
