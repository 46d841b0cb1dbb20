//! Brute-force protection for passwords, PINs and header values: per (service, client address)
//! a few failures are free, then every attempt (a right one too) is refused for a backoff that
//! doubles with each lockout. IPv6 clients are keyed by /64, the smallest block one holds.
//! The table has a fixed capacity: when full, the least recently touched entry is replaced, so
//! a flood of addresses costs bounded memory (and can at worst forget an attacker early).

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed within [`WINDOW`] before the first lockout.
pub const FREE_FAILURES: u32 = 5;
/// Failures older than this are forgotten (unless the key is locked).
pub const WINDOW: Duration = Duration::from_secs(60);
pub const FIRST_BACKOFF: Duration = Duration::from_secs(30);
pub const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// Default capacity: ~64 Ki entries of 48 bytes.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Entries sampled to choose one to evict.
const EVICTION_SAMPLE: usize = 8;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    first_failure: Instant,
    locked_until: Option<Instant>,
    /// How many times this key was locked: the backoff doubles each time.
    lockouts: u32,
    touched: Instant,
}

pub struct Lockout {
    capacity: usize,
    table: Mutex<HashMap<u64, Entry>>,
}

impl Default for Lockout {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl Lockout {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            table: Mutex::new(HashMap::with_capacity(capacity.clamp(1, 1024))),
        }
    }

    /// `Err(remaining)` while the key is locked.
    pub fn check(&self, service: &str, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let table = self.lock();
        match table.get(&key(service, ip)).and_then(|e| e.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a failed attempt; `Some(backoff)` when it locked the key.
    pub fn failure(&self, service: &str, ip: IpAddr, now: Instant) -> Option<Duration> {
        let k = key(service, ip);
        let mut table = self.lock();
        if !table.contains_key(&k) && table.len() >= self.capacity {
            evict_one(&mut table, now);
        }
        let e = table.entry(k).or_insert(Entry {
            failures: 0,
            first_failure: now,
            locked_until: None,
            lockouts: 0,
            touched: now,
        });
        e.touched = now;
        if let Some(until) = e.locked_until {
            if until > now {
                return Some(until - now);
            }
            // The lock ran out: the next failures count afresh, the backoff keeps growing.
            e.locked_until = None;
            e.failures = 0;
            e.first_failure = now;
        }
        if now.duration_since(e.first_failure) > WINDOW {
            e.failures = 0;
            e.first_failure = now;
        }
        e.failures += 1;
        if e.failures <= FREE_FAILURES {
            return None;
        }
        let backoff = FIRST_BACKOFF
            .saturating_mul(1u32 << e.lockouts.min(10))
            .min(MAX_BACKOFF);
        e.lockouts = e.lockouts.saturating_add(1);
        e.locked_until = Some(now + backoff);
        Some(backoff)
    }

    /// A successful attempt clears the key.
    pub fn success(&self, service: &str, ip: IpAddr) {
        self.lock().remove(&key(service, ip));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Drops an expired entry if the sample holds one, else the least recently touched sampled
/// one. HashMap iteration order is randomised per process, so the sample is not predictable.
fn evict_one(table: &mut HashMap<u64, Entry>, now: Instant) {
    let victim = table
        .iter()
        .take(EVICTION_SAMPLE)
        .min_by_key(|(_, e)| {
            let expired = e.locked_until.is_none_or(|u| u <= now)
                && now.duration_since(e.first_failure) > WINDOW;
            (!expired, e.touched)
        })
        .map(|(k, _)| *k);
    if let Some(k) = victim {
        table.remove(&k);
    }
}

fn key(service: &str, ip: IpAddr) -> u64 {
    let mut h = DefaultHasher::new();
    service.hash(&mut h);
    match crate::routes::access::canonical(ip) {
        IpAddr::V4(v4) => v4.hash(&mut h),
        IpAddr::V6(v6) => (u128::from(v6) >> 64).hash(&mut h),
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sixth_failure_locks_and_backoff_doubles() {
        let l = Lockout::default();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for i in 0..FREE_FAILURES {
            assert_eq!(l.failure("s", a, t0 + Duration::from_secs(i as u64)), None);
            assert!(l.check("s", a, t0).is_ok());
        }
        let locked = l.failure("s", a, t0 + Duration::from_secs(6)).unwrap();
        assert_eq!(locked, FIRST_BACKOFF);
        // Locked: even a right answer must wait.
        assert!(l.check("s", a, t0 + Duration::from_secs(10)).is_err());
        // Other services and addresses are not affected.
        assert!(l.check("t", a, t0 + Duration::from_secs(10)).is_ok());
        assert!(
            l.check("s", ip("192.0.2.2"), t0 + Duration::from_secs(10))
                .is_ok()
        );
        // After the backoff it is open again; the next lockout lasts twice as long.
        let later = t0 + Duration::from_secs(6) + FIRST_BACKOFF + Duration::from_secs(1);
        assert!(l.check("s", a, later).is_ok());
        for i in 0..FREE_FAILURES {
            assert_eq!(
                l.failure("s", a, later + Duration::from_millis(i as u64)),
                None
            );
        }
        assert_eq!(
            l.failure("s", a, later + Duration::from_secs(1)),
            Some(FIRST_BACKOFF * 2)
        );
    }

    #[test]
    fn slow_failures_and_success_reset() {
        let l = Lockout::default();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for i in 0..20u64 {
            // One failure every 20 s never reaches six within a minute.
            assert_eq!(
                l.failure("s", a, t0 + Duration::from_secs(i * 20)),
                None,
                "{i}"
            );
            if i % 3 == 2 {
                l.success("s", a);
            }
        }
        l.success("s", a);
        assert!(l.is_empty());
    }

    #[test]
    fn ipv6_shares_a_slash_64() {
        let l = Lockout::default();
        let t0 = Instant::now();
        for i in 0..=FREE_FAILURES {
            l.failure("s", ip(&format!("2001:db8::{:x}", i + 1)), t0);
        }
        assert!(l.check("s", ip("2001:db8::ffff"), t0).is_err());
        assert!(l.check("s", ip("2001:db8:0:1::1"), t0).is_ok());
    }

    #[test]
    fn a_flood_of_addresses_stays_within_capacity() {
        let l = Lockout::new(4096);
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            l.failure(
                "s",
                IpAddr::V4(i.into()),
                t0 + Duration::from_micros(i as u64),
            );
            assert!(l.len() <= 4096);
        }
        assert_eq!(l.len(), 4096);
        // A locked attacker inside the flood stays locked while it keeps failing.
        let attacker = ip("203.0.113.7");
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..=FREE_FAILURES {
            l.failure("s", attacker, t1);
        }
        assert!(l.check("s", attacker, t1).is_err());
    }
}
