//! A target URL (`http://100.64.0.7:8080/base`), parsed once when the table is built.

use std::net::{IpAddr, SocketAddr};

use rustls_pki_types::ServerName;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("not a URL: {0}")]
    Syntax(String),
    #[error("scheme must be http or https")]
    Scheme,
    #[error("a host is required")]
    NoHost,
    #[error("query strings and fragments are not allowed in a target")]
    Query,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetScheme {
    Http,
    Https,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub scheme: TargetScheme,
    /// Host as written, without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// Set when the host is an IP literal, so no resolution is needed.
    pub ip: Option<IpAddr>,
    /// `host[:port]` as a Host header value (port left out when it is the scheme's default).
    pub authority: String,
    /// Path of the target URL without trailing slash (`""` for none); prepended to requests.
    pub base_path: String,
    /// The origins the target may use in `Location` headers, for redirect rewriting.
    pub origins: Vec<String>,
    /// Name sent in SNI and verified for https targets.
    pub server_name: ServerName<'static>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let uri: http::Uri = url
            .trim()
            .parse()
            .map_err(|e: http::uri::InvalidUri| TargetError::Syntax(e.to_string()))?;
        let scheme = match uri.scheme_str() {
            Some("http") => TargetScheme::Http,
            Some("https") => TargetScheme::Https,
            _ => return Err(TargetError::Scheme),
        };
        if uri.query().is_some() || url.contains('#') {
            return Err(TargetError::Query);
        }
        let raw_host = uri.host().ok_or(TargetError::NoHost)?;
        let host = raw_host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(TargetError::NoHost);
        }
        let default_port = match scheme {
            TargetScheme::Http => 80,
            TargetScheme::Https => 443,
        };
        let port = uri.port_u16().unwrap_or(default_port);
        let ip = host.parse::<IpAddr>().ok();
        let host_for_url = match ip {
            Some(IpAddr::V6(_)) => format!("[{host}]"),
            _ => host.clone(),
        };
        let authority = if port == default_port {
            host_for_url.clone()
        } else {
            format!("{host_for_url}:{port}")
        };
        let scheme_str = match scheme {
            TargetScheme::Http => "http",
            TargetScheme::Https => "https",
        };
        let mut origins = vec![format!("{scheme_str}://{authority}")];
        if port == default_port {
            origins.push(format!("{scheme_str}://{host_for_url}:{port}"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        let server_name = match ip {
            Some(ip) => ServerName::IpAddress(ip.into()),
            None => ServerName::try_from(host.clone()).map_err(|_| TargetError::NoHost)?,
        };
        Ok(Target {
            scheme,
            host,
            port,
            ip,
            authority,
            base_path,
            origins,
            server_name,
        })
    }

    /// The socket address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.ip.map(|ip| SocketAddr::new(ip, self.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_with_port_and_base() {
        let t = Target::parse("http://100.64.0.7:8080/base/").unwrap();
        assert_eq!(t.scheme, TargetScheme::Http);
        assert_eq!(t.port, 8080);
        assert_eq!(t.authority, "100.64.0.7:8080");
        assert_eq!(t.base_path, "/base");
        assert_eq!(t.socket_addr().unwrap(), "100.64.0.7:8080".parse().unwrap());
    }

    #[test]
    fn https_default_port_and_name() {
        let t = Target::parse("https://app.internal").unwrap();
        assert_eq!(t.port, 443);
        assert_eq!(t.authority, "app.internal");
        assert!(t.ip.is_none());
        assert_eq!(
            t.origins,
            vec!["https://app.internal", "https://app.internal:443"]
        );
    }

    #[test]
    fn ipv6() {
        let t = Target::parse("http://[::1]:81").unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.authority, "[::1]:81");
    }

    #[test]
    fn rejects() {
        assert!(matches!(Target::parse("ftp://h"), Err(TargetError::Scheme)));
        assert!(Target::parse("http://h/?q").is_err());
        assert!(Target::parse("h:80").is_err());
        assert!(Target::parse("").is_err());
    }
}
