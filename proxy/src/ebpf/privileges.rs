//! The capabilities the fast path needs, checked up front so a missing one is named instead of
//! surfacing as a bare EPERM from whichever syscall comes first.

pub(crate) const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The missing capabilities, or None when all are there (or when `/proc` cannot tell, in which
/// case the kernel decides and its error is reported instead).
pub(super) fn missing() -> Option<String> {
    let effective = effective_capabilities()?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    (!missing.is_empty()).then(|| missing.join(" and "))
}

/// The calling thread's effective capability bits (capabilities are per thread, and
/// `/proc/self` is the main thread's); None when `/proc` cannot tell.
pub(crate) fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}
