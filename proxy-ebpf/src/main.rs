//! eBPF programs of the kernel fast path. Placeholder until the fast path lands (issue #5):
//! the proxy runs on its user-space path until then.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}
