//! The run time of the XDP program itself, from the kernel's BPF statistics: exact nanoseconds
//! and run counts, where `/proc/stat`'s softirq time is only sampled at the tick.
//!
//! Statistics cost a little on every program run, so they are on only while a [`StatsOn`] guard
//! lives (`BPF_ENABLE_STATS` hands out a descriptor; closing it switches them back off): nothing
//! is left changed on the machine.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::libc;

/// `BPF_ENABLE_STATS` and its only kind, `BPF_STATS_RUN_TIME` (linux/bpf.h).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;
/// `BPF_PROG_TYPE_XDP`.
const PROG_TYPE_XDP: u64 = 6;

/// Run-time statistics are on while this lives.
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

/// Switches the statistics on, or says why the kernel refuses.
pub fn enable() -> Result<StatsOn, String> {
    #[repr(C)]
    struct EnableStats {
        kind: u32,
    }
    let attr = EnableStats {
        kind: BPF_STATS_RUN_TIME,
    };
    // SAFETY: `attr` is a valid `bpf_attr.enable_stats` of the size passed; the kernel only
    // reads it. A non-negative result is a new descriptor that nothing else owns.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &attr as *const EnableStats,
            std::mem::size_of::<EnableStats>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(format!(
            "BPF statistics unavailable: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: see above; the descriptor is ours alone.
    Ok(StatsOn(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// Total run time (ns) and runs of every XDP program process `pid` holds.
pub fn xdp_runs(pid: u32) -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, 0);
    };
    let mut total = (0, 0);
    for entry in dir.flatten().take(10_000) {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if field("prog_type:") == Some(PROG_TYPE_XDP) {
            total.0 += field("run_time_ns:").unwrap_or(0);
            total.1 += field("run_cnt:").unwrap_or(0);
        }
    }
    total
}
