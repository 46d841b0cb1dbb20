//! The bytes a TCP socket carried, as the kernel counts them (`TCP_INFO`). Once a connection
//! is spliced in the kernel its bytes never cross user space, so this is the only count left
//! for its access log.

use std::os::fd::{AsRawFd, BorrowedFd};

// `tcpi_state` values (include/net/tcp_states.h).
const FIN_WAIT2: u8 = 5;
const TIME_WAIT: u8 = 6;
const CLOSE: u8 = 7;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// (data bytes received from the peer, data bytes sent and acknowledged by it); `None` when the
/// kernel does not report them.
pub fn carried(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable `tcp_info` of `len` bytes and the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // Older kernels fill a shorter struct; both counters must be in what they wrote.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    if rc != 0 || (len as usize) < needed {
        return None;
    }
    // SAFETY: zeroed, then filled by the kernel; every field is a plain integer.
    let info = unsafe { info.assume_init() };
    // The kernel counts sequence space, where each FIN takes one: the peer's once received,
    // ours once acknowledged. The socket's state says which of them happened.
    let state = info.tcpi_state;
    let fin_received = matches!(state, CLOSE_WAIT | LAST_ACK | CLOSING | TIME_WAIT | CLOSE);
    let fin_acked = matches!(state, FIN_WAIT2 | TIME_WAIT | CLOSE);
    Some((
        info.tcpi_bytes_received
            .saturating_sub(u64::from(fin_received)),
        info.tcpi_bytes_acked.saturating_sub(u64::from(fin_acked)),
    ))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn counts_both_directions() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&[7u8; 3000]).unwrap();
        let mut buf = [0u8; 3000];
        server.read_exact(&mut buf).unwrap();
        server.write_all(&[9u8; 500]).unwrap();
        client.read_exact(&mut buf[..500]).unwrap();
        let (received, acked) = carried(server.as_fd()).expect("TCP_INFO");
        assert_eq!(received, 3000);
        // The client's ACK may still be on its way; it is at most what was sent.
        assert!(acked <= 500, "{acked}");
        // After both FINs, only data is counted.
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        server.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let (received, acked) = carried(server.as_fd()).expect("TCP_INFO");
            assert_eq!(received, 3000);
            if acked == 500 {
                break;
            }
            assert!(acked < 500, "{acked}");
            assert!(std::time::Instant::now() < deadline, "never acknowledged");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
