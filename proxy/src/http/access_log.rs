//! Turns one finished exchange into an `AccessLog` entry and queues it for management. Queueing
//! never waits: a full queue drops the entry and counts it.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

use super::connection::Conn;
use super::exchange::RequestRecord;
use crate::dataplane::WorkerCtx;
use crate::routes::Service;

/// One entry per L4 TCP connection, when it ends. A spliced connection's bytes travel in the
/// kernel: they are not counted (`metadata.spliced`).
pub fn record_l4(
    ctx: &Rc<WorkerCtx>,
    service: &crate::routes::L4Service,
    client_ip: IpAddr,
    started: Instant,
    (up, down): (u64, u64),
    protocol: &str,
    spliced: bool,
) {
    let Some(queue) = ctx.shared.access_log.get() else {
        return;
    };
    let mut entry = proto::AccessLog {
        account_id: service.account_id.clone(),
        service_id: service.id.clone(),
        host: service.domain.clone(),
        duration_ms: started.elapsed().as_millis().min(i64::MAX as u128) as i64,
        source_ip: crate::routes::access::canonical(client_ip).to_string(),
        auth_success: true,
        bytes_upload: up.min(i64::MAX as u64) as i64,
        bytes_download: down.min(i64::MAX as u64) as i64,
        protocol: protocol.to_string(),
        ..Default::default()
    };
    if spliced {
        entry.metadata.insert("spliced".into(), "true".into());
    }
    queue.push(entry);
}

pub fn record(
    ctx: &Rc<WorkerCtx>,
    service: &Service,
    conn: &Conn,
    client_ip: IpAddr,
    started: Instant,
    rec: &RequestRecord,
) {
    let Some(queue) = ctx.shared.access_log.get() else {
        return;
    };
    let head = &conn.head;
    let entry = proto::AccessLog {
        account_id: service.account_id.clone(),
        service_id: service.id.clone(),
        host: head.host.clone(),
        path: head.path().to_string(),
        duration_ms: started.elapsed().as_millis().min(i64::MAX as u128) as i64,
        method: String::from_utf8_lossy(head.method()).into_owned(),
        response_code: i32::from(rec.status),
        source_ip: client_ip.to_string(),
        auth_mechanism: rec
            .identity
            .as_ref()
            .map_or_else(|| rec.gate.method.clone(), |i| i.method.clone()),
        user_id: rec
            .identity
            .as_ref()
            .map_or_else(|| rec.gate.user_id.clone(), |i| i.user_id.clone()),
        auth_success: rec.gate.success,
        bytes_upload: rec.bytes_up.min(i64::MAX as u64) as i64,
        bytes_download: rec.bytes_down.min(i64::MAX as u64) as i64,
        protocol: "http".to_string(),
        ..Default::default()
    };
    let mut entry = entry;
    if let Some(v) = &rec.crowdsec_verdict {
        entry.metadata.insert("crowdsec_verdict".into(), v.clone());
    }
    queue.push(entry);
}
