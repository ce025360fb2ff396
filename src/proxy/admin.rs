//! The admin HTTP endpoint: `GET /metrics` (Prometheus), `GET /healthz` (the process answers)
//! and `GET /readyz` (it can serve: upstream reachable, audit writable, keys and policies loaded).
//!
//! Deliberately tiny HTTP/1.1 (one request per connection, bounded request size): it serves
//! read-only pages to a scraper or a load balancer on an operator-chosen address, so a web
//! framework would add dependencies without adding safety.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Shared;

const MAX_REQUEST: usize = 8 * 1024;

/// Bind the admin address and serve until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, &shared)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || request.len() + n > MAX_REQUEST {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            render_metrics(shared),
        ),
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        (b"GET", b"/readyz") => {
            let (ready, body) = readiness(shared).await;
            let status = if ready {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "text/plain", body)
        }
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn render_metrics(shared: &Shared) -> String {
    let mut out = shared.metrics.render();
    shared.pools.render_metrics(&mut out);
    super::console::render_metrics(shared, &mut out);
    out
}

/// Time one readiness item may take (the whole page must answer a load balancer promptly).
const ITEM_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one write probe's answer serves the pages asked for meanwhile.
const PROBE_FRESH_FOR: Duration = Duration::from_secs(1);

/// The audit directory's write probe, shared by every `/readyz` page: one probe at a time
/// (off the runtime), and pages asked for while it runs, or within [`PROBE_FRESH_FOR`] of
/// its answer, get that answer — so two health checkers asking at once never see each other
/// as a failure, and a flood of pages costs one probe a second.
#[derive(Default)]
pub(super) struct AuditProbe {
    lane: crate::blocking::OneAtATime,
    last: tokio::sync::Mutex<Option<(std::time::Instant, (bool, String))>>,
}

impl AuditProbe {
    /// Whether a file can be written in `dir`. On a stalled disk creating or removing a file
    /// can block for good: the probe then costs a timeout, never a worker thread, and while
    /// it still waits the next one reports that at once rather than leaving another thread
    /// behind it.
    async fn ask(&self, dir: &std::path::Path) -> (bool, String) {
        let Ok(mut last) = tokio::time::timeout(ITEM_TIMEOUT, self.last.lock()).await else {
            return (
                false,
                "a write probe got no answer in time (is the disk stalled?)".into(),
            );
        };
        if let Some((at, answer)) = last.as_ref() {
            if at.elapsed() < PROBE_FRESH_FOR {
                return answer.clone();
            }
        }
        let answer = self.probe(dir).await;
        *last = Some((std::time::Instant::now(), answer.clone()));
        answer
    }

    async fn probe(&self, dir: &std::path::Path) -> (bool, String) {
        let dir = dir.to_path_buf();
        let probe = self
            .lane
            .within(ITEM_TIMEOUT, move || crate::audit::probe_writable(&dir));
        match probe.await {
            Ok(Ok(())) => (true, "writable".into()),
            Ok(Err(e)) => (false, e.to_string()),
            Err(crate::blocking::Unanswered::TimedOut(_)) => (
                false,
                "a write probe got no answer in time (is the disk stalled?)".into(),
            ),
            Err(crate::blocking::Unanswered::StillBusy) => (
                false,
                "an earlier write probe is still waiting for the disk".into(),
            ),
            Err(e) => (false, format!("the write probe failed: {e}")),
        }
    }
}

/// Each readiness item as `ok|fail <item>: detail`, and whether all are ok.
pub async fn readiness(shared: &Shared) -> (bool, String) {
    let mut items: Vec<(bool, &str, String)> = Vec::new();
    let upstream = tokio::time::timeout(ITEM_TIMEOUT, shared.upstream.probe()).await;
    items.push(match upstream {
        Ok(Ok(())) => (true, "upstream", "reachable".into()),
        Ok(Err(e)) => (false, "upstream", e.to_string()),
        Err(_) => (false, "upstream", "no answer in time".into()),
    });
    items.push(match &shared.config.audit {
        Some(audit) if audit.enabled => {
            let (ok, detail) = shared.audit_probe.ask(&audit.dir).await;
            (ok, "audit", detail)
        }
        _ => (true, "audit", "not configured".into()),
    });
    let token_keys = shared.verifier.key_count();
    items.push((token_keys > 0, "token keys", format!("{token_keys} loaded")));
    if let Some(encryption) = &shared.encryption {
        let manager = &encryption.manager;
        let mut missing = Vec::new();
        for name in manager.key_names() {
            let loaded = tokio::time::timeout(ITEM_TIMEOUT, manager.current_key_ref(name)).await;
            if !matches!(loaded, Ok(Ok(_))) {
                missing.push(name.to_string());
            }
        }
        items.push(if missing.is_empty() {
            (true, "encryption keys", "loaded".into())
        } else {
            (
                false,
                "encryption keys",
                format!("not loaded: {}", missing.join(", ")),
            )
        });
    }
    if let Some(policies) = &shared.policies {
        let services = policies.engine().services().len();
        items.push((true, "policies", format!("{services} service(s) loaded")));
    }
    let ready = items.iter().all(|(ok, _, _)| *ok);
    let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
    for (ok, item, detail) in items {
        body.push_str(&format!(
            "{} {item}: {detail}\n",
            if ok { "ok" } else { "fail" }
        ));
    }
    (ready, body)
}
