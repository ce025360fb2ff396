//! CancelRequest routing: pgward hands every client its own backend key and maps it to the
//! upstream backend, so a client can only ever cancel its own session's query.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;

use super::state::SessionState;

/// Maps the keys pgward handed out to the sessions they belong to.
#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<u32, (u32, Arc<SessionState>)>>,
}

/// The key a client must present to cancel its session's query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub process_id: u32,
    pub secret_key: u32,
}

impl CancelRegistry {
    /// Register a session and return the key to hand to its client.
    pub fn register(&self, session: Arc<SessionState>) -> CancelKey {
        let mut rng = rand::thread_rng();
        let mut sessions = self.sessions.lock();
        loop {
            // Zero and values that look like real small PIDs are fine; uniqueness is what matters.
            let process_id = rng.gen::<u32>() | 1;
            if let std::collections::hash_map::Entry::Vacant(slot) = sessions.entry(process_id) {
                let secret_key = rng.gen();
                slot.insert((secret_key, session));
                return CancelKey {
                    process_id,
                    secret_key,
                };
            }
        }
    }

    /// Forget a session's key (at disconnect).
    pub fn unregister(&self, key: CancelKey) {
        self.sessions.lock().remove(&key.process_id);
    }

    /// The session a key belongs to, if the key (both halves) is valid.
    pub fn lookup(&self, process_id: u32, secret_key: u32) -> Option<Arc<SessionState>> {
        let sessions = self.sessions.lock();
        let (secret, session) = sessions.get(&process_id)?;
        // Compare without an early exit so response timing says nothing about the secret.
        let equal = (secret ^ secret_key) == 0;
        equal.then(|| session.clone())
    }

    /// Number of live sessions (for tests and metrics).
    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_only_opens_its_own_session() {
        let registry = CancelRegistry::default();
        let a = Arc::new(SessionState::new(1, 100, 200));
        let b = Arc::new(SessionState::new(2, 101, 201));
        let key_a = registry.register(a);
        let key_b = registry.register(b);
        assert_eq!(
            registry
                .lookup(key_a.process_id, key_a.secret_key)
                .unwrap()
                .id,
            1
        );
        assert_eq!(
            registry
                .lookup(key_b.process_id, key_b.secret_key)
                .unwrap()
                .id,
            2
        );
        assert!(
            registry
                .lookup(key_a.process_id, key_b.secret_key ^ key_a.secret_key ^ 1)
                .is_none()
                || key_b.secret_key ^ 1 == 0
        );
        assert!(registry
            .lookup(key_a.process_id, key_a.secret_key.wrapping_add(1))
            .is_none());
        registry.unregister(key_a);
        assert!(registry
            .lookup(key_a.process_id, key_a.secret_key)
            .is_none());
        assert_eq!(registry.len(), 1);
    }
}
