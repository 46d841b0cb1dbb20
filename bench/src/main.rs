//! `bench`: Portcullis, nginx and HAProxy side by side on one machine.
//!
//! Each proxy gets the same core (the last one), one worker, the same certificate and the same
//! nginx backend; wrk and the backend share the other cores. Every workload runs against each
//! proxy in turn for several rounds; the report gives medians and the ratios Portcullis/nginx
//! and Portcullis/HAProxy. `cargo xtask bench` installs the tools and runs this.
//!
//! The L4 part (`l4`) does the same for TCP and UDP proxying (iperf3 through Portcullis with and
//! without the kernel splice, HAProxy and nginx's stream module) and compares Portcullis's XDP
//! filter with nftables at dropping a flood, in network namespaces of its own.
//!
//! The mesh part (`mesh`) sends one TCP stream and HTTPS requests through Portcullis over its
//! WireGuard mesh (TUN and in-process backends) to a target behind a real agent, against the same
//! traffic over a plain wireguard-go tunnel.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

mod certs;
mod client;
mod contestants;
mod l4;
mod machine;
mod mesh;
mod process;
mod report;
mod workloads;
mod wrk;

use contestants::{Contestant, Kind, Placement, Settings};
use l4::L4Workload;
use mesh::MeshWorkload;
use report::Report;
use workloads::{Effort, Workload};

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark Portcullis against nginx and HAProxy on this machine",
    long_about = "Starts a backend (nginx), then Portcullis, nginx and HAProxy as reverse proxies \
                  configured alike (one worker on one core, keep-alive to the backend, access logs \
                  off, one ECDSA P-256 certificate), runs each workload against each proxy in turn \
                  for several rounds with wrk, and writes a Markdown and a JSON report with medians \
                  and ratios. Every run must be answered without errors, or the bench fails."
)]
struct Args {
    /// The portcullis binary to measure.
    #[arg(long, default_value = "target/release/portcullis")]
    portcullis: PathBuf,
    /// Where the report goes (`<stem>.md` and `<stem>.json`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// File name of the report, without extension.
    #[arg(long, default_value = "latest")]
    stem: String,
    /// Scratch directory for configs, certificates and logs (emptied first).
    #[arg(long, default_value = "target/bench-work")]
    work_dir: PathBuf,
    /// Rounds per workload (each proxy once per round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Length of one measured run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured load before each run.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Connections held open by the idle workload. HAProxy reserves two descriptors for each
    /// connection it may accept, so with the usual hard open-file limit of 20,000 it cannot
    /// start with room for 10,000; 9,500 fits every proxy.
    #[arg(long, default_value_t = 9_500)]
    idle_connections: usize,
    /// Smoke mode: one short round, few idle connections, report under the work dir. Checks that
    /// every proxy answers every workload correctly; the numbers mean little.
    #[arg(long)]
    quick: bool,
    /// Workloads to run (comma separated). HTTP: https-keepalive, tls-handshake,
    /// large-response, idle-tls, http-keepalive. L4: l4-tcp, l4-udp, xdp-drop. Mesh: mesh-tcp,
    /// mesh-https. Default: all. The parts (HTTP, L4, mesh) not run keep their place in the
    /// existing report.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Measure nothing: rewrite `<stem>.md` (and the targets in `<stem>.json`) from the existing
    /// `<stem>.json`, after a change to how the report is written.
    #[arg(long)]
    render_only: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn placement() -> (Placement, String) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return (
            Placement {
                proxy_cpus: None,
                load_cpus: None,
            },
            "one core: proxies, load and backend share it (no pinning)".into(),
        );
    }
    let proxy = (cores - 1).to_string();
    let load = if cores == 2 {
        "0".to_string()
    } else {
        format!("0-{}", cores - 2)
    };
    let text = format!("each proxy alone on CPU {proxy}, wrk and the backend on CPU {load}");
    (
        Placement {
            proxy_cpus: Some(proxy),
            load_cpus: Some(load),
        },
        text,
    )
}

fn run(mut args: Args) -> Result<()> {
    if args.render_only {
        let path = args.out.join(format!("{}.json", args.stem));
        let mut report =
            Report::load(&path)?.with_context(|| format!("{} not found", path.display()))?;
        report::write(&args.out, &args.stem, &mut report)?;
        eprintln!(
            "bench: rewrote {} from its JSON",
            args.out.join(format!("{}.md", args.stem)).display()
        );
        return Ok(());
    }
    if args.quick {
        args.rounds = 1;
        args.duration = Duration::from_secs(1);
        args.warmup = Duration::ZERO;
        args.idle_connections = args.idle_connections.min(500);
        args.out = args.work_dir.join("report");
    }
    let (http, l4_selected, mesh_selected) = select(&args.workloads)?;
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let mut tools: Vec<&str> = Vec::new();
    if !http.is_empty() {
        tools.extend(["nginx", "haproxy", "wrk", "taskset"]);
    }
    for w in &l4_selected {
        tools.extend(w.tools());
    }
    for w in &mesh_selected {
        tools.extend(w.tools());
    }
    for tool in tools {
        contestants::find_program(tool)?;
    }
    let portcullis_bin = std::fs::canonicalize(&args.portcullis).with_context(|| {
        format!(
            "{} not found: build it with cargo build --release",
            args.portcullis.display()
        )
    })?;
    // A run of some parts keeps the other parts of the report it replaces.
    let mut report = if args.quick
        || (!http.is_empty() && !l4_selected.is_empty() && !mesh_selected.is_empty())
    {
        Report::default()
    } else {
        let path = args.out.join(format!("{}.json", args.stem));
        Report::load(&path)
            .unwrap_or_else(|e| {
                eprintln!("bench: {e:#}; the part not run now is left out of the report");
                None
            })
            .unwrap_or_default()
    };

    let _ = std::fs::remove_dir_all(&args.work_dir);
    std::fs::create_dir_all(&args.work_dir)?;
    let work = std::fs::canonicalize(&args.work_dir)?;
    let (placement, placement_text) = placement();
    let started = Instant::now();
    if !http.is_empty() {
        let machine = machine::describe(&portcullis_bin, placement_text.clone());
        eprintln!("bench: {} cores, {}", machine.cores, machine.placement);
        let (effort, results) = run_http(&mut args, &http, &work, &placement, &portcullis_bin)?;
        report.machine = Some(machine);
        report.effort = Some(effort);
        report.rounds = Some(args.rounds);
        report.workloads = results;
    }
    if !l4_selected.is_empty() {
        let l4_placement =
            placement_text.replace("wrk and the backend", "iperf3 (both ends) and the flood");
        let machine = machine::describe(&portcullis_bin, l4_placement);
        let settings = l4::Settings {
            dir: &work,
            portcullis_bin: &portcullis_bin,
            placement: &placement,
            effort: l4::report::L4Effort {
                rounds: args.rounds,
                duration: args.duration,
                warmup: args.warmup,
            },
        };
        report.l4 = Some(l4::run(&l4_selected, &settings, machine)?);
    }
    if !mesh_selected.is_empty() {
        let mesh_placement = placement_text
            .replace(
                "each proxy alone",
                "each proxy (with its wireguard-go) and the baseline's edge wireguard-go alone",
            )
            .replace(
                "wrk and the backend",
                "iperf3, wrk, the agent, the site's wireguard-go and the targets",
            );
        let machine = machine::describe(&portcullis_bin, mesh_placement);
        let script = wrk::write_script(&work)?;
        let settings = mesh::Settings {
            dir: &work,
            portcullis_bin: &portcullis_bin,
            placement: &placement,
            effort: mesh::report::MeshEffort {
                rounds: args.rounds,
                duration: args.duration,
                warmup: args.warmup,
            },
            script: &script,
        };
        report.mesh = Some(mesh::run(&mesh_selected, &settings, machine)?);
    }
    report::write(&args.out, &args.stem, &mut report)?;
    eprintln!(
        "bench: done in {:.0?}; report in {}",
        started.elapsed(),
        args.out.join(format!("{}.md", args.stem)).display()
    );
    print!("{}", report::markdown(&report));
    let mut failures = report.l4.as_ref().map(|r| r.failures()).unwrap_or_default();
    failures.extend(
        report
            .mesh
            .as_ref()
            .map(|r| r.failures())
            .unwrap_or_default(),
    );
    if !failures.is_empty() {
        bail!(
            "{} L4 or mesh run(s) failed (the report has the figures of the rest):\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

type Selected = (Vec<Workload>, Vec<L4Workload>, Vec<MeshWorkload>);

/// The HTTP, L4 and mesh workloads named (all of them when none is).
fn select(names: &[String]) -> Result<Selected> {
    if names.is_empty() {
        return Ok((
            workloads::ALL.to_vec(),
            l4::ALL.to_vec(),
            mesh::ALL.to_vec(),
        ));
    }
    let (mut http, mut l4, mut mesh) = (Vec::new(), Vec::new(), Vec::new());
    for name in names {
        if let Some(w) = Workload::parse(name) {
            http.push(w);
        } else if let Some(w) = L4Workload::parse(name) {
            l4.push(w);
        } else if let Some(w) = MeshWorkload::parse(name) {
            mesh.push(w);
        } else {
            let known: Vec<&str> = workloads::ALL
                .iter()
                .map(|w| w.id())
                .chain(l4::ALL.iter().map(|w| w.id()))
                .chain(mesh::ALL.iter().map(|w| w.id()))
                .collect();
            bail!("unknown workload {name:?}; known: {}", known.join(", "));
        }
    }
    Ok((http, l4, mesh))
}

/// The HTTP workloads (issue #4) against Portcullis, nginx and HAProxy.
fn run_http(
    args: &mut Args,
    selected: &[Workload],
    work: &std::path::Path,
    placement: &Placement,
    portcullis_bin: &std::path::Path,
) -> Result<(Effort, Vec<report::WorkloadResult>)> {
    let open_files = client::raise_open_file_limit();
    // The idle client holds one descriptor per connection; leave room for the rest.
    let idle_cap = open_files.saturating_sub(200) as usize;
    if args.idle_connections > idle_cap {
        eprintln!(
            "bench: the open-file limit is {open_files}: holding {idle_cap} idle connections instead of {}",
            args.idle_connections
        );
        args.idle_connections = idle_cap;
    }
    let certs = certs::write(&work.join("certs"), contestants::SERVICE_HOST)?;
    let script = wrk::write_script(work)?;
    let (_backend, backend) = contestants::start_backend(work, placement)?;
    let settings = Settings {
        dir: work,
        certs: &certs,
        backend,
        placement,
        portcullis_bin,
        max_connections: args.idle_connections,
    };
    let mut proxies: Vec<Contestant> = [Kind::Portcullis, Kind::Nginx, Kind::Haproxy]
        .into_iter()
        .map(|k| contestants::start(k, &settings).with_context(|| format!("starting {}", k.name())))
        .collect::<Result<_>>()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tls = client::connector(&certs.ca_pem)?;
    let effort = Effort {
        duration: args.duration,
        warmup: args.warmup,
        idle_connections: args.idle_connections,
    };
    let env = workloads::Env {
        script: &script,
        load_cpus: placement.load_cpus.as_deref(),
        tls: &tls,
        rt: &rt,
        effort,
    };
    for p in &proxies {
        workloads::check_answers(p, &env).with_context(|| format!("checking {}", p.kind.name()))?;
        eprintln!(
            "bench: {} answers both bodies correctly over HTTPS and HTTP",
            p.kind.name()
        );
    }

    let mut results = Vec::new();
    for &w in selected {
        let mut samples: BTreeMap<&'static str, Vec<workloads::Sample>> = BTreeMap::new();
        for round in 0..args.rounds {
            // Rotate who goes first, so no proxy always follows the same one.
            let n = proxies.len();
            for i in 0..n {
                let p = &mut proxies[(i + round) % n];
                if w == Workload::IdleTls {
                    // Memory per connection is only meaningful from a fresh process: allocators
                    // keep what earlier runs used.
                    *p = contestants::start(p.kind, &settings)?;
                }
                let s = workloads::run(w, p, &env, round).with_context(|| {
                    format!("{} against {} (round {})", w.id(), p.kind.name(), round + 1)
                })?;
                eprintln!(
                    "bench: {:<16} round {} {:<10} {:>10.0} {}  {:>8.2} µs CPU/{}{}",
                    w.id(),
                    round + 1,
                    p.kind.name(),
                    s.ops_per_sec,
                    w.rate(),
                    s.cpu_us_per_op,
                    w.op(),
                    s.rss_kib_per_conn
                        .map(|r| format!("  {r:.2} KiB/conn"))
                        .unwrap_or_default()
                );
                samples.entry(p.kind.name()).or_default().push(s);
            }
        }
        results.push(report::WorkloadResult::new(w, samples));
    }
    Ok((effort, results))
}
