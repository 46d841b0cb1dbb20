//! The immutable routing table: host → service → longest path prefix → target.
//!
//! Built by the control side from `ProxyMapping`s and published as a whole; workers only read it.

pub mod access;
pub mod auth;
pub mod l4;
mod target;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proto::{PathRewriteMode, ProxyMapping};

use access::AccessPolicy;
pub use l4::{L4Mode, L4Service, L4Table, Transport};
pub use target::{Target, TargetError, TargetScheme};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("domain: {0}")]
    Domain(&'static str),
    #[error("path {path:?}: {message}")]
    Path { path: String, message: String },
    #[error("target {target:?}: {source}")]
    Target { target: String, source: TargetError },
    #[error("mode {0:?} is not one of http, tcp, udp, tls")]
    UnsupportedMode(String),
    /// An L4 service's or an access restriction's problem, in words.
    #[error("{0}")]
    L4(String),
    #[error("a custom header name or value is not valid in HTTP: {0:?}")]
    BadHeader(String),
}

/// How the matched prefix is treated when the request goes to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRewrite {
    /// Remove the matched prefix (the protocol's default).
    Strip,
    /// Send the path as the client sent it.
    Preserve,
}

/// One `path → target` entry of a service.
#[derive(Debug)]
pub struct PathRoute {
    pub prefix: String,
    pub target: Target,
    pub rewrite: PathRewrite,
    pub skip_tls_verify: bool,
    pub request_timeout: Option<Duration>,
    /// Set on the upstream request, replacing any client header of the same name.
    pub custom_headers: Vec<(String, String)>,
    /// Dialed directly even when the account's mesh carries the address.
    pub direct_upstream: bool,
}

/// A published HTTP service.
#[derive(Debug)]
pub struct Service {
    pub id: String,
    pub account_id: String,
    pub domain: String,
    pub pass_host_header: bool,
    pub rewrite_redirects: bool,
    pub access: AccessPolicy,
    /// `None`: anyone may use the service (after the access restrictions).
    pub auth: Option<auth::ServiceAuth>,
    /// Reachable only over the mesh, authorised per tunnel peer by management.
    pub private: bool,
    pub crowdsec: crate::crowdsec::CrowdsecMode,
    /// Sorted longest prefix first, so the first match wins.
    pub routes: Vec<PathRoute>,
}

/// Every service a worker can route to: HTTP services by host, L4 services by port.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, Arc<Service>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<Service>>,
    pub l4: L4Table,
}

/// Problems found while building a table; the offending services are left out.
#[derive(Debug, Default)]
pub struct BuildReport {
    pub skipped: Vec<(String, RouteError)>,
}

// === impl RouteTable ===

impl RouteTable {
    /// Builds a table from mappings. A mapping that cannot be served is skipped and reported,
    /// never half-applied. `previous` decides L4 port conflicts in favour of the service that
    /// already holds the port; `reserved` are the proxy's own listeners.
    pub fn build(
        mappings: &[ProxyMapping],
        previous: &RouteTable,
        reserved: &[(Transport, u16, &'static str)],
    ) -> (RouteTable, BuildReport) {
        let mut table = RouteTable::default();
        let mut report = BuildReport::default();
        let mut l4 = Vec::new();
        for mapping in mappings {
            let built = match L4Mode::parse(&mapping.mode) {
                Some(mode) => L4Service::from_mapping(mapping, mode).map(|s| l4.push(s)),
                None => Service::from_mapping(mapping).map(|s| table.insert(Arc::new(s))),
            };
            if let Err(e) = built {
                report.skipped.push((mapping.id.clone(), e));
            }
        }
        let (l4, refused) = L4Table::build(l4, &previous.l4, reserved);
        table.l4 = l4;
        report.skipped.extend(refused);
        (table, report)
    }

    /// Every (account, address) a worker may dial through a mesh: IP-literal targets of HTTP and
    /// L4 TCP services that are not `direct_upstream`. The in-process mesh opens a bridge for each.
    pub fn mesh_targets(&self) -> Vec<(String, std::net::SocketAddr)> {
        let mut out = Vec::new();
        for service in self.exact.values().chain(self.wildcard.values()) {
            for route in service.routes.iter().filter(|r| !r.direct_upstream) {
                if let Some(addr) = route.target.socket_addr() {
                    out.push((service.account_id.clone(), addr));
                }
            }
        }
        for (transport, port) in self.l4.ports() {
            if transport != Transport::Tcp {
                continue;
            }
            for service in self.l4.services_on(transport, port) {
                if let (false, Some(addr)) = (service.direct_upstream, service.target.addr) {
                    out.push((service.account_id.clone(), addr));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn insert(&mut self, service: Arc<Service>) {
        match service.domain.strip_prefix("*.") {
            Some(suffix) => self.wildcard.insert(suffix.to_string(), service),
            None => self.exact.insert(service.domain.clone(), service),
        };
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + self.l4.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Finds the service for a request's host (already lower-case, without port): exact first,
    /// then the wildcard of its parent domain.
    pub fn service(&self, host: &str) -> Option<&Arc<Service>> {
        if let Some(s) = self.exact.get(host) {
            return Some(s);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }
}

// === impl Service ===

impl Service {
    pub fn from_mapping(m: &ProxyMapping) -> Result<Service, RouteError> {
        if !(m.mode.is_empty() || m.mode == "http") {
            return Err(RouteError::UnsupportedMode(m.mode.clone()));
        }
        let domain = m.domain.trim().trim_end_matches('.').to_ascii_lowercase();
        validate_domain(&domain).map_err(RouteError::Domain)?;
        let mut routes = Vec::with_capacity(m.path.len());
        for p in &m.path {
            let prefix = normalize_prefix(&p.path)?;
            let target = Target::parse(&p.target).map_err(|source| RouteError::Target {
                target: p.target.clone(),
                source,
            })?;
            let opts = p.options.clone().unwrap_or_default();
            let rewrite = if opts.path_rewrite == PathRewriteMode::PathRewritePreserve as i32 {
                PathRewrite::Preserve
            } else {
                PathRewrite::Strip
            };
            let request_timeout = opts
                .request_timeout
                .as_ref()
                .and_then(|d| Duration::try_from(*d).ok())
                .filter(|d| !d.is_zero());
            let mut custom_headers: Vec<(String, String)> = opts
                .custom_headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            custom_headers.sort();
            for (k, v) in &custom_headers {
                if !is_token(k) || v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                    return Err(RouteError::BadHeader(k.clone()));
                }
            }
            routes.push(PathRoute {
                prefix,
                target,
                rewrite,
                skip_tls_verify: opts.skip_tls_verify,
                request_timeout,
                custom_headers,
                direct_upstream: opts.direct_upstream,
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(Service {
            id: m.id.clone(),
            account_id: m.account_id.clone(),
            domain,
            pass_host_header: m.pass_host_header,
            rewrite_redirects: m.rewrite_redirects,
            access: AccessPolicy::from_restrictions(m.access_restrictions.as_ref())
                .map_err(|e| RouteError::L4(e.to_string()))?,
            auth: auth::ServiceAuth::from_mapping(m.auth.as_ref())
                .map_err(|e| RouteError::L4(e.to_string()))?,
            private: m.private,
            crowdsec: crowdsec_mode(m)?,
            routes,
        })
    }

    /// The route whose prefix is the longest match for `path` (the path without query).
    /// A prefix matches whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    pub fn route(&self, path: &str) -> Option<&PathRoute> {
        self.routes.iter().find(|r| prefix_matches(&r.prefix, path))
    }
}

/// The service's CrowdSec mode (`off` without restrictions).
pub fn crowdsec_mode(m: &ProxyMapping) -> Result<crate::crowdsec::CrowdsecMode, RouteError> {
    let mode = m
        .access_restrictions
        .as_ref()
        .map_or("", |r| r.crowdsec_mode.as_str());
    crate::crowdsec::CrowdsecMode::parse(mode).map_err(RouteError::L4)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

fn normalize_prefix(path: &str) -> Result<String, RouteError> {
    let p = path.trim();
    if p.is_empty() {
        return Ok("/".to_string());
    }
    if !p.starts_with('/') || p.contains(['?', '#', ' ']) || p.bytes().any(|b| b < 0x21) {
        return Err(RouteError::Path {
            path: path.to_string(),
            message: "must start with / and hold no query, fragment or spaces".to_string(),
        });
    }
    Ok(p.to_string())
}

/// Checks a service domain: DNS labels, optionally a leading `*.` wildcard.
pub fn validate_domain(domain: &str) -> Result<(), &'static str> {
    let name = domain.strip_prefix("*.").unwrap_or(domain);
    if name.is_empty() || name.len() > 253 {
        return Err("must be a DNS name of 1 to 253 characters");
    }
    for label in name.split('.') {
        let ok_len = !label.is_empty() && label.len() <= 63;
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_len || !ok_chars || label.starts_with('-') || label.ends_with('-') {
            return Err("labels must be 1-63 letters, digits or hyphens (a leading *. is allowed)");
        }
    }
    Ok(())
}

/// RFC 9110 token characters, the only ones allowed in a header name.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{PathMapping, PathTargetOptions};

    fn mapping(domain: &str, paths: &[(&str, &str)]) -> ProxyMapping {
        ProxyMapping {
            id: domain.to_string(),
            domain: domain.to_string(),
            path: paths
                .iter()
                .map(|(p, t)| PathMapping {
                    path: p.to_string(),
                    target: t.to_string(),
                    options: Some(PathTargetOptions::default()),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn exact_host_beats_wildcard() {
        let (t, r) = RouteTable::build(
            &[
                mapping("*.example.com", &[("/", "http://10.0.0.1:80")]),
                mapping("a.example.com", &[("/", "http://10.0.0.2:80")]),
            ],
            &RouteTable::default(),
            &[],
        );
        assert!(r.skipped.is_empty());
        assert_eq!(t.service("a.example.com").unwrap().domain, "a.example.com");
        assert_eq!(t.service("b.example.com").unwrap().domain, "*.example.com");
        assert!(t.service("example.com").is_none());
        assert!(t.service("x.b.example.com").is_none());
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let s = Service::from_mapping(&mapping(
            "a.example",
            &[
                ("/", "http://h:1"),
                ("/api", "http://h:2"),
                ("/api/v2", "http://h:3"),
            ],
        ))
        .unwrap();
        assert_eq!(s.route("/api/v2/x").unwrap().prefix, "/api/v2");
        assert_eq!(s.route("/api/v2").unwrap().prefix, "/api/v2");
        assert_eq!(s.route("/api/v22").unwrap().prefix, "/api");
        assert_eq!(s.route("/apix").unwrap().prefix, "/");
        assert_eq!(s.route("/").unwrap().prefix, "/");
    }

    #[test]
    fn bad_mappings_are_skipped_and_reported() {
        let (t, r) = RouteTable::build(
            &[
                mapping("ok.example", &[("/", "http://h:1")]),
                mapping("bad domain", &[("/", "http://h:1")]),
                mapping("bad-target.example", &[("/", "gopher://h")]),
            ],
            &RouteTable::default(),
            &[],
        );
        assert_eq!(t.len(), 1);
        assert_eq!(r.skipped.len(), 2);
    }

    #[test]
    fn domains() {
        assert!(validate_domain("a.example.com").is_ok());
        assert!(validate_domain("*.example.com").is_ok());
        assert!(validate_domain("-a.example").is_err());
        assert!(validate_domain("a..b").is_err());
        assert!(validate_domain("").is_err());
    }
}
