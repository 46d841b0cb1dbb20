//! Service changes fanned out to the open mapping streams, and mesh changes (per account) fanned
//! out to the open `SyncMesh` and agent `Sync` streams.
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

/// An account's mesh changed (a peer joined, left, changed key, endpoint or routes). Streams
/// re-read the account from the store. Only changes made in this process are announced: a change
/// made through another management replica on the same PostgreSQL is picked up by the streams'
/// periodic re-read (every 30 s).
#[derive(Debug, Clone)]
pub struct MeshEvent {
    pub account_id: String,
}

#[derive(Clone)]
pub struct ChangeBus {
    tx: broadcast::Sender<ServiceEvent>,
    mesh: broadcast::Sender<MeshEvent>,
}

impl Default for ChangeBus {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        let (mesh, _) = broadcast::channel(CAPACITY);
        Self { tx, mesh }
    }

    pub fn subscribe_mesh(&self) -> broadcast::Receiver<MeshEvent> {
        self.mesh.subscribe()
    }

    /// Wakes the mesh streams of this account.
    pub fn publish_mesh(&self, account_id: &str) {
        let _ = self.mesh.send(MeshEvent {
            account_id: account_id.to_string(),
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ServiceEvent> {
        self.tx.subscribe()
    }

    pub fn publish(&self, event: ServiceEvent) {
        // No open stream is not an error.
        let _ = self.tx.send(event);
    }
}
