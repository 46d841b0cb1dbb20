//! Access restrictions by source address and country (`AccessRestrictions` of a mapping), in
//! the order of NetBird's `restrict.Filter.Check`: the CIDR allowlist, the CIDR blocklist, then
//! the country allowlist and the country blocklist (a lookup only when CIDRs passed); the first
//! that refuses decides. CrowdSec, when a service uses it, comes after all of these. Checked for
//! the client address (trusted `X-Forwarded-For`, else a trusted PROXY header's source, else the
//! socket peer) before anything else of a request, on every HTTP request, L4 connection and new
//! UDP session. The XDP fast path enforces the CIDR part for L4 ports in the kernel; countries
//! are always checked here, in user space.

use std::net::IpAddr;

use ipnet::IpNet;
use proto::AccessRestrictions;

/// Who may connect: a source in `blocked` never may; when `allowed` is not empty, only sources
/// in it may. Countries likewise; a source whose country is unknown passes only when no country
/// allowlist is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    pub allowed: Vec<IpNet>,
    pub blocked: Vec<IpNet>,
    pub allowed_countries: Vec<[u8; 2]>,
    pub blocked_countries: Vec<[u8; 2]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("{0:?} is not a CIDR or IP address")]
    BadCidr(String),
    #[error(
        "country restrictions need a GeoLite2 Country or City database (*.mmdb) in \
         NB_PROXY_GEO_DATA_DIR ({dir}), and none is loaded; refusing the service rather than \
         serving it unrestricted (put the file there and restart the proxy)"
    )]
    Countries { dir: String },
    #[error("{0:?} is not an ISO 3166-1 alpha-2 country code")]
    BadCountry(String),
}

impl AccessPolicy {
    pub fn from_restrictions(r: Option<&AccessRestrictions>) -> Result<Self, AccessError> {
        let Some(r) = r else {
            return Ok(Self::default());
        };
        Self::build(r, crate::geo::database().is_some())
    }

    fn build(r: &AccessRestrictions, have_geo: bool) -> Result<Self, AccessError> {
        let allowed_countries = parse_countries(&r.allowed_countries)?;
        let blocked_countries = parse_countries(&r.blocked_countries)?;
        let wants_countries = !allowed_countries.is_empty() || !blocked_countries.is_empty();
        if wants_countries && !have_geo {
            let dir = crate::geo::data_dir()
                .map_or_else(|| "not searched".to_string(), |d| d.display().to_string());
            return Err(AccessError::Countries { dir });
        }
        Ok(Self {
            allowed: parse_all(&r.allowed_cidrs)?,
            blocked: parse_all(&r.blocked_cidrs)?,
            allowed_countries,
            blocked_countries,
        })
    }

    pub fn permits(&self, source: IpAddr) -> bool {
        self.permits_with(source, |ip| {
            crate::geo::database().and_then(|g| g.country(ip))
        })
    }

    fn permits_with(&self, source: IpAddr, country_of: impl Fn(IpAddr) -> Option<[u8; 2]>) -> bool {
        let source = canonical(source);
        if !self.allowed.is_empty() && !self.allowed.iter().any(|n| n.contains(&source)) {
            return false;
        }
        if self.blocked.iter().any(|n| n.contains(&source)) {
            return false;
        }
        if self.allowed_countries.is_empty() && self.blocked_countries.is_empty() {
            return true;
        }
        match country_of(source) {
            None => self.allowed_countries.is_empty(),
            Some(c) => {
                (self.allowed_countries.is_empty() || self.allowed_countries.contains(&c))
                    && !self.blocked_countries.contains(&c)
            }
        }
    }

    pub fn is_open(&self) -> bool {
        self.allowed.is_empty()
            && self.blocked.is_empty()
            && self.allowed_countries.is_empty()
            && self.blocked_countries.is_empty()
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

fn parse_countries(list: &[String]) -> Result<Vec<[u8; 2]>, AccessError> {
    list.iter()
        .map(|c| {
            let b = c.trim().as_bytes();
            if b.len() == 2 && b.iter().all(u8::is_ascii_alphabetic) {
                Ok([b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()])
            } else {
                Err(AccessError::BadCountry(c.clone()))
            }
        })
        .collect()
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
        assert!(matches!(countries, Err(AccessError::Countries { .. })));
        assert!(
            countries
                .unwrap_err()
                .to_string()
                .contains("NB_PROXY_GEO_DATA_DIR")
        );
    }

    #[test]
    fn countries_after_cidrs() {
        let geo = crate::geo::Geo::open(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/geo-test.mmdb"
        )))
        .unwrap();
        let lookup = |ip| geo.country(ip);
        let r = AccessRestrictions {
            blocked_countries: vec!["de".into()],
            ..Default::default()
        };
        let p = AccessPolicy::build(&r, true).unwrap();
        assert!(!p.is_open());
        assert!(!p.permits_with("203.0.113.1".parse().unwrap(), lookup));
        assert!(p.permits_with("198.51.100.1".parse().unwrap(), lookup));
        assert!(p.permits_with("10.0.0.1".parse().unwrap(), lookup));
        let r = AccessRestrictions {
            allowed_countries: vec!["US".into(), "FR".into()],
            allowed_cidrs: vec!["0.0.0.0/0".into(), "::/0".into()],
            blocked_cidrs: vec!["198.51.100.7".into()],
            ..Default::default()
        };
        let p = AccessPolicy::build(&r, true).unwrap();
        assert!(p.permits_with("198.51.100.1".parse().unwrap(), lookup));
        assert!(p.permits_with("2001:db8::5".parse().unwrap(), lookup));
        assert!(!p.permits_with("198.51.100.7".parse().unwrap(), lookup));
        assert!(!p.permits_with("203.0.113.1".parse().unwrap(), lookup));
        // Unknown country with an allowlist: refused.
        assert!(!p.permits_with("10.0.0.1".parse().unwrap(), lookup));
        assert!(!p.permits_with("198.18.1.1".parse().unwrap(), lookup));
        // An IPv4 client on a dual-stack socket is looked up as IPv4.
        assert!(p.permits_with("::ffff:198.51.100.1".parse().unwrap(), lookup));
        assert!(!p.permits_with("::ffff:203.0.113.1".parse().unwrap(), lookup));
        // Both lists: the allowlist admits, the blocklist still refuses.
        let r = AccessRestrictions {
            allowed_countries: vec!["US".into(), "JP".into()],
            blocked_countries: vec!["JP".into()],
            ..Default::default()
        };
        let p = AccessPolicy::build(&r, true).unwrap();
        assert!(p.permits_with("198.51.100.1".parse().unwrap(), lookup));
        assert!(!p.permits_with("198.18.0.1".parse().unwrap(), lookup));
        assert!(!p.permits_with("203.0.113.1".parse().unwrap(), lookup));
        // Country rules never let in what the CIDR rules refuse.
        let r = AccessRestrictions {
            allowed_countries: vec!["US".into()],
            blocked_cidrs: vec!["198.51.100.0/25".into()],
            ..Default::default()
        };
        let p = AccessPolicy::build(&r, true).unwrap();
        assert!(!p.permits_with("198.51.100.1".parse().unwrap(), lookup));
        assert!(p.permits_with("198.51.100.200".parse().unwrap(), lookup));
        assert!(matches!(
            AccessPolicy::build(
                &AccessRestrictions {
                    blocked_countries: vec!["Germany".into()],
                    ..Default::default()
                },
                true
            ),
            Err(AccessError::BadCountry(_))
        ));
    }
}
