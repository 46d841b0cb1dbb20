//! What can go wrong in the kernel fast path, each said in one line with what to do about it.

use std::io;

use super::L4Protocol;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this binary has no eBPF object: run `cargo xtask build-ebpf` before building the proxy"
    )]
    NoObject,
    #[error(
        "missing {missing}: the kernel fast path needs CAP_BPF (or CAP_SYS_ADMIN) and \
         CAP_NET_ADMIN — run as root or grant them"
    )]
    MissingPrivileges { missing: String },
    #[error("cannot load the eBPF object: {reason}")]
    Load { reason: String },
    #[error("the kernel's verifier rejected {program}: {reason}")]
    Verifier {
        program: &'static str,
        reason: String,
    },
    #[error("unknown network interface {0:?}: check `ip link` in this network namespace")]
    UnknownInterface(String),
    #[error("cannot attach {program} to {target}: {reason}")]
    Attach {
        program: &'static str,
        target: String,
        reason: String,
    },
    #[error("two policies for port {port}/{protocol}: give each port and protocol one entry")]
    DuplicatePort { port: u16, protocol: L4Protocol },
    #[error("{count} L4 ports, but the fast path holds at most {max}")]
    TooManyPorts { count: usize, max: u32 },
    #[error("{count} source CIDRs for {map}, but it holds at most {max} (all ports together)")]
    TooManySources {
        map: &'static str,
        count: usize,
        max: u32,
    },
    #[error("cannot update the {map} map: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("cannot read the {map} map: {reason}")]
    ReadMap { map: &'static str, reason: String },
    #[error("cannot splice: {what}: {source}")]
    Splice {
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot splice: the splice programs are not loaded (FastPath::load with splice off)")]
    SpliceOff,
}

/// An error and its sources on one line; aya's errors put the useful part in the sources.
pub(super) fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

/// Whether the kernel refused for lack of privilege somewhere in this error's chain. Only
/// EPERM: the verifier says EACCES when it rejects a program, which is not about privilege.
pub(super) fn is_permission(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        current = e.source();
    }
    false
}
