//! Access restrictions by source address (`AccessRestrictions` of a mapping).

use std::net::IpAddr;

use ipnet::IpNet;
use proto::AccessRestrictions;

/// Who may connect: a source in `blocked` never may; when `allowed` is not empty, only sources
/// in it may.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    pub allowed: Vec<IpNet>,
    pub blocked: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("{0:?} is not a CIDR or IP address")]
    BadCidr(String),
    #[error(
        "country restrictions need a GeoIP database, which this proxy does not read yet; \
         refusing the service rather than serving it unrestricted"
    )]
    Countries,
}

impl AccessPolicy {
    pub fn from_restrictions(r: Option<&AccessRestrictions>) -> Result<Self, AccessError> {
        let Some(r) = r else {
            return Ok(Self::default());
        };
        if !r.allowed_countries.is_empty() || !r.blocked_countries.is_empty() {
            return Err(AccessError::Countries);
        }
        Ok(Self {
            allowed: parse_all(&r.allowed_cidrs)?,
            blocked: parse_all(&r.blocked_cidrs)?,
        })
    }

    pub fn permits(&self, source: IpAddr) -> bool {
        let source = canonical(source);
        if self.blocked.iter().any(|n| n.contains(&source)) {
            return false;
        }
        self.allowed.is_empty() || self.allowed.iter().any(|n| n.contains(&source))
    }

    pub fn is_open(&self) -> bool {
        self.allowed.is_empty() && self.blocked.is_empty()
    }
}

/// An IPv4 client on a dual-stack socket shows up as `::ffff:a.b.c.d`; rules are written in IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn parse_all(list: &[String]) -> Result<Vec<IpNet>, AccessError> {
    list.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| AccessError::BadCidr(s.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str], blocked: &[&str]) -> AccessPolicy {
        AccessPolicy::from_restrictions(Some(&AccessRestrictions {
            allowed_cidrs: allowed.iter().map(|s| s.to_string()).collect(),
            blocked_cidrs: blocked.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }))
        .unwrap()
    }

    #[test]
    fn blocked_wins_then_allowlist() {
        let p = policy(&["10.0.0.0/8"], &["10.1.2.3"]);
        assert!(p.permits("10.9.9.9".parse().unwrap()));
        assert!(!p.permits("10.1.2.3".parse().unwrap()));
        assert!(!p.permits("192.168.1.1".parse().unwrap()));
        assert!(p.permits("::ffff:10.9.9.9".parse().unwrap()));
    }

    #[test]
    fn empty_is_open_and_bad_input_is_named() {
        assert!(policy(&[], &[]).permits("1.2.3.4".parse().unwrap()));
        let bad = AccessPolicy::from_restrictions(Some(&AccessRestrictions {
            blocked_cidrs: vec!["10.0.0.0/33".into()],
            ..Default::default()
        }));
        assert_eq!(bad, Err(AccessError::BadCidr("10.0.0.0/33".into())));
        let countries = AccessPolicy::from_restrictions(Some(&AccessRestrictions {
            blocked_countries: vec!["DE".into()],
            ..Default::default()
        }));
        assert_eq!(countries, Err(AccessError::Countries));
    }
}
