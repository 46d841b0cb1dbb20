//! Keeps a certificate for every wanted domain: loads stored ones, orders missing ones, renews
//! at two thirds of their lifetime, backs off after failures and reports each domain's state.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::challenges::load_peers;
use super::issue::Issuer;
use super::lock::CertLock;
use super::settings::AcmeSettings;
use super::storage::{AcmeDir, Validity};
use super::{AcmeError, LOCK_WAIT};
use crate::state::Shared;
use crate::tls::CertLoader;

/// Orders running at once.
const MAX_CONCURRENT: usize = 4;
/// Whole budget of one order, lock wait excluded.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// First retry after a failure; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// Wait after a rate-limit answer that named no time.
const RATE_LIMIT_WAIT: Duration = Duration::from_secs(3600);
/// Longest sleep of the manager between looks at every domain.
const RECHECK: Duration = Duration::from_secs(30);
/// How often the shared challenge folders are checked for other replicas' challenges.
pub const CHALLENGE_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertState {
    Pending,
    Issued,
    Failed(String),
}

/// Each wanted domain's certificate state, read by the status reporter.
#[derive(Debug, Default)]
pub struct AcmeBoard {
    states: Mutex<HashMap<String, CertState>>,
}

impl AcmeBoard {
    pub fn get(&self, domain: &str) -> Option<CertState> {
        self.lock().get(domain).cloned()
    }

    /// Each domain's state for `/healthz`: `pending`, `issued` or `failed: <reason>`.
    pub fn snapshot(&self) -> serde_json::Value {
        self.lock()
            .iter()
            .map(|(d, s)| {
                let text = match s {
                    CertState::Pending => "pending".to_string(),
                    CertState::Issued => "issued".to_string(),
                    CertState::Failed(reason) => format!("failed: {reason}"),
                };
                (d.clone(), serde_json::Value::String(text))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// True when the state changed.
    fn set(&self, domain: &str, state: CertState) -> bool {
        self.lock().insert(domain.to_string(), state.clone()) != Some(state)
    }

    fn remove(&self, domain: &str) {
        self.lock().remove(domain);
    }

    fn retain(&self, wanted: &BTreeSet<String>) {
        self.lock().retain(|d, _| wanted.contains(d));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CertState>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the manager needs from the rest of the proxy.
pub struct ManagerParts {
    pub shared: Arc<Shared>,
    pub loader: Arc<Mutex<CertLoader>>,
    pub domains: watch::Receiver<BTreeSet<String>>,
    /// Domains whose state changed, for the management status reporter.
    pub events: Option<mpsc::Sender<String>>,
}

struct Plan {
    next: Instant,
    failures: u32,
}

/// The folder and the lock, set up at start so that a broken setup stops the proxy with a
/// clear message instead of leaving every domain pending.
pub fn prepare(
    settings: &AcmeSettings,
    cert_dir: &std::path::Path,
    identity: &str,
) -> Result<Prepared, AcmeError> {
    let dir = AcmeDir::new(cert_dir);
    dir.prepare()?;
    let lock = CertLock::new(settings.lock, dir.locks(), identity)?;
    Ok(Prepared {
        dir,
        lock: Arc::new(lock),
    })
}

/// What [`prepare`] set up.
pub struct Prepared {
    dir: AcmeDir,
    lock: Arc<CertLock>,
}

/// Runs on the control thread for the proxy's lifetime.
pub async fn run(settings: AcmeSettings, Prepared { dir, lock }: Prepared, parts: ManagerParts) {
    tracing::info!(
        directory = %settings.directory,
        challenge = settings.challenge.name(),
        lock = lock.describe(),
        "ACME certificates on"
    );
    let shared = parts.shared.clone();
    tokio::spawn(watch_peer_challenges(dir.clone(), shared.clone()));
    let issuer = Arc::new(Issuer::new(
        settings,
        dir.clone(),
        shared.acme_challenges.clone(),
        lock.clone(),
    ));
    Manager {
        dir,
        issuer,
        lock,
        parts,
        plans: HashMap::new(),
        in_flight: HashSet::new(),
        newly_served: Vec::new(),
        tasks: HashMap::new(),
    }
    .run()
    .await;
}

struct Manager {
    dir: AcmeDir,
    issuer: Arc<Issuer>,
    lock: Arc<CertLock>,
    parts: ManagerParts,
    plans: HashMap<String, Plan>,
    in_flight: HashSet<String>,
    newly_served: Vec<String>,
    /// Which domain each running order task is for (to recover from a panicked task).
    tasks: HashMap<tokio::task::Id, String>,
}

type Outcome = (String, Result<Validity, AcmeError>);

impl Manager {
    async fn run(mut self) {
        let mut orders: JoinSet<Outcome> = JoinSet::new();
        loop {
            let wanted = self.parts.domains.borrow_and_update().clone();
            self.forget_unwanted(&wanted);
            for domain in &wanted {
                self.consider(domain, &mut orders);
            }
            self.flush();
            // A due domain waiting for a free order slot is woken by the order that frees it;
            // every domain is looked at again at least every RECHECK (a static certificate
            // removed from disk hands its domain back to ACME).
            let now = Instant::now();
            let wake = self
                .plans
                .iter()
                .filter(|(d, p)| !self.in_flight.contains(*d) && p.next > now)
                .map(|(_, p)| p.next)
                .min()
                .map_or(now + RECHECK, |at| at.min(now + RECHECK));
            tokio::select! {
                changed = self.parts.domains.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                Some(done) = orders.join_next_with_id(), if !orders.is_empty() => {
                    let (domain, result) = match done {
                        Ok((id, outcome)) => {
                            self.tasks.remove(&id);
                            outcome
                        }
                        Err(e) => {
                            let domain = self.tasks.remove(&e.id()).unwrap_or_default();
                            tracing::error!(%domain, error = %e, "an ACME order task failed");
                            (domain, Err(AcmeError::Acme(format!("the order task failed: {e}"))))
                        }
                    };
                    self.finished(&domain, result);
                    self.flush();
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// A removed service's certificate is no longer renewed.
    fn forget_unwanted(&mut self, wanted: &BTreeSet<String>) {
        self.plans.retain(|d, _| wanted.contains(d));
        self.parts.shared.acme_board.retain(wanted);
    }

    fn consider(&mut self, domain: &str, orders: &mut JoinSet<Outcome>) {
        if self.in_flight.contains(domain) {
            return;
        }
        let certs = self.parts.shared.certs.store();
        if certs.covered_by_configured(domain) {
            // A static or wildcard certificate serves it.
            self.plans.remove(domain);
            self.parts.shared.acme_board.remove(domain);
            return;
        }
        let now = Instant::now();
        let plan = self.plans.entry(domain.to_string()).or_insert(Plan {
            next: now,
            failures: 0,
        });
        if plan.next > now {
            return;
        }
        let stored = self.dir.stored(domain);
        if let Some(v) = stored
            && SystemTime::now() < v.renew_at()
        {
            plan.next = instant_at(v.renew_at());
            plan.failures = 0;
            self.served(domain);
            return;
        }
        if self.in_flight.len() >= MAX_CONCURRENT {
            return;
        }
        if !valid_now(stored) {
            self.report(domain, CertState::Pending);
        }
        self.in_flight.insert(domain.to_string());
        let issuer = self.issuer.clone();
        let lock = self.lock.clone();
        let dir = self.dir.clone();
        let domain = domain.to_string();
        let task_domain = domain.clone();
        let handle = orders.spawn(async move {
            let result = order_once(&issuer, &lock, &dir, &domain).await;
            (domain, result)
        });
        self.tasks.insert(handle.id(), task_domain);
    }

    fn finished(&mut self, domain: &str, result: Result<Validity, AcmeError>) {
        self.in_flight.remove(domain);
        let Some(plan) = self.plans.get_mut(domain) else {
            // The service went away while its order ran.
            return;
        };
        match result {
            Ok(v) => {
                tracing::info!(%domain, not_after = ?v.not_after, "certificate ready");
                plan.failures = 0;
                plan.next = instant_at(v.renew_at());
                self.served(domain);
            }
            Err(e) => {
                plan.failures += 1;
                let wait = match &e {
                    AcmeError::RateLimited { retry_after, .. } => retry_after
                        .and_then(|t| t.duration_since(SystemTime::now()).ok())
                        .unwrap_or(RATE_LIMIT_WAIT),
                    _ => backoff(plan.failures),
                };
                plan.next = Instant::now() + wait;
                tracing::error!(%domain, error = %e, retry_in = ?wait, "certificate not issued");
                if valid_now(self.dir.stored(domain)) {
                    // A renewal failed: the current certificate still serves until it expires.
                    return;
                }
                self.report(domain, CertState::Failed(e.to_string()));
            }
        }
    }

    /// The stored certificate is new or still good: it is loaded and reported by `flush`.
    fn served(&mut self, domain: &str) {
        self.newly_served.push(domain.to_string());
    }

    /// One certificate reload for everything served since the last flush, then the reports,
    /// so that a domain reported issued is already served.
    fn flush(&mut self) {
        if self.newly_served.is_empty() {
            return;
        }
        {
            let mut loader = self.parts.loader.lock().unwrap_or_else(|p| p.into_inner());
            crate::control::reload_certs(&self.parts.shared, &mut loader);
        }
        for domain in std::mem::take(&mut self.newly_served) {
            self.report(&domain, CertState::Issued);
        }
    }

    fn report(&self, domain: &str, state: CertState) {
        if !self.parts.shared.acme_board.set(domain, state) {
            return;
        }
        if let Some(events) = &self.parts.events
            && events.try_send(domain.to_string()).is_err()
        {
            tracing::debug!(%domain, "status event queue full; the next sync reports it");
        }
    }
}

/// Takes the domain's lock, and orders only when no other replica stored a fresh certificate
/// while this one waited.
async fn order_once(
    issuer: &Issuer,
    lock: &CertLock,
    dir: &AcmeDir,
    domain: &str,
) -> Result<Validity, AcmeError> {
    let held = lock.acquire(domain, LOCK_WAIT).await?;
    let result = match dir.stored(domain) {
        Some(v) if SystemTime::now() < v.renew_at() => {
            tracing::info!(%domain, "another proxy stored this certificate meanwhile");
            Ok(v)
        }
        _ => match tokio::time::timeout(ORDER_TIMEOUT, issuer.issue(domain)).await {
            Ok(r) => r,
            Err(_) => Err(AcmeError::Timeout(ORDER_TIMEOUT)),
        },
    };
    held.release().await;
    result
}

/// A stored certificate that has not expired.
fn valid_now(stored: Option<Validity>) -> bool {
    stored.is_some_and(|v| SystemTime::now() < v.not_after)
}

fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

fn instant_at(at: SystemTime) -> Instant {
    let now = Instant::now();
    match at.duration_since(SystemTime::now()) {
        Ok(d) => now + d,
        Err(_) => now,
    }
}

/// Loads the challenges other replicas published into the shared directory.
async fn watch_peer_challenges(dir: AcmeDir, shared: Arc<Shared>) {
    let mut seen = None;
    let mut tick = tokio::time::interval(CHALLENGE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stamp = dir.challenges_stamp();
        if seen.as_ref() == Some(&stamp) {
            continue;
        }
        seen = Some(stamp);
        shared
            .acme_challenges
            .set_peers(load_peers(&dir.challenges()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn board_reports_changes_only() {
        let b = AcmeBoard::default();
        assert!(b.set("a.example", CertState::Pending));
        assert!(!b.set("a.example", CertState::Pending));
        assert!(b.set("a.example", CertState::Issued));
        b.retain(&BTreeSet::new());
        assert!(b.get("a.example").is_none());
    }
}
