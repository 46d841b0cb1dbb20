//! Local ports for the stack's outgoing connections, one allocator per target.
//!
//! A port is never handed out twice at once for the same target, and a released port rests for
//! [`COOL_DOWN`] before reuse: the target may still hold the old connection in TIME_WAIT, and a
//! SYN reusing its 4-tuple too early could be answered with a stale ACK or dropped.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// The IANA dynamic port range (49152–65535).
const FIRST: u16 = 49152;
const COUNT: u16 = 16384;
/// Linux holds TIME_WAIT for 60 s.
pub(super) const COOL_DOWN: Duration = Duration::from_secs(60);

pub(super) struct PortAllocator {
    next: u16,
    in_use: HashSet<u16>,
    /// Released ports and when; at most [`COUNT`] entries, pruned as they expire.
    cooling: HashMap<u16, Instant>,
}

impl PortAllocator {
    pub(super) fn new(seed: u64) -> Self {
        PortAllocator {
            next: (seed % u64::from(COUNT)) as u16,
            in_use: HashSet::new(),
            cooling: HashMap::new(),
        }
    }

    /// A free port, or None when every port is in use or cooling down.
    pub(super) fn allocate(&mut self, now: Instant) -> Option<u16> {
        if self.cooling.len() + self.in_use.len() >= usize::from(COUNT) {
            self.cooling
                .retain(|_, at| now.saturating_duration_since(*at) < COOL_DOWN);
        }
        for _ in 0..COUNT {
            let port = FIRST + self.next;
            self.next = (self.next + 1) % COUNT;
            if self.in_use.contains(&port) {
                continue;
            }
            match self.cooling.get(&port) {
                Some(at) if now.saturating_duration_since(*at) < COOL_DOWN => continue,
                Some(_) => {
                    self.cooling.remove(&port);
                }
                None => {}
            }
            self.in_use.insert(port);
            return Some(port);
        }
        None
    }

    pub(super) fn release(&mut self, port: u16, now: Instant) {
        if self.in_use.remove(&port) {
            self.cooling.insert(port, now);
        }
    }

    /// Nothing in use and nothing cooling: the allocator can be forgotten.
    pub(super) fn is_idle(&self, now: Instant) -> bool {
        self.in_use.is_empty()
            && self
                .cooling
                .values()
                .all(|at| now.saturating_duration_since(*at) >= COOL_DOWN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_a_port_twice_or_too_early() {
        let now = Instant::now();
        let mut ports = PortAllocator::new(7);
        let a = ports.allocate(now).unwrap();
        let b = ports.allocate(now).unwrap();
        assert_ne!(a, b);
        ports.release(a, now);
        // Every other port comes before `a` again, and `a` is cooling until then.
        let mut all = HashSet::new();
        while let Some(p) = ports.allocate(now) {
            assert!(all.insert(p));
        }
        assert!(!all.contains(&a));
        assert_eq!(all.len() + 2, usize::from(COUNT));
        assert_eq!(ports.allocate(now + COOL_DOWN), Some(a));
    }
}
