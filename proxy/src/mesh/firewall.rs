//! Keeps the accounts' WireGuard interfaces apart from everything else on the host: a peer may
//! answer the proxy's own connections, and nothing more. It cannot open connections to the
//! proxy host, and nothing is forwarded into or out of a mesh interface, so a peer of one
//! account cannot reach the other accounts' targets (or anything else) through the proxy, even
//! where the host forwards packets. One nftables table per proxy process, replaced atomically.
//! With NB_PROXY_PRIVATE a peer may also open HTTPS connections to the proxy's own tunnel
//! address on that interface, and to nothing else.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
#[error("nftables: {0}")]
pub struct FirewallError(String);

/// One account's interface, and the address it accepts connections on (NB_PROXY_PRIVATE).
pub struct MeshInterface<'a> {
    pub name: &'a str,
    pub accepts: Option<SocketAddr>,
}

pub struct MeshFirewall {
    table: String,
}

impl MeshFirewall {
    pub fn new() -> Self {
        Self {
            table: format!("portcullis_mesh_{}", std::process::id()),
        }
    }

    /// Installs the rules for exactly these interfaces (removes the table when there are none).
    pub fn apply(&self, interfaces: &[MeshInterface<'_>]) -> Result<(), FirewallError> {
        nft(&ruleset(&self.table, interfaces))
    }
}

impl Default for MeshFirewall {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MeshFirewall {
    fn drop(&mut self) {
        let _ = nft(&ruleset(&self.table, &[]));
    }
}

/// Creating the table first makes the delete valid whether or not it existed: the whole text is
/// one transaction, so the rules never have a gap.
fn ruleset(table: &str, interfaces: &[MeshInterface<'_>]) -> String {
    let mut text = format!("table inet {table}\ndelete table inet {table}\n");
    if interfaces.is_empty() {
        return text;
    }
    let set = interfaces
        .iter()
        .map(|i| format!("\"{}\"", i.name))
        .collect::<Vec<_>>()
        .join(", ");
    let accepts: String = interfaces
        .iter()
        .filter_map(|i| {
            let a = i.accepts?;
            let family = if a.is_ipv4() { "ip" } else { "ip6" };
            Some(format!(
                "\t\tiifname \"{}\" {family} daddr {} tcp dport {} accept\n",
                i.name,
                a.ip(),
                a.port()
            ))
        })
        .collect();
    text.push_str(&format!(
        "table inet {table} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -10; policy accept;\n\
         \t\tiifname {{ {set} }} ct state established,related accept\n\
         {accepts}\
         \t\tiifname {{ {set} }} drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority -10; policy accept;\n\
         \t\tiifname {{ {set} }} drop\n\
         \t\toifname {{ {set} }} drop\n\
         \t}}\n\
         }}\n"
    ));
    text
}

fn nft(ruleset: &str) -> Result<(), FirewallError> {
    super::device::cmd::run("nft", &["-f", "-"], Some(ruleset))
        .map(drop)
        .map_err(|e| FirewallError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_every_interface_and_drop_the_rest() {
        let interfaces = [
            MeshInterface {
                name: "pcm1",
                accepts: None,
            },
            MeshInterface {
                name: "pcm2",
                accepts: Some("100.64.0.1:443".parse().unwrap()),
            },
        ];
        let text = ruleset("t", &interfaces);
        assert!(text.contains("iifname \"pcm2\" ip daddr 100.64.0.1 tcp dport 443 accept"));
        assert!(!text.contains("iifname \"pcm1\" ip daddr"));
        let accept = text.find("tcp dport 443 accept").unwrap();
        assert!(accept < text.find("iifname { \"pcm1\", \"pcm2\" } drop").unwrap());
        assert!(text.starts_with("table inet t\ndelete table inet t\n"));
        assert!(
            text.contains("iifname { \"pcm1\", \"pcm2\" } ct state established,related accept")
        );
        assert!(text.contains("oifname { \"pcm1\", \"pcm2\" } drop"));
        assert_eq!(ruleset("t", &[]), "table inet t\ndelete table inet t\n");
    }
}
