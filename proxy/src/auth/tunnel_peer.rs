//! NetBird-only (private) services. A request is let in only when it arrived over the mesh of
//! the service's own account (`Arrival::Mesh`, a listener bound to that account's interface)
//! and management's `ValidateTunnelPeer` says the peer at its tunnel source address (or the
//! peer's user) is in one of the service's groups. Anything else is refused: from outside the
//! mesh, from another account's mesh, unknown peers, and every error (fail closed).
//!
//! Answers are remembered per worker, tied to the WireGuard key of the peer the address
//! belongs to (a tunnel address handed to a new peer is asked about afresh): a peer let in for
//! [`PASS_TTL`], a refusal for [`DENY_TTL`] so that a peer outside every group cannot keep
//! management busy. Taking a peer out of a group takes effect within [`PASS_TTL`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::auth_calls::AuthCallError;
use crate::dataplane::WorkerCtx;
use crate::http::connection::Arrival;
use crate::http::gate::Identity;
use crate::routes::Service;

/// How long a peer that was let in is not asked about again.
pub const PASS_TTL: Duration = Duration::from_secs(30);
/// How long a refusal stands before management is asked again.
pub const DENY_TTL: Duration = Duration::from_secs(5);
/// Tunnel addresses remembered per worker; when full, the memory starts over.
pub const CAPACITY: usize = 4096;
/// Services remembered per address.
const SERVICES_PER_ADDRESS: usize = 256;

/// The access log's `auth_method_used` for requests decided here.
pub const METHOD: &str = "tunnel_peer";

/// Management's answer for one peer and service (an error answers nothing: refused too, but
/// the client may retry).
#[derive(Debug, Clone)]
pub enum TunnelVerdict {
    Pass(Rc<Identity>),
    /// Refused, with the reason (for the log).
    Denied(Rc<str>),
}

struct AddressEntry {
    peer_key: Arc<str>,
    /// Service id → until when, and the answer.
    answers: HashMap<Box<str>, (Instant, TunnelVerdict)>,
}

#[derive(Default)]
pub struct TunnelPeerCache {
    by_address: HashMap<IpAddr, AddressEntry>,
}

impl TunnelPeerCache {
    fn get(
        &self,
        ip: IpAddr,
        peer_key: &str,
        service_id: &str,
        now: Instant,
    ) -> Option<TunnelVerdict> {
        let entry = self.by_address.get(&ip)?;
        if *entry.peer_key != *peer_key {
            return None;
        }
        let (until, answer) = entry.answers.get(service_id)?;
        (*until > now).then(|| answer.clone())
    }

    fn insert(
        &mut self,
        ip: IpAddr,
        peer_key: &Arc<str>,
        service_id: &str,
        until: Instant,
        answer: TunnelVerdict,
    ) {
        if self.by_address.len() >= CAPACITY && !self.by_address.contains_key(&ip) {
            self.by_address.clear();
        }
        let entry = self.by_address.entry(ip).or_insert_with(|| AddressEntry {
            peer_key: peer_key.clone(),
            answers: HashMap::new(),
        });
        if entry.peer_key != *peer_key || entry.answers.len() >= SERVICES_PER_ADDRESS {
            entry.peer_key = peer_key.clone();
            entry.answers.clear();
        }
        entry.answers.insert(service_id.into(), (until, answer));
    }

    pub fn len(&self) -> usize {
        self.by_address.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }
}

/// Decides a request to a private service from `peer` (the TCP peer, never a forwarded
/// address: only the tunnel vouches for it).
pub async fn check(
    ctx: &WorkerCtx,
    service: &Service,
    arrival: &Arrival,
    peer: IpAddr,
) -> Result<TunnelVerdict, AuthCallError> {
    let Arrival::Mesh { account_id } = arrival else {
        return Ok(TunnelVerdict::Denied("not over the mesh".into()));
    };
    if **account_id != *service.account_id {
        return Ok(TunnelVerdict::Denied("account_mismatch".into()));
    }
    let tunnel_ip = peer.to_canonical();
    // WireGuard let the packet in only from the peer whose networks hold its source.
    let peer_key = {
        let mesh = ctx.shared.mesh.load();
        let Some(key) = mesh
            .accounts
            .get(&**account_id)
            .and_then(|routes| routes.peer_for(tunnel_ip))
            .map(|p| p.public_key.clone())
        else {
            return Ok(TunnelVerdict::Denied("peer_not_found".into()));
        };
        key
    };
    let now = Instant::now();
    let remembered = ctx
        .tunnel_peers
        .borrow()
        .get(tunnel_ip, &peer_key, &service.id, now);
    if let Some(verdict) = remembered {
        return Ok(verdict);
    }
    let answer = ctx
        .shared
        .auth_calls
        .validate_tunnel_peer(proto::ValidateTunnelPeerRequest {
            tunnel_ip: tunnel_ip.to_string(),
            domain: service.domain.clone(),
        })
        .await;
    let (answer, ttl) = match answer? {
        r if r.valid => {
            let identity = Identity::new(&r.user_id, &r.user_email, &r.peer_group_names, METHOD);
            (TunnelVerdict::Pass(Rc::new(identity)), PASS_TTL)
        }
        r => {
            let reason = if r.denied_reason.is_empty() {
                "denied"
            } else {
                r.denied_reason.as_str()
            };
            (TunnelVerdict::Denied(Rc::from(reason)), DENY_TTL)
        }
    };
    ctx.tunnel_peers.borrow_mut().insert(
        tunnel_ip,
        &peer_key,
        &service.id,
        now + ttl,
        answer.clone(),
    );
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(a: Option<TunnelVerdict>) -> bool {
        matches!(a, Some(TunnelVerdict::Pass(_)))
    }

    #[test]
    fn remembers_per_peer_key_service_and_deadline() {
        let mut c = TunnelPeerCache::default();
        let ip: IpAddr = "100.64.0.2".parse().unwrap();
        let (k1, k2): (Arc<str>, Arc<str>) = (Arc::from("k1"), Arc::from("k2"));
        let now = Instant::now();
        let pass = TunnelVerdict::Pass(Rc::new(Identity::default()));
        c.insert(ip, &k1, "s1", now + PASS_TTL, pass.clone());
        c.insert(
            ip,
            &k1,
            "s2",
            now + DENY_TTL,
            TunnelVerdict::Denied(Rc::from("not_in_group")),
        );
        assert!(passed(c.get(ip, &k1, "s1", now)));
        assert!(matches!(
            c.get(ip, &k1, "s2", now),
            Some(TunnelVerdict::Denied(_))
        ));
        assert!(c.get(ip, &k1, "s1", now + PASS_TTL).is_none(), "expired");
        assert!(
            c.get(ip, &k2, "s1", now).is_none(),
            "the address now belongs to another peer"
        );
        assert!(
            c.get("100.64.0.3".parse().unwrap(), &k1, "s1", now)
                .is_none()
        );
        // The new peer's answer replaces the old peer's.
        c.insert(ip, &k2, "s3", now + PASS_TTL, pass.clone());
        assert!(c.get(ip, &k1, "s1", now).is_none());
        for i in 0..CAPACITY * 2 {
            let ip = IpAddr::from((0x6440_0000u32 + i as u32).to_be_bytes());
            c.insert(ip, &k1, "s", now + PASS_TTL, pass.clone());
            assert!(c.len() <= CAPACITY);
        }
        for i in 0..SERVICES_PER_ADDRESS * 2 {
            c.insert(ip, &k1, &i.to_string(), now + PASS_TTL, pass.clone());
        }
        assert!(c.by_address[&ip].answers.len() <= SERVICES_PER_ADDRESS);
    }
}
