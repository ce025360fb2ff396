//! Transaction pooling (`pool_mode = "transaction"`): server connections shared by the client
//! sessions of one (upstream role, database).
//!
//! A [`Pool`] holds at most `pool_size` server connections. A session in transaction mode
//! borrows one ([`Pool::acquire`], queued behind a semaphore with `pool_timeout`) when its
//! client sends a request and gives it back ([`Lease::release`]) once the server is idle
//! outside a transaction with nothing outstanding; `proxy::pooled` decides when. A connection
//! whose state is unknown (the client left mid-transaction, an I/O error, an unexpected
//! message while idle) is closed instead ([`Lease::discard`]) and a new one is opened on
//! demand, so a broken connection is replaced.
//!
//! What may not survive on a shared connection is kept off it: `session_state` refuses
//! statements that would leave session state behind, and `prepared` gives protocol-level
//! prepared statements server-side names of pgward's own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::PoolSettings;
use crate::net::{ConnReader, ConnWriter};
use crate::protocol::FrameReader;
use crate::upstream::{UpstreamError, UpstreamTarget, MAX_UPSTREAM_MESSAGE};

pub mod prepared;
pub mod session_state;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// Why no server connection could be lent.
#[derive(Debug, Error)]
pub enum PoolError {
    #[error("no server connection became free within {waited:?} (pool_size {size})")]
    Timeout { waited: Duration, size: usize },
    #[error(transparent)]
    Connect(#[from] UpstreamError),
}

/// What the admin console shows of one server connection of a pool; shared by the
/// connection and its pool's list, so the console reads it without touching the connection.
#[derive(Debug)]
pub struct ServerEntry {
    pub id: u64,
    /// The backend's process id (`pg_stat_activity.pid`).
    pub process_id: u32,
    pub connected_at: SystemTime,
    /// The client session it is lent to (0: idle in the pool).
    client: AtomicU64,
}

impl ServerEntry {
    /// The client session this connection is lent to, if any.
    pub fn client(&self) -> Option<u64> {
        match self.client.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }
}

/// One upstream server connection of a pool.
pub struct ServerConn {
    pub id: u64,
    /// Its row in the pool's list of connections (`SHOW SERVERS`).
    pub entry: Arc<ServerEntry>,
    pub reader: FrameReader<ConnReader>,
    pub writer: ConnWriter,
    /// The backend's cancel key.
    pub process_id: u32,
    pub secret_key: u32,
    /// The ParameterStatus messages the server sent at login.
    pub startup_messages: Vec<Bytes>,
    /// Server-side names of the statements prepared on this connection (`prepared`).
    pub prepared: HashSet<String>,
    pub opened: Instant,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("process_id", &self.process_id)
            .field("prepared", &self.prepared.len())
            .finish()
    }
}

impl ServerConn {
    /// Whether an idle connection is still usable: nothing may have arrived on it (an idle
    /// server says nothing unless it is going away, e.g. terminated by an administrator).
    fn still_idle(&mut self) -> bool {
        // One poll of the read, without a timer: ready means EOF, an error or an unexpected
        // message. (The read is cancel-safe: whatever it buffered stays for the next one.)
        let read = std::pin::pin!(self.reader.next_batch());
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        std::future::Future::poll(read, &mut context).is_pending()
    }
}

/// Counters of one pool (for logs, metrics and tests).
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Server connections open (idle or lent).
    pub open: AtomicUsize,
    /// Server connections lent to a client right now.
    pub lent: AtomicUsize,
    /// Clients waiting for a server connection right now.
    pub waiting: AtomicUsize,
    /// Leases granted since start.
    pub leases: AtomicU64,
    /// Clients that gave up waiting (53300).
    pub timeouts: AtomicU64,
    /// Connections closed because their state was unknown or broken.
    pub discarded: AtomicU64,
}

/// The server connections of one (upstream role, database).
pub struct Pool {
    pub role: String,
    pub database: String,
    /// `pool_size` now (changed by [`Pool::resize`] on SIGHUP).
    size: AtomicUsize,
    /// `pool_timeout` now, in milliseconds.
    timeout_ms: AtomicU64,
    permits: Arc<Semaphore>,
    /// Permits still to be taken out of circulation after a shrink: each lease that ends
    /// while this is positive gives up its permit instead of returning it.
    shrink_debt: AtomicUsize,
    idle: Mutex<Vec<ServerConn>>,
    /// Every open connection, idle or lent (inserted at login, removed at close).
    servers: Mutex<BTreeMap<u64, Arc<ServerEntry>>>,
    pub stats: PoolStats,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("role", &self.role)
            .field("database", &self.database)
            .field("size", &self.size())
            .finish()
    }
}

impl Pool {
    fn new(role: &str, database: &str, settings: PoolSettings) -> Self {
        Self {
            role: role.to_string(),
            database: database.to_string(),
            size: AtomicUsize::new(settings.size),
            timeout_ms: AtomicU64::new(millis(settings.timeout)),
            permits: Arc::new(Semaphore::new(settings.size)),
            shrink_debt: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            servers: Mutex::new(BTreeMap::new()),
            stats: PoolStats::default(),
        }
    }

    /// `pool_size` now.
    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// `pool_timeout` now.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Apply a new `pool_size` and `pool_timeout` (SIGHUP). Growing frees the new slots at
    /// once (waiting clients get them); shrinking takes free slots out of circulation, closes
    /// surplus idle connections now and lent ones when their lease ends (a transaction is
    /// never interrupted).
    pub fn resize(&self, settings: PoolSettings) {
        self.timeout_ms
            .store(millis(settings.timeout), Ordering::Relaxed);
        let old = self.size.swap(settings.size, Ordering::Relaxed);
        if settings.size > old {
            let mut grow = settings.size - old;
            // Slots still owed from an earlier shrink are cancelled before new ones are added.
            let _ = self
                .shrink_debt
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |debt| {
                    let paid = debt.min(grow);
                    grow -= paid;
                    Some(debt - paid)
                });
            self.permits.add_permits(grow);
        } else if settings.size < old {
            let shrink = old - settings.size;
            let taken = self.permits.forget_permits(shrink);
            self.shrink_debt
                .fetch_add(shrink - taken, Ordering::Relaxed);
        }
        let surplus: Vec<ServerConn> = {
            let mut idle = self.idle.lock();
            let open = self.stats.open.load(Ordering::Relaxed);
            let excess = open.saturating_sub(settings.size).min(idle.len());
            let keep = idle.len() - excess;
            idle.split_off(keep)
        };
        for conn in surplus {
            self.close(conn);
        }
        tracing::info!(role = %self.role, database = %self.database, pool_size = settings.size, pool_timeout = ?settings.timeout, "pool resized");
    }

    /// Every open server connection of the pool (for the admin console).
    pub fn servers(&self) -> Vec<Arc<ServerEntry>> {
        self.servers.lock().values().cloned().collect()
    }

    /// Borrow a server connection: an idle one still in good shape, else a new login. Waits
    /// at most `pool_timeout` for one of the `pool_size` slots.
    /// `client` is the session id the connection is lent to (shown by `SHOW SERVERS`).
    pub async fn acquire(
        self: &Arc<Self>,
        upstream: &UpstreamTarget,
        password: Option<&str>,
        client: u64,
    ) -> Result<Lease, PoolError> {
        let permit = self.slot().await?;
        loop {
            let candidate = self.idle.lock().pop();
            let Some(mut conn) = candidate else { break };
            if conn.still_idle() {
                return Ok(self.lend(conn, permit, client));
            }
            tracing::info!(
                server = conn.id,
                role = %self.role,
                database = %self.database,
                "pooled server connection went away while idle: replaced"
            );
            self.forget(conn);
        }
        let session = upstream
            .connect(&self.role, password, &self.database, &[])
            .await?;
        let (reader, writer) = session.conn.split();
        let id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ServerEntry {
            id,
            process_id: session.process_id,
            connected_at: SystemTime::now(),
            client: AtomicU64::new(0),
        });
        self.servers.lock().insert(id, entry.clone());
        let conn = ServerConn {
            id,
            entry,
            reader: FrameReader::with_buffered(reader, MAX_UPSTREAM_MESSAGE, session.buffered),
            writer,
            process_id: session.process_id,
            secret_key: session.secret_key,
            startup_messages: session.startup_messages,
            prepared: HashSet::new(),
            opened: Instant::now(),
        };
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(server = conn.id, role = %self.role, database = %self.database, "pooled server connection opened");
        Ok(self.lend(conn, permit, client))
    }

    /// One of the `pool_size` slots: at once when one is free (no timer armed — the common
    /// case under load costs one atomic operation), else after waiting in line at most
    /// `pool_timeout`. A free slot is never taken ahead of a waiting client: the semaphore
    /// hands released slots to its waiters first.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, PoolError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let timeout = self.timeout();
        let permit = tokio::time::timeout(timeout, self.permits.clone().acquire_owned()).await;
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(PoolError::Timeout {
                    waited: timeout,
                    size: self.size(),
                })
            }
        }
    }

    fn lend(
        self: &Arc<Self>,
        conn: ServerConn,
        permit: OwnedSemaphorePermit,
        client: u64,
    ) -> Lease {
        conn.entry.client.store(client, Ordering::Relaxed);
        self.stats.lent.fetch_add(1, Ordering::Relaxed);
        self.stats.leases.fetch_add(1, Ordering::Relaxed);
        Lease {
            conn,
            pool: self.clone(),
            permit,
        }
    }

    fn forget(&self, conn: ServerConn) {
        self.stats.discarded.fetch_add(1, Ordering::Relaxed);
        self.close(conn);
    }

    /// Close a connection and take it off the pool's list.
    fn close(&self, conn: ServerConn) {
        self.servers.lock().remove(&conn.id);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        drop(conn);
    }

    /// A lease ended: its slot goes back, unless a shrink still owes one.
    fn end_lease(&self, permit: OwnedSemaphorePermit) {
        let owed = self
            .shrink_debt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |debt| {
                debt.checked_sub(1)
            })
            .is_ok();
        if owed {
            permit.forget();
        } else {
            drop(permit);
        }
    }

    /// Idle server connections right now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }
}

/// A server connection lent to one client session; its slot is freed when the lease ends.
#[derive(Debug)]
pub struct Lease {
    pub conn: ServerConn,
    pool: Arc<Pool>,
    permit: OwnedSemaphorePermit,
}

impl Lease {
    /// Give the connection back: the caller saw it idle, outside a transaction, with every
    /// request answered.
    pub fn release(self) {
        let Lease { conn, pool, permit } = self;
        pool.stats.lent.fetch_sub(1, Ordering::Relaxed);
        conn.entry.client.store(0, Ordering::Relaxed);
        let surplus = pool.stats.open.load(Ordering::Relaxed) > pool.size();
        if surplus {
            // The pool shrank while this connection was lent.
            tracing::debug!(
                server = conn.id,
                "pooled server connection closed: pool_size shrank"
            );
            pool.close(conn);
        } else {
            pool.idle.lock().push(conn);
        }
        // The permit goes after the connection is back, so the next borrower finds it.
        pool.end_lease(permit);
    }

    /// Close the connection (its state is unknown or broken); a new one replaces it on demand.
    pub fn discard(self) {
        let Lease { conn, pool, permit } = self;
        pool.stats.lent.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(server = conn.id, "pooled server connection closed");
        pool.forget(conn);
        pool.end_lease(permit);
    }
}

/// Every pool of a proxy, by (upstream role, database).
#[derive(Debug, Default)]
pub struct Pools {
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
}

impl Pools {
    /// The pool of this role and database (created with `settings` on first use; SIGHUP
    /// applies later changes with [`Pool::resize`]).
    pub fn pool(&self, role: &str, database: &str, settings: PoolSettings) -> Arc<Pool> {
        self.pools
            .lock()
            .entry((role.to_string(), database.to_string()))
            .or_insert_with(|| Arc::new(Pool::new(role, database, settings)))
            .clone()
    }

    /// Every pool, for statistics.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().values().cloned().collect()
    }

    /// The pools' Prometheus series (labels: upstream role and database, fixed by the
    /// configuration), appended to `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let mut pools = self.all();
        if pools.is_empty() {
            return;
        }
        pools.sort_by(|a, b| (&a.role, &a.database).cmp(&(&b.role, &b.database)));
        type Read = fn(&Pool) -> u64;
        let series: [(&str, &str, &str, Read); 6] = [
            (
                "pgward_pool_size",
                "gauge",
                "Server connections a pool may open (pool_size).",
                |p| p.size() as u64,
            ),
            (
                "pgward_pool_server_connections_active",
                "gauge",
                "Server connections lent to a client now.",
                |p| p.stats.lent.load(Ordering::Relaxed) as u64,
            ),
            (
                "pgward_pool_server_connections_idle",
                "gauge",
                "Server connections open and idle now.",
                |p| p.idle_count() as u64,
            ),
            (
                "pgward_pool_clients_waiting",
                "gauge",
                "Clients waiting for a server connection now.",
                |p| p.stats.waiting.load(Ordering::Relaxed) as u64,
            ),
            (
                "pgward_pool_leases_total",
                "counter",
                "Server connections lent to clients (one per transaction or statement).",
                |p| p.stats.leases.load(Ordering::Relaxed),
            ),
            (
                "pgward_pool_timeouts_total",
                "counter",
                "Clients that waited longer than pool_timeout (53300).",
                |p| p.stats.timeouts.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, read) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for pool in &pools {
                let _ = writeln!(
                    out,
                    "{name}{{role=\"{}\",database=\"{}\"}} {}",
                    crate::metrics::label_value(&pool.role),
                    crate::metrics::label_value(&pool.database),
                    read(pool)
                );
            }
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolMode;

    #[tokio::test]
    async fn resizing_adds_slots_at_once_and_withdraws_busy_ones_when_they_come_back() {
        let settings = |size| PoolSettings {
            mode: PoolMode::Transaction,
            size,
            timeout: Duration::from_secs(1),
        };
        let pool = Pool::new("app", "db", settings(2));
        let first = pool.permits.clone().acquire_owned().await.unwrap();
        let second = pool.permits.clone().acquire_owned().await.unwrap();
        // Both slots are lent: shrinking to 1 owes one slot, taken when a lease ends.
        pool.resize(settings(1));
        assert_eq!((pool.size(), pool.permits.available_permits()), (1, 0));
        pool.end_lease(first);
        assert_eq!(pool.permits.available_permits(), 0);
        pool.end_lease(second);
        assert_eq!(pool.permits.available_permits(), 1);
        // Growing frees the new slots at once.
        pool.resize(PoolSettings {
            timeout: Duration::from_secs(7),
            ..settings(4)
        });
        assert_eq!(pool.permits.available_permits(), 4);
        assert_eq!(pool.timeout(), Duration::from_secs(7));
        // A shrink that is paid back by a growth before any lease ended.
        let held: Vec<_> = (0..4)
            .map(|_| pool.permits.clone().try_acquire_owned().unwrap())
            .collect();
        pool.resize(settings(2));
        pool.resize(settings(3));
        for permit in held {
            pool.end_lease(permit);
        }
        assert_eq!(pool.permits.available_permits(), 3);
    }

    #[test]
    fn pools_are_shared_per_role_and_database_and_rendered_for_prometheus() {
        let pools = Pools::default();
        let settings = PoolSettings {
            mode: PoolMode::Transaction,
            size: 5,
            timeout: Duration::from_secs(1),
        };
        let a = pools.pool("app", "db", settings);
        let b = pools.pool(
            "app",
            "db",
            PoolSettings {
                size: 9,
                ..settings
            },
        );
        assert!(Arc::ptr_eq(&a, &b));
        pools.pool("we\"ird", "db", settings);
        let mut out = String::new();
        pools.render_metrics(&mut out);
        assert!(
            out.contains("pgward_pool_size{role=\"app\",database=\"db\"} 5"),
            "{out}"
        );
        assert!(out.contains("role=\"we\\\"ird\""), "{out}");
        assert!(out.contains("# TYPE pgward_pool_leases_total counter"));
    }
}
