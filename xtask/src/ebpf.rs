//! The kernel fast path's toolchain and object.
//!
//! - `setup-ebpf`: nightly's `rust-src`, Debian's LLVM 22 and bpf-linker 0.13 built against it.
//!   Each step is skipped when already satisfied, so a second run costs a few probes.
//! - `build-ebpf`: builds `proxy-ebpf` for `bpfel-unknown-none`; `proxy/build.rs` embeds the
//!   object when it exists, so this must run before the proxy is built.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{apt_install, have_nightly, is_root, root, run};

/// bpf-linker links against this LLVM; the nightly rustc here is on LLVM 22 as well, and the two
/// must agree on the bitcode format.
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_FEATURE: &str = "llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Any 0.13.x works; newer majors may want another LLVM.
const BPF_LINKER_SERIES: &str = "0.13.";

const TARGET: &str = "bpfel-unknown-none";

/// Where `build-ebpf` leaves the object (and where `proxy/build.rs` looks for it).
pub fn object_path() -> PathBuf {
    root().join(format!("proxy-ebpf/target/{TARGET}/release/proxy-ebpf"))
}

pub fn setup() -> Result<()> {
    if !have_nightly() {
        bail!(
            "no nightly toolchain: the eBPF programs need it (`-Z build-std=core` for \
             {TARGET}); install it with `rustup toolchain install nightly --profile minimal`"
        );
    }
    ensure_rust_src()?;
    ensure_llvm()?;
    ensure_bpf_linker()
}

pub fn build() -> Result<()> {
    // `+nightly` is understood by the rustup proxy, not by the toolchain's own cargo; and the
    // outer cargo's RUSTC/RUSTUP_TOOLCHAIN would pin the stable compiler.
    let mut cmd = Command::new("cargo");
    cmd.args([
        "+nightly",
        "build",
        "--release",
        "--target",
        TARGET,
        "-Z",
        "build-std=core",
    ])
    .current_dir(root().join("proxy-ebpf"))
    .env_remove("RUSTC")
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("CARGO");
    run("cargo +nightly build (proxy-ebpf)", &mut cmd)?;
    let object = object_path();
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    eprintln!("    eBPF object: {}", object.display());
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        eprintln!("==> rust-src (nightly): already installed");
        return Ok(());
    }
    run(
        "rustup component add rust-src --toolchain nightly",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

fn ensure_llvm() -> Result<()> {
    let status = output(Command::new("dpkg").args(["-s", LLVM_PACKAGE])).unwrap_or_default();
    if status
        .lines()
        .any(|l| l.trim() == "Status: install ok installed")
    {
        eprintln!("==> {LLVM_PACKAGE}: already installed");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "{LLVM_PACKAGE} is missing (bpf-linker is built against it): \
             apt-get install --no-install-recommends {LLVM_PACKAGE}, or run as root"
        );
    }
    apt_install(&[LLVM_PACKAGE])
}

fn ensure_bpf_linker() -> Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version
        .split_whitespace()
        .any(|w| w.starts_with(BPF_LINKER_SERIES))
    {
        eprintln!("==> bpf-linker: already installed ({})", version.trim());
        return Ok(());
    }
    run(
        &format!("cargo install bpf-linker@{BPF_LINKER_VERSION}"),
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                LLVM_FEATURE,
                "--locked",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            // bpf-linker is a host tool: build it with the default toolchain, not the one the
            // outer cargo pinned.
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"),
    )
    .context("bpf-linker is needed to link the eBPF object")
}

/// A program's stdout, or None when it cannot run or fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
