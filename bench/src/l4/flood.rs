//! A UDP flood: minimum-size datagrams (60-byte frames) from one socket, 64 per `sendmmsg`
//! call, for a fixed time. Cheaper per packet than hping3 (one raw `sendto` per packet), so more
//! of the core is left for the receiving side's drop.

use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::libc;
use nix::sched::{CpuSet, sched_setaffinity};
use nix::sys::resource::{UsageWho, getrusage};
use nix::unistd::Pid;

use crate::process::CpuTime;

const BATCH: usize = 64;
/// 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 18 = 60 bytes: the smallest Ethernet frame.
const PAYLOAD: [u8; 18] = *b"portcullis-flood!!";

pub struct Flood {
    /// Datagrams the kernel accepted from the sender.
    pub sent: u64,
    /// `sendmmsg` calls that failed (ENOBUFS and the like: the sender outran the device).
    pub failed_calls: u64,
    pub elapsed: Duration,
    /// CPU of the sending thread. Without IRQ time accounting the kernel also charges it the
    /// softirq work done on its core while it runs, the receiving side's drops included.
    pub cpu: CpuTime,
}

/// Floods `to` from `from` for `duration`, on CPU `cpu` when given. Call it on a thread inside
/// the sender's network namespace.
pub fn run(
    from: std::net::Ipv4Addr,
    to: SocketAddrV4,
    duration: Duration,
    cpu: Option<usize>,
) -> Result<Flood> {
    if let Some(cpu) = cpu {
        let mut set = CpuSet::new();
        set.set(cpu).context("CPU number out of range")?;
        // PID 0: this thread only.
        sched_setaffinity(Pid::from_raw(0), &set).context("pin the flood thread")?;
    }
    let socket = UdpSocket::bind(SocketAddrV4::new(from, 0)).context("bind the flood socket")?;
    socket.connect(to).context("connect the flood socket")?;
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: PAYLOAD.as_ptr() as *mut libc::c_void,
            iov_len: PAYLOAD.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; all zeroes is a valid, empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let cpu_before = thread_cpu();
    let started = Instant::now();
    let deadline = started + duration;
    let (mut sent, mut failed_calls) = (0u64, 0u64);
    while Instant::now() < deadline {
        // SAFETY: `msgs` holds BATCH headers, each pointing at one iovec of `iovs`, which point
        // at the static payload; all of them outlive the call and the kernel only reads them
        // (and writes `msg_len`).
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
            )
        };
        if n >= 0 {
            sent += n as u64;
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            // The device queue or the neighbour queue is full; carry on.
            Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::ECONNREFUSED) => {
                failed_calls += 1
            }
            _ => bail!("sendmmsg to {to}: {err}"),
        }
    }
    let elapsed = started.elapsed();
    Ok(Flood {
        sent,
        failed_calls,
        elapsed,
        cpu: thread_cpu().since(cpu_before),
    })
}

fn thread_cpu() -> CpuTime {
    let Ok(u) = getrusage(UsageWho::RUSAGE_THREAD) else {
        return CpuTime::default();
    };
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    CpuTime {
        user_us: us(u.user_time()),
        system_us: us(u.system_time()),
    }
}
