//! `#[repr(C)]` types shared by the eBPF programs (`proxy-ebpf`) and the user-space loader.
//! Empty until the kernel fast path lands (issue #5).
#![no_std]
