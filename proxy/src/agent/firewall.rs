//! A routing peer's forwarding rules: one nftables table of ours, `inet portcullis_agent_<iface>`,
//! replaced atomically with `nft -f -`. From our interface only the proxies' tunnel addresses may
//! reach the routed networks; everything else arriving on it is dropped. Policies stay `accept`
//! so the host's other forwarding is left as it was; what we forward is masqueraded so the
//! routed networks need no route back to the mesh.

use ipnet::IpNet;

use crate::mesh::device::cmd;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot install the agent's nftables rules: {0}")]
    Nft(#[from] cmd::CmdError),
    #[error("cannot enable forwarding ({path}): {source}")]
    Forwarding {
        path: &'static str,
        source: std::io::Error,
    },
}

/// Our table; removed when dropped.
pub struct AgentFirewall {
    table: String,
    interface: String,
    installed: bool,
}

impl AgentFirewall {
    pub fn new(interface: &str) -> AgentFirewall {
        let safe: String = interface
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        AgentFirewall {
            table: format!("portcullis_agent_{safe}"),
            interface: interface.to_string(),
            installed: false,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Installs the rules for these proxies and networks; with no networks, removes the table.
    pub fn apply(&mut self, proxies: &[IpNet], routed: &[IpNet]) -> Result<(), FirewallError> {
        if routed.is_empty() {
            self.remove()?;
            return Ok(());
        }
        enable_forwarding(routed)?;
        cmd::run(
            "nft",
            &["-f", "-"],
            Some(&ruleset(&self.table, &self.interface, proxies, routed)),
        )?;
        self.installed = true;
        Ok(())
    }

    pub fn remove(&mut self) -> Result<(), FirewallError> {
        if self.installed {
            cmd::run("nft", &["-f", "-"], Some(&delete_only(&self.table)))?;
            self.installed = false;
        }
        Ok(())
    }
}

impl Drop for AgentFirewall {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(table = %self.table, error = %e, "cannot remove the agent's nftables table");
        }
    }
}

/// Forwarding is a host-wide switch: it is turned on for the families we route and left on at
/// exit (turning it off could break whatever else relies on it).
fn enable_forwarding(routed: &[IpNet]) -> Result<(), FirewallError> {
    const V4: &str = "/proc/sys/net/ipv4/ip_forward";
    const V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
    let mut paths = Vec::new();
    if routed.iter().any(|n| matches!(n, IpNet::V4(_))) {
        paths.push(V4);
    }
    if routed.iter().any(|n| matches!(n, IpNet::V6(_))) {
        paths.push(V6);
    }
    for path in paths {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(path, "1").map_err(|source| FirewallError::Forwarding { path, source })?;
        tracing::info!(%path, "enabled packet forwarding");
    }
    Ok(())
}

/// Creating the table first makes the delete valid whether or not it existed; the whole text
/// is one transaction, so the rules never have a gap.
fn delete_only(table: &str) -> String {
    format!("table inet {table}\ndelete table inet {table}\n")
}

pub fn ruleset(table: &str, interface: &str, proxies: &[IpNet], routed: &[IpNet]) -> String {
    let mut text = delete_only(table);
    let mut allow = String::new();
    for (family, v4) in [("ip", true), ("ip6", false)] {
        let pick = |nets: &[IpNet]| {
            nets.iter()
                .filter(|n| matches!(n, IpNet::V4(_)) == v4)
                .map(|n| n.trunc().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (sources, destinations) = (pick(proxies), pick(routed));
        if !sources.is_empty() && !destinations.is_empty() {
            allow.push_str(&format!(
                "\t\tiifname \"{interface}\" {family} saddr {{ {sources} }} {family} daddr {{ {destinations} }} accept\n"
            ));
        }
    }
    text.push_str(&format!(
        "table inet {table} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\toifname \"{interface}\" ct state established,related accept\n\
         {allow}\
         \t\tiifname \"{interface}\" drop\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tiifname \"{interface}\" oifname != \"{interface}\" masquerade\n\
         \t}}\n\
         }}\n"
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("test net")).collect()
    }

    #[test]
    fn only_proxies_reach_the_routed_networks() {
        let text = ruleset(
            "portcullis_agent_pca1",
            "pca1",
            &nets(&["100.64.0.1/32", "100.64.0.2/32", "fd00::1/128"]),
            &nets(&["10.20.0.7/24", "192.168.5.9/32"]),
        );
        let expected = "table inet portcullis_agent_pca1\n\
                        delete table inet portcullis_agent_pca1\n\
                        table inet portcullis_agent_pca1 {\n\
                        \tchain forward {\n\
                        \t\ttype filter hook forward priority filter; policy accept;\n\
                        \t\toifname \"pca1\" ct state established,related accept\n\
                        \t\tiifname \"pca1\" ip saddr { 100.64.0.1/32, 100.64.0.2/32 } ip daddr { 10.20.0.0/24, 192.168.5.9/32 } accept\n\
                        \t\tiifname \"pca1\" drop\n\
                        \t}\n\
                        \tchain postrouting {\n\
                        \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                        \t\tiifname \"pca1\" oifname != \"pca1\" masquerade\n\
                        \t}\n\
                        }\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn no_proxies_means_everything_from_the_mesh_is_dropped() {
        let text = ruleset("t", "pca1", &[], &nets(&["10.0.0.0/8"]));
        assert!(!text.contains("saddr"));
        assert!(text.contains("iifname \"pca1\" drop"));
        assert_eq!(
            AgentFirewall::new("pca1a-2").table(),
            "portcullis_agent_pca1a_2"
        );
    }

    /// Feeds the text to `nft --check` where nft and privileges exist.
    #[test]
    fn nft_accepts_the_ruleset() {
        if !nix::unistd::geteuid().is_root() || cmd::run("nft", &["--version"], None).is_err() {
            eprintln!("skipped nft_accepts_the_ruleset: needs root and nft");
            return;
        }
        let text = ruleset(
            "portcullis_agent_check",
            "pcacheck",
            &nets(&["100.64.0.1/32", "fd00::1/128"]),
            &nets(&["10.20.0.0/24", "fd10::/64"]),
        );
        cmd::run("nft", &["--check", "-f", "-"], Some(&text)).expect("nft accepts the ruleset");
    }
}
