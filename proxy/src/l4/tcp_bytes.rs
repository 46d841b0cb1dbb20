//! The bytes a TCP socket carried, as the kernel counts them (`TCP_INFO`). Once a connection
//! is spliced in the kernel its bytes never cross user space, so this is the only count left
//! for its access log.

use std::os::fd::{AsRawFd, BorrowedFd};

// `tcpi_state` values (include/net/tcp_states.h).
const TIME_WAIT: u8 = 6;
const CLOSE: u8 = 7;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// (data bytes received from the peer, data bytes sent to it, each once); `None` when the kernel
/// does not report them.
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
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_retrans) + 8;
    if rc != 0 || (len as usize) < needed {
        return None;
    }
    // SAFETY: zeroed, then filled by the kernel; every field is a plain integer.
    let info = unsafe { info.assume_init() };
    // Received bytes are counted in sequence space, where the peer's FIN takes one once it
    // arrived (the socket's state says whether it did). Sent bytes are data only, but count
    // retransmissions again. Acknowledged bytes would lag behind a peer's delayed ACK.
    let fin_received = matches!(
        info.tcpi_state,
        CLOSE_WAIT | LAST_ACK | CLOSING | TIME_WAIT | CLOSE
    );
    Some((
        info.tcpi_bytes_received
            .saturating_sub(u64::from(fin_received)),
        info.tcpi_bytes_sent.saturating_sub(info.tcpi_bytes_retrans),
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
        assert_eq!(carried(server.as_fd()).expect("TCP_INFO"), (3000, 500));
        // After both FINs, still only data is counted.
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        server.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        assert_eq!(carried(server.as_fd()).expect("TCP_INFO"), (3000, 500));
    }
}
