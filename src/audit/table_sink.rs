//! Optional second sink: a copy of every durable batch in a PostgreSQL table of a separate
//! database, which is also the log's external anchor (see `anchor`). Records are best effort
//! — the JSON Lines files are the record of truth and the durable path never waits for this
//! sink; while the database is unreachable batches are dropped (and logged), and the files
//! still hold them — but the newest checkpoint is retried until it is stored.
use std::time::Duration;

use tokio::sync::mpsc;

/// Batches queued before the sink starts dropping.
const QUEUE: usize = 1024;

const CREATE: &str = "CREATE TABLE IF NOT EXISTS pgward_audit (
    node text NOT NULL,
    seq bigint NOT NULL,
    ts timestamptz NOT NULL,
    kind text NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (node, seq)
)";

/// Inserts a whole batch (a JSON array built from the lines) in one statement. ON CONFLICT
/// keeps re-sends after a reconnect idempotent.
const INSERT: &str = "INSERT INTO pgward_audit (node, seq, ts, kind, record)
SELECT r->>'node', (r->>'seq')::bigint, (r->>'ts')::timestamptz, r->>'kind', r
FROM jsonb_array_elements($1::text::jsonb) AS r
ON CONFLICT DO NOTHING";

/// Starts the sink task; the writer sends each durable batch (newline-separated records).
pub(crate) fn spawn(url: String) -> mpsc::Sender<String> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(url, rx));
    tx
}

/// Records are best effort, checkpoints are not: the newest checkpoint of a batch that could
/// not be stored is kept and sent again with the next batch (a checkpoint comes at least every
/// `checkpoint_interval`), because it anchors every record before it.
async fn run(url: String, mut rx: mpsc::Receiver<String>) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut pending_checkpoint: Option<String> = None;
    while let Some(batch) = rx.recv().await {
        let batch = match pending_checkpoint.take() {
            Some(cp) => cp + &batch,
            None => batch,
        };
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect(&url).await;
        }
        let Some(c) = &client else {
            tracing::warn!("audit table sink unreachable; batch kept only in the files");
            pending_checkpoint = newest_checkpoint(&batch);
            continue;
        };
        let array = lines_to_array(&batch);
        if let Err(e) = c.execute(INSERT, &[&array]).await {
            tracing::warn!(error = %e, "audit table sink insert failed");
            pending_checkpoint = newest_checkpoint(&batch);
            client = None;
        }
    }
}

/// The last checkpoint line of a batch, with its newline.
fn newest_checkpoint(batch: &str) -> Option<String> {
    batch
        .lines()
        .rev()
        .find(|l| l.contains("\"kind\":\"checkpoint\""))
        .map(|l| format!("{l}\n"))
}

async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await;
    let (client, conn) = match connected {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "audit table sink connect failed");
            return None;
        }
        Err(_) => {
            tracing::warn!("audit table sink connect timed out");
            return None;
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "audit table sink connection ended");
        }
    });
    if let Err(e) = client.batch_execute(CREATE).await {
        tracing::warn!(error = %e, "audit table sink: cannot create table");
        return None;
    }
    Some(client)
}

/// Each line is already a JSON object; joining them with commas makes a JSON array.
fn lines_to_array(batch: &str) -> String {
    let mut out = String::with_capacity(batch.len() + 2);
    out.push('[');
    for (i, line) in batch.lines().filter(|l| !l.is_empty()).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(line);
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_become_array() {
        let a = super::lines_to_array("{\"a\":1}\n{\"b\":2}\n");
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v.as_array().map(|a| a.len()), Some(2));
        let batch = "{\"kind\":\"checkpoint\",\"seq\":1}\n{\"kind\":\"statement\"}\n{\"kind\":\"checkpoint\",\"seq\":3}\n{\"kind\":\"statement\"}\n";
        assert_eq!(
            super::newest_checkpoint(batch).as_deref(),
            Some("{\"kind\":\"checkpoint\",\"seq\":3}\n")
        );
    }
}
