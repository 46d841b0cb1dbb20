//! L4 services (`mode` tcp, udp, tls): which listen port carries which service.
//!
//! A TCP port carries either one `tcp` service or any number of `tls` services told apart by
//! SNI; a UDP port carries one `udp` service. A service that would take a port another service
//! already holds is refused and reported, and the holder keeps the port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use proto::ProxyMapping;

use super::access::AccessPolicy;
use super::{RouteError, validate_domain};

/// UDP sessions idle this long are reaped when the mapping does not say otherwise.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Mode {
    Tcp,
    Udp,
    Tls,
}

/// The transport a listener needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        })
    }
}

impl L4Mode {
    pub fn parse(mode: &str) -> Option<L4Mode> {
        match mode {
            "tcp" => Some(L4Mode::Tcp),
            "udp" => Some(L4Mode::Udp),
            "tls" => Some(L4Mode::Tls),
            _ => None,
        }
    }

    pub fn transport(self) -> Transport {
        match self {
            L4Mode::Udp => Transport::Udp,
            L4Mode::Tcp | L4Mode::Tls => Transport::Tcp,
        }
    }
}

/// A `host:port` target; the address is known up front when the host is an IP literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Target {
    pub host: String,
    pub port: u16,
    pub addr: Option<SocketAddr>,
}

impl L4Target {
    pub fn parse(s: &str) -> Result<L4Target, String> {
        let s = s.trim();
        // Accept a URL-looking target too (`tcp://h:p`), as the HTTP side writes targets that way.
        let s = s.split_once("://").map(|(_, rest)| rest).unwrap_or(s);
        let s = s.trim_end_matches('/');
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} must be host:port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: port must be 1-65535"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?}: a host is required"));
        }
        let ip = host.parse::<IpAddr>().ok();
        if ip.is_none() && validate_domain(host).is_err() {
            return Err(format!("{s:?}: host is not an IP address or DNS name"));
        }
        Ok(L4Target {
            host: host.to_string(),
            port,
            addr: ip.map(|ip| SocketAddr::new(ip, port)),
        })
    }
}

/// One published L4 service.
#[derive(Debug)]
pub struct L4Service {
    pub id: String,
    pub account_id: String,
    pub mode: L4Mode,
    pub listen_port: u16,
    /// The SNI a `tls` service answers to (its domain, lower case; may be `*.` wildcard).
    pub domain: String,
    pub target: L4Target,
    pub proxy_protocol: bool,
    pub session_idle_timeout: Duration,
    pub access: AccessPolicy,
    pub crowdsec: crate::crowdsec::CrowdsecMode,
    /// Dialed directly even when the account's mesh carries the address.
    pub direct_upstream: bool,
}

impl L4Service {
    pub fn from_mapping(m: &ProxyMapping, mode: L4Mode) -> Result<L4Service, RouteError> {
        let listen_port = u16::try_from(m.listen_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(RouteError::L4("listen_port must be 1-65535".to_string()))?;
        if m.private {
            // Fail closed: only connections over the mesh may reach a NetBird-only service, and
            // this proxy does not accept connections over the mesh yet.
            return Err(RouteError::L4(
                "NetBird-only (private) L4 services are not served: this proxy does not accept \
                 connections over the mesh yet"
                    .to_string(),
            ));
        }
        let domain = m.domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if mode == L4Mode::Tls {
            validate_domain(&domain).map_err(RouteError::Domain)?;
        }
        let [path] = m.path.as_slice() else {
            return Err(RouteError::L4(format!(
                "an L4 service has exactly one target, this one has {}",
                m.path.len()
            )));
        };
        let target = L4Target::parse(&path.target).map_err(RouteError::L4)?;
        let opts = path.options.clone().unwrap_or_default();
        let session_idle_timeout = opts
            .session_idle_timeout
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_UDP_IDLE);
        let access = AccessPolicy::from_restrictions(m.access_restrictions.as_ref())
            .map_err(|e| RouteError::L4(e.to_string()))?;
        Ok(L4Service {
            id: m.id.clone(),
            account_id: m.account_id.clone(),
            mode,
            listen_port,
            domain,
            target,
            proxy_protocol: opts.proxy_protocol,
            session_idle_timeout,
            access,
            crowdsec: super::crowdsec_mode(m)?,
            direct_upstream: opts.direct_upstream,
        })
    }
}

/// What a TCP listen port carries.
#[derive(Debug)]
pub enum TcpPort {
    Plain(Arc<L4Service>),
    /// TLS passthrough: SNI → service, exact names first, then `*.parent`.
    Sni {
        exact: HashMap<String, Arc<L4Service>>,
        wildcard: HashMap<String, Arc<L4Service>>,
    },
}

impl TcpPort {
    pub fn by_sni(&self, name: &str) -> Option<&Arc<L4Service>> {
        let TcpPort::Sni { exact, wildcard } = self else {
            return None;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        exact
            .get(&name)
            .or_else(|| wildcard.get(name.split_once('.')?.1))
    }

    fn services(&self) -> Vec<&Arc<L4Service>> {
        match self {
            TcpPort::Plain(s) => vec![s],
            TcpPort::Sni { exact, wildcard } => exact.values().chain(wildcard.values()).collect(),
        }
    }
}

/// Every L4 port and what it carries.
#[derive(Debug, Default)]
pub struct L4Table {
    pub tcp: HashMap<u16, TcpPort>,
    pub udp: HashMap<u16, Arc<L4Service>>,
}

impl L4Table {
    /// Adds services, the ones already holding a port in `previous` first, so that a newcomer
    /// never takes a port from a service that is running. Returns the refused services.
    pub fn build(
        mut services: Vec<L4Service>,
        previous: &L4Table,
        reserved: &[(Transport, u16, &'static str)],
    ) -> (L4Table, Vec<(String, RouteError)>) {
        services.sort_by(|a, b| {
            let held = |s: &L4Service| !previous.holds(s);
            (held(a), &a.id).cmp(&(held(b), &b.id))
        });
        let mut table = L4Table::default();
        let mut refused = Vec::new();
        for s in services {
            let id = s.id.clone();
            if let Err(e) = table.insert(s, reserved) {
                refused.push((id, e));
            }
        }
        (table, refused)
    }

    fn holds(&self, s: &L4Service) -> bool {
        match s.mode.transport() {
            Transport::Udp => self.udp.get(&s.listen_port).is_some_and(|h| h.id == s.id),
            Transport::Tcp => self
                .tcp
                .get(&s.listen_port)
                .is_some_and(|p| p.services().iter().any(|h| h.id == s.id)),
        }
    }

    fn insert(
        &mut self,
        s: L4Service,
        reserved: &[(Transport, u16, &'static str)],
    ) -> Result<(), RouteError> {
        let port = s.listen_port;
        let transport = s.mode.transport();
        if let Some((_, _, setting)) = reserved
            .iter()
            .find(|(t, p, _)| *t == transport && *p == port)
        {
            return Err(RouteError::L4(format!(
                "port {port}/{transport} is the proxy's own listener ({setting})"
            )));
        }
        let taken = |holder: &str| {
            RouteError::L4(format!(
                "port {port}/{transport} is already used by service {holder:?}"
            ))
        };
        match s.mode {
            L4Mode::Udp => {
                if let Some(h) = self.udp.get(&port) {
                    return Err(taken(&h.id));
                }
                self.udp.insert(port, Arc::new(s));
            }
            L4Mode::Tcp => {
                if let Some(h) = self.tcp.get(&port) {
                    return Err(taken(&h.services()[0].id));
                }
                self.tcp.insert(port, TcpPort::Plain(Arc::new(s)));
            }
            L4Mode::Tls => {
                let entry = self.tcp.entry(port).or_insert_with(|| TcpPort::Sni {
                    exact: HashMap::new(),
                    wildcard: HashMap::new(),
                });
                let TcpPort::Sni { exact, wildcard } = entry else {
                    let holder = entry.services()[0].id.clone();
                    return Err(taken(&holder));
                };
                let (map, key) = match s.domain.strip_prefix("*.") {
                    Some(parent) => (wildcard, parent.to_string()),
                    None => (exact, s.domain.clone()),
                };
                if let Some(h) = map.get(&key) {
                    return Err(RouteError::L4(format!(
                        "port {port}/tcp already routes SNI {} to service {:?}",
                        s.domain, h.id
                    )));
                }
                map.insert(key, Arc::new(s));
            }
        }
        Ok(())
    }

    /// The listeners this table needs.
    pub fn ports(&self) -> Vec<(Transport, u16)> {
        let mut out: Vec<_> = self
            .tcp
            .keys()
            .map(|p| (Transport::Tcp, *p))
            .chain(self.udp.keys().map(|p| (Transport::Udp, *p)))
            .collect();
        out.sort();
        out
    }

    /// The services on a port (every SNI service of a TLS port).
    pub fn services_on(&self, transport: Transport, port: u16) -> Vec<&Arc<L4Service>> {
        match transport {
            Transport::Tcp => self
                .tcp
                .get(&port)
                .map(|p| p.services())
                .unwrap_or_default(),
            Transport::Udp => self.udp.get(&port).into_iter().collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.tcp.values().map(|p| p.services().len()).sum::<usize>() + self.udp.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{PathMapping, PathTargetOptions};

    fn svc(id: &str, mode: &str, port: i32, domain: &str) -> L4Service {
        let m = ProxyMapping {
            id: id.into(),
            domain: domain.into(),
            mode: mode.into(),
            listen_port: port,
            path: vec![PathMapping {
                path: String::new(),
                target: "10.0.0.1:9000".into(),
                options: Some(PathTargetOptions::default()),
            }],
            ..Default::default()
        };
        L4Service::from_mapping(&m, L4Mode::parse(mode).unwrap()).unwrap()
    }

    #[test]
    fn netbird_only_services_are_refused_not_published() {
        let m = ProxyMapping {
            id: "p".into(),
            mode: "tcp".into(),
            listen_port: 7000,
            private: true,
            path: vec![PathMapping {
                path: String::new(),
                target: "10.0.0.1:9000".into(),
                options: Some(PathTargetOptions::default()),
            }],
            ..Default::default()
        };
        let e = L4Service::from_mapping(&m, L4Mode::Tcp).unwrap_err();
        assert!(e.to_string().contains("over the mesh"), "{e}");
    }

    #[test]
    fn targets() {
        let t = L4Target::parse("10.0.0.1:9000").unwrap();
        assert_eq!(t.addr, Some("10.0.0.1:9000".parse().unwrap()));
        assert_eq!(L4Target::parse("[::1]:53").unwrap().host, "::1");
        assert!(L4Target::parse("db.internal:5432").unwrap().addr.is_none());
        assert!(L4Target::parse("10.0.0.1").is_err());
        assert!(L4Target::parse("10.0.0.1:0").is_err());
        assert!(L4Target::parse(":80").is_err());
    }

    #[test]
    fn tls_services_share_a_port_by_sni() {
        let (t, refused) = L4Table::build(
            vec![
                svc("a", "tls", 8443, "a.example"),
                svc("b", "tls", 8443, "*.b.example"),
                svc("c", "udp", 8443, "c.example"),
            ],
            &L4Table::default(),
            &[],
        );
        assert!(refused.is_empty(), "{refused:?}");
        let port = &t.tcp[&8443];
        assert_eq!(port.by_sni("A.example.").unwrap().id, "a");
        assert_eq!(port.by_sni("x.b.example").unwrap().id, "b");
        assert!(port.by_sni("b.example").is_none());
        assert_eq!(
            t.ports(),
            vec![(Transport::Tcp, 8443), (Transport::Udp, 8443)]
        );
    }

    #[test]
    fn the_holder_keeps_its_port() {
        let (first, _) = L4Table::build(vec![svc("z", "tcp", 7000, "")], &L4Table::default(), &[]);
        let (second, refused) = L4Table::build(
            vec![svc("a", "tcp", 7000, ""), svc("z", "tcp", 7000, "")],
            &first,
            &[],
        );
        assert_eq!(second.services_on(Transport::Tcp, 7000)[0].id, "z");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, "a");
        assert!(refused[0].1.to_string().contains("already used"));
    }

    #[test]
    fn own_listeners_are_reserved() {
        let (_, refused) = L4Table::build(
            vec![svc("a", "tcp", 443, "")],
            &L4Table::default(),
            &[(Transport::Tcp, 443, "NB_PROXY_ADDRESS")],
        );
        assert!(refused[0].1.to_string().contains("NB_PROXY_ADDRESS"));
    }
}
