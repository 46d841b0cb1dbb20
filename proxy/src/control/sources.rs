//! Where services come from: the mappings file and management. The table the workers serve is
//! always built from both, whole, and swapped in at once; the L4 listen ports and the kernel
//! fast path's maps follow each new table.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use ipnet::IpNet;
use proto::ProxyMapping;
use tokio::sync::watch;

use crate::ebpf::{L4Protocol, PortPolicySpec};
use crate::l4::listeners::L4Listeners;
use crate::routes::{L4Table, RouteTable, Transport};
use crate::state::Shared;

pub struct Sources {
    inner: Mutex<Inner>,
}

struct Inner {
    file: Vec<ProxyMapping>,
    management: Vec<ProxyMapping>,
    /// The proxy's own listeners, which no L4 service may take.
    reserved: Vec<(Transport, u16, &'static str)>,
    /// None when custom ports are switched off.
    listeners: Option<L4Listeners>,
    /// The domains ACME should hold certificates for; None when ACME is off.
    acme_domains: Option<watch::Sender<BTreeSet<String>>>,
    /// Some L4 port of the last table could not be opened (held by another program).
    ports_failed: bool,
}

impl Sources {
    pub fn new(
        reserved: Vec<(Transport, u16, &'static str)>,
        listeners: Option<L4Listeners>,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner {
                file: Vec::new(),
                management: Vec::new(),
                reserved,
                listeners,
                acme_domains: None,
                ports_failed: false,
            }),
        }
    }

    /// Publishes the same services again, which retries ports that could not be opened.
    pub fn republish(&self, shared: &Shared) -> HashMap<String, String> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        publish(&mut inner, shared)
    }

    /// True when a port of the current table could not be opened; publishing again retries it.
    pub fn ports_failed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ports_failed
    }

    /// From now on, every published table also tells ACME which domains need a certificate.
    pub fn feed_acme(&self) -> watch::Receiver<BTreeSet<String>> {
        let (tx, rx) = watch::channel(BTreeSet::new());
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .acme_domains = Some(tx);
        rx
    }

    pub fn set_file(
        &self,
        mappings: Vec<ProxyMapping>,
        shared: &Shared,
    ) -> HashMap<String, String> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.file = mappings;
        publish(&mut inner, shared)
    }

    /// Replaces management's services; returns the ids that could not be served, with why.
    pub fn set_management(
        &self,
        mappings: Vec<ProxyMapping>,
        shared: &Shared,
    ) -> HashMap<String, String> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.management = mappings;
        publish(&mut inner, shared)
    }
}

fn publish(inner: &mut Inner, shared: &Shared) -> HashMap<String, String> {
    // Management's services come last, so they win over a file service with the same domain.
    let all: Vec<ProxyMapping> = inner
        .file
        .iter()
        .chain(inner.management.iter())
        .filter(|m| inner.listeners.is_some() || crate::routes::L4Mode::parse(&m.mode).is_none())
        .cloned()
        .collect();
    let previous = shared.routes.load_full();
    let (table, report) = RouteTable::build(&all, &previous, &inner.reserved);
    let mut skipped = HashMap::new();
    for (id, err) in report.skipped {
        skipped.insert(id, err.to_string());
    }
    if inner.listeners.is_none() {
        for m in inner.file.iter().chain(inner.management.iter()) {
            if crate::routes::L4Mode::parse(&m.mode).is_some() {
                skipped.insert(
                    m.id.clone(),
                    "custom ports are switched off (NB_PROXY_SUPPORTS_CUSTOM_PORTS=false)"
                        .to_string(),
                );
            }
        }
    }
    if let Some(feed) = &inner.acme_domains {
        let domains: BTreeSet<String> = all
            .iter()
            .filter(|m| {
                crate::routes::L4Mode::parse(&m.mode).is_none() && !skipped.contains_key(&m.id)
            })
            .filter_map(|m| crate::acme::issuable_domain(&m.domain))
            .collect();
        feed.send_if_modified(|current| {
            let changed = *current != domains;
            *current = domains;
            changed
        });
    }
    update_fast_path(shared, &table.l4);
    // The table goes out before new ports open, so a port's first connection finds its service.
    let l4 = std::sync::Arc::new(table);
    shared.publish_routes_arc(l4.clone());
    let port_failures = sync_ports(inner, &l4.l4);
    inner.ports_failed = !port_failures.is_empty();
    skipped.extend(port_failures);
    for (id, err) in &skipped {
        tracing::error!(service = %id, error = %err, "service not served");
    }
    skipped
}

/// Opens and closes listen ports to match the table; returns the services whose port failed.
fn sync_ports(inner: &mut Inner, l4: &L4Table) -> HashMap<String, String> {
    let Some(listeners) = inner.listeners.as_mut() else {
        return HashMap::new();
    };
    let failed = listeners.sync(&l4.ports());
    let mut skipped = HashMap::new();
    for ((transport, port), reason) in failed {
        for s in l4.services_on(transport, port) {
            skipped.insert(s.id.clone(), reason.clone());
        }
    }
    skipped
}

/// Puts the current route table's port policies (and CrowdSec bans) into the kernel maps.
pub fn refresh_fast_path(shared: &Shared) {
    let table = shared.routes.load_full();
    update_fast_path(shared, &table.l4);
}

fn update_fast_path(shared: &Shared, l4: &L4Table) {
    let mut guard = shared.fast_path();
    let Some(fp) = guard.as_mut() else {
        return;
    };
    let mut specs = Vec::new();
    // Ports whose one service enforces CrowdSec get the bans too, in what the tries have left.
    let mut crowdsec_ports = Vec::new();
    for (transport, port) in l4.ports() {
        let services = l4.services_on(transport, port);
        // Several TLS services share a port; the kernel can only drop what every one of them
        // refuses, so only a port with one service gets its restrictions in XDP.
        // Behind a balancer speaking PROXY protocol the packets' source is the balancer, not
        // the client: only user space (which reads the header) can judge those ports.
        let behind_balancer = transport == Transport::Tcp
            && shared.config.proxy_protocol
            && !shared.config.trusted_proxies.is_empty();
        let (allowed, blocked) = match services.as_slice() {
            [one] if !behind_balancer => {
                if one.crowdsec == crate::crowdsec::CrowdsecMode::Enforce {
                    crowdsec_ports.push(specs.len());
                }
                (one.access.allowed.clone(), one.access.blocked.clone())
            }
            _ => (Vec::new(), Vec::new()),
        };
        specs.push(PortPolicySpec {
            port,
            protocol: match transport {
                Transport::Tcp => L4Protocol::Tcp,
                Transport::Udp => L4Protocol::Udp,
            },
            allowed,
            blocked,
        });
    }
    if let Some(bouncer) = shared.crowdsec.as_deref()
        && !crowdsec_ports.is_empty()
    {
        add_bans(&mut specs, &crowdsec_ports, bouncer.blocked_nets());
    }
    if let Err(e) = fp.set_ports(&specs) {
        tracing::error!(error = %e, "kernel fast path maps not updated; user space still filters");
    }
}

/// Adds the bans to the ports at `ports`, within the room the shared block tries have left
/// (split evenly between those ports). Bans that do not fit are still refused in user space.
fn add_bans(specs: &mut [PortPolicySpec], ports: &[usize], (v4, v6): (Vec<IpNet>, Vec<IpNet>)) {
    let max = proxy_common::MAX_SOURCES as usize;
    let used = |want_v4: bool| -> usize {
        specs
            .iter()
            .flat_map(|s| &s.blocked)
            .filter(|n| n.addr().is_ipv4() == want_v4)
            .count()
    };
    let share_v4 = max.saturating_sub(used(true)) / ports.len();
    let share_v6 = max.saturating_sub(used(false)) / ports.len();
    if v4.len() > share_v4 || v6.len() > share_v6 {
        tracing::debug!(
            v4 = v4.len(),
            v6 = v6.len(),
            share_v4,
            share_v6,
            "CrowdSec bans beyond the kernel maps' room are refused in user space only"
        );
    }
    for &i in ports {
        let blocked = &mut specs[i].blocked;
        blocked.extend(v4.iter().take(share_v4).copied());
        blocked.extend(v6.iter().take(share_v6).copied());
        blocked.sort_unstable();
        blocked.dedup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16, blocked: &[&str]) -> PortPolicySpec {
        PortPolicySpec {
            port,
            protocol: L4Protocol::Tcp,
            allowed: Vec::new(),
            blocked: blocked.iter().map(|b| b.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn bans_join_enforcing_ports_within_the_tries_room() {
        let mut specs = vec![spec(1, &["203.0.113.0/24"]), spec(2, &[]), spec(3, &[])];
        let v4: Vec<IpNet> = vec![
            "192.0.2.1/32".parse().unwrap(),
            "203.0.113.0/24".parse().unwrap(),
        ];
        add_bans(&mut specs, &[0, 2], (v4, Vec::new()));
        let shown = |s: &PortPolicySpec| -> Vec<String> {
            s.blocked.iter().map(ToString::to_string).collect()
        };
        assert_eq!(shown(&specs[0]), ["192.0.2.1/32", "203.0.113.0/24"]);
        assert!(
            specs[1].blocked.is_empty(),
            "a port that only observes gets no bans"
        );
        assert_eq!(shown(&specs[2]), ["192.0.2.1/32", "203.0.113.0/24"]);

        // More bans than the shared trie holds: each enforcing port gets an equal share and the
        // whole set still fits.
        let max = proxy_common::MAX_SOURCES as usize;
        let many: Vec<IpNet> = (0..max as u32)
            .map(|i| {
                IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::from(
                    0x0a00_0000 + i,
                )))
            })
            .collect();
        let mut specs = vec![spec(1, &["203.0.113.0/24"]), spec(2, &[])];
        add_bans(&mut specs, &[0, 1], (many, Vec::new()));
        let total: usize = specs.iter().map(|s| s.blocked.len()).sum();
        assert!(total <= max, "{total} entries");
        assert_eq!(specs[1].blocked.len(), (max - 1) / 2);
    }
}
