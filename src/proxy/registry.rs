//! The live client sessions, for the admin console (`SHOW CLIENTS`, `SHOW POOLS`,
//! `SHOW SERVERS`) and the client gauges in `/metrics`.
//!
//! A session registers once it is authenticated and is removed when its [`Registered`] guard
//! drops, whatever path ends it: one lock at connect and one at disconnect. What changes while
//! it runs is read from atomics the session updates anyway ([`SessionState`]: idle or busy,
//! the server connection it holds) plus one store at the start and end of a wait for a pooled
//! server connection; nothing is locked per statement.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::state::SessionState;

/// How a client session uses server connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClientMode {
    /// One server connection of its own (`pool_mode = "session"`).
    Session,
    /// Server connections lent per transaction (`pool_mode = "transaction"`).
    Transaction,
    /// The admin console: no server connection at all.
    Console,
}

impl ClientMode {
    /// The `pool_mode` column.
    pub fn label(self) -> &'static str {
        match self {
            ClientMode::Session => "session",
            ClientMode::Transaction => "transaction",
            ClientMode::Console => "console",
        }
    }
}

/// What a client session is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClientActivity {
    /// Logging in upstream or still starting.
    Login,
    /// A request in flight or a transaction open.
    Active,
    /// Idle outside a transaction.
    Idle,
    /// Waiting for a pooled server connection.
    Waiting,
}

impl ClientActivity {
    pub fn label(self) -> &'static str {
        match self {
            ClientActivity::Login => "login",
            ClientActivity::Active => "active",
            ClientActivity::Idle => "idle",
            ClientActivity::Waiting => "waiting",
        }
    }
}

/// The fixed facts of a client session, known when it registers.
#[derive(Debug, Clone)]
pub struct ClientFacts {
    pub id: u64,
    pub service: String,
    pub database: String,
    pub addr: SocketAddr,
    pub tls: bool,
    pub mode: ClientMode,
    /// The token's `jti` (never the token).
    pub token_id: Option<String>,
    pub application_name: Option<String>,
    /// The upstream role its server connections log in as (`None`: the console).
    pub upstream_role: Option<String>,
}

/// A session-mode session's own server connection.
#[derive(Debug, Clone, Copy)]
pub struct OwnServer {
    pub process_id: u32,
    pub connected_at: SystemTime,
}

/// One live client session.
#[derive(Debug)]
pub struct ClientEntry {
    pub facts: ClientFacts,
    pub connected_at: SystemTime,
    /// The relay state, once the session runs.
    state: OnceLock<Arc<SessionState>>,
    /// Session mode: the server connection it logged in upstream.
    own_server: OnceLock<OwnServer>,
    /// Microseconds since the Unix epoch when its current wait for a pooled server
    /// connection began (0: not waiting).
    waiting_since: AtomicU64,
}

impl ClientEntry {
    /// The session runs with this relay state.
    pub fn attach(&self, state: Arc<SessionState>) {
        let _ = self.state.set(state);
    }

    /// Session mode: the server connection the session logged in.
    pub fn attach_server(&self, process_id: u32) {
        let _ = self.own_server.set(OwnServer {
            process_id,
            connected_at: SystemTime::now(),
        });
    }

    /// Session mode: its own server connection, once logged in.
    pub fn own_server(&self) -> Option<OwnServer> {
        self.own_server.get().copied()
    }

    /// A wait for a pooled server connection begins (one store).
    pub fn begin_wait(&self) {
        self.waiting_since.store(
            micros_since_epoch(SystemTime::now()).max(1),
            Ordering::Relaxed,
        );
    }

    /// The wait ended (a connection was lent, or it timed out); returns how long it took.
    pub fn end_wait(&self) -> Duration {
        let since = self.waiting_since.swap(0, Ordering::Relaxed);
        wait_length(since, SystemTime::now())
    }

    /// How long the session has been waiting, if it is waiting now.
    pub fn waiting_for(&self, now: SystemTime) -> Option<Duration> {
        match self.waiting_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(wait_length(since, now)),
        }
    }

    /// What the session is doing now.
    pub fn activity(&self) -> ClientActivity {
        if self.waiting_since.load(Ordering::Relaxed) != 0 {
            return ClientActivity::Waiting;
        }
        match self.state.get() {
            None if self.facts.mode == ClientMode::Console => ClientActivity::Idle,
            None => ClientActivity::Login,
            Some(state) if state.is_idle() => ClientActivity::Idle,
            Some(_) => ClientActivity::Active,
        }
    }

    /// The backend process id of the server connection the session uses now: its own
    /// (session mode) or the one lent to it (transaction mode).
    pub fn linked_process_id(&self) -> Option<u32> {
        match self.facts.mode {
            ClientMode::Session => self.own_server().map(|s| s.process_id),
            ClientMode::Transaction => self
                .state
                .get()
                .and_then(|state| state.cancel_target())
                .map(|(pid, _)| pid),
            ClientMode::Console => None,
        }
    }
}

fn micros_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn wait_length(since_micros: u64, now: SystemTime) -> Duration {
    Duration::from_micros(micros_since_epoch(now).saturating_sub(since_micros))
}

/// Every live client session of the proxy.
#[derive(Debug, Default)]
pub struct Registry {
    clients: Mutex<BTreeMap<u64, Arc<ClientEntry>>>,
}

impl Registry {
    /// Add a session; it stays listed until the returned guard drops.
    pub fn register(&self, facts: ClientFacts) -> Registered<'_> {
        let entry = Arc::new(ClientEntry {
            facts,
            connected_at: SystemTime::now(),
            state: OnceLock::new(),
            own_server: OnceLock::new(),
            waiting_since: AtomicU64::new(0),
        });
        self.clients.lock().insert(entry.facts.id, entry.clone());
        Registered {
            registry: self,
            entry,
        }
    }

    /// Every live session, by session id.
    pub fn clients(&self) -> Vec<Arc<ClientEntry>> {
        self.clients.lock().values().cloned().collect()
    }
}

/// A session's place in the [`Registry`]; dropping it removes the session.
#[derive(Debug)]
pub struct Registered<'a> {
    registry: &'a Registry,
    pub entry: Arc<ClientEntry>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.clients.lock().remove(&self.entry.facts.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(id: u64, mode: ClientMode) -> ClientFacts {
        ClientFacts {
            id,
            service: "svc".into(),
            database: "db".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
            tls: true,
            mode,
            token_id: None,
            application_name: None,
            upstream_role: Some("app".into()),
        }
    }

    #[test]
    fn sessions_are_listed_until_their_guard_drops() {
        let registry = Registry::default();
        let one = registry.register(facts(1, ClientMode::Session));
        {
            let _two = registry.register(facts(2, ClientMode::Transaction));
            assert_eq!(registry.clients().len(), 2);
        }
        assert_eq!(registry.clients().len(), 1);
        assert_eq!(one.entry.activity(), ClientActivity::Login);
        one.entry.attach(Arc::new(SessionState::new(1, 42, 0)));
        one.entry.attach_server(42);
        assert_eq!(one.entry.activity(), ClientActivity::Idle);
        assert_eq!(one.entry.linked_process_id(), Some(42));
    }

    #[test]
    fn a_wait_is_reported_while_it_lasts() {
        let registry = Registry::default();
        let client = registry.register(facts(1, ClientMode::Transaction));
        client.entry.attach(Arc::new(SessionState::pooled(1, 7)));
        client.entry.begin_wait();
        assert_eq!(client.entry.activity(), ClientActivity::Waiting);
        let later = SystemTime::now() + Duration::from_secs(2);
        assert!(client.entry.waiting_for(later).unwrap() >= Duration::from_secs(1));
        client.entry.end_wait();
        assert_eq!(client.entry.activity(), ClientActivity::Idle);
        assert!(client.entry.waiting_for(later).is_none());
    }
}
