//! The PROXY protocol v2 header a target asked for with `proxy_protocol`.

use std::net::SocketAddr;

use ppp::v2::{Builder, Command, IPv4, IPv6, Protocol, Version};

use crate::routes::access::canonical;

/// The header telling the target who the client is (`client`) and which proxy address it
/// connected to (`proxy`). Mixed families are written in IPv6 form.
pub fn v2(client: SocketAddr, proxy: SocketAddr, protocol: Protocol) -> std::io::Result<Vec<u8>> {
    let (c_ip, p_ip) = (canonical(client.ip()), canonical(proxy.ip()));
    let command = Version::Two | Command::Proxy;
    let builder = match (c_ip, p_ip) {
        (std::net::IpAddr::V4(c), std::net::IpAddr::V4(p)) => Builder::with_addresses(
            command,
            protocol,
            IPv4::new(c, p, client.port(), proxy.port()),
        ),
        _ => {
            let v6 = |ip: std::net::IpAddr| match ip {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                std::net::IpAddr::V6(v6) => v6,
            };
            Builder::with_addresses(
                command,
                protocol,
                IPv6::new(v6(c_ip), v6(p_ip), client.port(), proxy.port()),
            )
        }
    };
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_stream_layout() {
        let h = v2(
            "10.0.0.2:40000".parse().unwrap(),
            "[::ffff:10.0.0.1]:7000".parse().unwrap(),
            Protocol::Stream,
        )
        .unwrap();
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21, "v2, PROXY");
        assert_eq!(h[13], 0x11, "IPv4, stream");
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[10, 0, 0, 2]);
        assert_eq!(&h[20..24], &[10, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 40000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 7000);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn ipv6_when_families_differ() {
        let h = v2(
            "[2001:db8::1]:1".parse().unwrap(),
            "10.0.0.1:2".parse().unwrap(),
            Protocol::Stream,
        )
        .unwrap();
        assert_eq!(h[13], 0x21);
        assert_eq!(h.len(), 16 + 36);
    }
}
