//! In-kernel TCP splice between the two sockets of a pair.
//!
//! User space puts each socket X of a pair in both maps: `SPLICE_PEERS[cookie(X)] = peer(X)`
//! first, then `SPLICE_SOCKETS[cookie(X)] = X`. Entering `SPLICE_SOCKETS` starts the stream
//! parser on X; by then both sockets are already in `SPLICE_PEERS`, so every redirect finds its
//! target and no byte is ever left behind in a socket's own queue out of order. When a socket
//! closes, the kernel removes it from both maps: nothing outlives the pair.

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_parser, stream_verdict},
    maps::SockHash,
    programs::SkBuffContext,
};
use proxy_common::{MAX_SPLICED_SOCKETS, SocketCookie};

#[map]
static SPLICE_SOCKETS: SockHash<SocketCookie> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[map]
static SPLICE_PEERS: SockHash<SocketCookie> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);

/// Every skb is a message of its own: a splice has no framing to respect.
#[stream_parser]
fn splice_parser(ctx: SkBuffContext) -> u32 {
    ctx.len()
}

#[stream_verdict]
fn splice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the socket the context carries.
    let mut cookie: SocketCookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // On success the helper has set the redirect and SK_PASS makes the kernel follow it. On a
    // miss (the peer is gone) SK_PASS without a redirect queues the bytes on this socket, where
    // user space reads them: never drop, TCP has already acknowledged them.
    let _ = SPLICE_PEERS.redirect_skb(&ctx, &mut cookie, 0);
    SK_PASS
}
