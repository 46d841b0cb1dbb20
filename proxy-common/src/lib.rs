//! `#[repr(C)]` types shared by the eBPF programs (`proxy-ebpf`) and the user-space loader
//! (`proxy::ebpf`): map keys and values of the kernel fast path.
//!
//! Byte orders: every integer here is in host order (little endian on the machines we run on)
//! unless its documentation says otherwise. Addresses are byte arrays in network order, exactly
//! as they sit in the packet. Both sides must build keys the same way, byte for byte: the
//! kernel compares keys as raw bytes.
//!
//! Every struct is free of implicit padding (the `_pad` fields are explicit and must be zero),
//! so a key hashes and compares the same on both sides.
#![no_std]

// === Map names and sizes ===

/// The names of the maps in the eBPF object (the eBPF statics carry exactly these names).
pub mod maps {
    /// `HashMap<PortKey, PortPolicy>`: the L4 ports the XDP program acts on.
    pub const PORTS: &str = "PORTS";
    /// `PerCpuHashMap<PortKey, PortCounters>`: what the XDP program did, per port and CPU.
    pub const COUNTERS: &str = "COUNTERS";
    /// `LpmTrie<SourceV4, u8>`: IPv4 sources allowed on a port (with `HAS_ALLOWLIST`).
    pub const ALLOW_V4: &str = "ALLOW_V4";
    /// `LpmTrie<SourceV6, u8>`: IPv6 sources allowed on a port (with `HAS_ALLOWLIST`).
    pub const ALLOW_V6: &str = "ALLOW_V6";
    /// `LpmTrie<SourceV4, u8>`: IPv4 sources dropped on a port.
    pub const BLOCK_V4: &str = "BLOCK_V4";
    /// `LpmTrie<SourceV6, u8>`: IPv6 sources dropped on a port.
    pub const BLOCK_V6: &str = "BLOCK_V6";
    /// `SockHash<SocketCookie>`: socket X under X's own cookie. The stream parser and verdict
    /// programs are attached to this map, so entering it is what starts the splice on X.
    pub const SPLICE_SOCKETS: &str = "SPLICE_SOCKETS";
    /// `SockHash<SocketCookie>`: X's peer under X's cookie; the verdict redirects through it.
    /// It has no programs, so a socket can be put here (getting the kernel state a redirect
    /// target needs) before any of its bytes are diverted.
    pub const SPLICE_PEERS: &str = "SPLICE_PEERS";
}

/// Capacity of `PORTS` and `COUNTERS`.
pub const MAX_PORTS: u32 = 4096;
/// Capacity of each of the four source tries (all ports share them).
pub const MAX_SOURCES: u32 = 65_536;
/// Capacity of each splice map: one entry per spliced socket, two per spliced pair.
pub const MAX_SPLICED_SOCKETS: u32 = 65_536;

/// The names of the programs in the eBPF object.
pub mod programs {
    /// XDP: per-port source policy and counters.
    pub const XDP: &str = "portcullis_xdp";
    /// `sk_skb/stream_parser`: every skb is one message.
    pub const SPLICE_PARSER: &str = "splice_parser";
    /// `sk_skb/stream_verdict`: redirects the message to the peer socket's egress.
    pub const SPLICE_VERDICT: &str = "splice_verdict";
}

// === XDP ===

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// An L4 service: destination port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// Destination port, host order (the XDP program converts from the packet's network order).
    pub port: u16,
    /// IP protocol number: [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// Always zero.
    pub _pad: u8,
}

impl PortKey {
    pub const fn new(port: u16, protocol: u8) -> Self {
        Self {
            port,
            protocol,
            _pad: 0,
        }
    }
}

/// What the XDP program enforces on a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// A set of `PortPolicy::*` flags.
    pub flags: u32,
}

impl PortPolicy {
    /// A source must match the port's entries in the allow trie, or its packet is dropped.
    /// Without it, only the block trie applies.
    pub const HAS_ALLOWLIST: u32 = 1 << 0;
}

/// Per-port counters, one copy per CPU (summed by user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub passed_packets: u64,
    /// Whole frames, Ethernet header included.
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    /// Whole frames, Ethernet header included.
    pub dropped_bytes: u64,
}

/// Prefix bits of an LPM key that cover the [`PortKey`]: a trie entry always matches its port
/// exactly, so one trie serves every port.
pub const PORT_PREFIX_BITS: u32 = 32;

/// The data of an IPv4 source-trie key. The full LPM key is `{ prefix_len: u32, data }` with
/// `prefix_len` = [`PORT_PREFIX_BITS`] + CIDR bits (64 in a lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceV4 {
    pub port: PortKey,
    /// Source address, network order (as in the packet).
    pub addr: [u8; 4],
}

/// The data of an IPv6 source-trie key; `prefix_len` = [`PORT_PREFIX_BITS`] + CIDR bits (160 in
/// a lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceV6 {
    pub port: PortKey,
    /// Source address, network order (as in the packet).
    pub addr: [u8; 16],
}

/// Value of every source-trie entry; only presence matters.
pub const SOURCE_PRESENT: u8 = 1;

// === Splice ===

/// Key of both splice maps: the kernel's socket cookie (`SO_COOKIE` in user space,
/// `bpf_get_socket_cookie` in the verdict program), a host-order `u64` unique per socket for the
/// life of the machine, so a key never names a later socket by accident.
pub type SocketCookie = u64;

// === user space ===

// SAFETY: all of these are `repr(C)`, `Copy`, without implicit padding, and valid for any bit
// pattern, which is what `Pod` requires.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortPolicy {}
    unsafe impl aya::Pod for PortCounters {}
    unsafe impl aya::Pod for SourceV4 {}
    unsafe impl aya::Pod for SourceV6 {}
}

// The layouts both sides rely on; a change here is a change of the kernel ABI between them.
const _: () = {
    assert!(core::mem::size_of::<PortKey>() == 4);
    assert!(core::mem::size_of::<PortPolicy>() == 4);
    assert!(core::mem::size_of::<PortCounters>() == 32);
    assert!(core::mem::size_of::<SourceV4>() == 8);
    assert!(core::mem::size_of::<SourceV6>() == 20);
};
