//! The kernel fast path for L4 (TCP/UDP) services.
//!
//! - XDP on the named interfaces enforces each L4 port's source policy (block list, optional
//!   allow list) before the network stack sees the packet (in driver mode, before the kernel
//!   allocates anything for it), and counts per port.
//! - A sockmap splice moves a proxied TCP pair's bytes from one socket straight to the other.
//!
//! `FastPath` owns the loaded object and lives on the control thread; dropping it detaches
//! every program. `Splicer` is the workers' handle. The programs are in `proxy-ebpf`, the
//! types both sides share in `proxy-common`. A binary built without the eBPF toolchain has no
//! object ([`object_built_in`] is false) and the proxy stays on its user-space path.
//!
//! Loading needs CAP_BPF and CAP_NET_ADMIN, nothing more (the programs avoid what the verifier
//! reserves for CAP_PERFMON); splicing needs no capability. RLIMIT_MEMLOCK plays no part: the
//! kernel charges eBPF memory to the cgroup.

mod error;
mod object;
mod ports;
pub(crate) mod privileges;
mod splice;
mod sys;
mod xdp;

use std::os::fd::AsFd;

use aya::maps::{MapData, SockHash};
use aya::programs::{SkSkb, Xdp};
use proxy_common::{SocketCookie, maps, programs};

pub use error::EbpfError;
pub use object::object_built_in;
pub use ports::{L4Protocol, PortCounterSnapshot, PortPolicySpec};
pub use splice::{SpliceMark, Splicer};
pub use xdp::XdpAttachMode;

use error::{chain, is_permission};
use ports::PortTable;

/// The loaded kernel fast path.
pub struct FastPath {
    ports: PortTable,
    xdp: Vec<(String, XdpAttachMode)>,
    splicer: Option<Splicer>,
    /// Owns the programs and their links: dropping it detaches everything.
    _ebpf: aya::Ebpf,
}

impl FastPath {
    /// Loads the embedded object, attaches XDP to each named interface (driver mode, SKB mode
    /// as fallback per interface), and, with `splice`, loads the sk_skb programs and attaches
    /// them to the splice map. Interface names resolve in the calling thread's network
    /// namespace. No port is configured until [`FastPath::set_ports`].
    pub fn load(interfaces: &[String], splice: bool) -> Result<FastPath, EbpfError> {
        if !object_built_in() {
            return Err(EbpfError::NoObject);
        }
        if let Some(missing) = privileges::missing() {
            return Err(EbpfError::MissingPrivileges { missing });
        }
        let mut ebpf = aya::EbpfLoader::new()
            .load(object::bytes())
            .map_err(|e| load_error(&e))?;
        let program: &mut Xdp = program(&mut ebpf, programs::XDP)?;
        program
            .load()
            .map_err(|e| program_error(programs::XDP, e))?;
        let xdp = xdp::attach_all(program, interfaces)?;
        let ports = PortTable::new(&mut ebpf)?;
        let splicer = if splice {
            Some(load_splice(&mut ebpf)?)
        } else {
            None
        };
        let fast_path = FastPath {
            ports,
            xdp,
            splicer,
            _ebpf: ebpf,
        };
        tracing::debug!(state = %fast_path.describe(), "eBPF fast path loaded");
        Ok(fast_path)
    }

    /// One line for logs and `/healthz`, e.g. "on: xdp driver on veth0, skb on eth1; splice on".
    pub fn describe(&self) -> String {
        let xdp = if self.xdp.is_empty() {
            "xdp on no interface".to_string()
        } else {
            let each: Vec<String> = self
                .xdp
                .iter()
                .map(|(name, mode)| format!("{mode} on {name}"))
                .collect();
            format!("xdp {}", each.join(", "))
        };
        let splice = if self.splicer.is_some() { "on" } else { "off" };
        format!("on: {xdp}; splice {splice}")
    }

    /// The interfaces XDP runs on, and how.
    pub fn xdp_attachments(&self) -> &[(String, XdpAttachMode)] {
        &self.xdp
    }

    /// Replaces the whole set of L4 ports and their CIDR policies. Only what changed is
    /// written, so a port that stays keeps its counters. A bad set (a port twice, too many
    /// ports) is refused before any map changes; a map error part-way leaves the ports
    /// handled so far in their new state and the rest in their old one, and the next call
    /// completes the job.
    pub fn set_ports(&mut self, ports: &[PortPolicySpec]) -> Result<(), EbpfError> {
        self.ports.apply(ports)
    }

    /// Counters summed over CPUs, for the configured ports, in port order.
    pub fn counters(&self) -> Result<Vec<PortCounterSnapshot>, EbpfError> {
        self.ports.counters()
    }

    /// The workers' handle to splice pairs; None when loaded without splice.
    pub fn splicer(&self) -> Option<Splicer> {
        self.splicer.clone()
    }
}

// The control thread may hand it to another task.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<FastPath>();
    const fn assert_shared<T: Send + Sync + Clone>() {}
    assert_shared::<Splicer>();
};

/// Loads the parser and verdict programs and attaches them to `SPLICE_SOCKETS`. The
/// attachments and the splicer hold descriptors of their own, so the maps taken out of the
/// object here can go.
fn load_splice(ebpf: &mut aya::Ebpf) -> Result<Splicer, EbpfError> {
    let sockets: SockHash<MapData, SocketCookie> = take_sock_hash(ebpf, maps::SPLICE_SOCKETS)?;
    let peers: SockHash<MapData, SocketCookie> = take_sock_hash(ebpf, maps::SPLICE_PEERS)?;
    for name in [programs::SPLICE_PARSER, programs::SPLICE_VERDICT] {
        let program: &mut SkSkb = program(ebpf, name)?;
        program.load().map_err(|e| program_error(name, e))?;
        program
            .attach(sockets.fd())
            .map_err(|e| EbpfError::Attach {
                program: name,
                target: maps::SPLICE_SOCKETS.to_string(),
                reason: chain(&e),
            })?;
    }
    Splicer::new(sockets.fd().as_fd(), peers.fd().as_fd()).map_err(|e| EbpfError::Load {
        reason: format!("cannot duplicate the splice maps' descriptors: {e}"),
    })
}

fn take_sock_hash(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<SockHash<MapData, SocketCookie>, EbpfError> {
    let map = ebpf.take_map(name).ok_or_else(|| EbpfError::Load {
        reason: format!("the object has no map {name}"),
    })?;
    SockHash::try_from(map).map_err(|e| EbpfError::Load {
        reason: format!("map {name}: {}", chain(&e)),
    })
}

fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| EbpfError::Load {
        reason: format!("the object has no program {name}"),
    })?;
    program.try_into().map_err(|e| EbpfError::Load {
        reason: format!("program {name}: {}", chain(&e)),
    })
}

fn load_error(e: &aya::EbpfError) -> EbpfError {
    if is_permission(e) {
        return EbpfError::MissingPrivileges {
            missing: "permission to create eBPF maps (EPERM)".to_string(),
        };
    }
    EbpfError::Load { reason: chain(e) }
}

/// A program load error; a verifier rejection is cut to the lines that say why (the whole log
/// goes to the debug log).
fn program_error(name: &'static str, e: aya::programs::ProgramError) -> EbpfError {
    if let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &e
    {
        if io_error.raw_os_error() == Some(libc::EPERM) {
            return EbpfError::MissingPrivileges {
                missing: format!("permission to load {name} (EPERM)"),
            };
        }
        let log = verifier_log.to_string();
        tracing::debug!(program = name, log = %log, "verifier log");
        let tail: Vec<&str> = log
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !is_verifier_statistics(l))
            .collect();
        let reason = match tail.as_slice() {
            [] => io_error.to_string(),
            lines => lines[lines.len().saturating_sub(2)..].join(" / "),
        };
        return EbpfError::Verifier {
            program: name,
            reason,
        };
    }
    if is_permission(&e) {
        return EbpfError::MissingPrivileges {
            missing: format!("permission to load {name} (EPERM)"),
        };
    }
    EbpfError::Load {
        reason: format!("{name}: {}", chain(&e)),
    }
}

/// The verifier's closing statistics, which say nothing about why it refused.
fn is_verifier_statistics(line: &str) -> bool {
    [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
    ]
    .iter()
    .any(|prefix| line.starts_with(prefix))
}
