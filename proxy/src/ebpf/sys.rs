//! The few raw syscalls of the splice path.
//!
//! Map updates go straight to bpf(2) instead of through aya: aya's `SockHash::insert` takes
//! `&mut self`, which would force one lock shared by every worker onto each splice, while the
//! kernel needs none. Everything else here has no safe wrapper in our dependencies.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_ANY: u64 = 0;
/// `tcpi_state` values (include/net/tcp_states.h).
const TCP_ESTABLISHED: i32 = 1;
const TCP_CLOSE_WAIT: i32 = 8;

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &MapElemAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` prefix of the size passed; the
    // pointers in it refer to live values the caller borrows for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            size_of::<MapElemAttr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `map[key] = socket` in a sockmap/sockhash.
pub(super) fn sockhash_insert(
    map: BorrowedFd<'_>,
    key: u64,
    socket: BorrowedFd<'_>,
) -> io::Result<()> {
    let value = socket.as_raw_fd() as u32;
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            flags: BPF_ANY,
        },
    )
}

pub(super) fn sockhash_remove(map: BorrowedFd<'_>, key: u64) -> io::Result<()> {
    bpf(
        BPF_MAP_DELETE_ELEM,
        &MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: 0,
            flags: 0,
        },
    )
}

/// Raises `socket`'s send buffer to `bytes` unless it is already at least that large. Uses
/// `SO_SNDBUFFORCE`, which goes past `net.core.wmem_max` and needs CAP_NET_ADMIN (the fast path
/// has it); a plain `SO_SNDBUF` would be capped there and could shrink the buffer instead.
pub(super) fn raise_send_buffer(socket: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    if socket2::SockRef::from(&socket).send_buffer_size()? >= bytes {
        return Ok(());
    }
    // The kernel doubles the value it is given (half of the buffer is its bookkeeping).
    let half = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX);
    set_int_option(socket, libc::SO_SNDBUFFORCE, half)
}

/// Sets `SO_RCVLOWAT` to 1 (the default, so nothing else changes). TCP answers any
/// `SO_RCVLOWAT` by calling its data-ready path when bytes are queued, which is what runs the
/// stream parser over bytes that arrived before the socket entered the map.
pub(super) fn kick_receive_queue(socket: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(socket, libc::SO_RCVLOWAT, 1)
}

/// `setsockopt(SOL_SOCKET, option, value)` for an int option.
fn set_int_option(
    socket: BorrowedFd<'_>,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a plain int option, passed with its size.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// TCP's own byte counts for one socket.
pub(super) struct TcpCounts {
    /// Sequence space received in order, the FIN included once it arrived.
    pub received: u64,
    /// Bytes not yet read from the receive queue (the FIN excluded). Only meaningful before the
    /// socket enters a sockmap: after that the kernel reports the sockmap's own queue here.
    pub unread: u64,
    /// Bytes ever queued for sending: acknowledged plus still in the send queue.
    pub written: u64,
    /// Whether the socket can still send (established, or only its peer has finished).
    pub can_send: bool,
}

pub(super) fn tcp_counts(socket: BorrowedFd<'_>) -> io::Result<TcpCounts> {
    let fd = socket.as_raw_fd();
    // SAFETY: tcp_info is plain integers; zero is a valid value of each.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer and its length match.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // Acknowledged first, then the queue: an ACK landing in between makes the sum briefly
    // too small, never too large, so "everything was written" is never claimed early.
    let acked = info.tcpi_bytes_acked;
    let unsent = ioctl_int(fd, libc::TIOCOUTQ)?;
    let unread = ioctl_int(fd, libc::FIONREAD)?;
    Ok(TcpCounts {
        received: info.tcpi_bytes_received,
        unread,
        written: acked + unsent,
        can_send: matches!(i32::from(info.tcpi_state), TCP_ESTABLISHED | TCP_CLOSE_WAIT),
    })
}

fn ioctl_int(fd: libc::c_int, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: both requests write one int.
    let ret = unsafe { libc::ioctl(fd, request, std::ptr::from_mut(&mut value)) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(value).unwrap_or(0))
}
