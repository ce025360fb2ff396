//! CancelRequest routing: pgward hands every client the upstream backend's PID with a secret
//! key of its own, and maps that pair to the session, so a client can only ever cancel its own
//! session's query.
//!
//! In session mode, sessions are one to one with server connections, so the PID a client is given is the PID
//! of the backend that runs its statements: the one PostgreSQL puts in the NotificationResponses
//! it sends, and the one `pg_backend_pid()` returns. The PID is not a secret (PostgreSQL shows it
//! to every session); the secret key is pgward's own random value, never the server's, so a
//! client never learns a key the server would accept directly.
//!
//! In transaction pooling mode the PID is that of the first server connection the session
//! borrowed, and a cancel goes to the connection it holds when the cancel arrives
//! (`SessionState::cancel_target`), or nowhere when it holds none.
//!
//! In a fleet (`[cluster]`), the top [`NODE_BITS`] bits of every secret key name the replica
//! that issued it ([`node_of`]), so whichever replica a load balancer hands the CancelRequest
//! to can send it on to the right one (`proxy::cluster`); the other 26 bits stay random. Without
//! `[cluster]` all 32 bits are random.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;

use super::state::SessionState;

/// Bits of a secret key that carry the issuing replica's node id in a fleet.
pub const NODE_BITS: u32 = 6;

/// The node id a secret key names (meaningful only for keys issued by a replica in a fleet).
pub fn node_of(secret_key: u32) -> u8 {
    // The shift leaves NODE_BITS (6) bits: always fits.
    u8::try_from(secret_key >> (32 - NODE_BITS)).unwrap_or(u8::MAX)
}

/// A secret key naming `node` in its top bits, the rest taken from `random`.
fn with_node(random: u32, node: u8) -> u32 {
    (u32::from(node) << (32 - NODE_BITS)) | (random >> NODE_BITS)
}

/// Maps the keys pgward handed out to the sessions they belong to. Keyed by both halves: a
/// backend PID can be reused by the server while an older session holding it is still
/// registered, and the two must never be confusable.
#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<(u32, u32), Arc<SessionState>>>,
    /// This replica's `cluster.node_id`, carried in every secret key it draws.
    node: Option<u8>,
}

/// The key a client must present to cancel its session's query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub process_id: u32,
    pub secret_key: u32,
}

impl CancelRegistry {
    /// A registry whose secret keys name this node (`None`: not in a fleet, all bits random).
    pub fn for_node(node: Option<u8>) -> Self {
        Self {
            sessions: Mutex::default(),
            node,
        }
    }

    /// Register a session and return the key to hand to its client: its upstream backend's
    /// PID and a fresh random secret unique for that PID.
    pub fn register(&self, session: Arc<SessionState>) -> CancelKey {
        let process_id = session.upstream_process_id;
        let mut rng = rand::thread_rng();
        let mut sessions = self.sessions.lock();
        loop {
            let random = rng.gen::<u32>();
            let secret_key = self.node.map_or(random, |node| with_node(random, node));
            if let std::collections::hash_map::Entry::Vacant(slot) =
                sessions.entry((process_id, secret_key))
            {
                slot.insert(session);
                return CancelKey {
                    process_id,
                    secret_key,
                };
            }
        }
    }

    /// Forget a session's key (at disconnect).
    pub fn unregister(&self, key: CancelKey) {
        self.sessions
            .lock()
            .remove(&(key.process_id, key.secret_key));
    }

    /// The session a key belongs to, if the key (both halves) is valid. The map hashes the
    /// whole pair, so how long a lookup takes says nothing about how much of a secret matched.
    pub fn lookup(&self, process_id: u32, secret_key: u32) -> Option<Arc<SessionState>> {
        self.sessions.lock().get(&(process_id, secret_key)).cloned()
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
        // The client is given its upstream backend's PID, never the server's secret.
        assert_eq!((key_a.process_id, key_b.process_id), (100, 101));
        let id = |k: CancelKey| registry.lookup(k.process_id, k.secret_key).map(|s| s.id);
        assert_eq!(id(key_a), Some(1));
        assert_eq!(id(key_b), Some(2));
        assert_eq!(registry.lookup(100, 200).map(|s| s.id), None);
        assert_eq!(
            registry
                .lookup(key_a.process_id, key_b.secret_key)
                .map(|s| s.id),
            None
        );
        assert_eq!(
            registry
                .lookup(key_a.process_id, key_a.secret_key.wrapping_add(1))
                .map(|s| s.id),
            None
        );
        registry.unregister(key_a);
        assert_eq!(id(key_a), None);
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn a_fleet_replica_names_itself_in_every_key_and_keeps_the_rest_random() {
        let registry = CancelRegistry::for_node(Some(37));
        let keys: Vec<CancelKey> = (0..200)
            .map(|i| registry.register(Arc::new(SessionState::new(i, 7, 1))))
            .collect();
        assert!(keys.iter().all(|k| node_of(k.secret_key) == 37));
        let distinct: std::collections::HashSet<u32> = keys.iter().map(|k| k.secret_key).collect();
        assert_eq!(distinct.len(), keys.len());
        // The low bits vary: both values of the lowest random bit show up.
        assert!(keys.iter().any(|k| k.secret_key & 1 == 1));
        assert!(keys.iter().any(|k| k.secret_key & 1 == 0));
        for node in [0, 1, 62, 63] {
            assert_eq!(node_of(with_node(u32::MAX, node)), node);
            assert_eq!(node_of(with_node(0, node)), node);
        }
    }

    #[test]
    fn sessions_sharing_a_reused_backend_pid_are_never_confused() {
        let registry = CancelRegistry::default();
        let old = registry.register(Arc::new(SessionState::new(1, 4242, 1)));
        let new = registry.register(Arc::new(SessionState::new(2, 4242, 2)));
        assert_eq!(old.process_id, new.process_id);
        assert_ne!(old.secret_key, new.secret_key);
        assert_eq!(
            registry
                .lookup(old.process_id, old.secret_key)
                .map(|s| s.id),
            Some(1)
        );
        assert_eq!(
            registry
                .lookup(new.process_id, new.secret_key)
                .map(|s| s.id),
            Some(2)
        );
        registry.unregister(old);
        assert_eq!(
            registry
                .lookup(new.process_id, new.secret_key)
                .map(|s| s.id),
            Some(2)
        );
    }
}
