//! Per-worker memory of session tokens already verified. An Ed25519 verification costs more
//! than proxying a small request, and a browser sends the same cookie on every request, so each
//! worker keeps the identities of tokens it verified until they expire. Only tokens that passed
//! verification are kept (a flood of forged cookies cannot fill it), each tied to the domain and
//! the key it was checked for, so a rotated key or another service never reuses an entry.

use std::collections::HashMap;
use std::rc::Rc;

use crate::http::gate::Identity;

/// Entries per worker; when full, the memory starts over.
pub const CAPACITY: usize = 8192;

struct Entry {
    domain: Box<str>,
    key: [u8; 32],
    expires: i64,
    identity: Rc<Identity>,
}

#[derive(Default)]
pub struct SessionCache {
    entries: HashMap<Box<str>, Entry>,
}

impl SessionCache {
    pub fn get(&self, token: &str, domain: &str, key: &[u8; 32], now: i64) -> Option<Rc<Identity>> {
        let e = self.entries.get(token)?;
        (e.expires > now && &e.key == key && &*e.domain == domain).then(|| e.identity.clone())
    }

    pub fn insert(
        &mut self,
        token: &str,
        domain: &str,
        key: [u8; 32],
        expires: i64,
        identity: Rc<Identity>,
    ) {
        if self.entries.len() >= CAPACITY {
            self.entries.clear();
        }
        self.entries.insert(
            token.into(),
            Entry {
                domain: domain.into(),
                key,
                expires,
                identity,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_only_for_the_same_domain_key_and_time() {
        let mut c = SessionCache::default();
        let id = Rc::new(Identity::default());
        c.insert("tok", "a.example", [1; 32], 100, id);
        assert!(c.get("tok", "a.example", &[1; 32], 99).is_some());
        assert!(c.get("tok", "a.example", &[1; 32], 100).is_none());
        assert!(c.get("tok", "b.example", &[1; 32], 99).is_none());
        assert!(c.get("tok", "a.example", &[2; 32], 99).is_none());
        assert!(c.get("other", "a.example", &[1; 32], 99).is_none());
    }

    #[test]
    fn bounded() {
        let mut c = SessionCache::default();
        for i in 0..CAPACITY * 2 + 5 {
            c.insert(
                &i.to_string(),
                "a",
                [0; 32],
                10,
                Rc::new(Identity::default()),
            );
            assert!(c.len() <= CAPACITY);
        }
    }
}
