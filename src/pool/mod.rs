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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// One upstream server connection of a pool.
pub struct ServerConn {
    pub id: u64,
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
    async fn still_idle(&mut self) -> bool {
        // A zero timeout polls the read once: ready means EOF, an error or an unexpected message.
        tokio::time::timeout(Duration::ZERO, self.reader.next_batch())
            .await
            .is_err()
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
    pub size: usize,
    pub timeout: Duration,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<ServerConn>>,
    pub stats: PoolStats,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("role", &self.role)
            .field("database", &self.database)
            .field("size", &self.size)
            .finish()
    }
}

impl Pool {
    fn new(role: &str, database: &str, settings: PoolSettings) -> Self {
        Self {
            role: role.to_string(),
            database: database.to_string(),
            size: settings.size,
            timeout: settings.timeout,
            permits: Arc::new(Semaphore::new(settings.size)),
            idle: Mutex::new(Vec::new()),
            stats: PoolStats::default(),
        }
    }

    /// Borrow a server connection: an idle one still in good shape, else a new login. Waits
    /// at most `pool_timeout` for one of the `pool_size` slots.
    pub async fn acquire(
        self: &Arc<Self>,
        upstream: &UpstreamTarget,
        password: Option<&str>,
    ) -> Result<Lease, PoolError> {
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = tokio::time::timeout(self.timeout, self.permits.clone().acquire_owned()).await;
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        let permit = match permit {
            Ok(Ok(permit)) => permit,
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(PoolError::Timeout {
                    waited: self.timeout,
                    size: self.size,
                });
            }
        };
        loop {
            let candidate = self.idle.lock().pop();
            let Some(mut conn) = candidate else { break };
            if conn.still_idle().await {
                return Ok(self.lend(conn, permit));
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
        let conn = ServerConn {
            id: NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed),
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
        Ok(self.lend(conn, permit))
    }

    fn lend(self: &Arc<Self>, conn: ServerConn, permit: OwnedSemaphorePermit) -> Lease {
        self.stats.lent.fetch_add(1, Ordering::Relaxed);
        self.stats.leases.fetch_add(1, Ordering::Relaxed);
        Lease {
            conn,
            pool: self.clone(),
            _permit: permit,
        }
    }

    fn forget(&self, conn: ServerConn) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        self.stats.discarded.fetch_add(1, Ordering::Relaxed);
        drop(conn);
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
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    /// Give the connection back: the caller saw it idle, outside a transaction, with every
    /// request answered.
    pub fn release(self) {
        let Lease {
            conn,
            pool,
            _permit,
        } = self;
        pool.stats.lent.fetch_sub(1, Ordering::Relaxed);
        pool.idle.lock().push(conn);
        // The permit is dropped after the connection is back, so the next borrower finds it.
        drop(_permit);
    }

    /// Close the connection (its state is unknown or broken); a new one replaces it on demand.
    pub fn discard(self) {
        let Lease {
            conn,
            pool,
            _permit,
        } = self;
        pool.stats.lent.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(server = conn.id, "pooled server connection closed");
        pool.forget(conn);
    }
}

/// Every pool of a proxy, by (upstream role, database).
#[derive(Debug, Default)]
pub struct Pools {
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
}

impl Pools {
    /// The pool of this role and database (created with `settings` on first use; later
    /// changes of `pool_size`/`pool_timeout` apply after a restart).
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
                |p| p.size as u64,
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
                    label(&pool.role),
                    label(&pool.database),
                    read(pool)
                );
            }
        }
    }
}

/// A Prometheus label value, escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolMode;

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
