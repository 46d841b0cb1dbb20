//! XDP: the per-port source policy of L4 services.
//!
//! A packet whose (destination port, protocol) is not in `PORTS` passes untouched and
//! uncounted. For a configured port: a source in the block trie is dropped; else, when the port
//! has an allowlist, a source outside the allow trie is dropped; else the packet passes. Both
//! outcomes are counted per port and CPU. Anything the program cannot parse passes: the kernel
//! stack (and the proxy behind it) decides about it as if XDP were not there.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    helpers::generated::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuHashMap, lpm_trie::Key},
    programs::XdpContext,
};
use proxy_common::{
    MAX_PORTS, MAX_SOURCES, PORT_PREFIX_BITS, PROTO_TCP, PROTO_UDP, PortCounters, PortKey,
    PortPolicy, SourceV4, SourceV6,
};

// Not preallocated: an entry user space replaces or removes is freed only after every program
// that may still hold it has finished (RCU), so a lookup never reads a recycled element.
#[map]
static PORTS: HashMap<PortKey, PortPolicy> =
    HashMap::with_max_entries(MAX_PORTS, BPF_F_NO_PREALLOC);

#[map]
static COUNTERS: PerCpuHashMap<PortKey, PortCounters> =
    PerCpuHashMap::with_max_entries(MAX_PORTS, BPF_F_NO_PREALLOC);

#[map]
static ALLOW_V4: LpmTrie<SourceV4, u8> = LpmTrie::with_max_entries(MAX_SOURCES, 0);
#[map]
static ALLOW_V6: LpmTrie<SourceV6, u8> = LpmTrie::with_max_entries(MAX_SOURCES, 0);
#[map]
static BLOCK_V4: LpmTrie<SourceV4, u8> = LpmTrie::with_max_entries(MAX_SOURCES, 0);
#[map]
static BLOCK_V6: LpmTrie<SourceV6, u8> = LpmTrie::with_max_entries(MAX_SOURCES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// Fragment offset bits of the IPv4 flags/offset field.
const IPV4_FRAG_OFFSET: u16 = 0x1fff;

#[xdp]
pub fn portcullis_xdp(ctx: XdpContext) -> u32 {
    filter(&ctx).unwrap_or(XDP_PASS)
}

/// The verdict for a packet to a configured port, or None (pass) for anything else: not TCP
/// or UDP over IPv4 or IPv6 (no extension headers, at most one VLAN tag), a later fragment, a
/// port not in `PORTS`, or a frame too short to tell.
///
/// Each address family runs its own path to the end: a value holding either kind of address
/// would leave the IPv4 case's unused bytes uninitialised, and reading those is refused by the
/// verifier without CAP_PERFMON.
#[inline(always)]
fn filter(ctx: &XdpContext) -> Option<u32> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(ctx, 12)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(ctx, ETH_HLEN + 2)?;
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => {
            let ip: Ipv4Header = load(ctx, l3)?;
            if ip.version_ihl >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
            if ihl < IPV4_MIN_HLEN {
                return None;
            }
            // Later fragments carry no L4 header; the stack reassembles them.
            if u16::from_be_bytes(ip.flags_fragment) & IPV4_FRAG_OFFSET != 0 {
                return None;
            }
            let port = destination(ctx, ip.protocol, l3 + ihl)?;
            let source = SourceV4 {
                port,
                addr: ip.source,
            };
            Some(enforce(
                ctx,
                port,
                Key::new(PORT_PREFIX_BITS + 32, source),
                &ALLOW_V4,
                &BLOCK_V4,
            ))
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Header = load(ctx, l3)?;
            if ip.version_class_flow[0] >> 4 != 6 {
                return None;
            }
            let port = destination(ctx, ip.next_header, l3 + IPV6_HLEN)?;
            let source = SourceV6 {
                port,
                addr: ip.source,
            };
            Some(enforce(
                ctx,
                port,
                Key::new(PORT_PREFIX_BITS + 128, source),
                &ALLOW_V6,
                &BLOCK_V6,
            ))
        }
        _ => None,
    }
}

/// The TCP or UDP destination port at `l4`; None for other protocols.
#[inline(always)]
fn destination(ctx: &XdpContext, protocol: u8, l4: usize) -> Option<PortKey> {
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return None;
    }
    let ports: Ports = load(ctx, l4)?;
    Some(PortKey::new(
        u16::from_be_bytes(ports.destination),
        protocol,
    ))
}

/// Applies `port`'s policy to the source in `key`, counts, and returns the verdict; a port not
/// in `PORTS` passes uncounted.
#[inline(always)]
fn enforce<K>(
    ctx: &XdpContext,
    port: PortKey,
    key: Key<K>,
    allow: &LpmTrie<K, u8>,
    block: &LpmTrie<K, u8>,
) -> u32 {
    // SAFETY: the map is not preallocated (see above), so the entry stays valid while we run.
    let Some(policy) = (unsafe { PORTS.get(port) }) else {
        return XDP_PASS;
    };
    let allowed = block.get(&key).is_none()
        && (policy.flags & PortPolicy::HAS_ALLOWLIST == 0 || allow.get(&key).is_some());
    // The helper, not `data_end - data`: subtracting packet pointers needs CAP_PERFMON.
    // SAFETY: reads the length of the buffer the context describes.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) };
    count(&port, allowed, len);
    if allowed { XDP_PASS } else { XDP_DROP }
}

#[inline(always)]
fn count(port: &PortKey, allowed: bool, bytes: u64) {
    // User space creates the entry with the port, so a packet racing a port's removal cannot
    // resurrect counters nobody will ever read.
    let Some(counters) = COUNTERS.get_ptr_mut(port) else {
        return;
    };
    // SAFETY: a per-CPU value: nothing else writes it while this program runs on this CPU.
    let counters = unsafe { &mut *counters };
    // Every field updated on both outcomes: with an if/else the compiler picks the field's
    // address by outcome, and a map-value pointer moved by a chosen offset is refused without
    // CAP_PERFMON.
    let (passed, dropped) = if allowed { (1, 0) } else { (0, 1) };
    counters.passed_packets += passed;
    counters.passed_bytes += bytes * passed;
    counters.dropped_packets += dropped;
    counters.dropped_bytes += bytes * dropped;
}

/// The IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    flags_fragment: [u8; 2],
    ttl: u8,
    protocol: u8,
    checksum: [u8; 2],
    source: [u8; 4],
    destination: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    source: [u8; 16],
    destination: [u8; 16],
}

/// The first four bytes of both the TCP and the UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ports {
    source: [u8; 2],
    destination: [u8; 2],
}

/// A big-endian u16 at a fixed `offset` into the Ethernet header, in host order.
#[inline(always)]
fn be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    let start = ctx.data();
    // A constant offset: the verifier tracks it without any pointer arithmetic on a variable.
    if start + offset + 2 > ctx.data_end() {
        return None;
    }
    // SAFETY: both bytes lie inside the frame, checked just above.
    let bytes = unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; 2]) };
    Some(u16::from_be_bytes(bytes))
}

/// A copy of the `T` at `offset` into the frame, if the frame is long enough. `T` is plain
/// bytes, valid for any content.
#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let mut out = MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes at most `size_of::<T>()` bytes into `out`, and fails (returns
    // non-zero) unless it wrote all of them.
    let ret = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            offset as u32,
            out.as_mut_ptr().cast(),
            size_of::<T>() as u32,
        )
    };
    // SAFETY: fully written when the helper succeeded.
    (ret == 0).then(|| unsafe { out.assume_init() })
}
