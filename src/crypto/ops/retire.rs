//! `pgward keys retire`: remove the data keys no value is left under, and what `keys status`
//! tells operators about the KEK versions old backups still need.
//!
//! A retired data key (DEK) is deleted from `pgward.data_keys` and recorded in
//! `pgward.retired_keys` (facts only, never the wrapped key). Backups taken before the
//! retirement still hold the wrapped DEK: they stay readable as long as Vault keeps the KEK
//! version that wrapped it, and become unreadable once `min_decryption_version` passes it.
//!
//! Races: a pgward writes under its newest *known* DEK. One that has not yet picked up a
//! newer DEK (it polls every `keys.poll_interval`; with Vault unreachable it keeps writing
//! under its cached DEK for up to `keys.dek_cache_max_stale`) could write under an old one.
//! So nothing is retired until the newest DEK is older than that window, and the counts are
//! made again inside the transaction that deletes, with the DEK rows locked.
use std::fmt::Write as _;
use std::time::Duration;

use std::collections::HashMap;

use super::context_keys::{context_key_names, per_tenant_key_bases};
use super::OpsError;
use super::{
    column_type, count_by_dek, in_transaction, key_status, DekStatus, DestroyedKey, KeyStatus,
    KeysStatusArgs,
};
use crate::crypto::envelope::{key_name_id, KeyRef};
use crate::crypto::manager::{ColumnSpec, KeyManager};
use crate::keys::transit::kek_version_of;
use crate::keys::DekInfo;

/// `pgward keys retire`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KeysRetireArgs {
    /// Only this key name (default: every configured key).
    #[arg(long)]
    pub key: Option<String>,
    /// Retire for real; without it, only say what would be retired (nothing changes).
    #[arg(long)]
    pub confirm: bool,
}

/// What `keys retire` found, or did, for one key name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetireReport {
    pub key_name: String,
    /// For a per-context key name: the configured key it serves a context of.
    pub context_of: Option<String>,
    /// DEKs with no value left: retired (with `--confirm`) or retirable (dry run).
    pub retire: Vec<DekInfo>,
    /// DEKs kept, with the reason (newest, values left), oldest first.
    pub kept: Vec<(u32, String)>,
    /// Why nothing of this key name could be retired safely (a count could not be made,
    /// the newest DEK is too recent): the command fails.
    pub held: Option<String>,
}

impl RetireReport {
    fn new(key_name: &str) -> Self {
        RetireReport {
            key_name: key_name.to_string(),
            ..RetireReport::default()
        }
    }
}

/// Which DEKs of a counted key may go: not the newest, not the blind-index root, and no
/// value left under them. Any DEK not counted (`rows: None`) keeps every DEK (fail closed).
pub(super) fn retirable(deks: &[DekStatus]) -> (Vec<DekInfo>, Vec<(u32, String)>) {
    let newest = deks.iter().map(|d| d.info.dek_version).max();
    let counted = deks.iter().all(|d| d.rows.is_some());
    let mut retire = Vec::new();
    let mut kept = Vec::new();
    for d in deks {
        let v = d.info.dek_version;
        if v == 0 {
            continue;
        }
        match d.rows {
            _ if Some(v) == newest => kept.push((v, "newest (new writes)".to_string())),
            Some(0) if counted => retire.push(d.info.clone()),
            Some(n) if n > 0 => {
                kept.push((v, format!("{n} values left: run `pgward keys reencrypt`")))
            }
            _ => kept.push((v, "not counted".to_string())),
        }
    }
    (retire, kept)
}

/// `keys retire`: see the module documentation. `min_age` is how old the newest DEK of a
/// key must be before older ones may go (`keys.poll_interval + keys.dek_cache_max_stale`).
pub async fn keys_retire(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    args: &KeysRetireArgs,
    min_age: Duration,
) -> Result<Vec<RetireReport>, OpsError> {
    let kind = manager.provider().kind();
    if kind != "transit" {
        return Err(OpsError::Schema(format!(
            "keys retire needs keys.provider = \"transit\" (this configuration uses {kind:?}), whose data keys are stored in pgward.data_keys"
        )));
    }
    let names: Vec<String> = match &args.key {
        Some(k) if manager.columns().any(|s| s.column.key == *k) => vec![k.clone()],
        Some(k) => {
            return Err(OpsError::Schema(format!(
                "key {k:?} is not used by any [[encrypt]] column"
            )))
        }
        None => manager.key_names().map(str::to_string).collect(),
    };
    let mut names = names;
    // Keys only per-tenant columns use are not in `key_names` (no key of that name serves).
    if args.key.is_none() {
        for base in per_tenant_key_bases(manager) {
            if !names.contains(&base) {
                names.push(base);
            }
        }
    }
    let mut reports = Vec::new();
    for name in names {
        let specs: Vec<ColumnSpec> = manager
            .columns()
            .filter(|s| s.column.key == name)
            .cloned()
            .collect();
        let (plain, per_context): (Vec<ColumnSpec>, Vec<ColumnSpec>) = specs
            .into_iter()
            .partition(|s| s.column.context_claim.is_none());
        if !plain.is_empty() {
            reports.push(retire_key(manager, db, &name, &plain, args.confirm, min_age).await?);
        }
        if !per_context.is_empty() {
            reports.extend(
                retire_contexts(manager, db, &name, &per_context, args.confirm, min_age).await?,
            );
        }
    }
    Ok(reports)
}

async fn retire_key(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    key_name: &str,
    specs: &[ColumnSpec],
    confirm: bool,
    min_age: Duration,
) -> Result<RetireReport, OpsError> {
    let mut report = RetireReport::new(key_name);
    let status = key_status(manager, db, key_name, &KeysStatusArgs::default()).await?;
    if let Some((column, reason)) = status.pending_columns.first() {
        report.held = Some(format!(
            "column {column} could not be counted ({reason}); nothing retired"
        ));
        return Ok(report);
    }
    let (retire, kept) = retirable(&status.deks);
    report.kept = kept;
    let Some(newest) = status.deks.iter().map(|d| d.info.dek_version).max() else {
        return Ok(report);
    };
    if retire.is_empty() {
        return Ok(report);
    }
    let age = newest_age(db, key_name, newest).await?;
    if age < min_age {
        report.held = Some(format!(
            "the newest data key (DEK {newest}) was created {}s ago; a pgward that has not picked it up yet may still write under older ones (keys.poll_interval + keys.dek_cache_max_stale = {}s): retry after that",
            age.as_secs(),
            min_age.as_secs()
        ));
        return Ok(report);
    }
    if !confirm {
        report.retire = retire;
        return Ok(report);
    }
    report.retire = in_transaction(db, retire_in_transaction(db, specs, &retire)).await?;
    log_retired(&report.retire);
    Ok(report)
}

fn log_retired(retired: &[DekInfo]) {
    for d in retired {
        tracing::warn!(
            key = %d.key_name,
            dek_version = d.dek_version,
            kek_version = d.kek_version,
            "data key retired: no value was left under it"
        );
    }
}

/// `keys retire` for the per-tenant columns of `base`: every per-context key name found in
/// `pgward.data_keys` is examined like a key of its own, its data keys counted from the
/// header key ids of the columns' values (one scan per column for every context). One
/// report per context name; the retirements of all contexts happen in one transaction.
async fn retire_contexts(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    base: &str,
    specs: &[ColumnSpec],
    confirm: bool,
    min_age: Duration,
) -> Result<Vec<RetireReport>, OpsError> {
    let mut held = RetireReport::new(base);
    let kind = manager.provider().kind();
    if kind != "transit" {
        held.held = Some(format!("per-tenant keys are found in pgward.data_keys, which keys.provider {kind:?} does not use"));
        return Ok(vec![held]);
    }
    let mut counts: HashMap<KeyRef, i64> = HashMap::new();
    for spec in specs {
        match column_type(db, &spec.table, &spec.column.column).await {
            Ok(ty) if ty == "bytea" => {}
            Ok(ty) => {
                held.held = Some(format!(
                    "column {}.{} could not be counted (stored as {ty}); nothing retired",
                    spec.table, spec.column.column
                ));
                return Ok(vec![held]);
            }
            Err(OpsError::Schema(reason)) => {
                held.held = Some(format!(
                    "column {}.{} could not be counted ({reason}); nothing retired",
                    spec.table, spec.column.column
                ));
                return Ok(vec![held]);
            }
            Err(e) => return Err(e),
        }
        for (key_ref, n) in count_by_dek(db, spec).await? {
            *counts.entry(key_ref).or_default() += n;
        }
    }
    let (names, _) = context_key_names(db, base).await?;
    let mut reports = Vec::new();
    let mut candidates = Vec::new();
    for name in names {
        let mut report = RetireReport::new(&name);
        report.context_of = Some(base.to_string());
        let key_id = key_name_id(&name);
        let deks: Vec<DekStatus> = manager
            .provider()
            .list_deks(&name)
            .await?
            .into_iter()
            .map(|info| DekStatus {
                rows: Some(
                    counts
                        .get(&KeyRef {
                            key_id,
                            dek_version: info.dek_version,
                        })
                        .copied()
                        .unwrap_or(0),
                ),
                info,
                unwrap: None,
            })
            .collect();
        let (retire, kept) = retirable(&deks);
        report.kept = kept;
        if let (false, Some(newest)) = (retire.is_empty(), deks.last()) {
            let newest = newest.info.dek_version;
            let age = newest_age(db, &name, newest).await?;
            if age < min_age {
                report.held = Some(format!(
                    "the newest data key (DEK {newest}) was created {}s ago; a pgward that has not picked it up yet may still write under older ones (keys.poll_interval + keys.dek_cache_max_stale = {}s): retry after that",
                    age.as_secs(),
                    min_age.as_secs()
                ));
            } else {
                candidates.extend(retire.iter().cloned());
                report.retire = retire;
            }
        }
        reports.push(report);
    }
    if confirm && !candidates.is_empty() {
        let retired = in_transaction(db, retire_in_transaction(db, specs, &candidates)).await?;
        log_retired(&retired);
        for report in &mut reports {
            report.retire = retired
                .iter()
                .filter(|d| d.key_name == report.key_name)
                .cloned()
                .collect();
        }
    }
    Ok(reports)
}

/// How long ago the DEK was created (by the database's clock).
async fn newest_age(
    db: &tokio_postgres::Client,
    key_name: &str,
    dek_version: u32,
) -> Result<Duration, OpsError> {
    let version = version_i32(dek_version)?;
    let secs: f64 = db
        .query_one(
            "SELECT extract(epoch FROM now() - created_at)::float8 FROM pgward.data_keys WHERE key_name = $1 AND dek_version = $2",
            &[&key_name, &version],
        )
        .await?
        .try_get(0)?;
    Ok(Duration::from_secs_f64(secs.max(0.0)))
}

fn version_i32(v: u32) -> Result<i32, OpsError> {
    i32::try_from(v).map_err(|_| OpsError::Schema(format!("DEK version {v} out of range")))
}

/// Lock the candidates' rows (each of its own key name), count again, record and delete; any
/// value found under a candidate now fails the whole transaction (nothing retired).
async fn retire_in_transaction(
    db: &tokio_postgres::Client,
    specs: &[ColumnSpec],
    candidates: &[DekInfo],
) -> Result<Vec<DekInfo>, OpsError> {
    db.batch_execute("SET LOCAL lock_timeout = '10s'").await?;
    let mut by_name: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
    for d in candidates {
        by_name
            .entry(d.key_name.as_str())
            .or_default()
            .push(version_i32(d.dek_version)?);
    }
    let mut retired = Vec::new();
    for (key_name, versions) in &by_name {
        // Never the blind-index root (0) nor the newest DEK, whatever the caller computed.
        let locked = db
            .query(
                "SELECT dek_version, wrapped FROM pgward.data_keys WHERE key_name = $1 AND dek_version = ANY($2) \
                 AND dek_version > 0 AND dek_version < (SELECT max(dek_version) FROM pgward.data_keys WHERE key_name = $1) \
                 ORDER BY dek_version FOR UPDATE",
                &[key_name, versions],
            )
            .await?;
        for row in &locked {
            let version: i32 = row.try_get(0)?;
            let wrapped: String = row.try_get(1)?;
            retired.push(DekInfo {
                key_name: key_name.to_string(),
                dek_version: u32::try_from(version)
                    .map_err(|_| OpsError::Schema(format!("negative DEK version {version}")))?,
                // What Vault unwraps by, not the table's copy.
                kek_version: kek_version_of(&wrapped).unwrap_or(0),
            });
        }
    }
    let ids: HashMap<u32, &str> = by_name.keys().map(|n| (key_name_id(n), *n)).collect();
    for spec in specs {
        for (key_ref, n) in count_by_dek(db, spec).await? {
            let Some(key_name) = ids.get(&key_ref.key_id) else {
                continue;
            };
            let hit = retired
                .iter()
                .any(|d| d.key_name == *key_name && d.dek_version == key_ref.dek_version);
            if hit && n > 0 {
                return Err(OpsError::Schema(format!(
                    "{}.{} has {n} values under DEK {} of key {key_name} again (written by a pgward that had not picked up the newest data key?): nothing retired; run `pgward keys reencrypt` and retry",
                    spec.table, spec.column.column, key_ref.dek_version
                )));
            }
        }
    }
    for d in &retired {
        let version = version_i32(d.dek_version)?;
        let kek = version_i32(d.kek_version)?;
        db.execute(
            "INSERT INTO pgward.retired_keys (key_name, dek_version, kek_version, first_kek_version, created_at, rewrapped_at) \
             SELECT key_name, dek_version, $3, first_kek_version, created_at, rewrapped_at FROM pgward.data_keys \
             WHERE key_name = $1 AND dek_version = $2 ON CONFLICT (key_name, dek_version) DO NOTHING",
            &[&d.key_name, &version, &kek],
        )
        .await?;
        db.execute(
            "DELETE FROM pgward.data_keys WHERE key_name = $1 AND dek_version = $2",
            &[&d.key_name, &version],
        )
        .await?;
    }
    Ok(retired)
}

/// A retired DEK, for `keys status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetiredKey {
    pub key_name: String,
    pub dek_version: u32,
    /// KEK version wrapping it when it was retired (read from the wrapped form).
    pub kek_version: u32,
    /// KEK version that first wrapped it, when recorded.
    pub first_kek_version: Option<u32>,
    /// Its last rewrap, as PostgreSQL prints it.
    pub rewrapped_at: Option<String>,
    /// `retired_at` as PostgreSQL prints it.
    pub retired_at: String,
}

impl RetiredKey {
    /// The oldest KEK version a backup taken before the retirement may hold it under.
    pub fn oldest_kek(&self) -> u32 {
        self.first_kek_version
            .map_or(self.kek_version, |v| v.min(self.kek_version))
    }
}

/// Every retired DEK, oldest retirement first.
pub async fn retired_keys(db: &tokio_postgres::Client) -> Result<Vec<RetiredKey>, OpsError> {
    let rows = db
        .query(
            "SELECT key_name, dek_version, kek_version, first_kek_version, rewrapped_at::text, retired_at::text \
             FROM pgward.retired_keys ORDER BY retired_at, key_name, dek_version",
            &[],
        )
        .await?;
    let version =
        |v: i32| u32::try_from(v).map_err(|_| OpsError::Schema(format!("negative version {v}")));
    rows.iter()
        .map(|r| {
            Ok(RetiredKey {
                key_name: r.try_get(0)?,
                dek_version: version(r.try_get(1)?)?,
                kek_version: version(r.try_get(2)?)?,
                first_kek_version: r.try_get::<_, Option<i32>>(3)?.map(version).transpose()?,
                rewrapped_at: r.try_get(4)?,
                retired_at: r.try_get(5)?,
            })
        })
        .collect()
}

/// The `keys status` section on old backups: for each retired and destroyed key, what a
/// backup taken before then holds and which KEK version it needs, checked against what
/// Vault says now (`statuses`: its KEK versions and `min_decryption_version`).
pub fn backup_advice(
    retired: &[RetiredKey],
    destroyed: &[DestroyedKey],
    statuses: &[KeyStatus],
) -> String {
    if retired.is_empty() && destroyed.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nWhat old backups still need:\n");
    for r in retired {
        let need = r.oldest_kek();
        let name = &r.key_name;
        let _ = write!(
            out,
            "  {name} DEK {}: retired {}; backups taken before then hold values under it, wrapped by KEK v{need} of transit key {name}",
            r.dek_version, r.retired_at
        );
        if need < r.kek_version {
            let since = r.rewrapped_at.as_deref().unwrap_or("its rewrap");
            let _ = write!(out, " (v{} if taken after {since})", r.kek_version);
        }
        let kek = statuses
            .iter()
            .find(|s| &s.key_name == name && s.provider == "transit")
            .map(|s| &s.kek);
        match kek {
            None => {
                let _ = writeln!(
                    out,
                    ": key no longer configured, Vault not asked; keep KEK v{need} as long as such backups must stay readable"
                );
            }
            Some(kek) if need < kek.min_decryption_version || !kek.versions.contains(&need) => {
                let _ = writeln!(
                    out,
                    ": Vault no longer decrypts with KEK v{need} (min_decryption_version v{}, versions {:?}), so such backups can no longer be read",
                    kek.min_decryption_version, kek.versions
                );
            }
            Some(_) => {
                let _ = writeln!(
                    out,
                    ": keep KEK v{need} (do not raise min_decryption_version above {need}, do not trim it) as long as such backups must stay readable; once they expire, raise it"
                );
            }
        }
    }
    for d in destroyed {
        let _ = writeln!(
            out,
            "  {} (key {:?}): {} {}; backups taken before then hold values under it that can never be decrypted (its transit key was deleted): no KEK version to keep",
            d.key_name, d.configured_key, d.reason, d.since
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KekStatus;

    fn dek(v: u32, kek: u32, rows: Option<i64>) -> DekStatus {
        DekStatus {
            info: DekInfo {
                key_name: "pii".into(),
                dek_version: v,
                kek_version: kek,
            },
            rows,
            unwrap: None,
        }
    }

    fn status(deks: Vec<DekStatus>) -> KeyStatus {
        KeyStatus {
            key_name: "pii".into(),
            provider: "transit",
            kek: KekStatus {
                latest_version: 3,
                min_decryption_version: 1,
                versions: vec![1, 2, 3],
            },
            deks,
            unknown_rows: 0,
            index_root: Some(dek(0, 3, None)),
            index_root_version: 1,
            index_rotation: None,
            pending_columns: vec![],
        }
    }

    #[test]
    fn only_old_empty_data_keys_are_retirable() {
        let (retire, kept) = retirable(
            &status(vec![
                dek(1, 3, Some(0)),
                dek(2, 3, Some(7)),
                dek(3, 3, Some(0)),
            ])
            .deks,
        );
        let versions: Vec<u32> = retire.iter().map(|d| d.dek_version).collect();
        assert_eq!(versions, [1]);
        assert_eq!(kept[0].0, 2);
        assert!(kept[0].1.contains("7 values left"), "{kept:?}");
        assert_eq!(kept[1], (3, "newest (new writes)".to_string()));
    }

    #[test]
    fn the_newest_is_kept_even_when_empty_and_uncounted_keys_keep_everything() {
        let (retire, kept) = retirable(&status(vec![dek(4, 3, Some(0))]).deks);
        assert!(retire.is_empty());
        assert_eq!(kept, [(4, "newest (new writes)".to_string())]);
        // One DEK not counted: nothing goes (fail closed).
        let (retire, _) = retirable(
            &status(vec![
                dek(1, 3, Some(0)),
                dek(2, 3, None),
                dek(3, 3, Some(5)),
            ])
            .deks,
        );
        assert!(retire.is_empty());
        // The blind-index root is never a candidate, even if listed among the DEKs.
        let (retire, _) = retirable(&status(vec![dek(0, 1, Some(0)), dek(1, 3, Some(1))]).deks);
        assert!(retire.is_empty());
    }

    fn retired(first: Option<u32>, kek: u32) -> RetiredKey {
        RetiredKey {
            key_name: "pii".into(),
            dek_version: 1,
            kek_version: kek,
            first_kek_version: first,
            rewrapped_at: Some("2026-01-02 00:00:00+00".into()),
            retired_at: "2026-02-03 00:00:00+00".into(),
        }
    }

    #[test]
    fn backups_are_told_the_oldest_kek_version_they_need_and_what_vault_says() {
        assert_eq!(backup_advice(&[], &[], &[]), "");
        let statuses = [status(vec![])];
        let text = backup_advice(&[retired(Some(1), 3)], &[], &statuses);
        assert!(
            text.contains("pii DEK 1: retired 2026-02-03 00:00:00+00; backups taken before then hold values under it, wrapped by KEK v1 of transit key pii (v3 if taken after 2026-01-02 00:00:00+00)"),
            "{text}"
        );
        assert!(
            text.contains(
                "keep KEK v1 (do not raise min_decryption_version above 1, do not trim it)"
            ),
            "{text}"
        );
        // Vault already passed that version: say the backups are unreadable.
        let mut raised = status(vec![]);
        raised.kek.min_decryption_version = 2;
        let text = backup_advice(&[retired(Some(1), 3)], &[], &[raised]);
        assert!(
            text.contains("Vault no longer decrypts with KEK v1"),
            "{text}"
        );
        // Never rewrapped: one version, no "if taken after".
        let text = backup_advice(&[retired(Some(2), 2)], &[], &statuses);
        assert!(
            text.contains("wrapped by KEK v2 of transit key pii:"),
            "{text}"
        );
        // Not configured any more: Vault is not asked.
        let text = backup_advice(&[retired(None, 2)], &[], &[]);
        assert!(text.contains("Vault not asked; keep KEK v2"), "{text}");
        let shredded = DestroyedKey {
            key_name: "pii-t00".into(),
            configured_key: "pii".into(),
            reason: "shredded".into(),
            since: "2026-03-04".into(),
        };
        let text = backup_advice(&[], &[shredded], &statuses);
        assert!(text.contains("pii-t00 (key \"pii\"): shredded 2026-03-04; backups taken before then hold values under it that can never be decrypted"), "{text}");
    }
}
