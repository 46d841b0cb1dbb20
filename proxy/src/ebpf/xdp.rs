//! Attaching the XDP program to interfaces: driver mode where the driver supports it, the
//! kernel's generic (SKB) mode where it does not.

use std::fmt;

use aya::programs::{ProgramError, Xdp, XdpMode};

use super::EbpfError;
use super::error::chain;
use proxy_common::programs::XDP as PROGRAM;

/// Where the program runs on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// In the driver, before any socket buffer is allocated.
    Driver,
    /// In the kernel's generic path: works on every interface, costs a socket buffer.
    Skb,
}

impl fmt::Display for XdpAttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpAttachMode::Driver => "driver",
            XdpAttachMode::Skb => "skb",
        })
    }
}

/// Attaches `program` to each interface; the links live in `program` and are detached when it
/// is dropped. Interface names resolve in the calling thread's network namespace.
pub(super) fn attach_all(
    program: &mut Xdp,
    interfaces: &[String],
) -> Result<Vec<(String, XdpAttachMode)>, EbpfError> {
    let mut attached: Vec<(String, XdpAttachMode)> = Vec::new();
    for name in interfaces {
        if attached.iter().any(|(n, _)| n == name) {
            continue;
        }
        // aya turns the name into a C string and would panic on a NUL.
        if name.is_empty() || name.contains('\0') {
            return Err(EbpfError::UnknownInterface(name.clone()));
        }
        let mode = attach_one(program, name)?;
        tracing::debug!(interface = %name, %mode, "XDP attached");
        attached.push((name.clone(), mode));
    }
    Ok(attached)
}

fn attach_one(program: &mut Xdp, name: &str) -> Result<XdpAttachMode, EbpfError> {
    let driver_error = match program.attach(name, XdpMode::Driver) {
        Ok(_) => return Ok(XdpAttachMode::Driver),
        Err(ProgramError::UnknownInterface { .. }) => {
            return Err(EbpfError::UnknownInterface(name.to_string()));
        }
        Err(e) => e,
    };
    tracing::debug!(
        interface = %name,
        error = %chain(&driver_error),
        "XDP driver mode unavailable; trying SKB mode"
    );
    match program.attach(name, XdpMode::Skb) {
        Ok(_) => Ok(XdpAttachMode::Skb),
        Err(e) => Err(EbpfError::Attach {
            program: PROGRAM,
            target: name.to_string(),
            reason: format!(
                "driver mode: {}; skb mode: {}",
                chain(&driver_error),
                chain(&e)
            ),
        }),
    }
}
