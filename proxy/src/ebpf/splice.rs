//! Handing a connected TCP pair to the kernel, so the bytes arriving on either socket leave
//! through the other without a trip through user space.
//!
//! Keying: both splice maps are keyed by socket cookie (`SO_COOKIE`), which the verdict program
//! reads with `bpf_get_socket_cookie`: the same `u64` on both sides by construction, for IPv4
//! and IPv6 alike, never reused while the machine runs. `SPLICE_PEERS[cookie(X)]` holds X's
//! peer and `SPLICE_SOCKETS[cookie(X)]` holds X itself (the programs hang off that map). Every
//! entry's value is a socket, and the kernel deletes a socket's entries when it closes, so a
//! finished pair leaves nothing behind and there is nothing to undo.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use aya::maps::{Map, MapData, SockHash};
use proxy_common::SocketCookie;

use super::EbpfError;
use super::error::chain;
use super::sys::{self, TcpCounts};

/// The send buffer of a spliced socket. The kernel moves spliced bytes in a work item that,
/// when the sending socket's buffer is full, waits a whole scheduler tick (4 ms at HZ=250)
/// before trying again, and a wakeup for freed space does not cut that wait short. The buffer
/// must therefore hold a tick's worth of the stream, or the tick caps throughput: with the
/// 4 MiB autotuning limit, one stream topped out near 4 Gbit/s on loopback. 16 MiB covers
/// 25 Gbit/s at HZ=250. It is a ceiling, not an allocation: memory is charged only for bytes the
/// receiver has not yet acknowledged.
const SPLICED_SEND_BUFFER: usize = 16 << 20;

/// Says once per process that spliced sockets keep the kernel's send buffer.
fn warn_send_buffer_once(error: &std::io::Error) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            %error,
            "cannot raise spliced sockets' send buffers; a single spliced stream may be slower"
        );
    });
}

/// Splices TCP pairs; cheap to clone, one clone per worker. Splicing takes no lock: each call
/// goes straight to the kernel's maps.
#[derive(Clone)]
pub struct Splicer {
    maps: Arc<SpliceMaps>,
}

struct SpliceMaps {
    /// `SPLICE_SOCKETS`, with the parser and verdict programs attached.
    sockets: OwnedFd,
    /// `SPLICE_PEERS`, the redirect targets.
    peers: OwnedFd,
}

impl Splicer {
    /// Our own descriptors of the two maps: a splicer keeps working (and keeps the maps alive)
    /// however long it outlives the `FastPath` it came from.
    pub(super) fn new(sockets: BorrowedFd<'_>, peers: BorrowedFd<'_>) -> std::io::Result<Self> {
        Ok(Splicer {
            maps: Arc::new(SpliceMaps {
                sockets: sockets.try_clone_to_owned()?,
                peers: peers.try_clone_to_owned()?,
            }),
        })
    }

    /// Puts both sockets (connected TCP sockets, IPv4 or IPv6, not yet half-closed) into the
    /// splice maps, so bytes arriving on either go straight out of the other, including any
    /// already waiting in their receive queues.
    ///
    /// Flush whatever user space still holds for either socket before calling. Afterwards keep
    /// reading both sockets: a read sees the end of the stream (and, if a peer vanished, the
    /// bytes the kernel could not forward). Before shutting down one socket's write side after
    /// the other reached its end, wait for [`SpliceMark`] (from [`Splicer::splice_marked`]) to
    /// report that direction flushed: the kernel sends spliced bytes asynchronously, and a
    /// shutdown would cut off any it still holds.
    ///
    /// On error nothing is spliced (unless the error says otherwise) and the caller copies in
    /// user space as before.
    pub fn splice(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<(), EbpfError> {
        self.splice_marked(a, b).map(|_| ())
    }

    /// [`Splicer::splice`], also returning where both streams stood, to tell later when the
    /// kernel has moved everything.
    pub fn splice_marked(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
    ) -> Result<SpliceMark, EbpfError> {
        let ca = cookie(a)?;
        let cb = cookie(b)?;
        if ca == cb {
            return Err(EbpfError::Splice {
                what: "a socket cannot be spliced to itself",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        // Taken before any map holds them: only then does FIONREAD report TCP's own queue.
        let mark = SpliceMark {
            a: StreamMark::take(a)?,
            b: StreamMark::take(b)?,
        };
        let peers = self.maps.peers.as_fd();
        let sockets = self.maps.sockets.as_fd();
        // Redirect targets first: once a socket enters `sockets` its bytes are diverted, and
        // its peer must already be there to take them, or they would land in the socket's own
        // queue, behind later bytes sent straight through.
        insert(peers, ca, b, "cannot add the second socket")?;
        if let Err(e) = insert(peers, cb, a, "cannot add the first socket") {
            let _ = sys::sockhash_remove(peers, ca);
            return Err(e);
        }
        if let Err(e) = insert(sockets, ca, a, "cannot start on the first socket") {
            let _ = sys::sockhash_remove(peers, ca);
            let _ = sys::sockhash_remove(peers, cb);
            return Err(e);
        }
        if let Err(e) = insert(sockets, cb, b, "cannot start on the second socket") {
            return Err(self.undo_half_splice(a, ca, cb, &mark, e));
        }
        // Only a spliced pair gets it: a pair that falls back to copying keeps autotuning.
        for socket in [a, b] {
            if let Err(e) = sys::raise_send_buffer(socket, SPLICED_SEND_BUFFER) {
                warn_send_buffer_once(&e);
            }
        }
        // Bytes that arrived before the sockets entered the map sit in their receive queues
        // until TCP next calls data-ready; make it do so now, or a request sent before the
        // splice would wait for more bytes that may never come.
        for (name, socket) in [("first", a), ("second", b)] {
            if let Err(e) = sys::kick_receive_queue(socket) {
                tracing::warn!(
                    error = %e,
                    socket = name,
                    "spliced, but bytes already queued wait for the next arrival"
                );
            }
        }
        Ok(mark)
    }

    /// Entries in both splice maps: two per socket of a live pair, none once its sockets have
    /// closed. For `/healthz` and tests; it walks the maps, so not for a hot path.
    pub fn map_entries(&self) -> Result<usize, EbpfError> {
        let mut total = 0;
        for (name, fd) in [
            (proxy_common::maps::SPLICE_SOCKETS, &self.maps.sockets),
            (proxy_common::maps::SPLICE_PEERS, &self.maps.peers),
        ] {
            let read_error = |reason: String| EbpfError::ReadMap { map: name, reason };
            let fd = fd.try_clone().map_err(|e| read_error(e.to_string()))?;
            let data = MapData::from_fd(fd).map_err(|e| read_error(chain(&e)))?;
            let map: SockHash<MapData, SocketCookie> =
                SockHash::try_from(Map::SockHash(data)).map_err(|e| read_error(chain(&e)))?;
            for key in map.keys() {
                key.map_err(|e| read_error(chain(&e)))?;
                total += 1;
            }
        }
        Ok(total)
    }

    /// The last insert failed while `a` was already diverting into `b`. Stops `a`, and tells
    /// whether any of its bytes went through the kernel meanwhile: those are still queued for
    /// `b` and would race user-space copies, so then the pair can only be closed.
    fn undo_half_splice(
        &self,
        a: BorrowedFd<'_>,
        ca: u64,
        cb: u64,
        mark: &SpliceMark,
        error: EbpfError,
    ) -> EbpfError {
        let _ = sys::sockhash_remove(self.maps.sockets.as_fd(), ca);
        let _ = sys::sockhash_remove(self.maps.peers.as_fd(), cb);
        // `a` is out of both maps now, so its counts are TCP's own again.
        let moved = match sys::tcp_counts(a) {
            Ok(now) => consumed(&now) != mark.a.consumed,
            Err(_) => true,
        };
        if moved {
            // `b` stays in `peers` (so its queue still drains) until it closes.
            tracing::warn!(%error, "splice failed half-way after moving bytes; the pair must close");
            return EbpfError::Splice {
                what: "failed half-way after the kernel moved bytes; close both sockets",
                source: std::io::Error::from_raw_os_error(libc::EPIPE),
            };
        }
        let _ = sys::sockhash_remove(self.maps.peers.as_fd(), ca);
        error
    }
}

/// Where both streams of a pair stood when the splice began.
#[derive(Clone, Copy, Debug)]
pub struct SpliceMark {
    a: StreamMark,
    b: StreamMark,
}

#[derive(Clone, Copy, Debug)]
struct StreamMark {
    /// Bytes read from the socket's receive queue (by user space) before the splice.
    consumed: u64,
    /// Bytes ever queued for sending on the socket before the splice.
    written: u64,
}

impl StreamMark {
    fn take(socket: BorrowedFd<'_>) -> Result<StreamMark, EbpfError> {
        let now = sys::tcp_counts(socket).map_err(|source| EbpfError::Splice {
            what: "TCP_INFO",
            source,
        })?;
        Ok(StreamMark {
            consumed: consumed(&now),
            written: now.written,
        })
    }
}

impl SpliceMark {
    /// Call once a read on `a` returned end of stream: whether every byte `a` received since
    /// the splice has been queued on `b`, so that shutting down `b`'s write side now cannot cut
    /// the stream short. Poll it (every millisecond or so) until it says so. An error means `b`
    /// can no longer send (reset or closed): the bytes still in the kernel are lost, stop
    /// waiting.
    pub fn a_to_b_flushed(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<bool, EbpfError> {
        flushed(&self.a, a, &self.b, b)
    }

    /// The same for the other direction, once `b` reached end of stream.
    pub fn b_to_a_flushed(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<bool, EbpfError> {
        flushed(&self.b, b, &self.a, a)
    }
}

fn flushed(
    from_mark: &StreamMark,
    from: BorrowedFd<'_>,
    to_mark: &StreamMark,
    to: BorrowedFd<'_>,
) -> Result<bool, EbpfError> {
    let counts = |socket| {
        sys::tcp_counts(socket).map_err(|source| EbpfError::Splice {
            what: "TCP_INFO",
            source,
        })
    };
    let from_now = counts(from)?;
    let to_now = counts(to)?;
    // `from` is at end of stream, so its FIN is one unit of the received sequence space.
    let arrived = from_now
        .received
        .saturating_sub(1)
        .saturating_sub(from_mark.consumed);
    let sent_on = to_now.written.saturating_sub(to_mark.written);
    if sent_on >= arrived {
        return Ok(true);
    }
    if !to_now.can_send {
        return Err(EbpfError::Splice {
            what: "the receiving socket can no longer send; spliced bytes were lost",
            source: std::io::Error::from_raw_os_error(libc::EPIPE),
        });
    }
    Ok(false)
}

/// Bytes taken out of the receive queue so far (valid while the socket is in no sockmap).
fn consumed(counts: &TcpCounts) -> u64 {
    counts.received.saturating_sub(counts.unread)
}

fn cookie(socket: BorrowedFd<'_>) -> Result<u64, EbpfError> {
    socket2::SockRef::from(&socket)
        .cookie()
        .map_err(|source| EbpfError::Splice {
            what: "SO_COOKIE",
            source,
        })
}

fn insert(
    map: BorrowedFd<'_>,
    key: u64,
    socket: BorrowedFd<'_>,
    what: &'static str,
) -> Result<(), EbpfError> {
    sys::sockhash_insert(map, key, socket).map_err(|source| {
        let what = match source.raw_os_error() {
            // The kernel takes only established TCP sockets (not half-closed, not listening).
            Some(libc::EOPNOTSUPP) => "not an established TCP socket (closed or half-closed?)",
            Some(libc::E2BIG) | Some(libc::ENOSPC) => "the splice maps are full",
            _ => what,
        };
        EbpfError::Splice { what, source }
    })
}
