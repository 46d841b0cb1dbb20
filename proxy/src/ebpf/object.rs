//! The eBPF object `proxy/build.rs` embedded, if `cargo xtask build-ebpf` had built it.

#[cfg(portcullis_ebpf_object)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

#[cfg(not(portcullis_ebpf_object))]
static OBJECT: &[u8] = &[];

/// Whether the embedded object exists (false when built without the eBPF toolchain).
pub fn object_built_in() -> bool {
    !OBJECT.is_empty()
}

pub(super) fn bytes() -> &'static [u8] {
    OBJECT
}
