//! NetBird-only (private) services. A request is let in only when it arrived over the mesh of
//! the service's own account (`Arrival::Mesh`, a listener bound to that account's interface)
//! and management's `ValidateTunnelPeer` says the peer at its tunnel source address (or the
//! peer's user) is in one of the service's groups. Anything else is refused: from outside the
//! mesh, from another account's mesh, unknown peers, and every error (fail closed).
//!
//! Answers that let a peer in are remembered per worker for [`TTL`] (denials never are, so a
//! peer added to a group gets in at once); a peer taken out of a group loses access within it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::control::auth_calls::AuthCallError;
use crate::dataplane::WorkerCtx;
use crate::http::connection::Arrival;
use crate::http::gate::Identity;
use crate::routes::Service;

/// How long a peer that was let in is not asked about again.
pub const TTL: Duration = Duration::from_secs(30);
/// Entries per worker; when full, the memory starts over.
pub const CAPACITY: usize = 4096;

#[derive(Debug)]
pub enum TunnelVerdict {
    Pass(Rc<Identity>),
    /// Refused, with the reason (for the log).
    Denied(String),
    /// Management could not answer: refused too, but the client may retry.
    Unavailable(AuthCallError),
}

#[derive(Hash, PartialEq, Eq)]
struct Key {
    service_id: Box<str>,
    tunnel_ip: IpAddr,
}

#[derive(Default)]
pub struct TunnelPeerCache {
    entries: HashMap<Key, (Instant, Rc<Identity>)>,
}

impl TunnelPeerCache {
    fn get(&self, service_id: &str, tunnel_ip: IpAddr, now: Instant) -> Option<Rc<Identity>> {
        let key = Key {
            service_id: service_id.into(),
            tunnel_ip,
        };
        let (until, identity) = self.entries.get(&key)?;
        (*until > now).then(|| identity.clone())
    }

    fn insert(&mut self, service_id: &str, tunnel_ip: IpAddr, until: Instant, id: Rc<Identity>) {
        if self.entries.len() >= CAPACITY {
            self.entries.clear();
        }
        let key = Key {
            service_id: service_id.into(),
            tunnel_ip,
        };
        self.entries.insert(key, (until, id));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Decides a request to a private service from `peer` (the TCP peer, never a forwarded
/// address: only the tunnel vouches for it).
pub async fn check(
    ctx: &WorkerCtx,
    service: &Service,
    arrival: &Arrival,
    peer: IpAddr,
) -> TunnelVerdict {
    let Arrival::Mesh { account_id } = arrival else {
        return TunnelVerdict::Denied("not over the mesh".into());
    };
    if **account_id != *service.account_id {
        return TunnelVerdict::Denied("account_mismatch".into());
    }
    let tunnel_ip = peer.to_canonical();
    let now = Instant::now();
    if let Some(identity) = ctx.tunnel_peers.borrow().get(&service.id, tunnel_ip, now) {
        return TunnelVerdict::Pass(identity);
    }
    let answer = ctx
        .shared
        .auth_calls
        .validate_tunnel_peer(proto::ValidateTunnelPeerRequest {
            tunnel_ip: tunnel_ip.to_string(),
            domain: service.domain.clone(),
        })
        .await;
    match answer {
        Ok(r) if r.valid => {
            let identity = Rc::new(Identity {
                user: if r.user_email.is_empty() {
                    r.user_id.clone()
                } else {
                    r.user_email
                },
                user_id: r.user_id,
                groups: r.peer_group_names.join(","),
                method: "tunnel_peer".into(),
            });
            ctx.tunnel_peers.borrow_mut().insert(
                &service.id,
                tunnel_ip,
                now + TTL,
                identity.clone(),
            );
            TunnelVerdict::Pass(identity)
        }
        Ok(r) => TunnelVerdict::Denied(if r.denied_reason.is_empty() {
            "denied".into()
        } else {
            r.denied_reason
        }),
        Err(e) => TunnelVerdict::Unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_per_service_and_address_until_the_deadline() {
        let mut c = TunnelPeerCache::default();
        let ip: IpAddr = "100.64.0.2".parse().unwrap();
        let now = Instant::now();
        c.insert("s1", ip, now + TTL, Rc::new(Identity::default()));
        assert!(c.get("s1", ip, now).is_some());
        assert!(c.get("s1", ip, now + TTL).is_none());
        assert!(c.get("s2", ip, now).is_none());
        assert!(c.get("s1", "100.64.0.3".parse().unwrap(), now).is_none());
        for i in 0..CAPACITY * 2 {
            c.insert(&i.to_string(), ip, now + TTL, Rc::new(Identity::default()));
            assert!(c.len() <= CAPACITY);
        }
    }
}
