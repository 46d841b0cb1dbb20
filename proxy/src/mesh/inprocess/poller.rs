//! A level-triggered `poll(2)` over the worker's descriptors, rebuilt every round.
//!
//! Level-triggered and rebuilt each time because interest changes with the stack's buffers
//! (read a loopback socket only while its smoltcp send buffer has room): that is back-pressure,
//! and re-registering with epoll on every change would cost as much as this does.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

pub(super) const READ: i16 = libc::POLLIN;
pub(super) const WRITE: i16 = libc::POLLOUT;

#[derive(Default)]
pub(super) struct Poller {
    fds: Vec<libc::pollfd>,
}

impl Poller {
    pub(super) fn clear(&mut self) {
        self.fds.clear();
    }

    /// Adds a descriptor; returns its slot for [`Poller::ready`].
    pub(super) fn add(&mut self, fd: &impl AsRawFd, events: i16) -> usize {
        self.add_raw(fd.as_raw_fd(), events)
    }

    fn add_raw(&mut self, fd: RawFd, events: i16) -> usize {
        self.fds.push(libc::pollfd {
            fd,
            events,
            revents: 0,
        });
        self.fds.len() - 1
    }

    /// Waits up to `timeout` for any registered readiness. Errors (EINTR) count as a timeout:
    /// the caller re-polls every round anyway.
    pub(super) fn wait(&mut self, timeout: Duration) {
        let millis = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a live, exclusively borrowed slice of initialized pollfd structs and
        // its length is passed with it; poll(2) writes only their `revents` fields.
        let rc = unsafe {
            libc::poll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                millis,
            )
        };
        if rc < 0 {
            for fd in &mut self.fds {
                fd.revents = 0;
            }
        }
    }

    /// Whether the descriptor in `slot` is ready for reading (or hung up / failed, which a
    /// read reports).
    pub(super) fn readable(&self, slot: usize) -> bool {
        self.fds
            .get(slot)
            .is_some_and(|fd| fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
    }
}
