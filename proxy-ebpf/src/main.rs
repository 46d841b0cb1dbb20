//! eBPF programs of the kernel fast path, loaded by `proxy::ebpf`:
//!
//! - `xdp`: per-port source policy (block and allow tries) and counters for L4 services.
//! - `splice`: sockmap programs that move a TCP pair's bytes from one socket straight to the
//!   other's egress, so user space never copies them.
//!
//! Map keys and values come from `proxy-common`; map and program names are listed there too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod splice;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Nothing here can panic once optimised (every access is bounds-checked by hand); the
    // verifier would reject the object if a panic path survived, because this loop never ends.
    loop {}
}

// Built for the host (e.g. by an editor's `cargo check`), the crate is empty.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
