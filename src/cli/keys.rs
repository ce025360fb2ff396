//! `pgward keys status|rewrap|reencrypt|rotate-index|retire|shred` and `pgward encrypt-existing`: key operations an
//! operator runs against the upstream database, beside (not through) the proxy.
//!
//! Each reads `[vault]`, `[keys]` and `[[encrypt]]` from the configuration file and opens an
//! admin connection to the upstream database (`--database-url` or `PGWARD_DATABASE_URL`):
//! that database holds the encrypted tables, the wrapped data keys (`pgward.data_keys`) and
//! the progress of batch jobs (`pgward.job_progress`); the schema is created if missing.
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::config::Config;
use crate::crypto::manager::KeyManager;
use crate::crypto::ops::{
    self, DekStatus, EncryptExistingArgs, KeyStatus, KeysReencryptArgs, KeysRetireArgs,
    KeysRewrapArgs, KeysRotateIndexArgs, KeysStatusArgs, Progress,
};
use crate::keys::store::PgKeyStore;

/// Where the keys and the data are: the configuration file and the upstream database.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Configuration file (its `[vault]`, `[keys]` and `[[encrypt]]` sections are used).
    #[arg(long, short, default_value = "pgward.toml")]
    pub config: PathBuf,
    /// Admin connection to the upstream database, e.g. `postgresql://admin@db:5432/app`
    /// (prefer the environment variable: a password on the command line shows in `ps`).
    #[arg(long, env = "PGWARD_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// `pgward keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// KEK versions, data keys, rows per data key, and what rotation step is due.
    Status(StatusCommand),
    /// Re-wrap every stored data key under the newest KEK version (no row is touched).
    Rewrap(RewrapCommand),
    /// Rewrite every value not under its key's newest data key, in throttled, resumable batches.
    Reencrypt(ReencryptCommand),
    /// Remove the data keys no value is left under (after reencrypt and rewrap); `keys status`
    /// then says which KEK versions backups taken before still need. Dry run without --confirm.
    Retire(RetireCommand),
    /// Start replacing a key's blind-index root: new index values use a new root, searches
    /// match either until `keys reencrypt` has recomputed every index value. Needs --confirm.
    RotateIndex(RotateIndexCommand),
    /// Destroy one tenant's data key (crypto-shredding): its values can never be decrypted
    /// again, from the database or any backup. Needs --confirm.
    Shred(ShredCommand),
}

#[derive(Debug, Args)]
pub struct ShredCommand {
    #[command(flatten)]
    pub target: Target,
    /// The configured key name (`key` of the per-tenant [[encrypt]] columns).
    #[arg(long)]
    pub key: String,
    /// The context whose key is destroyed: the tenant's `context_claim` value, e.g. `2`.
    #[arg(long)]
    pub context: String,
    /// Required: shredding cannot be undone.
    #[arg(long)]
    pub confirm: bool,
}

#[derive(Debug, Args)]
pub struct RotateIndexCommand {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub args: KeysRotateIndexArgs,
}

#[derive(Debug, Args)]
pub struct RetireCommand {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub args: KeysRetireArgs,
}

#[derive(Debug, Args)]
pub struct StatusCommand {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub args: KeysStatusArgs,
}

#[derive(Debug, Args)]
pub struct RewrapCommand {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub args: KeysRewrapArgs,
}

#[derive(Debug, Args)]
pub struct ReencryptCommand {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub args: KeysReencryptArgs,
}

/// `pgward encrypt-existing`.
#[derive(Debug, Args)]
pub struct EncryptExistingCommand {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub args: EncryptExistingArgs,
}

/// An opened configuration: the key manager and the admin connection for jobs.
struct Session {
    manager: KeyManager,
    db: tokio_postgres::Client,
    /// How long a pgward may keep writing under a data key older than the newest:
    /// `keys.poll_interval + keys.dek_cache_max_stale`.
    stale_writes: Duration,
    /// How long after an index root rotation started every proxy indexes with the new root:
    /// two `keys.poll_interval`s.
    index_settle: Duration,
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the upstream database (--database-url)")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::error!(error = %e, "upstream database connection failed");
        }
    });
    // Idempotent DDL ("already exists, skipping") would otherwise log a NOTICE per run.
    client
        .batch_execute("SET client_min_messages = warning")
        .await
        .context("configuring the upstream database session")?;
    Ok(client)
}

/// Load the configuration, connect, create the `pgward` schema if missing, build the key manager.
async fn open(target: &Target) -> anyhow::Result<Session> {
    let config = Config::from_file(&target.config)?;
    if config.encrypt.is_empty() {
        anyhow::bail!(
            "{}: no [[encrypt]] columns configured",
            target.config.display()
        );
    }
    let db = connect(&target.database_url).await?;
    // The key store gets its own connection, so a data key created during a job's
    // transaction is never rolled back with it.
    let store = PgKeyStore::new(Arc::new(connect(&target.database_url).await?));
    store
        .migrate()
        .await
        .context("creating the pgward schema (pgward.data_keys, pgward.retired_keys, ...)")?;
    let crypto = config.crypto();
    let stale_writes = crypto.keys.poll_interval + crypto.keys.dek_cache_max_stale;
    let index_settle = crypto.keys.poll_interval * 2;
    let manager = KeyManager::from_config(&crypto, Some(Arc::new(store)))?;
    Ok(Session {
        manager,
        db,
        stale_writes,
        index_settle,
    })
}

/// `pgward keys ...`; returns the exit code.
pub async fn run_keys(command: KeysCommand) -> anyhow::Result<i32> {
    let (name, result) = match &command {
        KeysCommand::Status(c) => ("status", status(c).await),
        KeysCommand::Rewrap(c) => ("rewrap", rewrap(c).await),
        KeysCommand::Reencrypt(c) => ("reencrypt", reencrypt(c).await),
        KeysCommand::Retire(c) => ("retire", retire(c).await),
        KeysCommand::Shred(c) => ("shred", shred(c).await),
        KeysCommand::RotateIndex(c) => ("rotate-index", rotate_index(c).await),
    };
    Ok(report_failure(&format!("keys {name}"), result))
}

/// `pgward encrypt-existing`; returns the exit code.
pub async fn run_encrypt_existing(command: EncryptExistingCommand) -> anyhow::Result<i32> {
    Ok(report_failure(
        "encrypt-existing",
        encrypt_existing(&command).await,
    ))
}

fn report_failure(what: &str, result: anyhow::Result<i32>) -> i32 {
    result.unwrap_or_else(|e| {
        eprintln!("pgward {what}: {e:#}");
        1
    })
}

async fn status(c: &StatusCommand) -> anyhow::Result<i32> {
    let s = open(&c.target).await?;
    let statuses = ops::keys_status(&s.manager, &s.db, &c.args).await?;
    print!("{}", render_status(&statuses, c.args.verify));
    let per_context = ops::context_keys_status(&s.manager, &s.db, !c.args.no_count).await?;
    if !per_context.is_empty() {
        println!("\nPer-tenant keys (context_claim; each context's key is a transit key <key>-t<hash> of its own):");
        for k in &per_context {
            println!("  {k}");
        }
    }
    let destroyed = ops::destroyed_keys(&s.db).await?;
    print!("{}", render_destroyed(&destroyed));
    let retired = ops::retired_keys(&s.db).await?;
    print!("{}", ops::backup_advice(&retired, &destroyed, &statuses));
    let failed = statuses.iter().any(|k| !k.unwrap_ok());
    if failed {
        eprintln!("pgward keys status: some data keys could not be unwrapped (see UNWRAP)");
    }
    Ok(i32::from(failed))
}

async fn rewrap(c: &RewrapCommand) -> anyhow::Result<i32> {
    let s = open(&c.target).await?;
    if let Some(key) = &c.args.key {
        // A configured key name, or one tenant's key of a per-tenant column (`<key>-t<hash>`).
        let per_context = s.manager.columns().any(|c| {
            c.column.context_claim.is_some()
                && crate::crypto::scope::is_context_key_name(&c.column.key, key)
        });
        if !per_context && !s.manager.key_names().any(|k| k == key) {
            anyhow::bail!("key {key:?} is not used by any [[encrypt]] column");
        }
        // Asking Vault about a shredded name would create its transit key afresh.
        if per_context && s.manager.provider().destroyed(key).await? {
            anyhow::bail!("key {key:?} was shredded: nothing to rewrap");
        }
    }
    let mut behind_any = false;
    for (key, n) in ops::keys_rewrap(&s.manager, &c.args).await? {
        // Re-read what Vault's wrapped forms say now, rather than assuming the rewrap worked.
        let latest = s.manager.provider().kek_status(&key).await?.latest_version;
        let behind: Vec<u32> = s
            .manager
            .provider()
            .list_deks(&key)
            .await?
            .iter()
            .filter(|d| d.kek_version < latest)
            .map(|d| d.dek_version)
            .collect();
        if behind.is_empty() {
            println!("{key}: {n} data keys rewrapped; all are now wrapped by KEK v{latest}");
        } else {
            behind_any = true;
            println!(
                "{key}: {n} data keys rewrapped; DEK versions {behind:?} are still wrapped by a KEK version below v{latest}"
            );
        }
    }
    Ok(i32::from(behind_any))
}

async fn reencrypt(c: &ReencryptCommand) -> anyhow::Result<i32> {
    let s = open(&c.target).await?;
    let mut line = ProgressLine::new();
    let reports = ops::keys_reencrypt(&s.manager, &s.db, &c.args, &mut |p| line.update(p)).await?;
    let mut skipped = 0;
    for r in &reports {
        println!(
            "{}.{}: {} values rewritten under the newest data key",
            r.table, r.column, r.rows_changed
        );
        if r.rows_skipped() > 0 {
            skipped += r.rows_skipped();
            let listed: Vec<&str> = r.skipped.iter().map(String::as_str).collect();
            let more = match r.skipped_unlisted {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            eprintln!(
                "pgward keys reencrypt: {}.{}: {} values could not be read (malformed, failed integrity, or under an unknown, retired or shredded key) and were left as they are; primary keys: {}{more}",
                r.table,
                r.column,
                r.rows_skipped(),
                listed.join(", ")
            );
        }
    }
    let rotations = ops::reindex_rotating_keys(
        &s.manager,
        &s.db,
        c.args.table.as_deref(),
        &c.args.batch,
        s.index_settle,
        &mut |p| line.update(p),
    )
    .await?;
    let mut rotation_pending = false;
    for r in &rotations {
        for p in &r.columns {
            println!(
                "{}.{}: {} blind-index values recomputed with index root v{}",
                p.table, p.column, p.rows_changed, r.root_version
            );
            if p.rows_skipped() > 0 {
                eprintln!(
                    "pgward keys reencrypt: {}.{}: {} values could not be read, so their blind index cannot be recomputed",
                    p.table,
                    p.column,
                    p.rows_skipped()
                );
            }
        }
        if let (true, Some(n)) = (r.completed, r.contexts) {
            println!(
                "{}: index root rotation complete in {n} per-tenant contexts: each has one index root again",
                r.key_name
            );
        } else if r.completed {
            println!(
                "{}: index root rotation complete: v{} is the only index root",
                r.key_name, r.root_version
            );
        } else {
            rotation_pending = true;
            let waiting = if r.waiting_for.is_empty() {
                "unreadable values".to_string()
            } else {
                r.waiting_for.join(", ")
            };
            eprintln!(
                "pgward keys reencrypt: {}: index root rotation to v{} is still in progress (waiting for {waiting}); rerun",
                r.key_name, r.root_version
            );
        }
    }
    // Count what is left under older data keys: rows a proxy still wrote under the old key
    // (it picks up a rotation within keys.poll_interval).
    let count = KeysStatusArgs::default();
    let mut left = 0;
    for key in ops::keys_status(&s.manager, &s.db, &count).await? {
        let newest = s.manager.current_key_ref(&key.key_name).await?.dek_version;
        left += key.unknown_rows;
        left += key
            .deks
            .iter()
            .filter(|d| d.info.dek_version != newest)
            .filter_map(|d| d.rows)
            .sum::<i64>();
    }
    // Per-tenant values not under their context's newest data key (or under none).
    for k in ops::context_keys_status(&s.manager, &s.db, true).await? {
        if let Some((_, older, unknown)) = k.values {
            left += older + unknown;
        }
    }
    // The skipped values are still under their old (or no) data key.
    let left = left - skipped;
    if left > 0 {
        eprintln!(
            "pgward keys reencrypt: {left} values are still under older data keys \
             (written meanwhile by a proxy that has not picked up the rotation?); rerun"
        );
        return Ok(1);
    }
    Ok(i32::from(skipped > 0 || rotation_pending))
}

async fn rotate_index(c: &RotateIndexCommand) -> anyhow::Result<i32> {
    if !c.args.confirm {
        anyhow::bail!(
            "rotating the index root of {:?} makes every search match two index values until `pgward keys reencrypt` has recomputed them all; rerun with --confirm",
            c.args.key
        );
    }
    let s = open(&c.target).await?;
    let started = ops::keys_rotate_index(&s.manager, &s.db, &c.args).await?;
    if started.contexts > 0 {
        println!(
            "{}: index root rotation of {} per-tenant contexts {} (up to v{}); proxies index with the new roots within keys.poll_interval; run `pgward keys reencrypt` to recompute every blind index and complete it",
            started.key_name,
            started.contexts,
            if started.created { "started" } else { "already in progress" },
            started.root_version
        );
    } else if started.created {
        println!(
            "{}: index root rotation to v{} started; proxies index with it within keys.poll_interval; run `pgward keys reencrypt` to recompute every blind index and complete it",
            started.key_name, started.root_version
        );
    } else {
        println!(
            "{}: index root rotation to v{} is already in progress; run `pgward keys reencrypt` to complete it",
            started.key_name, started.root_version
        );
    }
    Ok(0)
}

async fn retire(c: &RetireCommand) -> anyhow::Result<i32> {
    let s = open(&c.target).await?;
    let reports = ops::keys_retire(&s.manager, &s.db, &c.args, s.stale_writes).await?;
    let verb = if c.args.confirm {
        "retired"
    } else {
        "would retire"
    };
    let mut held = false;
    let mut pending = false;
    for r in &reports {
        let key = match &r.context_of {
            Some(base) => format!("{} (per-tenant key of {base})", r.key_name),
            None => r.key_name.clone(),
        };
        if let Some(why) = &r.held {
            held = true;
            eprintln!("pgward keys retire: {key}: {why}");
        }
        for d in &r.retire {
            pending |= !c.args.confirm;
            println!(
                "{key}: {verb} DEK {} (wrapped by KEK v{}): no value left under it",
                d.dek_version, d.kek_version
            );
        }
        for (version, why) in &r.kept {
            println!("{key}: kept DEK {version}: {why}");
        }
        if r.retire.is_empty() && r.held.is_none() {
            println!("{key}: nothing to retire");
        }
    }
    if pending {
        eprintln!("pgward keys retire: dry run, nothing changed; rerun with --confirm to retire");
    } else if c.args.confirm && reports.iter().any(|r| !r.retire.is_empty()) {
        println!("`pgward keys status` now says which KEK versions backups taken before this retirement still need.");
    }
    Ok(i32::from(held || pending))
}

async fn shred(c: &ShredCommand) -> anyhow::Result<i32> {
    if !c.confirm {
        anyhow::bail!(
            "refusing to shred without --confirm: every value of context {:?} under key {:?} becomes unreadable for good, in this database and in every backup",
            c.context,
            c.key
        );
    }
    let s = open(&c.target).await?;
    let report = ops::keys_shred(&s.manager, &s.db, &c.key, &c.context).await?;
    println!(
        "{}: destroyed (Vault key deleted, {} wrapped data keys deleted); its values can never be decrypted again. Running pgward instances stop serving it within keys.poll_interval.",
        report.key_name, report.wrapped_deleted
    );
    Ok(0)
}

async fn encrypt_existing(c: &EncryptExistingCommand) -> anyhow::Result<i32> {
    let s = open(&c.target).await?;
    let spec = s.manager.column(&c.args.table, &c.args.column)?.clone();
    let mut line = ProgressLine::new();
    let done = ops::encrypt_existing(&s.manager, &s.db, &c.args, &mut |p| line.update(p)).await?;
    let bidx = if spec.column.searchable {
        format!(", blind index in {}_bidx", spec.column.column)
    } else {
        String::new()
    };
    println!(
        "{}.{}: {} values encrypted under key {:?}; the column is now bytea ciphertext{bidx}",
        done.table, done.column, done.rows_changed, spec.column.key
    );
    Ok(0)
}

/// Progress on stderr: one rewritten line on a terminal, else one line per batch at most
/// every few seconds (first and last always), so logs and CI output stay readable.
struct ProgressLine {
    tty: bool,
    job: Option<(String, String)>,
    started: Instant,
    last_print: Option<Instant>,
}

impl ProgressLine {
    fn new() -> Self {
        ProgressLine {
            tty: std::io::stderr().is_terminal(),
            job: None,
            started: Instant::now(),
            last_print: None,
        }
    }

    fn update(&mut self, p: &Progress) {
        let job = (p.table.clone(), p.column.clone());
        if self.job.as_ref() != Some(&job) {
            self.job = Some(job);
            self.started = Instant::now();
            self.last_print = None;
        }
        let every = if self.tty {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(2)
        };
        let due = p.finished || self.last_print.is_none_or(|t| t.elapsed() >= every);
        if !due {
            return;
        }
        self.last_print = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64();
        // rows_changed counts this run only (rows_done carries over from a resumed run).
        let rate = p.rows_changed as f64 / secs.max(0.001);
        let text = format!("{p} [{secs:.1}s, {rate:.0} values/s]");
        if self.tty {
            eprint!("\r\x1b[2K{text}");
            if p.finished {
                eprintln!();
            }
        } else {
            eprintln!("{text}");
        }
    }
}

/// The `keys status` report: one table of keys, one of data keys, then what to do next.
/// The destroyed keys: backups taken before `since` hold values under them that no restore
/// can decrypt (the KEK is gone from Vault).
pub fn render_destroyed(destroyed: &[ops::DestroyedKey]) -> String {
    if destroyed.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nDestroyed keys (values under them, in the database or any backup, can no longer be decrypted):\n",
    );
    for d in destroyed {
        out.push_str(&format!(
            "  {} (key {:?}): {} since {}\n",
            d.key_name, d.configured_key, d.reason, d.since
        ));
    }
    out
}

pub fn render_status(statuses: &[KeyStatus], verify: bool) -> String {
    let mut keys = vec![vec![
        "KEY".to_string(),
        "PROVIDER".into(),
        "KEK LATEST".into(),
        "MIN DECRYPTION".into(),
        "KEK VERSIONS".into(),
    ]];
    let mut deks = vec![vec![
        "KEY".to_string(),
        "DEK".into(),
        "WRAPPED BY".into(),
        "ROWS".into(),
        "STATE".into(),
    ]];
    if verify {
        deks[0].push("UNWRAP".into());
    }
    let mut advice = String::new();
    for k in statuses {
        let transit = k.provider == "transit";
        let versions: Vec<String> = k.kek.versions.iter().map(u32::to_string).collect();
        keys.push(vec![
            k.key_name.clone(),
            k.provider.to_string(),
            kek_label(transit, k.kek.latest_version),
            kek_label(transit, k.kek.min_decryption_version),
            if transit {
                versions.join(",")
            } else {
                "-".into()
            },
        ]);
        let newest = k.deks.last().map(|d| d.info.dek_version);
        for d in k.index_root.iter().chain(&k.deks) {
            let mut row = vec![
                k.key_name.clone(),
                if d.info.dek_version == 0 {
                    "index root".into()
                } else {
                    d.info.dek_version.to_string()
                },
                kek_label(transit, d.info.kek_version),
                d.rows.map_or_else(|| "-".into(), |r| r.to_string()),
                dek_state(k, d, newest),
            ];
            if verify {
                row.push(match &d.unwrap {
                    Some(Ok(())) => "ok".into(),
                    Some(Err(e)) => format!("FAILED: {e}"),
                    None => "-".into(),
                });
            }
            deks.push(row);
        }
        key_advice(k, &mut advice);
    }
    let mut out = render_table(&keys);
    out.push('\n');
    out.push_str(&render_table(&deks));
    if !advice.is_empty() {
        out.push('\n');
        out.push_str(&advice);
    }
    out
}

fn kek_label(transit: bool, version: u32) -> String {
    if transit {
        format!("v{version}")
    } else {
        "-".into()
    }
}

/// What a data key is for and what it still needs.
fn dek_state(k: &KeyStatus, d: &DekStatus, newest: Option<u32>) -> String {
    let mut parts = Vec::new();
    if d.info.dek_version == 0 {
        return match k.index_rotation {
            Some(next) => format!(
                "blind-index root v{}, rotating to v{next}: reencrypt",
                k.index_root_version
            ),
            None => format!("blind-index root v{}", k.index_root_version),
        };
    } else if Some(d.info.dek_version) == newest && d.info.kek_version >= k.kek.latest_version {
        parts.push("current (new writes)");
    } else if d.rows.unwrap_or(0) > 0 {
        parts.push("old: reencrypt");
    } else {
        parts.push("old, unused: `keys retire`");
    }
    if k.provider == "transit" && d.info.kek_version < k.kek.latest_version {
        parts.push("rewrap");
    }
    parts.join("; ")
}

/// The next rotation step for one key, in words.
fn key_advice(k: &KeyStatus, out: &mut String) {
    let name = &k.key_name;
    for (column, reason) in &k.pending_columns {
        let _ = writeln!(
            out,
            "{name}: column {column} is not encrypted yet ({reason})"
        );
    }
    if k.unknown_rows > 0 {
        let _ = writeln!(
            out,
            "{name}: {} values name a data key that is not stored (restored from a backup older than a `keys retire`, or from another database?)",
            k.unknown_rows
        );
    }
    if k.provider != "transit" {
        return;
    }
    let latest = k.kek.latest_version;
    if k.deks.last().is_none_or(|d| d.info.kek_version < latest) {
        let _ = writeln!(
            out,
            "{name}: KEK v{latest} has no data key yet; `pgward keys reencrypt` (or a proxy's next key poll) creates it"
        );
    }
    match k.oldest_kek_in_use() {
        Some(oldest) if oldest < latest => {
            let _ = writeln!(
                out,
                "{name}: data keys wrapped by KEK v{oldest} remain; run `pgward keys rewrap` before raising min_decryption_version above {oldest}"
            );
        }
        Some(oldest) if k.kek.min_decryption_version < oldest => {
            let _ = writeln!(
                out,
                "{name}: every data key is wrapped by KEK v{oldest}; min_decryption_version may be raised to {oldest} for the live data (older backups may need older versions)"
            );
        }
        _ => {}
    }
}

/// Left-aligned columns separated by two spaces.
fn render_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{DekInfo, KekStatus};

    fn dek(v: u32, kek: u32, rows: i64) -> DekStatus {
        DekStatus {
            info: DekInfo {
                key_name: "pii".into(),
                dek_version: v,
                kek_version: kek,
            },
            rows: Some(rows),
            unwrap: None,
        }
    }

    fn rotated() -> KeyStatus {
        KeyStatus {
            key_name: "pii".into(),
            provider: "transit",
            kek: KekStatus {
                latest_version: 2,
                min_decryption_version: 1,
                versions: vec![1, 2],
            },
            deks: vec![dek(1, 1, 1200), dek(2, 2, 15)],
            unknown_rows: 0,
            index_root: Some(DekStatus {
                rows: None,
                ..dek(0, 1, 0)
            }),
            index_root_version: 1,
            index_rotation: None,
            pending_columns: vec![],
        }
    }

    #[test]
    fn status_table_names_the_next_step() {
        let text = render_status(&[rotated()], false);
        let dek1 = text
            .lines()
            .find(|l| l.starts_with("pii  1 "))
            .unwrap_or_default();
        let cells: Vec<&str> = dek1
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            cells,
            ["pii", "1", "v1", "1200", "old: reencrypt; rewrap"],
            "{text}"
        );
        assert!(text.contains("current (new writes)"), "{text}");
        assert!(
            text.contains("run `pgward keys rewrap` before raising"),
            "{text}"
        );

        let mut done = rotated();
        done.deks = vec![dek(1, 2, 0), dek(2, 2, 1215)];
        done.index_root.as_mut().unwrap().info.kek_version = 2;
        let text = render_status(&[done], false);
        assert!(text.contains("old, unused"), "{text}");
        assert!(
            text.contains("min_decryption_version may be raised to 2"),
            "{text}"
        );
        assert!(!text.contains("rewrap"), "{text}");
    }
}
