//! A CrowdSec bouncer: follows a CrowdSec Local API's decision stream (no call per request) and
//! keeps the banned addresses and ranges in memory, which workers read without a lock. Services
//! choose per `crowdsec_mode`: `enforce` refuses a banned client (403, or a closed L4
//! connection), `observe` only records the verdict in the access log. `captcha` decisions are
//! treated as bans: a proxy has no captcha page to send.

mod stream;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;

pub use stream::run;

/// Decisions kept at most; more are refused (and counted) until some are deleted.
pub const MAX_DECISIONS: usize = 200_000;

/// `access_restrictions.crowdsec_mode` of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CrowdsecMode {
    #[default]
    Off,
    Enforce,
    Observe,
}

impl CrowdsecMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "off" => Ok(Self::Off),
            "enforce" => Ok(Self::Enforce),
            "observe" => Ok(Self::Observe),
            other => Err(format!(
                "crowdsec_mode {other:?} must be off, enforce or observe"
            )),
        }
    }
}

/// Where the Local API is and how often to ask it for changes.
#[derive(Debug, Clone)]
pub struct CrowdsecSettings {
    pub url: String,
    pub api_key: String,
    pub interval: Duration,
}

#[derive(Debug, Clone)]
struct Decision {
    id: i64,
    verdict: String,
    expires: Option<Instant>,
}

/// The decisions in force: exact addresses and ranges.
#[derive(Debug, Clone, Default)]
pub struct DecisionSet {
    ips: HashMap<IpAddr, Decision>,
    ranges: Vec<(IpNet, Decision)>,
}

impl DecisionSet {
    pub fn len(&self) -> usize {
        self.ips.len() + self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The addresses and ranges of the decisions in force at `now`, IPv4 and IPv6 apart, each
    /// in a stable order (so a kernel map gets the same subset every time it is cut short).
    pub fn blocked_nets(&self, now: Instant) -> (Vec<IpNet>, Vec<IpNet>) {
        let live = |d: &Decision| d.expires.is_none_or(|e| e > now);
        let mut nets: Vec<IpNet> = self
            .ips
            .iter()
            .filter(|(_, d)| live(d))
            .map(|(ip, _)| IpNet::from(*ip))
            .chain(
                self.ranges
                    .iter()
                    .filter(|(_, d)| live(d))
                    .map(|(n, _)| n.trunc()),
            )
            .collect();
        nets.sort_unstable();
        nets.dedup();
        nets.into_iter().partition(|n| n.addr().is_ipv4())
    }

    fn verdict(&self, ip: IpAddr, now: Instant) -> Option<&str> {
        let live = |d: &&Decision| d.expires.is_none_or(|e| e > now);
        if let Some(d) = self.ips.get(&ip).filter(live) {
            return Some(&d.verdict);
        }
        self.ranges
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .map(|(_, d)| d)
            .find(live)
            .map(|d| d.verdict.as_str())
    }

    /// Adds a decision; false when the set is full.
    fn add(&mut self, target: Target, d: Decision) -> bool {
        let exists = match &target {
            Target::Ip(ip) => self.ips.contains_key(ip),
            Target::Range(net) => self.ranges.iter().any(|(n, _)| n == net),
        };
        if !exists && self.len() >= MAX_DECISIONS {
            return false;
        }
        match target {
            Target::Ip(ip) => {
                self.ips.insert(ip, d);
            }
            Target::Range(net) => {
                self.ranges.retain(|(n, _)| *n != net);
                self.ranges.push((net, d));
            }
        }
        true
    }

    fn remove(&mut self, target: Target, id: i64) {
        match target {
            Target::Ip(ip) => {
                if self.ips.get(&ip).is_some_and(|d| d.id == id || id == 0) {
                    self.ips.remove(&ip);
                }
            }
            Target::Range(net) => self
                .ranges
                .retain(|(n, d)| !(*n == net && (d.id == id || id == 0))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Ip(IpAddr),
    Range(IpNet),
}

/// The bouncer's state shared with the workers.
pub struct Bouncer {
    pub settings: CrowdsecSettings,
    decisions: ArcSwap<DecisionSet>,
    status: Mutex<BouncerStatus>,
    /// Woken on every new decision set, for the kernel fast path's deny maps.
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default, Clone)]
struct BouncerStatus {
    connected: bool,
    last_error: Option<String>,
    refused_full: u64,
}

impl Bouncer {
    pub fn new(settings: CrowdsecSettings) -> Self {
        Self {
            settings,
            decisions: ArcSwap::from_pointee(DecisionSet::default()),
            status: Mutex::new(BouncerStatus::default()),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The banned addresses and ranges now (IPv4, IPv6).
    pub fn blocked_nets(&self) -> (Vec<IpNet>, Vec<IpNet>) {
        self.decisions.load().blocked_nets(Instant::now())
    }

    /// Resolves once a decision set newer than the last call's has been published.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The verdict on `ip` (`"ban:<scenario>"`), when a decision covers it.
    pub fn verdict(&self, ip: IpAddr) -> Option<String> {
        let ip = crate::routes::access::canonical(ip);
        self.decisions
            .load()
            .verdict(ip, Instant::now())
            .map(str::to_string)
    }

    fn publish(&self, set: DecisionSet) {
        self.decisions.store(std::sync::Arc::new(set));
        self.changed.notify_one();
    }

    fn set_status(&self, f: impl FnOnce(&mut BouncerStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn health(&self) -> serde_json::Value {
        let s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        serde_json::json!({
            "connected": s.connected,
            "decisions": self.decisions.load().len(),
            "refused_full": s.refused_full,
            "last_error": s.last_error,
        })
    }
}

/// What CrowdSec says about `ip` for a service in `mode`: `(verdict, refuse)`. A service asking
/// for CrowdSec on a proxy without a bouncer is served (NetBird sends such services only to
/// proxies that claim the capability), with one warning.
pub fn check(bouncer: Option<&Bouncer>, mode: CrowdsecMode, ip: IpAddr) -> Option<(String, bool)> {
    if mode == CrowdsecMode::Off {
        return None;
    }
    let Some(bouncer) = bouncer else {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "a service asks for CrowdSec, but NB_PROXY_CROWDSEC_API_URL is not set: not checked"
            )
        });
        return None;
    };
    let verdict = bouncer.verdict(ip)?;
    Some((verdict, mode == CrowdsecMode::Enforce))
}

/// A Go duration (`"3h59m50.1s"`, `"-2s"` for an expired one), as CrowdSec writes them.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.starts_with('-') {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(id: i64) -> Decision {
        Decision {
            id,
            verdict: format!("ban:test-{id}"),
            expires: None,
        }
    }

    #[test]
    fn ips_and_ranges() {
        let mut s = DecisionSet::default();
        let now = Instant::now();
        assert!(s.add(Target::Ip("192.0.2.1".parse().unwrap()), decision(1)));
        assert!(s.add(
            Target::Range("198.51.100.0/24".parse().unwrap()),
            decision(2)
        ));
        assert_eq!(
            s.verdict("192.0.2.1".parse().unwrap(), now),
            Some("ban:test-1")
        );
        assert_eq!(
            s.verdict("198.51.100.77".parse().unwrap(), now),
            Some("ban:test-2")
        );
        assert_eq!(s.verdict("192.0.2.2".parse().unwrap(), now), None);
        s.remove(Target::Ip("192.0.2.1".parse().unwrap()), 1);
        assert_eq!(s.verdict("192.0.2.1".parse().unwrap(), now), None);
        let mut expired = decision(3);
        expired.expires = Some(now);
        s.add(Target::Ip("192.0.2.3".parse().unwrap()), expired);
        assert_eq!(s.verdict("192.0.2.3".parse().unwrap(), now), None);
    }

    #[test]
    fn live_bans_become_kernel_nets() {
        let mut s = DecisionSet::default();
        let now = Instant::now();
        s.add(Target::Ip("192.0.2.9".parse().unwrap()), decision(1));
        s.add(
            Target::Range("198.51.100.7/24".parse().unwrap()),
            decision(2),
        );
        s.add(Target::Ip("2001:db8::1".parse().unwrap()), decision(3));
        let mut expired = decision(4);
        expired.expires = Some(now);
        s.add(Target::Ip("192.0.2.10".parse().unwrap()), expired);
        let (v4, v6) = s.blocked_nets(now);
        let v4: Vec<String> = v4.iter().map(ToString::to_string).collect();
        assert_eq!(v4, ["192.0.2.9/32", "198.51.100.0/24"]);
        assert_eq!(v6, ["2001:db8::1/128".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn bounded() {
        let mut s = DecisionSet::default();
        for i in 0..MAX_DECISIONS as u32 {
            assert!(s.add(Target::Ip(IpAddr::V4(i.into())), decision(i64::from(i))));
        }
        assert!(!s.add(Target::Ip("255.255.255.255".parse().unwrap()), decision(0)));
        // Replacing an existing entry is still allowed.
        assert!(s.add(Target::Ip(IpAddr::V4(5.into())), decision(9)));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1h"), Some(Duration::from_secs(3600)));
        let d = parse_go_duration("59m59.471981908s").unwrap();
        assert!((d.as_secs_f64() - 3599.471981908).abs() < 1e-6);
        assert_eq!(parse_go_duration("-3s"), Some(Duration::ZERO));
        assert_eq!(
            parse_go_duration("1500ms"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_go_duration("1x"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(CrowdsecMode::parse("observe"), Ok(CrowdsecMode::Observe));
        assert!(CrowdsecMode::parse("block").is_err());
    }
}
