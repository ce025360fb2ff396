//! Operations behind the CLI: `keys status`, `keys rewrap`, `keys reencrypt`, `encrypt-existing`.
//!
//! They talk to the upstream database with `tokio-postgres` and never need the proxy.
//! Batch jobs page by keyset on a single-column primary key and record the last key
//! done in `pgward.job_progress`, so a crashed run resumes where it stopped.
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use thiserror::Error;

use super::codec::{encode_for_encryption, WireFormat};
use super::envelope::KeyRef;
use super::error::CryptoError;
use super::manager::{ColumnSpec, KeyManager};
use super::scope::KeyScope;
use crate::keys::{DekInfo, KekStatus, KeyError};

mod context_keys;
mod index_rotation;
mod reencrypt;
mod retire;
mod shred;
mod status;
mod sweep;
pub use index_rotation::{
    keys_rotate_index, reindex_rotating_keys, IndexRotationReport, KeysRotateIndexArgs,
    RotationStarted,
};
pub use reencrypt::keys_reencrypt;
pub use retire::{
    backup_advice, keys_retire, retired_keys, KeysRetireArgs, RetireReport, RetiredKey,
};
pub use shred::{destroyed_keys, keys_shred, DestroyedKey, ShredReport};
pub use status::{context_keys_status, ContextKeysStatus};

#[derive(Debug, Error)]
pub enum OpsError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{0}")]
    Schema(String),
    /// A failure on one row, named by its primary key (never by its value).
    #[error("{table}.{column}, row with primary key {pk}: {source}")]
    Row {
        table: String,
        column: String,
        pk: String,
        source: Box<OpsError>,
    },
}

impl OpsError {
    fn at_row(self, spec: &ColumnSpec, pk: &str) -> Self {
        OpsError::Row {
            table: spec.table.clone(),
            column: spec.column.column.clone(),
            pk: pk.to_string(),
            source: Box::new(self),
        }
    }
}

/// `pgward keys status`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KeysStatusArgs {
    /// Skip counting rows per DEK (a full scan of every encrypted column).
    #[arg(long)]
    pub no_count: bool,
    /// Unwrap every stored data key (and blind-index root) through the provider: proves they
    /// are still usable, e.g. after raising the KEK's min_decryption_version.
    #[arg(long)]
    pub verify: bool,
}

/// `pgward keys rewrap`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KeysRewrapArgs {
    /// Only this key name (default: every configured key), or one tenant's key of a
    /// per-tenant column (`<key>-t<hash>`, as `pgward.data_keys` lists it).
    #[arg(long)]
    pub key: Option<String>,
}

/// Batch pacing shared by the re-encryption jobs.
#[derive(Clone, Debug, clap::Args)]
pub struct BatchArgs {
    /// Rows per batch (one keyset page).
    #[arg(long, default_value_t = 500)]
    pub batch_size: i64,
    /// Pause between batches in milliseconds, to leave headroom for production traffic.
    #[arg(long = "pause-ms", value_name = "MS", default_value = "20", value_parser = parse_millis)]
    pub pause: Duration,
}

fn parse_millis(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("expected milliseconds: {e}"))
}

impl Default for BatchArgs {
    fn default() -> Self {
        BatchArgs {
            batch_size: 500,
            pause: Duration::from_millis(20),
        }
    }
}

/// `pgward keys reencrypt [--table T]`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KeysReencryptArgs {
    /// Only columns of this table (default: every encrypted column).
    #[arg(long)]
    pub table: Option<String>,
    #[command(flatten)]
    pub batch: BatchArgs,
}

/// `pgward encrypt-existing --table T --column C`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct EncryptExistingArgs {
    #[arg(long)]
    pub table: String,
    #[arg(long)]
    pub column: String,
    #[command(flatten)]
    pub batch: BatchArgs,
}

/// One DEK and the rows it protects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DekStatus {
    pub info: DekInfo,
    pub rows: Option<i64>,
    /// With `--verify`: `Some(Ok)` if the provider unwrapped it, `Some(Err(reason))` if not.
    pub unwrap: Option<Result<(), String>>,
}

/// One key name in `keys status`.
#[derive(Clone, Debug)]
pub struct KeyStatus {
    pub key_name: String,
    pub provider: &'static str,
    pub kek: KekStatus,
    pub deks: Vec<DekStatus>,
    /// Rows whose header names a DEK the provider does not list.
    pub unknown_rows: i64,
    /// The blind-index root key (DEK version 0), when one is stored: it is wrapped by a KEK
    /// version too, and must be rewrapped before `min_decryption_version` passes it.
    pub index_root: Option<DekStatus>,
    /// Version of the index root in `index_root` (1 until a rotation completed).
    pub index_root_version: u32,
    /// The new index root's version while a rotation is in progress (`keys rotate-index`).
    pub index_rotation: Option<u32>,
    /// Configured columns of this key that are not stored encrypted yet, with the reason
    /// (e.g. still `text`: run `encrypt-existing`).
    pub pending_columns: Vec<(String, String)>,
}

impl KeyStatus {
    /// The oldest KEK version still wrapping a stored key (transit), i.e. the highest value
    /// `min_decryption_version` may be raised to. `None` when nothing is wrapped by a KEK.
    pub fn oldest_kek_in_use(&self) -> Option<u32> {
        self.deks
            .iter()
            .chain(self.index_root.as_ref())
            .map(|d| d.info.kek_version)
            .filter(|&v| v > 0)
            .min()
    }

    /// Whether every checked unwrap succeeded (trivially true without `--verify`).
    pub fn unwrap_ok(&self) -> bool {
        self.deks
            .iter()
            .chain(self.index_root.as_ref())
            .all(|d| !matches!(d.unwrap, Some(Err(_))))
    }
}

impl fmt::Display for KeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "key {} ({}): KEK latest v{}, min decryption v{}, versions {:?}",
            self.key_name,
            self.provider,
            self.kek.latest_version,
            self.kek.min_decryption_version,
            self.kek.versions
        )?;
        for d in &self.deks {
            let rows = d.rows.map_or_else(|| "-".to_string(), |r| r.to_string());
            writeln!(
                f,
                "  DEK v{} under KEK v{}: {rows} rows",
                d.info.dek_version, d.info.kek_version
            )?;
        }
        if self.unknown_rows > 0 {
            writeln!(f, "  {} rows under unknown DEKs", self.unknown_rows)?;
        }
        Ok(())
    }
}

/// Progress of a batch job, one event per batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub job: &'static str,
    pub table: String,
    pub column: String,
    pub rows_done: i64,
    pub rows_changed: i64,
    pub last_pk: Option<String>,
    pub finished: bool,
    /// `keys reencrypt`: primary keys of values that could not be read (malformed, failed
    /// integrity, unknown key) and were left as they are; at most [`MAX_LISTED_SKIPS`].
    pub skipped: std::collections::BTreeSet<String>,
    /// Skipped values beyond the listed ones.
    pub skipped_unlisted: i64,
}

/// How many skipped primary keys a job lists (the rest are only counted).
pub const MAX_LISTED_SKIPS: usize = 1000;

impl Progress {
    fn new(job: &'static str, table: &str, column: &str) -> Self {
        Progress {
            job,
            table: table.to_string(),
            column: column.to_string(),
            rows_done: 0,
            rows_changed: 0,
            last_pk: None,
            finished: false,
            skipped: std::collections::BTreeSet::new(),
            skipped_unlisted: 0,
        }
    }

    /// Values left unreadable (listed or not).
    pub fn rows_skipped(&self) -> i64 {
        self.skipped.len() as i64 + self.skipped_unlisted
    }

    fn skip(&mut self, pk: &str) {
        if self.skipped.contains(pk) {
            return;
        }
        if self.skipped.len() < MAX_LISTED_SKIPS {
            self.skipped.insert(pk.to_string());
        } else {
            self.skipped_unlisted += 1;
        }
    }
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}.{}: {} rows scanned, {} rewritten{}{}",
            self.job,
            self.table,
            self.column,
            self.rows_done,
            self.rows_changed,
            match self.rows_skipped() {
                0 => String::new(),
                n => format!(", {n} unreadable skipped"),
            },
            if self.finished { " (done)" } else { "" }
        )
    }
}

/// `"schema.table"` quoted as identifiers.
pub fn quote_table(qualified: &str) -> String {
    match qualified.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
        None => quote_ident(qualified),
    }
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The single-column primary key of a table: (column name, SQL type).
async fn primary_key(
    db: &tokio_postgres::Client,
    table: &str,
) -> Result<(String, String), OpsError> {
    let rows = db
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
            &[&quote_table(table)],
        )
        .await?;
    match rows.as_slice() {
        [row] => Ok((row.try_get(0)?, row.try_get(1)?)),
        [] => Err(OpsError::Schema(format!(
            "{table} has no primary key; batch jobs page by primary key"
        ))),
        _ => Err(OpsError::Schema(format!(
            "{table} has a composite primary key; not supported yet"
        ))),
    }
}

/// `keys status`: KEK versions, DEKs, and (unless `no_count`) rows per DEK from the header bytes.
pub async fn keys_status(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    args: &KeysStatusArgs,
) -> Result<Vec<KeyStatus>, OpsError> {
    let mut out = Vec::new();
    for key_name in manager.key_names() {
        out.push(key_status(manager, db, key_name, args).await?);
    }
    Ok(out)
}

/// `keys status` of one configured key name.
async fn key_status(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    key_name: &str,
    args: &KeysStatusArgs,
) -> Result<KeyStatus, OpsError> {
    let provider = manager.provider();
    let kek = provider.kek_status(key_name).await?;
    let deks = provider.list_deks(key_name).await?;
    let mut counts: BTreeMap<u32, i64> = BTreeMap::new();
    let mut unknown_rows = 0;
    let mut pending_columns = Vec::new();
    for spec in manager.columns().filter(|s| s.column.key == key_name) {
        let name = format!("{}.{}", spec.table, spec.column.column);
        match column_type(db, &spec.table, &spec.column.column).await {
            Ok(ty) if ty == "bytea" => {}
            Ok(ty) => {
                pending_columns.push((name, format!("stored as {ty}: run encrypt-existing")));
                continue;
            }
            Err(OpsError::Schema(reason)) => {
                pending_columns.push((name, reason));
                continue;
            }
            Err(e) => return Err(e),
        }
        if args.no_count {
            continue;
        }
        for (key_ref, n) in count_by_dek(db, spec).await? {
            if key_ref.key_id == spec.key_id
                && deks.iter().any(|d| d.dek_version == key_ref.dek_version)
            {
                *counts.entry(key_ref.dek_version).or_default() += n;
            } else {
                unknown_rows += n;
            }
        }
    }
    let mut dek_statuses = Vec::new();
    for info in deks {
        let rows = (!args.no_count).then(|| counts.get(&info.dek_version).copied().unwrap_or(0));
        let unwrap = if args.verify {
            Some(unwrap_check(
                provider.fetch_dek(key_name, info.dek_version).await,
            ))
        } else {
            None
        };
        dek_statuses.push(DekStatus { info, rows, unwrap });
    }
    let index_root = match stored_index_root(db, provider.kind(), key_name).await? {
        Some(info) => {
            let unwrap = if args.verify {
                Some(unwrap_check(provider.index_root(key_name).await))
            } else {
                None
            };
            Some(DekStatus {
                info,
                rows: None,
                unwrap,
            })
        }
        None => None,
    };
    let roots = provider.index_root_state(key_name).await?;
    Ok(KeyStatus {
        index_root_version: roots.version,
        index_rotation: roots.pending.map(|p| p.root_version),
        key_name: key_name.to_string(),
        provider: provider.kind(),
        kek,
        deks: dek_statuses,
        unknown_rows,
        index_root,
        pending_columns,
    })
}

fn unwrap_check<T>(result: Result<T, KeyError>) -> Result<(), String> {
    result.map(drop).map_err(|e| e.to_string())
}

/// The stored blind-index root of a transit key (`pgward.data_keys`, DEK version 0).
async fn stored_index_root(
    db: &tokio_postgres::Client,
    provider_kind: &str,
    key_name: &str,
) -> Result<Option<DekInfo>, OpsError> {
    if provider_kind != "transit" {
        return Ok(None);
    }
    // The KEK version is read from the wrapped form (what Vault unwraps by), not from the
    // `kek_version` column, which is only a copy.
    let row = db
        .query_opt(
            "SELECT wrapped FROM pgward.data_keys WHERE key_name = $1 AND dek_version = 0",
            &[&key_name],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let wrapped: String = row.try_get(0)?;
    Ok(Some(DekInfo {
        key_name: key_name.to_string(),
        dek_version: 0,
        kek_version: crate::keys::transit::kek_version_of(&wrapped).unwrap_or(0),
    }))
}

/// Rows per (key id, DEK version) of one column, read from bytes 1..9 of the header.
async fn count_by_dek(
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
) -> Result<Vec<(KeyRef, i64)>, OpsError> {
    let col = quote_ident(&spec.column.column);
    let sql = format!(
        "SELECT substring({col} from 2 for 8), count(*) FROM {} WHERE {col} IS NOT NULL GROUP BY 1",
        quote_table(&spec.table)
    );
    let mut out = Vec::new();
    for row in db.query(&sql, &[]).await? {
        let id: Vec<u8> = row.try_get(0)?;
        let n: i64 = row.try_get(1)?;
        let key_ref = match <[u8; 8]>::try_from(id.as_slice()) {
            Ok(b) => KeyRef {
                key_id: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                dek_version: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            },
            Err(_) => KeyRef {
                key_id: 0,
                dek_version: 0,
            },
        };
        out.push((key_ref, n));
    }
    Ok(out)
}

/// `keys rewrap`: rewrap stored DEKs under the newest KEK version; no row is touched.
pub async fn keys_rewrap(
    manager: &KeyManager,
    args: &KeysRewrapArgs,
) -> Result<Vec<(String, usize)>, OpsError> {
    let names: Vec<String> = match &args.key {
        Some(k) => vec![k.clone()],
        None => manager.key_names().map(str::to_string).collect(),
    };
    let mut out = Vec::new();
    for name in names {
        let n = manager.provider().rewrap(&name).await?;
        tracing::info!(key = %name, rewrapped = n, "rewrap done");
        out.push((name, n));
    }
    Ok(out)
}

struct Job<'a> {
    name: &'a str,
    /// What progress lines call the job.
    label: &'static str,
    db: &'a tokio_postgres::Client,
    table: String,
    column: String,
}

impl Job<'_> {
    fn progress_name(&self) -> &'static str {
        self.label
    }

    /// Where a previous unfinished run stopped (`None`: start from the beginning).
    async fn resume_point(&self) -> Result<(Option<String>, i64), OpsError> {
        let row = self
            .db
            .query_opt(
                "SELECT last_pk, rows_done, finished_at IS NOT NULL FROM pgward.job_progress WHERE job = $1 AND table_name = $2 AND column_name = $3",
                &[&self.name, &self.table, &self.column],
            )
            .await?;
        match row {
            Some(r) if !r.try_get::<_, bool>(2)? => Ok((r.try_get(0)?, r.try_get(1)?)),
            _ => {
                self.db
                    .execute(
                        "INSERT INTO pgward.job_progress (job, table_name, column_name) VALUES ($1, $2, $3) \
                         ON CONFLICT (job, table_name, column_name) DO UPDATE SET last_pk = NULL, rows_done = 0, \
                         started_at = now(), updated_at = now(), finished_at = NULL",
                        &[&self.name, &self.table, &self.column],
                    )
                    .await?;
                Ok((None, 0))
            }
        }
    }

    async fn save(
        &self,
        last_pk: &Option<String>,
        rows_done: i64,
        finished: bool,
    ) -> Result<(), OpsError> {
        self.db
            .execute(
                "UPDATE pgward.job_progress SET last_pk = $4, rows_done = $5, updated_at = now(), \
                 finished_at = CASE WHEN $6 THEN now() END WHERE job = $1 AND table_name = $2 AND column_name = $3",
                &[&self.name, &self.table, &self.column, last_pk, &rows_done, &finished],
            )
            .await?;
        Ok(())
    }
}

/// Run `f` inside BEGIN/COMMIT on a shared client, rolling back on error.
async fn in_transaction<T>(
    db: &tokio_postgres::Client,
    f: impl std::future::Future<Output = Result<T, OpsError>>,
) -> Result<T, OpsError> {
    db.batch_execute("BEGIN").await?;
    match f.await {
        Ok(v) => {
            db.batch_execute("COMMIT").await?;
            Ok(v)
        }
        Err(e) => {
            if let Err(rb) = db.batch_execute("ROLLBACK").await {
                tracing::warn!(error = %rb, "rollback failed");
            }
            Err(e)
        }
    }
}

/// `encrypt-existing`: migrate a plaintext column in place to an encrypted `bytea` (+ `<col>_bidx`).
///
/// Copies into a twin column `<col>__pgward_enc` in batches while the application keeps
/// running (a trigger clears a twin value whose plaintext is updated meanwhile), then, under
/// a short `ACCESS EXCLUSIVE` lock, encrypts the rows still missing, drops the plaintext
/// column and renames the twin. Rerunnable: it resumes, and is a no-op once done.
/// Sets `TimeZone = UTC` and `DateStyle = ISO` on `db` so text renderings parse exactly.
pub async fn encrypt_existing(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    args: &EncryptExistingArgs,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Progress, OpsError> {
    let spec = manager.column(&args.table, &args.column)?.clone();
    // A plaintext value carries no tenant: there is no context to choose its key by.
    if let Some(claim) = &spec.column.context_claim {
        return Err(OpsError::Schema(format!(
            "{}.{} has per-tenant keys (context_claim = {claim:?}): encrypt-existing cannot tell which tenant's key a plaintext value belongs under; write such values through the proxy",
            spec.table, spec.column.column
        )));
    }
    let (table, column) = (spec.table.clone(), spec.column.column.clone());
    let twin_name = format!("{column}__pgward_enc");
    let bidx_name = format!("{column}_bidx");
    let (t, c, twin, bidx) = (
        quote_table(&table),
        quote_ident(&column),
        quote_ident(&twin_name),
        quote_ident(&bidx_name),
    );
    let col_type = column_type(db, &table, &column).await?;
    let twin_exists = column_type(db, &table, &twin_name).await.is_ok();
    if col_type == "bytea" && !twin_exists && all_values_encrypted(db, &spec).await? {
        tracing::info!(%table, %column, "already encrypted; nothing to do");
        return Ok(Progress {
            finished: true,
            ..Progress::new("encrypt_existing", &table, &column)
        });
    }
    db.batch_execute(
        "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3",
    )
    .await?;
    let (pk, pk_type) = primary_key(db, &table).await?;
    let p = quote_ident(&pk);
    let mut ddl = format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {twin} bytea");
    if spec.column.searchable {
        ddl.push_str(&format!(", ADD COLUMN IF NOT EXISTS {bidx} bytea"));
    }
    let trigger = quote_ident(&format!("pgward_invalidate_{column}"));
    let clear_args = if spec.column.searchable {
        format!(
            "'{}', '{}'",
            twin_name.replace('\'', "''"),
            bidx_name.replace('\'', "''")
        )
    } else {
        format!("'{}'", twin_name.replace('\'', "''"))
    };
    db.batch_execute(&format!(
        "{ddl}; DROP TRIGGER IF EXISTS {trigger} ON {t}; CREATE TRIGGER {trigger} BEFORE UPDATE OF {c} ON {t} FOR EACH ROW \
         WHEN (OLD.{c} IS DISTINCT FROM NEW.{c}) EXECUTE FUNCTION pgward.invalidate_encrypted_copy({clear_args})"
    ))
    .await?;

    // Aliases matter: an output column named like the key would make ORDER BY sort the text cast.
    let select = format!(
        "SELECT {p}::text AS pgward__pk, {c}::text AS pgward__val FROM {t} WHERE ($1::text IS NULL OR {p} > $1::text::{pk_type}) \
         AND {c} IS NOT NULL AND {twin} IS NULL ORDER BY {p} LIMIT $2"
    );
    let set_bidx = if spec.column.searchable {
        format!(", {bidx} = $4")
    } else {
        String::new()
    };
    let update = format!(
        "UPDATE {t} SET {twin} = $1{set_bidx} WHERE {p} = $2::text::{pk_type} AND {c}::text = $3"
    );
    let job = Job {
        name: "encrypt_existing",
        label: "encrypt_existing",
        db,
        table: table.clone(),
        column: column.clone(),
    };
    let (mut last_pk, mut done) = job.resume_point().await?;
    let mut changed = 0;
    loop {
        let rows = db
            .query(&select, &[&last_pk, &batch_size(&args.batch)])
            .await?;
        changed += encrypt_rows(manager, db, &spec, &rows, &update).await?;
        if let Some(last) = rows.last() {
            last_pk = Some(last.try_get(0)?);
        }
        done += rows.len() as i64;
        let finished = (rows.len() as i64) < batch_size(&args.batch);
        job.save(&last_pk, done, false).await?;
        progress(&Progress {
            rows_done: done,
            rows_changed: changed,
            last_pk: last_pk.clone(),
            ..Progress::new("encrypt_existing", &table, &column)
        });
        if finished {
            break;
        }
        tokio::time::sleep(args.batch.pause).await;
    }

    // Final pass under lock: rows inserted or updated since their batch, then swap columns.
    let remaining =
        format!("SELECT {p}::text, {c}::text FROM {t} WHERE {c} IS NOT NULL AND {twin} IS NULL");
    let swap = format!("DROP TRIGGER IF EXISTS {trigger} ON {t}; ALTER TABLE {t} DROP COLUMN {c}; ALTER TABLE {t} RENAME COLUMN {twin} TO {c}");
    let final_changed = in_transaction(db, async {
        db.batch_execute(&format!("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE"))
            .await?;
        let rows = db.query(&remaining, &[]).await?;
        let n = encrypt_rows(manager, db, &spec, &rows, &update).await?;
        db.batch_execute(&swap).await?;
        Ok(n)
    })
    .await?;
    changed += final_changed;
    job.save(&last_pk, done, true).await?;
    let event = Progress {
        rows_done: done,
        rows_changed: changed,
        last_pk,
        finished: true,
        ..Progress::new("encrypt_existing", &table, &column)
    };
    progress(&event);
    Ok(event)
}

/// Whether every value of a `bytea` column already carries this column's envelope header
/// (format version and key id). A non-`bytea` client type cannot be stored in `bytea` as
/// plaintext, so it counts as encrypted; a plaintext `bytea` column is checked row by row,
/// so a rerun never encrypts ciphertext a second time.
async fn all_values_encrypted(
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
) -> Result<bool, OpsError> {
    if spec.column.ty != super::codec::ClientType::Bytea {
        return Ok(true);
    }
    // Either format version (unbound or row-bound) counts as this column's envelope.
    let mut prefix = vec![super::envelope::FORMAT_V1];
    prefix.extend_from_slice(&spec.key_id.to_be_bytes());
    let mut bound = prefix.clone();
    bound[0] = super::envelope::FORMAT_ROW_BOUND;
    let c = quote_ident(&spec.column.column);
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE {c} IS NOT NULL AND substring({c} from 1 for 5) IS DISTINCT FROM $1 AND substring({c} from 1 for 5) IS DISTINCT FROM $2)",
        quote_table(&spec.table)
    );
    let plaintext_left: bool = db.query_one(&sql, &[&prefix, &bound]).await?.try_get(0)?;
    Ok(!plaintext_left)
}

fn batch_size(b: &BatchArgs) -> i64 {
    b.batch_size.max(1)
}

/// Encrypt the text renderings in `rows` ((pk, plaintext)) into the twin (and bidx) columns.
async fn encrypt_rows(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
    rows: &[tokio_postgres::Row],
    update: &str,
) -> Result<i64, OpsError> {
    let mut changed = 0;
    for row in rows {
        let id: String = row.try_get(0)?;
        let text: String = row.try_get(1)?;
        let canonical = zeroize::Zeroizing::new(
            encode_for_encryption(spec.column.ty, WireFormat::Text, text.as_bytes())
                .map_err(|e| OpsError::Crypto(e.into()).at_row(spec, &id))?,
        );
        // `id` is the primary key as PostgreSQL prints it: what a row-bound column binds.
        let row = spec.column.bind_primary_key.then_some(id.as_str());
        let ct = manager
            .encrypt_row(
                &spec.table,
                &spec.column.column,
                &KeyScope::default(),
                row,
                &canonical,
            )
            .await?;
        let n = if spec.column.searchable {
            let bidx = manager
                .blind_index(
                    &spec.table,
                    &spec.column.column,
                    &KeyScope::default(),
                    &canonical,
                )
                .await?
                .to_vec();
            db.execute(update, &[&ct, &id, &text, &bidx]).await?
        } else {
            db.execute(update, &[&ct, &id, &text]).await?
        };
        changed += n as i64;
    }
    Ok(changed)
}

/// SQL type of a column, or an error if it does not exist.
async fn column_type(
    db: &tokio_postgres::Client,
    table: &str,
    column: &str,
) -> Result<String, OpsError> {
    let row = db
        .query_opt(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = $2 AND NOT attisdropped AND attnum > 0",
            &[&quote_table(table), &column],
        )
        .await?;
    match row {
        Some(r) => Ok(r.try_get(0)?),
        None => Err(OpsError::Schema(format!("{table}.{column} does not exist"))),
    }
}
