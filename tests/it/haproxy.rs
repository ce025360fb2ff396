//! haproxy (the Debian package) in TCP mode in front of pgward replicas, started by the tests
//! on 127.0.0.1.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::harness;

/// haproxy in TCP mode, round robin over the replicas; killed when dropped.
pub struct Haproxy {
    pub addr: SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn haproxy_binary() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("haproxy is not installed: the fleet tests need it (apt-get install -y haproxy; scripts/test.sh installs it)")
    })
}

impl Haproxy {
    pub async fn start(backends: &[SocketAddr]) -> Self {
        Self::start_with(backends, "").await
    }

    /// With `server_options` on every backend line (`send-proxy`, `send-proxy-v2`).
    pub async fn start_with(backends: &[SocketAddr], server_options: &str) -> Self {
        let binary = haproxy_binary();
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = free.local_addr().unwrap();
            drop(free);
            let servers: String = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("    server replica{i} {b} {server_options}\n"))
                .collect();
            let config = format!(
                "global\n    maxconn 512\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n\nfrontend pgward\n    bind {addr}\n    default_backend replicas\n\nbackend replicas\n    balance roundrobin\n{servers}"
            );
            let path = dir.path().join("haproxy.cfg");
            std::fs::write(&path, config).unwrap();
            let mut child = std::process::Command::new(&binary)
                .arg("-db")
                .arg("-f")
                .arg(&path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start haproxy");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                if TcpStream::connect(addr).await.is_ok() {
                    return Self {
                        addr,
                        child,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("haproxy did not start listening");
    }

    pub fn client_config(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user("app")
            .password(harness::token("app", serde_json::json!({})))
            .dbname(database);
        config
    }

    pub async fn connect(&self, database: &str) -> tokio_postgres::Client {
        let (client, conn) = self
            .client_config(database)
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect through haproxy");
        tokio::spawn(conn);
        client
    }
}
