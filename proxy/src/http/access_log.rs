//! Turns one finished exchange into an `AccessLog` entry and queues it for management. Queueing
//! never waits: a full queue drops the entry and counts it.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

use super::connection::Conn;
use super::exchange::RequestRecord;
use crate::dataplane::WorkerCtx;
use crate::routes::Service;

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
    queue.push(entry);
}
