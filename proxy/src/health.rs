//! Health probes on NB_PROXY_HEALTH_ADDRESS: `/healthz` (JSON), `/livez`, `/readyz`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::state::Shared;

/// The `/healthz` document.
pub fn report(shared: &Shared) -> serde_json::Value {
    let s = &shared.status;
    let routes = shared.routes.load();
    let certs = shared.certs.store();
    serde_json::json!({
        "status": if shared.is_draining() { "draining" } else { "ok" },
        "management_connected": s.management_connected.load(Ordering::Relaxed),
        "initial_sync_complete": s.initial_sync_complete.load(Ordering::Relaxed),
        "workers": shared.config.workers,
        "io_driver": s.io_driver.get().copied().unwrap_or("starting"),
        "services": routes.len(),
        "route_table_generation": s.table_generation.load(Ordering::Relaxed),
        "certificates": {
            "names": certs.name_count(),
            "default": certs.has_default(),
        },
        "connections": {
            "active": shared.active_connections(),
            "limit": shared.max_connections,
            "refused": s.refused_connections.load(Ordering::Relaxed),
        },
        "mappings_file": shared.config.mappings_file.as_ref().map(|p| p.display().to_string()),
        "ebpf": shared.ebpf_state(),
        "l4": {
            "ports": routes.l4.ports().iter().map(|(t, p)| format!("{p}/{t}")).collect::<Vec<_>>(),
            "connections": s.l4.connections.load(Ordering::Relaxed),
            "spliced": s.l4.spliced.load(Ordering::Relaxed),
            "user_space_bytes": s.l4.user_space_bytes.load(Ordering::Relaxed),
            "denied": s.l4.denied.load(Ordering::Relaxed),
            "udp_sessions": s.l4.udp_sessions.load(Ordering::Relaxed),
            "xdp": shared.xdp_counters(),
        },
        "acme": shared.config.acme.as_ref().map(|_| shared.acme_board.snapshot()),
        "mesh": shared.mesh_health.lock().map(|h| h.clone()).unwrap_or_default(),
        "access_log": shared.access_log.get().map(|q| q.stats.snapshot()),
        "crowdsec": shared.crowdsec.as_ref().map(|b| b.health()),
        "auth": {
            "lockout_entries": shared.lockout.len(),
            "lockout_capacity": shared.lockout.capacity(),
        },
    })
}

fn ready(shared: &Shared) -> bool {
    !shared.is_draining() && shared.status.io_driver.get().is_some()
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" | "/health" => {
            let doc = report(&shared);
            let code = if shared.is_draining() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            (code, "application/json", doc.to_string())
        }
        "/livez" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if ready(&shared) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// Serves the probes until the runtime stops.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "health accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}
