//! `cargo xtask …`: project chores that need more than cargo alone.
//!
//! - `test`: installs what the tests need, checks formatting and lints, builds, runs every tier
//!   (unit, end-to-end on SQLite and PostgreSQL, a deterministic fuzz smoke run).
//! - `fuzz [SECONDS]`: runs each fuzz target for a while (installs cargo-fuzz on first use).
//! - `bench [--quick] [ARGS]`: installs nginx, HAProxy and wrk and runs the benchmark harness.
//! - `up`: builds and runs `portcullis up`.
//! - `setup-ebpf`, `build-ebpf`: the eBPF toolchain, and the kernel fast path's object.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};

mod crowdsec;
mod ebpf;
mod postgres;

/// Debian packages the test tiers use: (package, a program it installs).
const APT_PACKAGES: &[(&str, &str)] = &[
    ("curl", "curl"),
    ("ca-certificates", "update-ca-certificates"),
    // Let's Encrypt's ACME test server (`pebble`, with `pebble-challtestsrv` as its DNS) for
    // the ACME tests: `tests/src/pebble.rs`.
    ("pebble", "pebble"),
    // The WireGuard mesh: the TUN backend and the agent run `wireguard-go`; a stock peer is
    // `wg`/`wg-quick`; namespaces and NAT need `ip` and `nft`: `tests/tests/mesh*.rs`.
    ("wireguard-go", "wireguard-go"),
    ("wireguard-tools", "wg"),
    ("iproute2", "ip"),
    ("nftables", "nft"),
    // A real browser for the sign-in pages, driven over WebDriver: `tests/tests/browser.rs`.
    ("chromium", "chromium"),
    ("chromium-driver", "chromedriver"),
    // The identity provider of the single sign-on browser tests (`oidc-provider` from npm, see
    // `ensure_oidc_provider`) runs on Node.js. Machines of this kind come with Node.js 20 and
    // npm; the probes keep Debian's from being installed over them.
    ("nodejs", "node"),
    ("npm", "npm"),
];

/// Debian packages the benchmark harness uses: the peers, the load generator, pinning.
const BENCH_APT_PACKAGES: &[(&str, &str)] = &[
    ("nginx", "nginx"),
    ("haproxy", "haproxy"),
    ("wrk", "wrk"),
    ("util-linux", "taskset"),
    // The L4 workloads: iperf3 (target and load), nginx's stream module (probed by its path:
    // `command -v` finds a file by path), the namespaces and nftables of the drop workload.
    ("iperf3", "iperf3"),
    (
        "libnginx-mod-stream",
        "/usr/lib/nginx/modules/ngx_stream_module.so",
    ),
    ("iproute2", "ip"),
    ("nftables", "nft"),
    // The mesh workloads: wireguard-go at both ends of the baseline tunnel and in the proxy's
    // TUN backend and the agent; `wg` configures the baseline.
    ("wireguard-go", "wireguard-go"),
    ("wireguard-tools", "wg"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("up") => up(&args[1..]),
        Some("setup-ebpf") => ebpf::setup(),
        Some("build-ebpf") => ebpf::build(),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 test [--skip-lint]   install test dependencies, check fmt + clippy, build, run all tests\n  \
                 fuzz [SECONDS]       run every fuzz target for SECONDS each (default 60; needs nightly)\n  \
                 bench [--quick] [ARGS]  benchmark against nginx and HAProxy (`bench --help` for ARGS)\n  \
                 up [ARGS]            build in release and run `portcullis up`\n  \
                 setup-ebpf           install the eBPF toolchain (rust-src, LLVM 22, bpf-linker)\n  \
                 build-ebpf           build the eBPF object the proxy embeds"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub(crate) fn run(what: &str, cmd: &mut Command) -> Result<()> {
    let started = Instant::now();
    eprintln!("==> {what}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run: {what}"))?;
    eprintln!("    {what}: {:.0?}", started.elapsed());
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

/// Installs missing Debian packages; idempotent, and a no-op when everything is there.
fn ensure_apt(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, probe)| !have(probe))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing packages {missing:?}: install them (apt-get install {}) or run as root",
            missing.join(" ")
        );
    }
    apt_install(&missing)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    run(
        &format!("apt-get install {}", packages.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `npm ci` of `tests/oidc` (the `oidc-provider` package at the version its lock file names)
/// into `tests/oidc/node_modules`; skipped while the lock file is the one last installed.
fn ensure_oidc_provider() -> Result<()> {
    let dir = root().join("tests/oidc");
    let lock =
        std::fs::read(dir.join("package-lock.json")).context("tests/oidc/package-lock.json")?;
    let stamp = dir.join("node_modules/.portcullis-installed-lock");
    let installed = dir.join("node_modules/oidc-provider/package.json");
    if installed.exists() && std::fs::read(&stamp).is_ok_and(|s| s == lock) {
        return Ok(());
    }
    run(
        "npm ci (tests/oidc: oidc-provider)",
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir),
    )?;
    std::fs::write(&stamp, &lock).context("write the npm install stamp")?;
    Ok(())
}

fn ensure_apt_forced(packages: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "PostgreSQL server binaries are missing: apt-get install {}",
            packages.join(" ")
        );
    }
    apt_install(packages)
}

fn test(args: &[String]) -> Result<()> {
    let skip_lint = args.iter().any(|a| a == "--skip-lint");
    let started = Instant::now();
    ensure_apt(APT_PACKAGES)?;
    ensure_oidc_provider()?;
    // Before anything builds the proxy: `proxy/build.rs` embeds the object only if it exists,
    // and clippy should see the code that uses it.
    ebpf::setup()?;
    ebpf::build()?;
    if !skip_lint {
        run(
            "cargo fmt --check",
            cargo().args(["fmt", "--all", "--", "--check"]),
        )?;
        run(
            "cargo clippy",
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
    }
    run(
        "cargo build --release",
        // The same package selection as the test run below, so features unify the same way
        // and nothing is compiled twice.
        cargo().args(["build", "--release", "--workspace"]),
    )?;
    let bin = root().join("target/release/portcullis");
    if postgres::bin_dir().is_none() {
        // The package is there but its server binaries are not: reinstall them.
        ensure_apt_forced(&["postgresql"])?;
    }
    let crowdsec = crowdsec::ensure(&root().join("target"))?;
    let pg = postgres::TestPostgres::start(&root().join("target"))?;
    let result = run(
        "cargo test --release (unit and end-to-end tiers)",
        cargo()
            .args(["test", "--release", "--workspace", "--no-fail-fast"])
            .env("PORTCULLIS_BIN", &bin)
            .env("PORTCULLIS_TEST_PG_URL", &pg.url)
            .env("PORTCULLIS_TEST_CROWDSEC_DIR", &crowdsec)
            .env("RUST_BACKTRACE", "1"),
    );
    drop(pg);
    result?;
    run_bench(&["--quick".to_string()])?;
    if have_nightly() {
        run_fuzz_targets(FuzzBudget::Deterministic)?;
    } else {
        eprintln!(
            "==> skipping the fuzz smoke tier: no nightly toolchain here (cargo-fuzz needs it)"
        );
    }
    eprintln!("==> all test tiers passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Every cargo-fuzz target in `fuzz/`.
const FUZZ_TARGETS: &[(&str, u32)] = &[
    // (target, runs in the smoke tier)
    ("request_head", 2_000_000),
    ("chunked_body", 2_000_000),
    ("mappings_file", 300_000),
];

fn have_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ensure_cargo_fuzz() -> Result<()> {
    if have("cargo-fuzz") {
        return Ok(());
    }
    run(
        "cargo install cargo-fuzz",
        cargo().args(["install", "cargo-fuzz", "--locked"]),
    )
}

/// How long or how far each target runs.
enum FuzzBudget {
    Seconds(u64),
    /// A fixed seed and run count: the same inputs every time, so a green run stays green.
    Deterministic,
}

fn run_fuzz_targets(budget: FuzzBudget) -> Result<()> {
    ensure_cargo_fuzz()?;
    let work = root().join("target/fuzz-smoke");
    for (target, runs) in FUZZ_TARGETS {
        // `+nightly` is understood by the rustup proxy, not by the toolchain's own cargo.
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "fuzz", "run", target])
            .current_dir(root().join("fuzz"));
        let limits = match budget {
            FuzzBudget::Seconds(s) => vec![format!("-max_total_time={s}")],
            FuzzBudget::Deterministic => {
                // An empty corpus each time, so every machine runs exactly the same inputs.
                let corpus = work.join(target);
                let _ = std::fs::remove_dir_all(&corpus);
                std::fs::create_dir_all(&corpus)?;
                cmd.arg(&corpus);
                vec!["-seed=1".to_string(), format!("-runs={runs}")]
            }
        };
        cmd.arg("--").args(&limits);
        let what = format!("fuzz {target} ({})", limits.join(" "));
        if let FuzzBudget::Seconds(_) = budget {
            run(&what, &mut cmd)?;
            continue;
        }
        std::fs::create_dir_all(&work)?;
        let log_path = work.join(format!("{target}.log"));
        let log = std::fs::File::create(&log_path)?;
        cmd.stdout(log.try_clone()?).stderr(log);
        if let Err(e) = run(&what, &mut cmd) {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            for line in tail.iter().rev() {
                eprintln!("    {line}");
            }
            return Err(e.context(format!("full log: {}", log_path.display())));
        }
    }
    Ok(())
}

fn fuzz(args: &[String]) -> Result<()> {
    let seconds: u64 = match args.first() {
        Some(s) => s.parse().context("fuzz: SECONDS must be a number")?,
        None => 60,
    };
    run_fuzz_targets(FuzzBudget::Seconds(seconds))
}

fn bench(args: &[String]) -> Result<()> {
    run(
        "cargo build --release (portcullis, bench)",
        cargo().args(["build", "--release", "-p", "proxy", "-p", "bench"]),
    )?;
    run_bench(args)
}

/// Runs the harness on what is already built; `--quick` is the smoke tier of `test`, which checks
/// that every proxy answers every workload correctly and asserts nothing about speed.
fn run_bench(args: &[String]) -> Result<()> {
    ensure_apt(BENCH_APT_PACKAGES)?;
    let what = if args.iter().any(|a| a == "--quick") {
        "bench --quick (every proxy answers every workload)"
    } else {
        "bench"
    };
    run(
        what,
        Command::new(root().join("target/release/bench"))
            .current_dir(root())
            .args(args),
    )
}

fn up(args: &[String]) -> Result<()> {
    run(
        "portcullis up",
        cargo()
            .args([
                "run",
                "--release",
                "-p",
                "proxy",
                "--bin",
                "portcullis",
                "--",
                "up",
            ])
            .args(args),
    )
}
