//! Where services come from: the mappings file and management. The table the workers serve is
//! always built from both, whole, and swapped in at once.

use std::collections::HashMap;
use std::sync::Mutex;

use proto::ProxyMapping;

use crate::routes::RouteTable;
use crate::state::Shared;

#[derive(Default)]
pub struct Sources {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    file: Vec<ProxyMapping>,
    management: Vec<ProxyMapping>,
}

impl Sources {
    pub fn set_file(
        &self,
        mappings: Vec<ProxyMapping>,
        shared: &Shared,
    ) -> HashMap<String, String> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.file = mappings;
        publish(&inner, shared)
    }

    /// Replaces management's services; returns the ids that could not be served, with why.
    pub fn set_management(
        &self,
        mappings: Vec<ProxyMapping>,
        shared: &Shared,
    ) -> HashMap<String, String> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.management = mappings;
        publish(&inner, shared)
    }
}

fn publish(inner: &Inner, shared: &Shared) -> HashMap<String, String> {
    // Management's services come last, so they win over a file service with the same domain.
    let all: Vec<ProxyMapping> = inner
        .file
        .iter()
        .chain(inner.management.iter())
        .cloned()
        .collect();
    let (table, report) = RouteTable::build(&all);
    let mut skipped = HashMap::new();
    for (id, err) in report.skipped {
        tracing::error!(service = %id, error = %err, "service not served");
        skipped.insert(id, err.to_string());
    }
    shared.publish_routes(table);
    skipped
}
