//! A fleet of pgward replicas behind a load balancer: a CancelRequest reaches the replica that
//! holds its session, whichever replica the balancer hands it to.
//!
//! Every secret key a replica hands out names its `cluster.node_id` in the top bits
//! (`proxy::cancel`). A client's CancelRequest naming this node is delivered as without a
//! fleet; one naming a configured peer is sent on to that peer as a [`PeerCancelRequest`]
//! (pgward's own startup-phase packet, on the peer's ordinary client port, as PgBouncer's
//! peering sends a CancelRequest on), authenticated by an HMAC-SHA256 tag under the fleet's
//! shared `cluster.secret`; one naming any other node is dropped.
//!
//! A replica delivers a peer request only when its tag is valid, it comes from a configured
//! peer, it is at most [`MAX_CLOCK_SKEW`] old (or early), and its key names the receiving node
//! itself — and never forwards it again, so a request crosses at most one hop whatever the
//! peers' configurations say. Someone who can reach the port but does not hold the fleet's
//! secret can do nothing on this path; someone who holds it can do what any client holding
//! the cancel key can do. All of it runs in the connection's own task, bounded by
//! `cluster.peer_timeout`: the accept loop and other sessions never wait for a peer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::cancel::node_of;
use super::Shared;
use crate::config::{ClusterConfig, ConfigError};
use crate::metrics::inc;
use crate::net::Conn;
use crate::protocol::peer_cancel::{PeerCancelRequest, TAG_LEN};

/// Shortest accepted `cluster.secret`, in bytes.
const MIN_SECRET_LEN: usize = 32;

/// How far a peer request's time may be from the receiver's clock, in seconds.
pub const MAX_CLOCK_SKEW: u64 = 60;

/// This replica's place in the fleet.
pub struct Cluster {
    node_id: u8,
    /// Swapped whole on SIGHUP; the node id is fixed for the process's lifetime.
    peers: parking_lot::RwLock<Arc<PeerSet>>,
}

/// The peers, the shared secret and the time limit, as one reloadable value.
pub struct PeerSet {
    addresses: HashMap<u8, String>,
    /// HMAC-SHA256 keyed with `cluster.secret`, cloned for each tag.
    mac: Hmac<Sha256>,
    timeout: Duration,
}

impl std::fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSet")
            .field("addresses", &self.addresses)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PeerSet {
    /// Resolve the shared secret and index the peers (the configuration is validated).
    pub fn prepare(config: &ClusterConfig) -> Result<Self, ConfigError> {
        let secret = Zeroizing::new(config.secret.resolve()?);
        if secret.len() < MIN_SECRET_LEN {
            return Err(ConfigError::Invalid(format!(
                "cluster.secret must be at least {MIN_SECRET_LEN} bytes"
            )));
        }
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
            .map_err(|e| ConfigError::Invalid(format!("cluster.secret: {e}")))?;
        Ok(Self {
            addresses: config
                .peers
                .iter()
                .map(|p| (p.node_id, p.address.clone()))
                .collect(),
            mac,
            timeout: config.peer_timeout,
        })
    }

    fn mac(&self) -> Hmac<Sha256> {
        self.mac.clone()
    }

    fn sign(&self, process_id: u32, secret_key: u32, origin: u8, unix_time: u64) -> [u8; TAG_LEN] {
        let mut mac = self.mac();
        mac.update(&PeerCancelRequest::signed_bytes(
            process_id,
            secret_key,
            u32::from(origin),
            unix_time,
        ));
        mac.finalize().into_bytes().into()
    }
}

/// Why a peer request was not delivered (logged and counted, never told to the sender).
#[derive(Debug, Error)]
pub enum PeerRefusal {
    #[error("this replica has no [cluster] section")]
    NotClustered,
    #[error("origin node {0} is not a configured peer")]
    UnknownOrigin(u32),
    #[error("authentication tag does not verify")]
    BadTag,
    #[error("request time is more than {MAX_CLOCK_SKEW}s from this replica's clock")]
    Stale,
    #[error("the key names node {0}, not this replica")]
    NotOurs(u8),
}

/// Why a cancel could not be handed to a peer.
#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl Cluster {
    /// This replica's cluster state from a validated `[cluster]` section.
    pub fn start(config: &ClusterConfig) -> Result<Self, ConfigError> {
        let peers = PeerSet::prepare(config)?;
        tracing::info!(
            node_id = config.node_id,
            peers = ?peers.addresses,
            "cluster: cancels for other replicas go to their peers"
        );
        Ok(Self {
            node_id: config.node_id,
            peers: parking_lot::RwLock::new(Arc::new(peers)),
        })
    }

    /// This replica's node id.
    pub fn node_id(&self) -> u8 {
        self.node_id
    }

    /// Install a new peer set (SIGHUP, prepared beforehand so a reload applies whole).
    pub fn install(&self, peers: PeerSet) {
        tracing::info!(peers = ?peers.addresses, "SIGHUP: cluster peers reloaded");
        *self.peers.write() = Arc::new(peers);
    }

    fn peers(&self) -> Arc<PeerSet> {
        self.peers.read().clone()
    }

    /// Check a peer request: from a configured peer, correctly tagged, recent, for this node.
    pub fn verify(&self, request: &PeerCancelRequest, now: u64) -> Result<(), PeerRefusal> {
        let peers = self.peers();
        let origin = u8::try_from(request.origin)
            .ok()
            .filter(|o| peers.addresses.contains_key(o))
            .ok_or(PeerRefusal::UnknownOrigin(request.origin))?;
        let mut mac = peers.mac();
        mac.update(&PeerCancelRequest::signed_bytes(
            request.process_id,
            request.secret_key,
            u32::from(origin),
            request.unix_time,
        ));
        // Constant-time comparison.
        mac.verify_slice(&request.tag)
            .map_err(|_| PeerRefusal::BadTag)?;
        if now.abs_diff(request.unix_time) > MAX_CLOCK_SKEW {
            return Err(PeerRefusal::Stale);
        }
        let node = node_of(request.secret_key);
        if node != self.node_id {
            return Err(PeerRefusal::NotOurs(node));
        }
        Ok(())
    }

    /// The signed request that hands this cancel to the node its key names.
    fn peer_request(&self, peers: &PeerSet, process_id: u32, secret_key: u32) -> PeerCancelRequest {
        let unix_time = unix_now();
        PeerCancelRequest {
            process_id,
            secret_key,
            origin: u32::from(self.node_id),
            unix_time,
            tag: peers.sign(process_id, secret_key, self.node_id, unix_time),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A client's CancelRequest: delivered here when its key names this replica (or there is no
/// fleet), sent on to the peer its key names, dropped when it names no configured node.
pub(super) async fn route_cancel(shared: &Shared, process_id: u32, secret_key: u32) {
    let Some(cluster) = &shared.cluster else {
        return super::deliver_cancel(shared, process_id, secret_key).await;
    };
    let node = node_of(secret_key);
    if node == cluster.node_id {
        return super::deliver_cancel(shared, process_id, secret_key).await;
    }
    let peers = cluster.peers();
    let Some(address) = peers.addresses.get(&node) else {
        inc(&shared.metrics.cancels_dropped);
        tracing::debug!(node, "cancel request names no configured node: dropped");
        return;
    };
    let request = cluster.peer_request(&peers, process_id, secret_key);
    let sent = tokio::time::timeout(peers.timeout, send_to_peer(address, &request))
        .await
        .unwrap_or(Err(ForwardError::Timeout(peers.timeout)));
    match sent {
        Ok(()) => {
            inc(&shared.metrics.peer_cancels_sent);
            tracing::debug!(node, %address, "cancel request handed to its replica");
        }
        Err(e) => {
            inc(&shared.metrics.peer_cancels_failed);
            tracing::warn!(node, %address, error = %e, "cancel request could not be handed to its replica");
        }
    }
}

/// Send the request and wait until the peer closes the connection: it does once it has
/// delivered the cancel upstream (or dropped it).
async fn send_to_peer(address: &str, request: &PeerCancelRequest) -> Result<(), ForwardError> {
    let mut tcp = TcpStream::connect(address).await?;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(&request.encode()).await?;
    tcp.flush().await?;
    let mut sink = [0u8; 64];
    while tcp.read(&mut sink).await? > 0 {}
    Ok(())
}

/// A peer's request: delivered upstream if it verifies, then the connection is closed (which
/// tells the sending replica it was acted on). Never forwarded again.
pub(super) async fn accept_peer_cancel(shared: &Shared, request: PeerCancelRequest, conn: Conn) {
    let verified = match &shared.cluster {
        Some(cluster) => cluster.verify(&request, unix_now()),
        None => Err(PeerRefusal::NotClustered),
    };
    match verified {
        Ok(()) => {
            inc(&shared.metrics.peer_cancels_received);
            super::deliver_cancel(shared, request.process_id, request.secret_key).await;
        }
        Err(refusal) => {
            inc(&shared.metrics.peer_cancels_refused);
            tracing::warn!(origin = request.origin, reason = %refusal, "peer cancel request refused");
        }
    }
    drop(conn);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PeerConfig, SecretRef};

    fn config(node_id: u8, peers: &[(u8, &str)], secret_env: &str) -> ClusterConfig {
        ClusterConfig {
            node_id,
            secret: SecretRef::Env(secret_env.into()),
            peer_timeout: Duration::from_secs(1),
            peers: peers
                .iter()
                .map(|(id, a)| PeerConfig {
                    node_id: *id,
                    address: (*a).into(),
                })
                .collect(),
        }
    }

    fn pair() -> (Cluster, Cluster) {
        std::env::set_var(
            "PGWARD_UNIT_CLUSTER_SECRET",
            "a-fleet-secret-of-at-least-32-bytes!",
        );
        let a = Cluster::start(&config(1, &[(2, "b:1")], "PGWARD_UNIT_CLUSTER_SECRET")).unwrap();
        let b = Cluster::start(&config(2, &[(1, "a:1")], "PGWARD_UNIT_CLUSTER_SECRET")).unwrap();
        (a, b)
    }

    fn key_for(node: u8) -> u32 {
        (u32::from(node) << (32 - super::super::cancel::NODE_BITS)) | 0x12345
    }

    #[test]
    fn a_request_signed_by_a_peer_verifies_only_unchanged_recent_and_for_its_node() {
        let (a, b) = pair();
        let now = unix_now();
        let request = a.peer_request(&a.peers(), 77, key_for(2));
        assert!(b.verify(&request, now).is_ok());
        // Any field changed breaks the tag.
        for changed in [
            PeerCancelRequest {
                process_id: 78,
                ..request.clone()
            },
            PeerCancelRequest {
                secret_key: key_for(2) ^ 1,
                ..request.clone()
            },
            PeerCancelRequest {
                unix_time: request.unix_time + 1,
                ..request.clone()
            },
        ] {
            assert!(matches!(b.verify(&changed, now), Err(PeerRefusal::BadTag)));
        }
        // Not from a configured peer (itself included).
        let own = PeerCancelRequest {
            origin: 2,
            ..request.clone()
        };
        assert!(matches!(
            b.verify(&own, now),
            Err(PeerRefusal::UnknownOrigin(2))
        ));
        assert!(matches!(
            b.verify(&request, now + MAX_CLOCK_SKEW + 1),
            Err(PeerRefusal::Stale)
        ));
        // A correctly signed request for another node is not delivered (and never sent on).
        let elsewhere = a.peer_request(&a.peers(), 77, key_for(5));
        assert!(matches!(
            b.verify(&elsewhere, now),
            Err(PeerRefusal::NotOurs(5))
        ));
    }

    #[test]
    fn a_different_secret_does_not_verify_and_short_secrets_are_refused() {
        let (a, _) = pair();
        std::env::set_var(
            "PGWARD_UNIT_CLUSTER_OTHER",
            "another-secret-also-32-bytes-long!!",
        );
        let stranger =
            Cluster::start(&config(2, &[(1, "a:1")], "PGWARD_UNIT_CLUSTER_OTHER")).unwrap();
        let request = a.peer_request(&a.peers(), 77, key_for(2));
        assert!(matches!(
            stranger.verify(&request, unix_now()),
            Err(PeerRefusal::BadTag)
        ));
        std::env::set_var("PGWARD_UNIT_CLUSTER_SHORT", "too short");
        let short = Cluster::start(&config(2, &[], "PGWARD_UNIT_CLUSTER_SHORT"));
        assert!(short.is_err());
    }
}
