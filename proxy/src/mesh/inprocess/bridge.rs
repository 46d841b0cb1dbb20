//! One bridged connection: a loopback TCP stream on one side, a smoltcp TCP socket towards the
//! mesh target on the other, bytes copied both ways through the smoltcp buffers.
//!
//! Back-pressure is the buffers themselves: the loopback side is only read while the smoltcp
//! send buffer has room, and smoltcp's receive window only opens as the loopback side drains.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use smoltcp::socket::tcp::{self, RecvError, State};

use super::poller::{READ, WRITE};

/// A target that neither accepts nor refuses within this long is given up on.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After both directions closed, how long our FIN may wait for its ACK before we abort.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Copies per direction per round: two covers the wrap-around of the ring buffers.
const COPIES: usize = 2;

pub(super) struct Conn {
    pub(super) target: SocketAddr,
    pub(super) port: u16,
    pub(super) handle: smoltcp::iface::SocketHandle,
    stream: TcpStream,
    established: bool,
    /// The loopback client finished sending: our FIN is queued towards the target.
    client_done: bool,
    /// The target finished sending: the loopback write half is shut.
    target_done: bool,
    /// Connect deadline before `established`, close deadline once both sides are done.
    deadline: Option<Instant>,
    /// Set when the connection is over; the worker removes it after the next stack poll so
    /// an RST from `abort` still goes out.
    pub(super) finished: bool,
    /// Since when bytes have been waiting for the target's acknowledgement, without a break.
    pub(super) unacked_since: Option<Instant>,
}

impl Conn {
    pub(super) fn new(
        target: SocketAddr,
        port: u16,
        handle: smoltcp::iface::SocketHandle,
        stream: TcpStream,
        now: Instant,
    ) -> Self {
        Conn {
            target,
            port,
            handle,
            stream,
            established: false,
            client_done: false,
            target_done: false,
            deadline: Some(now + CONNECT_TIMEOUT),
            finished: false,
            unacked_since: None,
        }
    }

    pub(super) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// What to wait for on the loopback stream.
    pub(super) fn interest(&self, sock: &tcp::Socket) -> i16 {
        let mut events = 0;
        if self.established && !self.client_done && sock.can_send() {
            events |= READ;
        }
        if !self.target_done && sock.can_recv() {
            events |= WRITE;
        }
        events
    }

    /// Moves what can move. Returns whether any byte or state changed.
    pub(super) fn pump(&mut self, sock: &mut tcp::Socket, readable: bool, now: Instant) -> bool {
        if self.finished {
            return false;
        }
        if !self.established {
            match sock.state() {
                State::SynSent | State::SynReceived => {
                    if self.deadline.is_some_and(|d| now >= d) {
                        tracing::debug!(target = %self.target, "mesh connect timed out");
                        sock.abort();
                        self.reset_client();
                        return true;
                    }
                    return false;
                }
                State::Closed | State::Listen => {
                    // Refused (RST) or aborted by smoltcp's own timeout.
                    tracing::debug!(target = %self.target, "mesh connect refused");
                    self.reset_client();
                    return true;
                }
                _ => {
                    self.established = true;
                    self.deadline = None;
                }
            }
        }
        let mut moved = self.target_to_client(sock);
        if self.finished {
            return true;
        }
        if readable {
            moved |= self.client_to_target(sock);
        }
        if self.finished {
            return true;
        }
        if self.client_done && self.target_done {
            match sock.state() {
                State::Closed | State::TimeWait => {
                    self.finished = true;
                    return true;
                }
                _ => {
                    let deadline = *self.deadline.get_or_insert(now + CLOSE_TIMEOUT);
                    if now >= deadline {
                        sock.abort();
                        self.finished = true;
                        return true;
                    }
                }
            }
        }
        moved
    }

    fn target_to_client(&mut self, sock: &mut tcp::Socket) -> bool {
        if self.target_done {
            return false;
        }
        let mut moved = false;
        for _ in 0..COPIES {
            if !sock.can_recv() {
                break;
            }
            let stream = &self.stream;
            let written = sock.recv(|buf| match (&*stream).write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match written {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(_)) => moved = true,
                Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => break,
                Ok(Err(e)) => {
                    tracing::debug!(target = %self.target, error = %e, "mesh bridge client gone");
                    sock.abort();
                    self.finished = true;
                    return true;
                }
            }
        }
        if !sock.can_recv() {
            // An empty read tells a clean FIN (Finished) from a reset or timeout (InvalidState).
            match sock.recv(|_| (0, ())) {
                Ok(()) => {}
                Err(RecvError::Finished) => {
                    let _ = self.stream.shutdown(Shutdown::Write);
                    self.target_done = true;
                    moved = true;
                }
                Err(RecvError::InvalidState) => {
                    tracing::debug!(target = %self.target, "mesh connection reset by target");
                    self.reset_client();
                    moved = true;
                }
            }
        }
        moved
    }

    fn client_to_target(&mut self, sock: &mut tcp::Socket) -> bool {
        if self.client_done {
            return false;
        }
        let mut moved = false;
        for _ in 0..COPIES {
            if !sock.can_send() {
                break;
            }
            let stream = &self.stream;
            let read = sock.send(|buf| match (&*stream).read(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match read {
                Ok(Ok(0)) => {
                    // The client half-closed: send our FIN after what is queued.
                    sock.close();
                    self.client_done = true;
                    return true;
                }
                Ok(Ok(_)) => moved = true,
                Err(_) => break,
                Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => break,
                Ok(Err(e)) => {
                    tracing::debug!(target = %self.target, error = %e, "mesh bridge client failed");
                    sock.abort();
                    self.reset_client();
                    return true;
                }
            }
        }
        moved
    }

    /// Ends the loopback side with an RST, so the client sees a refusal or reset rather than
    /// a clean end of data that never all arrived.
    pub(super) fn reset_client(&mut self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        self.finished = true;
    }
}
