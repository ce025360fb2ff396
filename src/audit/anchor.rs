//! Checkpoints published outside the pgward host (the `table_sink_url` database's
//! `pgward_audit` table, and syslog) and the checks made against them: at start (is the log's
//! head behind its latest anchored checkpoint?) and by `audit verify --anchor`.
//!
//! A checkpoint anchors everything before it: its `prev` commits to the whole chain and its
//! signature to its own fields. Comparing a local checkpoint with its anchored copy (same
//! node and seq; same `prev` and `sig`) therefore proves the log up to there was not
//! rewritten, and an anchored seq beyond the log's head proves it was truncated.
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::record::{self, parse_head};
use super::AuditError;

/// One anchored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub node: String,
    pub seq: u64,
    pub ts: String,
    pub prev: String,
    pub sig: Option<String>,
}

impl Anchor {
    fn from_record(text: &str) -> Option<Self> {
        let h = parse_head(text.as_bytes())?;
        (h.kind == "checkpoint").then_some(Anchor {
            node: h.node,
            seq: h.seq,
            ts: h.ts,
            prev: h.prev,
            sig: h.sig,
        })
    }

    /// Whether `line` (a local record) is this anchored checkpoint.
    pub(crate) fn matches(&self, line: &[u8]) -> bool {
        parse_head(line).is_some_and(|h| {
            h.kind == "checkpoint"
                && h.seq == self.seq
                && h.node == self.node
                && h.prev.eq_ignore_ascii_case(&self.prev)
                && h.sig == self.sig
        })
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The newest checkpoint of this node in the table sink's database, read before the writer
/// starts. Unreachable: logged, and the start goes on (the anchor check is then `verify
/// --anchor`'s job).
pub(super) async fn latest_of_config(config: &super::AuditConfig) -> Option<Anchor> {
    let url = config.table_sink_url.as_deref()?;
    match latest(url, &config.resolved_node_id()).await {
        Ok(anchor) => anchor,
        Err(e) => {
            tracing::warn!(error = %e, "audit anchor unreachable: cannot check the log against it at start");
            None
        }
    }
}

/// The newest anchored checkpoint of `node`, if the table has one.
pub(crate) async fn latest(url: &str, node: &str) -> Result<Option<Anchor>, String> {
    let client = connect(url).await?;
    let rows = client
        .query(
            "SELECT record::text FROM pgward_audit WHERE node = $1 AND kind = 'checkpoint' \
             ORDER BY seq DESC LIMIT 1",
            &[&node],
        )
        .await;
    match rows {
        Ok(rows) => Ok(rows
            .first()
            .and_then(|r| Anchor::from_record(r.get::<_, &str>(0)))),
        // No table yet: nothing was ever anchored.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Every anchored checkpoint, keyed by (node, seq): a PostgreSQL URL (the table sink's
/// table) or a file of syslog lines (`… pgward-audit: {json}`) / JSON lines.
pub fn load(source: &str) -> Result<HashMap<(String, u64), Anchor>, AuditError> {
    let anchors = if source.starts_with("postgres://") || source.starts_with("postgresql://") {
        load_table(source)?
    } else {
        let path = Path::new(source);
        let text = std::fs::read_to_string(path).map_err(|e| AuditError::io(path, e))?;
        text.lines()
            .filter_map(|l| l.find('{').map(|at| &l[at..]))
            .filter_map(Anchor::from_record)
            .collect()
    };
    Ok(anchors
        .into_iter()
        .map(|a| ((a.node.clone(), a.seq), a))
        .collect())
}

/// Runs on its own thread and runtime: `verify` is synchronous and may be called from
/// inside the CLI's runtime.
fn load_table(url: &str) -> Result<Vec<Anchor>, AuditError> {
    let url = url.to_string();
    let fetch = std::thread::spawn(move || -> Result<Vec<Anchor>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let client = connect(&url).await?;
            let rows = client
                .query(
                    "SELECT record::text FROM pgward_audit WHERE kind = 'checkpoint' ORDER BY node, seq",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(rows
                .iter()
                .filter_map(|r| Anchor::from_record(r.get::<_, &str>(0)))
                .collect())
        })
    });
    fetch
        .join()
        .map_err(|_| AuditError::Anchor("anchor reader panicked".into()))?
        .map_err(AuditError::Anchor)
}

/// At start: is the local log consistent with the newest anchor? `None` when it is.
/// `next_seq` is the seq the writer would give its next record.
pub(crate) fn check_start(dir: &Path, next_seq: u64, anchor: &Anchor) -> Option<&'static str> {
    if anchor.seq >= next_seq {
        return Some("behind_anchor");
    }
    match find_line(dir, anchor.seq) {
        Some(line) if anchor.matches(&line) => None,
        _ => Some("differs_from_anchor"),
    }
}

/// The line of record `seq` in the log in `dir` (segment names start with their first seq).
fn find_line(dir: &Path, seq: u64) -> Option<Vec<u8>> {
    let files = record::list_segments(dir).ok()?;
    let first_seq = |p: &std::path::PathBuf| -> Option<u64> {
        p.file_name()?.to_str()?.get(6..26)?.parse().ok()
    };
    let file = files
        .iter()
        .rev()
        .find(|p| first_seq(p).is_some_and(|s| s <= seq))?;
    let data = std::fs::read(file).ok()?;
    data.split(|&b| b == b'\n')
        .find(|l| parse_head(l).is_some_and(|h| h.seq == seq))
        .map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslog_lines_are_anchors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("syslog");
        let cp = r#"{"v":1,"seq":7,"ts":"2026-12-03T00:00:00.000000Z","node":"n1","prev":"ab","kind":"checkpoint","reason":"interval","sig":"x"}"#;
        std::fs::write(
            &p,
            format!("Dec  3 00:00:00 h pgward-audit: {cp}\nDec  3 h pgward-audit: {{\"v\":1,\"seq\":8,\"ts\":\"t\",\"node\":\"n1\",\"prev\":\"cd\",\"kind\":\"statement\"}}\n"),
        )
        .unwrap();
        let anchors = load(p.to_str().unwrap()).unwrap();
        assert_eq!(anchors.len(), 1);
        let a = &anchors[&("n1".to_string(), 7)];
        assert!(a.matches(cp.as_bytes()));
        assert!(!a.matches(cp.replace("\"ab\"", "\"ac\"").as_bytes()));
    }
}
