//! The routes an interface needs for its peers' allowed IPs. Each interface uses its own metric
//! (1000 + ifindex), so two interfaces may carry the same prefix (two accounts with overlapping
//! ranges) without replacing each other's route.

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::cmd;

/// The prefixes that need a route: every allowed IP outside the interface's own prefix (that
/// one is covered by the address's connected route).
pub fn wanted<'a>(own: IpNet, allowed: impl IntoIterator<Item = &'a IpNet>) -> BTreeSet<IpNet> {
    let own = own.trunc();
    allowed
        .into_iter()
        .map(IpNet::trunc)
        .filter(|net| !own.contains(net))
        .collect()
}

pub fn metric(ifindex: u32) -> String {
    (1000u64 + u64::from(ifindex)).to_string()
}

pub fn add(dev: &str, metric: &str, net: &IpNet) -> Result<(), cmd::CmdError> {
    let net = net.to_string();
    cmd::run(
        "ip",
        &[
            family(&net),
            "route",
            "replace",
            &net,
            "dev",
            dev,
            "metric",
            metric,
        ],
        None,
    )
    .map(drop)
}

pub fn remove(dev: &str, metric: &str, net: &IpNet) -> Result<(), cmd::CmdError> {
    let net = net.to_string();
    cmd::run(
        "ip",
        &[
            family(&net),
            "route",
            "del",
            &net,
            "dev",
            dev,
            "metric",
            metric,
        ],
        None,
    )
    .map(drop)
}

fn family(net: &str) -> &'static str {
    if net.contains(':') { "-6" } else { "-4" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    #[test]
    fn own_prefix_needs_no_route() {
        let allowed = [
            net("100.64.0.1/32"),
            net("10.20.0.7/24"),
            net("100.127.255.254/32"),
            net("fd00::/64"),
        ];
        let got: Vec<String> = wanted(net("100.64.0.5/10"), &allowed)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.20.0.0/24", "fd00::/64"]);
        assert_eq!(metric(7), "1007");
    }
}
