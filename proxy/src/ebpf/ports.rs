//! The L4 ports the XDP program acts on, their source policies and their counters.
//!
//! `PortTable` keeps a copy of what it has put in the maps, updated after every successful map
//! operation, so the next `apply` diffs against what the kernel really holds even after a
//! failed one. A port's entries are written so that no packet ever sees a half-made policy: a
//! new port's counters and tries exist before the port does, and an allowlist's entries exist
//! before the flag that enforces them (removal runs in the opposite order).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, MapData, PerCpuHashMap, PerCpuValues};
use ipnet::IpNet;
use proxy_common::{
    MAX_PORTS, MAX_SOURCES, PORT_PREFIX_BITS, PROTO_TCP, PROTO_UDP, PortCounters, PortKey,
    PortPolicy, SOURCE_PRESENT, SourceV4, SourceV6, maps,
};

use super::EbpfError;
use super::error::chain;

/// The transport of an L4 service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Protocol {
    Tcp,
    Udp,
}

impl L4Protocol {
    fn number(self) -> u8 {
        match self {
            L4Protocol::Tcp => PROTO_TCP,
            L4Protocol::Udp => PROTO_UDP,
        }
    }

    fn from_number(n: u8) -> Option<L4Protocol> {
        match n {
            PROTO_TCP => Some(L4Protocol::Tcp),
            PROTO_UDP => Some(L4Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for L4Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            L4Protocol::Tcp => "tcp",
            L4Protocol::Udp => "udp",
        })
    }
}

/// The source policy of one L4 port.
///
/// A source in `blocked` is dropped. When `allowed` is not empty, a source outside it is
/// dropped too (an IPv4 list says nothing about IPv6 sources: with only IPv4 entries, every
/// IPv6 source is dropped). Host bits of a CIDR are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPolicySpec {
    pub port: u16,
    pub protocol: L4Protocol,
    pub allowed: Vec<IpNet>,
    pub blocked: Vec<IpNet>,
}

/// What the XDP program did on one port, summed over CPUs, since the port was configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortCounterSnapshot {
    pub port: u16,
    pub protocol: L4Protocol,
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// One port's state in the kernel, as far as this process has written it.
#[derive(Default)]
struct Installed {
    counters: bool,
    /// The policy the `PORTS` entry holds, if it exists.
    policy: Option<u32>,
    allowed: BTreeSet<IpNet>,
    blocked: BTreeSet<IpNet>,
}

/// One port's wanted state.
struct Wanted {
    flags: u32,
    allowed: BTreeSet<IpNet>,
    blocked: BTreeSet<IpNet>,
}

pub(super) struct PortTable {
    ports: HashMap<MapData, PortKey, PortPolicy>,
    counters: PerCpuHashMap<MapData, PortKey, PortCounters>,
    allow: Tries,
    block: Tries,
    installed: BTreeMap<PortKey, Installed>,
    cpus: usize,
}

struct Tries {
    v4: LpmTrie<MapData, SourceV4, u8>,
    v6: LpmTrie<MapData, SourceV6, u8>,
    names: (&'static str, &'static str),
}

impl PortTable {
    pub(super) fn new(ebpf: &mut aya::Ebpf) -> Result<PortTable, EbpfError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| EbpfError::Load {
            reason: format!("cannot count CPUs ({what}): {e}"),
        })?;
        Ok(PortTable {
            ports: take(ebpf, maps::PORTS)?,
            counters: take(ebpf, maps::COUNTERS)?,
            allow: Tries {
                v4: take(ebpf, maps::ALLOW_V4)?,
                v6: take(ebpf, maps::ALLOW_V6)?,
                names: (maps::ALLOW_V4, maps::ALLOW_V6),
            },
            block: Tries {
                v4: take(ebpf, maps::BLOCK_V4)?,
                v6: take(ebpf, maps::BLOCK_V6)?,
                names: (maps::BLOCK_V4, maps::BLOCK_V6),
            },
            installed: BTreeMap::new(),
            cpus,
        })
    }

    /// Makes the maps hold exactly `specs`. Validates everything before touching a map.
    pub(super) fn apply(&mut self, specs: &[PortPolicySpec]) -> Result<(), EbpfError> {
        let wanted = wanted(specs)?;
        let gone: Vec<PortKey> = self
            .installed
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.remove_port(key)?;
        }
        for (key, want) in &wanted {
            self.install_port(*key, want)?;
        }
        Ok(())
    }

    fn install_port(&mut self, key: PortKey, want: &Wanted) -> Result<(), EbpfError> {
        let have = self.installed.entry(key).or_default();
        if !have.counters {
            let zero =
                PerCpuValues::try_from(vec![PortCounters::default(); self.cpus]).map_err(|e| {
                    EbpfError::Map {
                        map: maps::COUNTERS,
                        reason: e.to_string(),
                    }
                })?;
            self.counters
                .insert(key, zero, 0)
                .map_err(|e| map_error(maps::COUNTERS, &e))?;
            have.counters = true;
        }
        for net in missing(&want.allowed, &have.allowed) {
            self.allow.insert(key, net)?;
            have.allowed.insert(net);
        }
        for net in missing(&want.blocked, &have.blocked) {
            self.block.insert(key, net)?;
            have.blocked.insert(net);
        }
        if have.policy != Some(want.flags) {
            self.ports
                .insert(key, PortPolicy { flags: want.flags }, 0)
                .map_err(|e| map_error(maps::PORTS, &e))?;
            have.policy = Some(want.flags);
        }
        for net in missing(&have.allowed, &want.allowed) {
            self.allow.remove(key, net)?;
            have.allowed.remove(&net);
        }
        for net in missing(&have.blocked, &want.blocked) {
            self.block.remove(key, net)?;
            have.blocked.remove(&net);
        }
        Ok(())
    }

    fn remove_port(&mut self, key: PortKey) -> Result<(), EbpfError> {
        let Some(have) = self.installed.get_mut(&key) else {
            return Ok(());
        };
        if have.policy.is_some() {
            removed(self.ports.remove(&key), maps::PORTS)?;
            have.policy = None;
        }
        for net in missing(&have.allowed, &BTreeSet::new()) {
            self.allow.remove(key, net)?;
            have.allowed.remove(&net);
        }
        for net in missing(&have.blocked, &BTreeSet::new()) {
            self.block.remove(key, net)?;
            have.blocked.remove(&net);
        }
        if have.counters {
            removed(self.counters.remove(&key), maps::COUNTERS)?;
        }
        self.installed.remove(&key);
        Ok(())
    }

    /// Counters of every configured port, in port order.
    pub(super) fn counters(&self) -> Result<Vec<PortCounterSnapshot>, EbpfError> {
        let mut out = Vec::with_capacity(self.installed.len());
        for (key, have) in &self.installed {
            if have.policy.is_none() || !have.counters {
                continue;
            }
            let Some(protocol) = L4Protocol::from_number(key.protocol) else {
                continue;
            };
            let per_cpu = self.counters.get(key, 0).map_err(|e| EbpfError::ReadMap {
                map: maps::COUNTERS,
                reason: chain(&e),
            })?;
            let mut snapshot = PortCounterSnapshot {
                port: key.port,
                protocol,
                passed_packets: 0,
                passed_bytes: 0,
                dropped_packets: 0,
                dropped_bytes: 0,
            };
            for c in per_cpu.iter() {
                snapshot.passed_packets = snapshot.passed_packets.wrapping_add(c.passed_packets);
                snapshot.passed_bytes = snapshot.passed_bytes.wrapping_add(c.passed_bytes);
                snapshot.dropped_packets = snapshot.dropped_packets.wrapping_add(c.dropped_packets);
                snapshot.dropped_bytes = snapshot.dropped_bytes.wrapping_add(c.dropped_bytes);
            }
            out.push(snapshot);
        }
        Ok(out)
    }
}

impl Tries {
    fn insert(&mut self, port: PortKey, net: IpNet) -> Result<(), EbpfError> {
        let result = match net {
            IpNet::V4(n) => self.v4.insert(&key_v4(port, n), SOURCE_PRESENT, 0),
            IpNet::V6(n) => self.v6.insert(&key_v6(port, n), SOURCE_PRESENT, 0),
        };
        result.map_err(|e| map_error(self.name(net), &e))
    }

    fn remove(&mut self, port: PortKey, net: IpNet) -> Result<(), EbpfError> {
        let result = match net {
            IpNet::V4(n) => self.v4.remove(&key_v4(port, n)),
            IpNet::V6(n) => self.v6.remove(&key_v6(port, n)),
        };
        removed(result, self.name(net))
    }

    fn name(&self, net: IpNet) -> &'static str {
        match net {
            IpNet::V4(_) => self.names.0,
            IpNet::V6(_) => self.names.1,
        }
    }
}

fn key_v4(port: PortKey, net: ipnet::Ipv4Net) -> Key<SourceV4> {
    let addr = net.network().octets();
    Key::new(
        PORT_PREFIX_BITS + u32::from(net.prefix_len()),
        SourceV4 { port, addr },
    )
}

fn key_v6(port: PortKey, net: ipnet::Ipv6Net) -> Key<SourceV6> {
    let addr = net.network().octets();
    Key::new(
        PORT_PREFIX_BITS + u32::from(net.prefix_len()),
        SourceV6 { port, addr },
    )
}

fn wanted(specs: &[PortPolicySpec]) -> Result<BTreeMap<PortKey, Wanted>, EbpfError> {
    if specs.len() > MAX_PORTS as usize {
        return Err(EbpfError::TooManyPorts {
            count: specs.len(),
            max: MAX_PORTS,
        });
    }
    let mut out = BTreeMap::new();
    for spec in specs {
        let key = PortKey::new(spec.port, spec.protocol.number());
        let allowed: BTreeSet<IpNet> = spec.allowed.iter().map(IpNet::trunc).collect();
        let want = Wanted {
            flags: if allowed.is_empty() {
                0
            } else {
                PortPolicy::HAS_ALLOWLIST
            },
            allowed,
            blocked: spec.blocked.iter().map(IpNet::trunc).collect(),
        };
        if out.insert(key, want).is_some() {
            return Err(EbpfError::DuplicatePort {
                port: spec.port,
                protocol: spec.protocol,
            });
        }
    }
    // All ports share each trie; a set that cannot fit is refused before anything changes.
    let mut counts = [
        (maps::ALLOW_V4, 0),
        (maps::ALLOW_V6, 0),
        (maps::BLOCK_V4, 0),
        (maps::BLOCK_V6, 0),
    ];
    for want in out.values() {
        for net in &want.allowed {
            counts[usize::from(net.addr().is_ipv6())].1 += 1;
        }
        for net in &want.blocked {
            counts[2 + usize::from(net.addr().is_ipv6())].1 += 1;
        }
    }
    if let Some(&(map, count)) = counts.iter().find(|(_, n)| *n > MAX_SOURCES as usize) {
        return Err(EbpfError::TooManySources {
            map,
            count,
            max: MAX_SOURCES,
        });
    }
    Ok(out)
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| EbpfError::Load {
        reason: format!("the object has no map {name}"),
    })?;
    T::try_from(map).map_err(|e| EbpfError::Load {
        reason: format!("map {name}: {}", chain(&e)),
    })
}

/// The CIDRs in `a` but not in `b`, collected so `b` can change while they are worked through.
fn missing(a: &BTreeSet<IpNet>, b: &BTreeSet<IpNet>) -> Vec<IpNet> {
    a.difference(b).copied().collect()
}

/// A removal's result, where an entry already gone counts as removed.
fn removed(result: Result<(), aya::maps::MapError>, map: &'static str) -> Result<(), EbpfError> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(map_error(map, &e)),
    }
}

fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A map error in one line; a full map (E2BIG from hash maps, ENOSPC from tries) says so.
fn map_error(map: &'static str, e: &aya::maps::MapError) -> EbpfError {
    let full = matches!(e, aya::maps::MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC)));
    let reason = if full {
        "the map is full: fewer ports or source CIDRs are needed".to_string()
    } else {
        chain(e)
    };
    EbpfError::Map { map, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16, allowed: &[&str], blocked: &[&str]) -> PortPolicySpec {
        let nets = |l: &[&str]| l.iter().map(|s| s.parse().unwrap()).collect();
        PortPolicySpec {
            port,
            protocol: L4Protocol::Udp,
            allowed: nets(allowed),
            blocked: nets(blocked),
        }
    }

    #[test]
    fn allowlist_flag_and_host_bits() {
        let w = wanted(&[
            spec(53, &["10.1.2.3/8", "10.9.9.9/8"], &[]),
            spec(54, &[], &["::1/128"]),
        ])
        .unwrap();
        let with_list = &w[&PortKey::new(53, PROTO_UDP)];
        assert_eq!(with_list.flags, PortPolicy::HAS_ALLOWLIST);
        // Both spell 10.0.0.0/8: one trie entry.
        assert_eq!(with_list.allowed.len(), 1);
        assert_eq!(w[&PortKey::new(54, PROTO_UDP)].flags, 0);
    }

    #[test]
    fn refuses_a_port_twice_and_sets_that_cannot_fit() {
        assert!(matches!(
            wanted(&[spec(1, &[], &[]), spec(1, &[], &[])]),
            Err(EbpfError::DuplicatePort { port: 1, .. })
        ));
        let tcp_and_udp = [
            spec(1, &[], &[]),
            PortPolicySpec {
                protocol: L4Protocol::Tcp,
                ..spec(1, &[], &[])
            },
        ];
        assert!(wanted(&tcp_and_udp).is_ok());
        let too_many: Vec<_> = (0..=MAX_PORTS as u16).map(|p| spec(p, &[], &[])).collect();
        assert!(matches!(
            wanted(&too_many),
            Err(EbpfError::TooManyPorts { .. })
        ));
        // 20 ports × 4,000 blocked /32s: each port fits, the shared trie does not.
        let blocked: Vec<String> = (0..4000u32)
            .map(|i| format!("{}/32", std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        let blocked: Vec<&str> = blocked.iter().map(String::as_str).collect();
        let ports: Vec<_> = (0..20).map(|p| spec(p, &[], &blocked)).collect();
        assert!(matches!(
            wanted(&ports),
            Err(EbpfError::TooManySources {
                map: "BLOCK_V4",
                count: 80_000,
                ..
            })
        ));
    }
}
