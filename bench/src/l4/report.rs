//! The L4 part of the report: medians, ratios against HAProxy and nginx, the XDP-against-
//! nftables table and the targets of issue #5.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::drop::{DropResult, FILTERS, Filter};
use super::proxies::{ALL, L4Kind};
use super::throughput::{TcpMedians, TcpResult, UdpMedians, UdpResult};
use crate::machine::Machine;
use crate::report::{Target, fmt, fmt_ratio, ratio, target};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct L4Effort {
    pub rounds: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct L4Report {
    pub machine: Machine,
    pub effort: L4Effort,
    #[serde(default)]
    pub tcp: Vec<TcpResult>,
    #[serde(default)]
    pub udp: Option<UdpResult>,
    #[serde(default)]
    pub drop: Option<DropResult>,
    /// Computed from the medians when written.
    #[serde(default, skip_deserializing)]
    pub targets: Vec<Target>,
}

/// What the TCP target is checked against: the spliced Portcullis's throughput over HAProxy's.
pub const SPLICE_OVER_HAPROXY: f64 = 1.5;
/// XDP's drop rate over nftables' (input hook).
pub const XDP_OVER_NFT: f64 = 5.0;

impl L4Report {
    pub fn compute_targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        for r in &self.tcp {
            let gbps = |k| r.get(k).map(|m| m.gbit_per_sec);
            let mut t = target(
                &format!("l4-tcp, {} stream{}", r.streams, plural(r.streams)),
                "spliced throughput ≥ 1.5× HAProxy's",
                ratio(gbps(L4Kind::PortcullisSplice), gbps(L4Kind::Haproxy)),
                SPLICE_OVER_HAPROXY,
                true,
            );
            t.note = match (
                r.failed.get(&L4Kind::PortcullisSplice),
                r.unavailable.get(&L4Kind::PortcullisSplice),
            ) {
                (Some(why), _) => Some(format!("the spliced runs failed ({})", first_line(why))),
                (None, Some(why)) => Some(why.clone()),
                (None, None) if t.met == Some(false) => load_core_bound(r),
                (None, None) => None,
            };
            out.push(t);
        }
        if let Some(d) = &self.drop {
            let rate = |f| d.medians.get(&f).map(|m| m.dropped_per_sec);
            let cost = |f| d.medians.get(&f).map(|m| m.softirq_ns_per_drop);
            let mut t = target(
                "xdp-drop",
                "XDP drop rate ≥ 5× nftables' (input hook)",
                ratio(rate(Filter::Xdp), rate(Filter::NftInput)),
                XDP_OVER_NFT,
                true,
            );
            t.note = match d.unavailable.get(&Filter::Xdp) {
                _ if d.failed.contains_key(&Filter::Xdp) => {
                    Some("the XDP runs failed (see below)".to_string())
                }
                Some(reason) => Some(reason.clone()),
                None if d.sender_bound() => Some(format!(
                    "sender-bound: every filter dropped all the flood could send, so the rate \
                     measures the sending core; receiver CPU per drop, nftables / XDP: {}",
                    fmt_ratio(ratio(cost(Filter::NftInput), cost(Filter::Xdp)))
                )),
                None => None,
            };
            out.push(t);
        }
        out
    }
}

/// Why a missed splice target could not be met on this placement, when the figures show it:
/// the kernel forwards a spliced stream on the core that received its packets (on loopback the
/// sender's, the load core), so the spliced proxy's own core stays idle and the load core carries
/// iperf3's two ends and the forwarding alone. Said only when the spliced path's whole cost per
/// MiB exceeds what that core could spend at the wanted rate.
fn load_core_bound(r: &TcpResult) -> Option<String> {
    let splice = r.get(L4Kind::PortcullisSplice)?;
    let haproxy = r.get(L4Kind::Haproxy)?;
    // Only when the proxy's own CPU says the kernel did the forwarding elsewhere.
    if splice.proxy_cpu_us_per_mib > 0.05 * splice.all_cpu_us_per_mib || haproxy.gbit_per_sec <= 0.0
    {
        return None;
    }
    let mib_per_sec = |gbit: f64| gbit * 1e9 / 8.0 / f64::from(1u32 << 20);
    let budget = 1e6 / (SPLICE_OVER_HAPROXY * mib_per_sec(haproxy.gbit_per_sec));
    if splice.all_cpu_us_per_mib <= budget {
        return None;
    }
    let load_side = haproxy.all_cpu_us_per_mib - haproxy.proxy_cpu_us_per_mib;
    Some(format!(
        "the kernel forwards a spliced stream on the core that received it, here the load core, \
         so the proxy's core stayed idle; at {SPLICE_OVER_HAPROXY}× HAProxy's rate that core would \
         have {budget:.0} µs per MiB for everything, and the spliced path took {:.0} in all, of \
         which iperf3's two ends take about {load_side:.0} (HAProxy's run less HAProxy)",
        splice.all_cpu_us_per_mib
    ))
}

impl L4Report {
    /// Every run that failed, one line each: the bench exits with an error when there is any.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.tcp {
            out.extend(
                r.failed
                    .iter()
                    .map(|(k, why)| format!("l4-tcp/{} through {}: {why}", r.streams, k.name())),
            );
        }
        if let Some(u) = &self.udp {
            out.extend(
                u.failed
                    .iter()
                    .map(|(k, why)| format!("l4-udp through {}: {why}", k.name())),
            );
        }
        if let Some(d) = &self.drop {
            out.extend(
                d.failed
                    .iter()
                    .map(|(f, why)| format!("xdp-drop with {}: {why}", f.name())),
            );
        }
        out
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Appends the L4 part to the report's Markdown.
pub fn markdown(s: &mut String, r: &L4Report) {
    let m = &r.machine;
    let e = &r.effort;
    let _ = writeln!(s, "# L4: TCP and UDP proxying, XDP against nftables\n");
    let _ = writeln!(
        s,
        "Measured {} on {} ({} cores), kernel {}; load average {} as the run began (other work \
         on the machine skews these figures). Placement: {}. Portcullis {}, {}, {}, {}, {}.\n",
        m.date_utc,
        m.cpu,
        m.cores,
        m.kernel,
        if m.load_average.is_empty() {
            "unknown"
        } else {
            &m.load_average
        },
        m.placement,
        m.portcullis,
        m.haproxy,
        m.nginx,
        m.iperf3,
        m.nft
    );
    let _ = writeln!(
        s,
        "Each figure is the median of {} rounds of {:?}; within a round the proxies take turns; each \
         proxy had one unmeasured {:?} warm-up run per workload. Proxy CPU is user + system time \
         from `/proc/<pid>/stat`. \"All CPU\" adds both iperf3 ends and the kernel threads \
         (kworkers, ksoftirqd): a spliced connection's bytes are moved by the kernel, partly in \
         kworkers, so the proxy's own CPU alone would flatter the splice.\n",
        e.rounds, e.duration, e.warmup
    );
    let _ = writeln!(
        s,
        "## Targets of issue #5\n\n| workload | target | result |\n|---|---|---|"
    );
    for t in r.compute_targets() {
        let _ = writeln!(s, "| {} | {} | {} |", t.workload, t.goal, t.gap());
    }
    let _ = writeln!(s);
    if !r.tcp.is_empty() {
        tcp_markdown(s, &r.tcp);
    }
    if let Some(u) = &r.udp {
        udp_markdown(s, u);
    }
    if let Some(d) = &r.drop {
        drop_markdown(s, d);
    }
}

type TcpMetric = fn(&TcpMedians) -> f64;

fn tcp_markdown(s: &mut String, results: &[TcpResult]) {
    let _ = writeln!(
        s,
        "## L4 TCP throughput (iperf3 through each proxy)\n\n\
         | streams | metric | Portcullis, splice | Portcullis, copy | HAProxy | nginx | splice/HAProxy | \
         splice/nginx | copy/HAProxy | copy/nginx |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let rows: [(&str, TcpMetric); 4] = [
        ("Gbit/s", |m| m.gbit_per_sec),
        ("proxy CPU µs per MiB", |m| m.proxy_cpu_us_per_mib),
        ("… of which user space", |m| m.proxy_user_us_per_mib),
        (
            "all CPU µs per MiB (proxy, iperf3 both ends, kernel threads)",
            |m| m.all_cpu_us_per_mib,
        ),
    ];
    let mut notes = BTreeMap::new();
    let mut failures = Vec::new();
    for r in results {
        for (label, f) in rows {
            let v = |k: L4Kind| r.get(k).map(f);
            let cells: Vec<String> = ALL
                .iter()
                .map(|k| {
                    cell(
                        v(*k),
                        r.failed.contains_key(k),
                        r.unavailable.contains_key(k),
                    )
                })
                .collect();
            let (sp, cp) = (v(L4Kind::PortcullisSplice), v(L4Kind::PortcullisCopy));
            let (h, n) = (v(L4Kind::Haproxy), v(L4Kind::Nginx));
            let _ = writeln!(
                s,
                "| {} | {label} | {} | {} | {} | {} | {} |",
                r.streams,
                cells.join(" | "),
                fmt_ratio(ratio(sp, h)),
                fmt_ratio(ratio(sp, n)),
                fmt_ratio(ratio(cp, h)),
                fmt_ratio(ratio(cp, n)),
            );
        }
        notes.extend(r.unavailable.iter().map(|(k, why)| (*k, why.clone())));
        for (k, why) in &r.failed {
            failures.push(format!(
                "{} stream{}, {}: **failed** ({})",
                r.streams,
                plural(r.streams),
                k.label(),
                first_line(why)
            ));
        }
    }
    let _ = writeln!(s);
    for (k, why) in notes {
        let _ = writeln!(s, "{}: {why}.\n", k.label());
    }
    for f in failures {
        let _ = writeln!(s, "{f}.\n");
    }
}

type UdpMetric = fn(&UdpMedians) -> f64;

fn udp_markdown(s: &mut String, u: &UdpResult) {
    let _ = writeln!(
        s,
        "## L4 UDP packet rate (iperf3 `-u -b 0 -l 64`, one flow)\n\n\
         | metric | Portcullis | nginx | HAProxy | Portcullis/nginx |\n|---|---|---|---|---|"
    );
    let p = u.medians.get(&L4Kind::PortcullisSplice);
    let n = u.medians.get(&L4Kind::Nginx);
    let h = u.medians.get(&L4Kind::Haproxy);
    let na = if u.unavailable.contains_key(&L4Kind::Haproxy) {
        "n/a".to_string()
    } else {
        "–".to_string()
    };
    let rows: [(&str, UdpMetric); 4] = [
        ("datagrams/s received by the server", |m| m.packets_per_sec),
        ("loss % (sent by the client, not received)", |m| {
            m.loss_percent
        }),
        ("proxy CPU µs per datagram delivered", |m| {
            m.proxy_cpu_us_per_packet
        }),
        ("… of which user space", |m| m.proxy_user_us_per_packet),
    ];
    for (label, f) in rows {
        let (pv, nv) = (p.map(f), n.map(f));
        let hv = h.map(f).map_or(na.clone(), |v| fmt(Some(v)));
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {hv} | {} |",
            fmt(pv),
            fmt(nv),
            fmt_ratio(ratio(pv, nv))
        );
    }
    let _ = writeln!(s);
    for (k, why) in &u.unavailable {
        let _ = writeln!(s, "{}: {why}.\n", k.label());
    }
    for (k, why) in &u.failed {
        let _ = writeln!(s, "{}: **failed** ({}).\n", k.label(), first_line(why));
    }
}

type DropMetric = fn(&super::drop::DropMedians) -> Option<f64>;

fn drop_markdown(s: &mut String, d: &DropResult) {
    let _ = writeln!(
        s,
        "## Dropping a flood from a blocked source: XDP against nftables\n\n\
         A UDP flood of 60-byte frames (one socket, `sendmmsg`, one core) from one network \
         namespace to port {} in another, over a veth pair. Portcullis blocks the sender's address \
         on that port; the flood is dropped by its XDP filter on the receiving veth, or (fast path \
         off) by an nftables rule `ip saddr … udp dport {} counter drop` in the input hook, or the \
         same rule in the netdev ingress hook. Dropped packets are the XDP counter in `/healthz` and \
         the nftables rule counter. Receiver CPU is the machine's softirq time in `/proc/stat` during \
         the flood: on veth the receive path runs in the NET_RX softirq of the sending core (this \
         kernel samples it at the tick: no IRQ time accounting).\n",
        d.port, d.port
    );
    if let Some(state) = &d.xdp_state {
        let _ = writeln!(s, "Kernel fast path during the XDP runs: `{state}`.\n");
    }
    let _ = writeln!(
        s,
        "| metric | {} | XDP / nftables input | XDP / nftables ingress |\n|---|---|---|---|---|---|",
        FILTERS.map(Filter::label).join(" | ")
    );
    let rows: [(&str, DropMetric); 6] = [
        ("packets sent/s", |m| Some(m.sent_per_sec)),
        ("packets dropped/s", |m| Some(m.dropped_per_sec)),
        ("share of the sent packets the filter dropped", |m| {
            Some(m.dropped_share)
        }),
        ("receiver CPU (softirq) ns per dropped packet", |m| {
            Some(m.softirq_ns_per_drop)
        }),
        (
            "… of which the XDP program itself (kernel BPF statistics)",
            |m| m.xdp_program_ns_per_packet,
        ),
        ("sender thread CPU ns per packet (softirq included)", |m| {
            Some(m.sender_ns_per_packet)
        }),
    ];
    for (label, f) in rows {
        let v = |k: Filter| d.medians.get(&k).and_then(f);
        let cells: Vec<String> = FILTERS
            .iter()
            .map(|k| {
                cell(
                    v(*k),
                    d.failed.contains_key(k),
                    d.unavailable.contains_key(k),
                )
            })
            .collect();
        let x = v(Filter::Xdp);
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} |",
            cells.join(" | "),
            fmt_ratio(ratio(x, v(Filter::NftInput))),
            fmt_ratio(ratio(x, v(Filter::NftIngress))),
        );
    }
    let _ = writeln!(s);
    for (k, why) in &d.unavailable {
        let _ = writeln!(s, "{}: {why}.\n", k.label());
    }
    for (k, why) in &d.failed {
        let _ = writeln!(s, "{}: **failed** ({}).\n", k.label(), first_line(why));
    }
    let _ = writeln!(
        s,
        "On veth, XDP runs on the socket buffer the sender's stack already built (veth copies it into \
         a page first when it lacks XDP's headroom, as locally built packets do), so it cannot skip \
         the buffer allocation it avoids on a physical NIC's driver path; the BPF statistics row \
         shows how much of its cost is the program itself.\n"
    );
    if d.sender_bound() {
        let _ = writeln!(
            s,
            "**The sender is the limit here.** Every filter dropped all the flood could send: \
             on a veth pair each packet is sent and dropped on the same core, so packets/s measure \
             that core's sending plus dropping, not what a receiver could drop. The ratio of \
             receiver CPU per dropped packet is the meaningful comparison.\n"
        );
    }
}

/// A table cell: the figure, or why there is none.
fn cell(v: Option<f64>, failed: bool, unavailable: bool) -> String {
    match (v, failed, unavailable) {
        (_, true, _) => "failed".into(),
        (None, _, true) => "n/a".into(),
        (v, _, _) => fmt(v),
    }
}

/// The first line of an error chain (the full text is in the JSON).
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s).trim_end_matches('.')
}

#[cfg(test)]
mod tests {
    use super::super::drop::DropSample;
    use super::*;

    fn machine() -> Machine {
        serde_json::from_value(serde_json::json!({
            "date_utc": "d", "cpu": "c", "cores": 2, "memory": "m", "kernel": "k", "os": "o",
            "portcullis": "p", "nginx": "n", "haproxy": "h", "wrk": "w", "placement": "x"
        }))
        .unwrap()
    }

    fn drop_sample(sent: u64, dropped: u64, softirq_ns: f64) -> DropSample {
        DropSample {
            round: 0,
            sent,
            dropped,
            seconds: 1.0,
            sent_per_sec: sent as f64,
            dropped_per_sec: dropped as f64,
            softirq_ns_per_drop: softirq_ns,
            sender_ns_per_packet: 2000.0,
            receiver_proxy_cpu_us: 0,
            failed_send_calls: 0,
            xdp_program_ns_per_packet: None,
        }
    }

    fn report() -> L4Report {
        let mut samples = BTreeMap::new();
        samples.insert(Filter::Xdp, vec![drop_sample(1000, 1000, 200.0)]);
        samples.insert(Filter::NftInput, vec![drop_sample(900, 900, 1000.0)]);
        let mut unavailable = BTreeMap::new();
        unavailable.insert(
            L4Kind::PortcullisSplice,
            "splice unavailable: no object".to_string(),
        );
        L4Report {
            machine: machine(),
            effort: L4Effort {
                rounds: 1,
                duration: Duration::from_secs(1),
                warmup: Duration::ZERO,
            },
            tcp: vec![TcpResult::new(
                1,
                BTreeMap::new(),
                unavailable,
                BTreeMap::new(),
            )],
            udp: None,
            drop: Some(DropResult::new(samples)),
            targets: Vec::new(),
        }
    }

    #[test]
    fn a_sender_bound_drop_run_says_so_and_gives_the_cpu_ratio() {
        let r = report();
        let t = r.compute_targets();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].met, None, "no spliced sample: not measured");
        assert!(t[0].gap().contains("splice unavailable"));
        assert_eq!(t[1].met, Some(false), "1000/900 < 5");
        assert!(t[1].gap().contains("sender-bound"), "{}", t[1].gap());
        assert!(
            t[1].gap().contains("5.00×"),
            "nft/XDP CPU per drop: {}",
            t[1].gap()
        );
        let mut md = String::new();
        markdown(&mut md, &r);
        assert!(md.contains("The sender is the limit here"));
    }

    #[test]
    fn the_l4_part_survives_a_round_trip_through_json() {
        let json = serde_json::to_string(&report()).unwrap();
        let back: L4Report = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.drop.unwrap().medians[&Filter::Xdp].softirq_ns_per_drop,
            200.0
        );
        assert!(
            back.tcp[0]
                .unavailable
                .contains_key(&L4Kind::PortcullisSplice)
        );
    }
}
