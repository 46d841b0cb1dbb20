//! The control thread: reloads certificates and the mappings file when they change, serves the
//! health probes and turns SIGTERM into a graceful drain. It is the only place that blocks.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};

pub mod auth_calls;
pub mod management;
pub mod sources;

use crate::state::Shared;
use crate::tls::CertLoader;
use sources::Sources;

/// Publishes a new table with the mappings file's services; a bad file keeps the current table.
pub fn reload_mappings(shared: &Shared, sources: &Sources, path: &std::path::Path) -> bool {
    match crate::mappings_file::load(path) {
        Ok(mappings) => {
            let count = mappings.len();
            sources.set_file(mappings, shared);
            tracing::info!(services = count, file = %path.display(), "mappings loaded");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "mappings file not applied; still serving the previous services");
            false
        }
    }
}

/// Publishes the certificates found on disk; errors are logged, previous pairs kept.
pub fn reload_certs(shared: &Shared, loader: &mut CertLoader) {
    let scan = loader.scan();
    for e in &scan.errors {
        tracing::error!(error = %e, "certificate not loaded");
    }
    tracing::info!(
        names = scan.store.name_count(),
        default = scan.store.has_default(),
        "certificates loaded"
    );
    shared.certs.publish(scan.store);
}

/// Modification time, size and inode of a file: what tells us it was replaced.
fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Runs until the proxy has drained after SIGTERM/SIGINT; returns the process exit code.
pub async fn run(
    shared: Arc<Shared>,
    certs: CertLoader,
    health: tokio::net::TcpListener,
    sources: Arc<Sources>,
    management: Option<management::ManagementLink>,
    mesh: Option<crate::mesh::MeshStart>,
    acme: Option<(
        crate::acme::manager::Prepared,
        tokio::sync::watch::Receiver<std::collections::BTreeSet<String>>,
    )>,
) -> i32 {
    let certs = Arc::new(Mutex::new(certs));
    tokio::spawn(crate::health::serve(health, shared.clone()));
    tokio::spawn(watch_files(
        shared.clone(),
        sources.clone(),
        shared.config.mappings_file.clone(),
        certs.clone(),
        // With management its session retries them, so that it can report the services.
        management.is_none(),
    ));
    // Bounded: a full queue drops events, and the next sync reports every status anyway.
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(256);
    if let (Some(settings), Some((prepared, domains))) = (shared.config.acme.clone(), acme) {
        let parts = crate::acme::manager::ManagerParts {
            shared: shared.clone(),
            loader: certs.clone(),
            domains,
            events: management.is_some().then_some(events_tx),
        };
        tokio::spawn(crate::acme::manager::run(settings, prepared, parts));
    }
    if let Some(bouncer) = shared.crowdsec.clone() {
        tokio::spawn(crate::crowdsec::run(bouncer.clone()));
        if shared.fast_path().is_some() {
            let shared = shared.clone();
            // Bans reach the XDP deny maps of `enforce` L4 ports as soon as they are known.
            tokio::spawn(async move {
                loop {
                    bouncer.changed().await;
                    sources::refresh_fast_path(&shared);
                }
            });
        }
    }
    if let Some(link) = management {
        if let Some(queue) = shared.auth_calls.connect() {
            tokio::spawn(auth_calls::serve(queue, link.clone()));
        }
        let (log_queue, log_rx) = crate::auth::access_log::AccessLogQueue::new();
        let stats = log_queue.stats.clone();
        if shared.access_log.set(log_queue).is_ok() {
            tokio::spawn(crate::auth::access_log::run_to_management(
                log_rx,
                stats,
                link.clone(),
            ));
        }
        let (tokens_tx, tokens_rx) = tokio::sync::watch::channel(Default::default());
        // Bounded like the certificate events: a lost event is repaired by the next sync.
        let (mesh_tx, mesh_rx) = tokio::sync::mpsc::channel(256);
        let events = management::StatusEvents {
            certificates: events_rx,
            mesh: mesh_rx,
            tokens: tokens_tx,
        };
        let mesh_inputs = crate::mesh::MeshInputs {
            tokens: tokens_rx,
            status_events: mesh_tx,
        };
        if let Some(start) = mesh {
            tokio::spawn(crate::mesh::control::run(
                shared.clone(),
                link.clone(),
                shared.config.mesh.clone(),
                mesh_inputs,
                start,
            ));
        }
        tokio::spawn(management::run(shared.clone(), link, sources, events));
    }

    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers");
            return 1;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    shared.start_draining();
    let grace = shared.config.limits.shutdown_timeout;
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let active = shared.active_connections();
        if active == 0 {
            tracing::info!("drained; exiting");
            return 0;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                active,
                "shutdown timeout reached with connections still open; exiting"
            );
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn watch_files(
    shared: Arc<Shared>,
    sources: Arc<Sources>,
    mappings: Option<PathBuf>,
    certs: Arc<Mutex<CertLoader>>,
    retry_held_ports: bool,
) {
    let mut mappings_stamp = mappings.as_deref().and_then(file_stamp);
    let mut last_port_retry = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(shared.config.reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        {
            let mut certs = certs.lock().unwrap_or_else(|p| p.into_inner());
            if certs.changed() {
                reload_certs(&shared, &mut certs);
            }
        }
        if let Some(path) = &mappings {
            let stamp = file_stamp(path);
            if stamp != mappings_stamp {
                mappings_stamp = stamp;
                if stamp.is_some() {
                    reload_mappings(&shared, &sources, path);
                } else {
                    tracing::warn!(file = %path.display(), "mappings file is gone; still serving the previous services");
                }
            }
        }
        if retry_held_ports
            && last_port_retry.elapsed() >= management::PORT_RETRY
            && sources.ports_failed()
        {
            last_port_retry = tokio::time::Instant::now();
            sources.republish(&shared);
        }
    }
}
