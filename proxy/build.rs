//! Embeds the kernel fast path's eBPF object when `cargo xtask build-ebpf` has built it.
//!
//! Without it (a machine without the eBPF toolchain) the proxy still builds and runs on its
//! user-space path: an empty file is embedded instead and `portcullis_ebpf_object` stays unset.

use std::path::PathBuf;

const OBJECT_ENV: &str = "PORTCULLIS_EBPF_OBJECT";
const OUT_NAME: &str = "proxy-ebpf.o";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(portcullis_ebpf_object)");
    println!("cargo::rerun-if-env-changed={OBJECT_ENV}");
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env_var("OUT_DIR")).join(OUT_NAME);
    let object = match std::env::var_os(OBJECT_ENV) {
        Some(path) => PathBuf::from(path),
        None => manifest_dir.join("../proxy-ebpf/target/bpfel-unknown-none/release/proxy-ebpf"),
    };
    // Watching a path that does not exist yet still works: cargo reruns once it appears.
    println!("cargo::rerun-if-changed={}", object.display());
    if object.is_file() {
        if let Err(e) = std::fs::copy(&object, &out) {
            panic!("cannot copy {} to {}: {e}", object.display(), out.display());
        }
        println!("cargo::rustc-cfg=portcullis_ebpf_object");
    } else {
        if std::env::var_os(OBJECT_ENV).is_some() {
            println!(
                "cargo::warning={OBJECT_ENV}={} does not exist: building without the eBPF fast path",
                object.display()
            );
        }
        if let Err(e) = std::fs::write(&out, []) {
            panic!("cannot write {}: {e}", out.display());
        }
    }
}

fn env_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}
