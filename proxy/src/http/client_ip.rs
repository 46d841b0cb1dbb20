//! The client's real address. Only a connection from a trusted proxy (`NB_PROXY_TRUSTED_PROXIES`)
//! may name another one in `X-Forwarded-For`; the client is then the right-most address in the
//! chain that is not itself a trusted proxy (everything left of it could be forged by the client).

use std::net::IpAddr;

use ipnet::IpNet;

use super::head::RequestHead;
use crate::routes::access::canonical;

/// Most `X-Forwarded-For` entries looked at (a bounded cost for hostile headers).
const MAX_HOPS: usize = 32;

/// The client of a request that came from `peer` (the socket peer, or the source of the PROXY
/// header a trusted balancer sent): `peer` itself unless it is in `trusted`, else the right-most
/// `X-Forwarded-For` hop, over all such header lines, that is not trusted. Canonical (no
/// IPv4-mapped IPv6 form). Use it for access rules, lockout and logs; what is forwarded to the
/// target in `X-Forwarded-For` is `http::rewrite`'s business.
pub fn resolve(peer: IpAddr, trusted: &[IpNet], head: &RequestHead) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !is_trusted(peer, trusted) {
        return peer;
    }
    let values: Vec<&[u8]> = head
        .fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"x-forwarded-for"))
        .map(|(_, v)| v)
        .collect();
    from_chain(peer, trusted, &values)
}

fn from_chain(peer: IpAddr, trusted: &[IpNet], values: &[&[u8]]) -> IpAddr {
    let mut client = peer;
    let hops = values
        .iter()
        .rev()
        .flat_map(|v| v.rsplit(|b| *b == b','))
        .take(MAX_HOPS);
    for hop in hops {
        let hop = hop.trim_ascii();
        if hop.is_empty() {
            // `a,,b` or a trailing comma: nobody's entry.
            continue;
        }
        let Some(ip) = parse_hop(hop) else {
            // A garbled entry: nothing left of it can be trusted, so the last good hop stands.
            break;
        };
        client = canonical(ip);
        if !is_trusted(client, trusted) {
            break;
        }
    }
    client
}

/// An address, with or without a port (some balancers append `203.0.113.5:41000` or
/// `[2001:db8::5]:41000`).
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(hop).ok()?;
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn head(xff: &[&str]) -> RequestHead {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for v in xff {
            raw.push_str(&format!("X-Forwarded-For: {v}\r\n"));
        }
        raw.push_str("\r\n");
        let mut h = RequestHead::default();
        h.parse(raw.as_bytes()).unwrap().unwrap();
        h
    }

    #[test]
    fn untrusted_senders_are_their_own_client() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            resolve(ip("192.0.2.1"), &trusted, &head(&["1.2.3.4"])),
            ip("192.0.2.1")
        );
        assert_eq!(
            resolve(ip("192.0.2.1"), &[], &head(&["1.2.3.4"])),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn right_most_untrusted_hop_wins() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        // The client forged the left-most entry; the trusted balancer appended the real one.
        let h = head(&["6.6.6.6, 203.0.113.9", "10.1.1.1"]);
        assert_eq!(resolve(ip("10.0.0.2"), &trusted, &h), ip("203.0.113.9"));
        assert_eq!(
            resolve(
                ip("::ffff:10.0.0.2"),
                &trusted,
                &head(&["::ffff:198.51.100.4"])
            ),
            ip("198.51.100.4")
        );
        // Only trusted hops: the left-most one is the best we know.
        assert_eq!(
            resolve(ip("10.0.0.2"), &trusted, &head(&["10.9.9.9"])),
            ip("10.9.9.9")
        );
        // No header: the proxy itself.
        assert_eq!(
            resolve(ip("10.0.0.2"), &trusted, &head(&[])),
            ip("10.0.0.2")
        );
        // Entries with ports, empty entries and whitespace.
        assert_eq!(
            resolve(
                ip("10.0.0.2"),
                &trusted,
                &head(&["6.6.6.6, 203.0.113.9:41000 ,, 10.3.3.3:80,"])
            ),
            ip("203.0.113.9")
        );
        assert_eq!(
            resolve(ip("10.0.0.2"), &trusted, &head(&["[2001:db8::5]:443"])),
            ip("2001:db8::5")
        );
        // A trusted IPv4-mapped hop is trusted as its IPv4 address.
        assert_eq!(
            resolve(
                ip("10.0.0.2"),
                &trusted,
                &head(&["203.0.113.9, ::ffff:10.4.4.4"])
            ),
            ip("203.0.113.9")
        );
        // Garbage stops the walk: the last good hop stands, never anything left of it.
        assert_eq!(
            resolve(ip("10.0.0.2"), &trusted, &head(&["6.6.6.6, junk"])),
            ip("10.0.0.2")
        );
        assert_eq!(
            resolve(
                ip("10.0.0.2"),
                &trusted,
                &head(&["6.6.6.6, junk, 10.3.3.3"])
            ),
            ip("10.3.3.3")
        );
    }
}
