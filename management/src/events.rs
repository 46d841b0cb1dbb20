//! Service changes fanned out to the open mapping streams.
//!
//! A bounded broadcast: a stream that falls behind is ended with `UNAVAILABLE`, and its proxy
//! reconnects and receives a full snapshot, so nothing is lost and nothing grows without bound.

use proto::ProxyMapping;
use tokio::sync::broadcast;

/// Changes buffered per stream before it counts as fallen behind.
const CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub struct ServiceEvent {
    pub account_id: String,
    pub cluster_address: String,
    /// A CREATED/MODIFIED mapping, or a REMOVED one carrying only id and domain.
    pub mapping: ProxyMapping,
}

#[derive(Clone)]
pub struct ChangeBus {
    tx: broadcast::Sender<ServiceEvent>,
}

impl Default for ChangeBus {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        Self { tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ServiceEvent> {
        self.tx.subscribe()
    }

    pub fn publish(&self, event: ServiceEvent) {
        // No open stream is not an error.
        let _ = self.tx.send(event);
    }
}
