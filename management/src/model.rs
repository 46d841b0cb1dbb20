//! The service as users write it (NetBird's `ServiceRequest` shape), its validation, and its
//! translation into the `ProxyMapping` that proxies receive.

pub mod auth;

use std::collections::BTreeMap;
use std::time::Duration;

use proto::{
    PathMapping, PathRewriteMode, PathTargetOptions, ProxyMapping, ProxyMappingUpdateType,
};
use serde::{Deserialize, Serialize};

use crate::store::ServiceRecord;

/// The request body of POST/PUT `/api/reverse-proxies/services`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRequest {
    pub name: String,
    /// Full domain. Alternatively `subdomain` + `base_domain`.
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub subdomain: Option<String>,
    #[serde(default)]
    pub base_domain: Option<String>,
    /// For a custom domain outside every cluster address: the cluster that serves it.
    #[serde(default)]
    pub proxy_cluster: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub listen_port: Option<i64>,
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub pass_host_header: bool,
    #[serde(default)]
    pub rewrite_redirects: bool,
    #[serde(default)]
    pub auth: Option<auth::AuthRequest>,
    #[serde(default)]
    pub access_restrictions: Option<auth::Restrictions>,
    /// NetBird-only: served only to mesh peers in `access_groups` (checked by
    /// `ValidateTunnelPeer`); everyone else gets 403.
    #[serde(default)]
    pub private: bool,
    #[serde(default)]
    pub access_groups: Vec<String>,
}

fn yes() -> bool {
    true
}

/// What is stored in `services.spec` and returned to users.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ServiceSpec {
    pub mode: String,
    pub listen_port: i64,
    pub targets: Vec<TargetSpec>,
    pub pass_host_header: bool,
    pub rewrite_redirects: bool,
    /// Which sign-in methods protect the service (the secrets live in `service_auth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<auth::AuthSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_restrictions: Option<auth::Restrictions>,
    #[serde(default)]
    pub private: bool,
    /// The groups whose peers may use a private service (ids).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_groups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    #[serde(default)]
    pub target_id: String,
    pub target_type: String,
    pub protocol: String,
    #[serde(default)]
    pub host: Option<String>,
    pub port: i64,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub options: TargetOptions,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TargetOptions {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_tls_verify: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_rewrite: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct_upstream: bool,
    /// L4: send a PROXY protocol v2 header to the target.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// UDP: reap a client's session after this long without traffic (`30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_idle_timeout: Option<String>,
}

/// A validation failure, reported as 422 with this text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(msg: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(msg.into()))
}

/// Headers the proxy manages itself; a service may not set them.
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-type",
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-real-ip",
    "host",
];

/// A validated request: the domain to serve and the spec to store.
#[derive(Debug)]
pub struct ValidService {
    pub name: String,
    pub domain: String,
    /// The cluster the caller asked for (custom domains), if any.
    pub requested_cluster: Option<String>,
    pub spec: ServiceSpec,
    pub enabled: bool,
    /// The methods and the secrets given (hashed by the caller before storing).
    pub auth: Option<auth::AuthInput>,
}

impl ServiceRequest {
    pub fn validate(self) -> Result<ValidService, Invalid> {
        let name = self.name.trim().to_string();
        if name.is_empty() || name.len() > 255 {
            return invalid("name is required and must be at most 255 characters");
        }
        let domain = match (&self.domain, &self.subdomain, &self.base_domain) {
            (Some(d), None, None) => d.clone(),
            (None, Some(sub), Some(base)) => format!("{sub}.{base}"),
            (None, None, Some(base)) => base.clone(),
            (None, None, None) => {
                return invalid("domain is required (or subdomain and base_domain)");
            }
            _ => return invalid("give either domain, or subdomain with base_domain, not both"),
        };
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if !is_valid_domain(&domain) {
            return invalid(format!("domain {domain:?} is not a valid DNS name"));
        }
        let requested_cluster = match (&self.base_domain, &self.proxy_cluster) {
            (Some(b), _) => Some(b.trim().trim_end_matches('.').to_ascii_lowercase()),
            (None, Some(c)) => Some(c.trim().trim_end_matches('.').to_ascii_lowercase()),
            (None, None) => None,
        };
        // Refuse rather than ignore: a service published without the protection its owner asked
        // for would be worse than an error.
        let auth = match self.auth.clone() {
            Some(a) => Some(a.validate()?).filter(auth::AuthInput::any),
            None => None,
        };
        let access_restrictions = match self.access_restrictions.clone() {
            Some(r) => Some(r.validate()?).filter(|r| !r.is_empty()),
            None => None,
        };
        let mode = self.mode.unwrap_or_default();
        let mode = if mode.is_empty() {
            "http".to_string()
        } else {
            mode
        };
        let l4 = match mode.as_str() {
            "http" => false,
            "tcp" | "udp" | "tls" => true,
            _ => return invalid(format!("mode {mode:?} must be http, tcp, udp or tls")),
        };
        let access_groups = validate_private(self.private, &self.access_groups, l4, &auth)?;
        let listen_port = self.listen_port.unwrap_or(0);
        if !l4 && listen_port != 0 {
            return invalid("listen_port must be 0 for http services");
        }
        if l4 && !(1..=65535).contains(&listen_port) {
            return invalid(format!(
                "listen_port is required for {mode} services and must be 1-65535"
            ));
        }
        if self.targets.is_empty() {
            return invalid("at least one target is required");
        }
        if l4 && self.targets.iter().filter(|t| t.enabled).count() != 1 {
            return invalid(format!("a {mode} service has exactly one enabled target"));
        }
        let mut paths = std::collections::HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            validate_target(i, t, &mode)?;
            if t.enabled && !paths.insert(t.path.clone().unwrap_or_else(|| "/".into())) {
                return invalid(format!(
                    "targets[{i}]: path {:?} is used by another target of this service",
                    t.path.as_deref().unwrap_or("/")
                ));
            }
        }
        Ok(ValidService {
            name,
            domain,
            requested_cluster,
            spec: ServiceSpec {
                mode,
                listen_port,
                targets: self.targets,
                pass_host_header: self.pass_host_header,
                rewrite_redirects: self.rewrite_redirects,
                auth: auth.as_ref().map(auth::AuthSummary::of),
                access_restrictions,
                private: self.private,
                access_groups,
            },
            enabled: self.enabled,
            auth,
        })
    }
}

/// A private service lets mesh peers in by group and nobody else: it needs groups, is HTTP
/// (like NetBird's), and takes no sign-in method, which would never be offered.
fn validate_private(
    private: bool,
    groups: &[String],
    l4: bool,
    auth: &Option<auth::AuthInput>,
) -> Result<Vec<String>, Invalid> {
    let mut groups: Vec<String> = groups.iter().map(|g| g.trim().to_string()).collect();
    groups.sort_unstable();
    groups.dedup();
    if !private {
        if !groups.is_empty() {
            return invalid("access_groups apply only to private services (set private: true)");
        }
        return Ok(groups);
    }
    if l4 {
        return invalid("private services are http services (mode http)");
    }
    if groups.is_empty() || groups.iter().any(String::is_empty) {
        return invalid("a private service needs access_groups: the groups whose peers may use it");
    }
    if auth.is_some() {
        return invalid(
            "a private service takes no password, PIN, header or single sign-on: mesh peers \
             are let in by access_groups",
        );
    }
    Ok(groups)
}

fn validate_target(i: usize, t: &TargetSpec, mode: &str) -> Result<(), Invalid> {
    if !matches!(
        t.target_type.as_str(),
        "peer" | "host" | "domain" | "subnet" | "cluster"
    ) {
        return invalid(format!(
            "targets[{i}]: target_type must be peer, host, domain, subnet or cluster"
        ));
    }
    let protocol_fits = match mode {
        "tcp" | "tls" => t.protocol == "tcp",
        "udp" => t.protocol == "udp",
        _ => matches!(t.protocol.as_str(), "http" | "https"),
    };
    if !protocol_fits {
        let wanted = match mode {
            "tcp" | "tls" => "tcp",
            "udp" => "udp",
            _ => "http or https",
        };
        return invalid(format!(
            "targets[{i}]: protocol must be {wanted} for a {mode} service"
        ));
    }
    if mode != "udp" && t.options.session_idle_timeout.is_some() {
        return invalid(format!(
            "targets[{i}]: session_idle_timeout is only for udp services"
        ));
    }
    if mode == "http" && t.options.proxy_protocol {
        return invalid(format!(
            "targets[{i}]: proxy_protocol is only for tcp, udp and tls services"
        ));
    }
    if let Some(idle) = &t.options.session_idle_timeout {
        parse_go_duration(idle).ok_or_else(|| {
            Invalid(format!(
                "targets[{i}]: session_idle_timeout {idle:?} is not a duration like 30s"
            ))
        })?;
    }
    if !(1..=65535).contains(&t.port) {
        return invalid(format!(
            "targets[{i}]: port {} is out of range 1-65535",
            t.port
        ));
    }
    let host = t.host.as_deref().unwrap_or("").trim();
    // With a target_id naming a peer or resource, the host comes from it (checked against the
    // store by `Store::resolve_targets`).
    let resolvable = !t.target_id.trim().is_empty() && t.target_type != "cluster";
    if host.is_empty() && !resolvable {
        return invalid(format!(
            "targets[{i}]: host is required (the peer or resource address)"
        ));
    }
    if !host.is_empty()
        && (host.contains(['/', ' ', '?', '#', '@'])
            || host.parse::<std::net::IpAddr>().is_err() && !is_valid_domain(host))
    {
        return invalid(format!(
            "targets[{i}]: host {host:?} is not an IP address or DNS name"
        ));
    }
    if let Some(p) = &t.path
        && (!p.starts_with('/') || p.contains(['?', '#', ' ']))
    {
        return invalid(format!(
            "targets[{i}]: path {p:?} must start with / and hold no query"
        ));
    }
    if let Some(rt) = &t.options.request_timeout {
        parse_go_duration(rt).ok_or_else(|| {
            Invalid(format!(
                "targets[{i}]: request_timeout {rt:?} is not a duration like 30s"
            ))
        })?;
    }
    if let Some(pr) = &t.options.path_rewrite
        && pr != "preserve"
        && !pr.is_empty()
    {
        return invalid(format!(
            "targets[{i}]: path_rewrite may only be \"preserve\""
        ));
    }
    if t.options.custom_headers.len() > 16 {
        return invalid(format!("targets[{i}]: at most 16 custom headers"));
    }
    for (k, v) in &t.options.custom_headers {
        let token = !k.is_empty()
            && k.len() <= 128
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token || v.len() > 4096 || v.contains(['\r', '\n', '\0']) {
            return invalid(format!(
                "targets[{i}]: custom header {k:?} is not a valid header"
            ));
        }
        if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
            return invalid(format!(
                "targets[{i}]: custom header {k:?} is managed by the proxy and cannot be set"
            ));
        }
    }
    Ok(())
}

/// `30s`, `1m30s`, `500ms`: the Go duration strings NetBird uses.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += Duration::try_from_secs_f64(value * unit).ok()?;
    }
    Some(total)
}

/// Names and emails end up in HTTP headers (`X-NetBird-User`) and logs: no control characters.
pub fn has_control_chars(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// DNS name check shared with proxy registration: true for a valid name (a leading `*.` is
/// allowed).
pub fn is_valid_domain(domain: &str) -> bool {
    let name = domain.strip_prefix("*.").unwrap_or(domain);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    true
}

/// The cluster that serves `domain`: the longest cluster address it equals or ends with, else
/// the one asked for explicitly (a custom domain). `clusters` are those the account can reach.
pub fn derive_cluster(
    domain: &str,
    requested: Option<&str>,
    clusters: &[String],
) -> Result<String, String> {
    if clusters.is_empty() {
        return Err("no proxy clusters available: connect a proxy first".to_string());
    }
    let by_suffix = clusters
        .iter()
        .filter(|c| domain == c.as_str() || domain.ends_with(&format!(".{c}")))
        .max_by_key(|c| c.len());
    match (by_suffix, requested) {
        (Some(c), Some(r)) if c != r => Err(format!(
            "domain {domain} belongs to cluster {c}, not to the requested {r}"
        )),
        (Some(c), _) => Ok(c.clone()),
        (None, Some(r)) if clusters.iter().any(|c| c == r) => Ok(r.to_string()),
        (None, Some(r)) => Err(format!("cluster {r} is not available to this account")),
        (None, None) => Err(format!(
            "domain {domain} does not match any available proxy cluster"
        )),
    }
}

/// `tcp` or `udp` for an L4 mode; None for http.
pub fn transport_of(mode: &str) -> Option<&'static str> {
    match mode {
        "tcp" | "tls" => Some("tcp"),
        "udp" => Some("udp"),
        _ => None,
    }
}

pub fn spec_of(record: &ServiceRecord) -> Result<ServiceSpec, String> {
    serde_json::from_str(&record.spec).map_err(|e| format!("stored spec is not valid: {e}"))
}

/// The mapping a proxy receives for a stored service, with hosts as written.
pub fn to_mapping(record: &ServiceRecord) -> Result<ProxyMapping, String> {
    to_mapping_with(record, &[])
}

/// The mapping a proxy receives for a stored service; `hosts[i]`, when `Some`, replaces the
/// host of target `i` (a peer's tunnel IP or a resource's address, from
/// `Store::resolve_targets`).
pub fn to_mapping_with(
    record: &ServiceRecord,
    hosts: &[Option<String>],
) -> Result<ProxyMapping, String> {
    let spec = spec_of(record)?;
    let mut path = Vec::new();
    for (i, t) in spec.targets.iter().enumerate().filter(|(_, t)| t.enabled) {
        let host = match hosts.get(i) {
            Some(Some(h)) => h.as_str(),
            _ => t
                .host
                .as_deref()
                .filter(|h| !h.is_empty())
                .unwrap_or("unknown"),
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let default_port =
            (t.protocol == "http" && t.port == 80) || (t.protocol == "https" && t.port == 443);
        let target = if matches!(t.protocol.as_str(), "tcp" | "udp") {
            format!("{host}:{}", t.port)
        } else if default_port {
            format!("{}://{host}/", t.protocol)
        } else {
            format!("{}://{host}:{}/", t.protocol, t.port)
        };
        let o = &t.options;
        let options = PathTargetOptions {
            skip_tls_verify: o.skip_tls_verify,
            request_timeout: o
                .request_timeout
                .as_deref()
                .and_then(parse_go_duration)
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
            path_rewrite: if o.path_rewrite.as_deref() == Some("preserve") {
                PathRewriteMode::PathRewritePreserve as i32
            } else {
                PathRewriteMode::PathRewriteDefault as i32
            },
            custom_headers: o.custom_headers.clone().into_iter().collect(),
            direct_upstream: o.direct_upstream,
            proxy_protocol: o.proxy_protocol,
            session_idle_timeout: o
                .session_idle_timeout
                .as_deref()
                .and_then(parse_go_duration)
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        };
        path.push(PathMapping {
            path: t.path.clone().unwrap_or_else(|| "/".to_string()),
            target,
            options: Some(options),
        });
    }
    Ok(ProxyMapping {
        r#type: ProxyMappingUpdateType::UpdateTypeCreated as i32,
        id: record.id.clone(),
        account_id: record.account_id.clone(),
        domain: record.domain.clone(),
        path,
        pass_host_header: spec.pass_host_header,
        rewrite_redirects: spec.rewrite_redirects,
        mode: spec.mode,
        listen_port: i32::try_from(spec.listen_port).unwrap_or(0),
        access_restrictions: spec
            .access_restrictions
            .as_ref()
            .map(auth::Restrictions::to_proto),
        private: spec.private,
        ..Default::default()
    })
}

/// A REMOVED mapping: only what identifies the service.
pub fn removed_mapping(record: &ServiceRecord) -> ProxyMapping {
    ProxyMapping {
        r#type: ProxyMappingUpdateType::UpdateTypeRemoved as i32,
        id: record.id.clone(),
        account_id: record.account_id.clone(),
        domain: record.domain.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_of(spec: &ServiceSpec) -> ServiceRecord {
        ServiceRecord {
            id: "id".into(),
            account_id: "acc".into(),
            name: "n".into(),
            domain: "s.a.example".into(),
            cluster_address: "a.example".into(),
            spec: serde_json::to_string(spec).unwrap(),
            enabled: true,
            status: crate::store::ServiceStatus::Pending,
            status_message: None,
            certificate_issued: false,
            created_at: 0,
            updated_at: 0,
            inbound_listener: None,
        }
    }

    fn request(json: serde_json::Value) -> Result<ValidService, Invalid> {
        serde_json::from_value::<ServiceRequest>(json)
            .unwrap()
            .validate()
    }

    #[test]
    fn a_peer_target_needs_no_host_but_a_plain_one_does() {
        let body = |target: serde_json::Value| serde_json::json!({"name": "s", "domain": "s.example", "targets": [target]});
        let peer = request(body(serde_json::json!({
            "target_id": "p1", "target_type": "peer", "protocol": "http", "port": 8080
        })));
        assert!(peer.is_ok(), "{:?}", peer.err());
        let bare = request(body(serde_json::json!({
            "target_type": "host", "protocol": "http", "port": 8080
        })));
        assert!(bare.is_err_and(|e| e.0.contains("host is required")));
        let bad = request(body(serde_json::json!({
            "target_id": "p1", "target_type": "peer", "protocol": "http", "port": 8080,
            "host": "a b"
        })));
        assert!(bad.is_err_and(|e| e.0.contains("not an IP address")));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("soon"), None);
    }

    #[test]
    fn clusters_from_domain_suffix() {
        let cl = vec!["proxy.a.example".to_string(), "a.example".to_string()];
        assert_eq!(
            derive_cluster("app.proxy.a.example", None, &cl).unwrap(),
            "proxy.a.example"
        );
        assert_eq!(
            derive_cluster("x.a.example", None, &cl).unwrap(),
            "a.example"
        );
        assert!(derive_cluster("x.other", None, &cl).is_err());
        assert_eq!(
            derive_cluster("x.other", Some("a.example"), &cl).unwrap(),
            "a.example"
        );
        assert!(derive_cluster("x.other", Some("b.example"), &cl).is_err());
    }

    #[test]
    fn validation_errors_are_specific() {
        let base = serde_json::json!({"name": "s", "domain": "s.a.example",
            "targets": [{"target_type": "host", "protocol": "http", "host": "10.0.0.1", "port": 80}]});
        assert!(request(base.clone()).is_ok());
        let mut bad = base.clone();
        bad["targets"][0]["port"] = 70000.into();
        assert!(request(bad).unwrap_err().0.contains("out of range"));
        let mut bad = base.clone();
        bad["domain"] = "not a domain".into();
        assert!(request(bad).unwrap_err().0.contains("not a valid DNS name"));
        let mut dup = base.clone();
        dup["targets"] = serde_json::json!([
            {"target_type": "host", "protocol": "http", "host": "10.0.0.1", "port": 80, "path": "/a"},
            {"target_type": "host", "protocol": "http", "host": "10.0.0.2", "port": 80, "path": "/a"}]);
        assert!(
            request(dup)
                .unwrap_err()
                .0
                .contains("used by another target")
        );
        let mut hdr = base.clone();
        hdr["targets"][0]["options"] = serde_json::json!({"custom_headers": {"Host": "x"}});
        assert!(request(hdr).unwrap_err().0.contains("managed by the proxy"));
        let mut auth = base.clone();
        auth["auth"] = serde_json::json!({"link_auth": {"enabled": true}});
        assert!(request(auth).unwrap_err().0.contains("not supported"));
        let mut sso = base.clone();
        sso["auth"] = serde_json::json!({"bearer_auth": {"enabled": true}});
        let sso = request(sso).expect("single sign-on for anyone who signs in");
        assert_eq!(sso.auth.and_then(|a| a.sso_groups), Some(vec![]));
        let mut pw = base.clone();
        pw["auth"] = serde_json::json!({"password_auth": {"enabled": true, "password": "x"}});
        assert!(request(pw).unwrap_err().0.contains("8 to 256"));
        let mut off = base;
        off["auth"] = serde_json::json!({"password_auth": {"enabled": false}, "header_auths": []});
        assert!(request(off).is_ok(), "disabled methods are fine");
    }

    #[test]
    fn private_services_need_groups_and_no_sign_in() {
        let base = serde_json::json!({"name": "s", "domain": "s.a.example", "private": true,
            "access_groups": ["g2", "g1", "g1"],
            "targets": [{"target_type": "host", "protocol": "http", "host": "10.0.0.1", "port": 80}]});
        let ok = request(base.clone()).unwrap();
        assert_eq!(ok.spec.access_groups, ["g1", "g2"]);
        assert!(to_mapping(&record_of(&ok.spec)).unwrap().private);
        let mut none = base.clone();
        none["access_groups"] = serde_json::json!([]);
        assert!(request(none).unwrap_err().0.contains("needs access_groups"));
        let mut pw = base.clone();
        pw["auth"] =
            serde_json::json!({"password_auth": {"enabled": true, "password": "long enough"}});
        assert!(request(pw).unwrap_err().0.contains("no password"));
        let mut tcp = base.clone();
        tcp["mode"] = "tcp".into();
        tcp["listen_port"] = 9000.into();
        assert!(request(tcp).unwrap_err().0.contains("http services"));
        let mut public = base;
        public["private"] = false.into();
        assert!(request(public).unwrap_err().0.contains("only to private"));
    }

    #[test]
    fn mapping_targets_drop_default_ports() {
        let spec = ServiceSpec {
            mode: "http".into(),
            listen_port: 0,
            targets: vec![TargetSpec {
                target_id: "t".into(),
                target_type: "host".into(),
                protocol: "http".into(),
                host: Some("10.0.0.1".into()),
                port: 80,
                path: Some("/api".into()),
                enabled: true,
                options: TargetOptions {
                    request_timeout: Some("5s".into()),
                    path_rewrite: Some("preserve".into()),
                    ..Default::default()
                },
            }],
            pass_host_header: true,
            rewrite_redirects: false,
            auth: None,
            access_restrictions: None,
            private: false,
            access_groups: Vec::new(),
        };
        let m = to_mapping(&record_of(&spec)).unwrap();
        assert_eq!(m.path[0].target, "http://10.0.0.1/");
        assert_eq!(m.path[0].path, "/api");
        let o = m.path[0].options.as_ref().unwrap();
        assert_eq!(o.path_rewrite, PathRewriteMode::PathRewritePreserve as i32);
        assert_eq!(o.request_timeout.unwrap().seconds, 5);
        assert!(m.pass_host_header);
    }
}
