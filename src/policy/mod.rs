//! The policy engine: per-service row/column permissions enforced by rewriting SQL.
//!
//! The relay calls [`PolicyEngine::rewrite`] for every simple Query and every Parse; the
//! result is forwarded instead of the client's text. Anything the engine cannot prove safe
//! is refused with SQLSTATE 42501 ([`PolicyDenied`]). See `rewrite.rs` for how each SQL
//! construct is made safe and `allow.rs` for the built-in allowlists.
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use thiserror::Error;

use crate::error::{ClientError, Refusal, RefusalKind};
use crate::metrics::{inc, RewriteCounters};
use crate::sql::fingerprint::RedactedText;

pub mod allow;
pub mod analysis;
pub mod check;
pub mod cli;
pub mod config;
mod memo;
pub mod rewrite;
pub mod shape;
mod template;

pub use analysis::AnalysisMemo;
// The analysis layer under the policy engine, under its former names for the engine's own
// code and the tools built on it.
pub use crate::sql::parse as sql;
pub use crate::sql::stage::{StagePlan, StatementTransform, TransformOutcome};
pub use crate::sql::{catalog, columns};
pub use crate::sql::{Catalog, CatalogError, ColumnInfo, RelKind, TableInfo};
pub use config::{Action, ServicePolicy, TablePolicy};
use memo::Reuse;
pub use memo::SessionMemo;
use template::{learn_shape, ShapeEntry, ShapeTemplate};

/// Who is asking: the service named by the token and the token's claims.
pub struct PolicyIdentity<'a> {
    pub service: &'a str,
    pub claims: &'a serde_json::Map<String, serde_json::Value>,
}

/// Errors in policy files (always with file and line when known).
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("{file}:{line}: {message}")]
    Invalid {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A `*.toml` entry of the policy directory that is a directory, FIFO, socket or device:
    /// refused rather than skipped, so the policy meant to be in it is not silently missing
    /// (and nothing blocks reading a FIFO).
    #[error("{path}: not a regular file (a policy file must be one)")]
    NotAFile { path: String },
}

/// A refusal, sent to the client as an ErrorResponse.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct PolicyDenied {
    pub sqlstate: &'static str,
    pub message: String,
    /// `file:line` of the rule that refused, when one did.
    pub rule: Option<String>,
    /// Whether the policy rewriter or field encryption's transform refused.
    pub kind: RefusalKind,
}

impl PolicyDenied {
    fn new(message: String, rule: Option<String>) -> Self {
        PolicyDenied {
            sqlstate: "42501",
            message,
            rule,
            kind: RefusalKind::Policy,
        }
    }

    /// A refusal by the transform that runs beside the rewrite (field encryption), or about
    /// text that transform would have to see.
    fn transform(kind: RefusalKind, sqlstate: &'static str, message: String) -> Self {
        PolicyDenied {
            sqlstate,
            message,
            rule: None,
            kind,
        }
    }
}

impl From<PolicyDenied> for Refusal {
    fn from(denied: PolicyDenied) -> Self {
        Refusal {
            kind: denied.kind,
            rule: denied.rule,
            error: ClientError::error(denied.sqlstate, denied.message),
        }
    }
}

/// What one statement of a rewritten string does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatementInfo {
    /// What kind of statement it is (`None` until the analysis has looked at it).
    pub kind: Option<crate::sql::StatementKind>,
    /// pgAudit's class of the statement, for its audit record.
    pub class: Option<crate::sql::CommandClass>,
    /// `schema.table` of protected tables read (after rewriting, through their filter).
    pub tables_read: Vec<String>,
    pub tables_written: Vec<String>,
    /// `table.column` the statement can see of the tables read.
    pub columns_read: Vec<String>,
    /// `table.column` the statement stores values in (INSERT, UPDATE, upsert, COPY FROM).
    pub columns_written: Vec<String>,
    /// `table.column` of encrypted columns the statement reads, searches or writes (field
    /// encryption; a wildcard or whole-row reference counts every encrypted column of its table).
    pub encrypted_columns: Vec<String>,
    /// The caller refreshes the catalog (`Catalog::refresh` + `PolicyEngine::set_catalog`).
    pub is_ddl: bool,
    /// The cursor or SQL prepared statement it creates, runs or drops (the audit names what a
    /// `FETCH` or `EXECUTE` touches by what created its name).
    pub session_name: Option<crate::sql::SessionName>,
}

/// The result of a rewrite: the SQL to forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewritten {
    pub sql: String,
    /// Shared: a statement served from a shape template carries its template's analysis.
    pub statements: Arc<[StatementInfo]>,
    /// The service is configured as unrestricted: `sql` is the client's text, unchanged
    /// unless field encryption transformed it.
    pub unrestricted: bool,
    /// What the relay must do per execution (field encryption: the parameters it encrypts
    /// or blind-indexes at Bind), as the transform typed it.
    pub params: Option<StagePlan>,
    /// The client's text, redacted and fingerprinted for the audit, when the engine made it
    /// while analysing the text (a rewrite, and every statement of its shape after it).
    pub client_text: Option<RedactedText>,
    /// For the audit: the SHA-256 of `sql` redacted ([`crate::sql::fingerprint::redacted_sha256`]),
    /// made with the rewrite (a template's is its first statement's: the shape's statements
    /// redact alike). `None` where the engine did not rewrite, or made a rewrite it serves only once
    /// (embedded ciphertext); the audit makes it then.
    pub rewritten_redacted_sha256: Option<Arc<str>>,
}

/// How a service is governed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Has a policy file.
    Policy,
    /// Named unrestricted in the config: statements pass unchanged.
    Unrestricted,
    /// Neither: gets nothing.
    NoPolicy,
}

const CACHE_CAPACITY: usize = 4096;
/// Longest statement text (or shape key) the shared caches keep. Any service may send
/// statements up to `max_message_bytes`; four thousand of those kept, with their rewrites,
/// would hold memory far beyond what serving them needs. A longer statement is rewritten each
/// time it comes (its cost grows with its length either way).
const CACHE_TEXT_LIMIT: usize = 16 * 1024;

/// (service, the claims as canonical JSON, sql) → rewrite. The claims are part of the key, so a
/// hit can only return the rewrite made for the same identity.
type CacheKey = (String, String, String);

struct Cache<V> {
    map: HashMap<CacheKey, V>,
    order: VecDeque<CacheKey>,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Cache {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V: Clone> Cache<V> {
    fn get(&self, k: &CacheKey) -> Option<V> {
        self.map.get(k).cloned()
    }

    /// FIFO eviction keeps the bound without per-hit bookkeeping.
    fn put(&mut self, k: CacheKey, v: V) {
        if k.2.len() > CACHE_TEXT_LIMIT {
            return;
        }
        if self.map.len() >= CACHE_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
        }
    }
}

/// One consistent generation: policies compiled against one catalog, with its own cache.
struct Snapshot {
    policies: HashMap<String, ServicePolicy>,
    catalog: Arc<Catalog>,
    /// Exact statement texts.
    cache: Mutex<Cache<Arc<Rewritten>>>,
    /// Statement shapes (texts up to their literals).
    shapes: Mutex<Cache<ShapeEntry>>,
}

impl Snapshot {
    fn new(policies: HashMap<String, ServicePolicy>, catalog: Arc<Catalog>) -> Self {
        Snapshot {
            policies,
            catalog,
            cache: Mutex::default(),
            shapes: Mutex::default(),
        }
    }
}

/// The engine. `Send + Sync`; share it in an `Arc`.
pub struct PolicyEngine {
    current: RwLock<Arc<Snapshot>>,
    dir: RwLock<PathBuf>,
    /// Services configured unrestricted (changed by a SIGHUP reload of `[services]`).
    unrestricted: RwLock<Vec<String>>,
    /// The transform run on every statement before the policy rewrite (field encryption).
    encryption: RwLock<Option<Arc<dyn StatementTransform>>>,
    counters: RwLock<Arc<RewriteCounters>>,
    /// Bumped after every change of what a rewrite depends on (policies, catalog, encryption,
    /// counters): sessions' memos from an older generation are emptied before use.
    generation: AtomicU64,
}

fn claims_key(
    used: &std::collections::BTreeSet<String>,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> String {
    // The used claims in sorted order, each as `name=json;` (names and JSON values are
    // serialized, so no two identities can produce the same text); compared whole, never
    // hashed. Built without copying the claims into a map first: this runs per statement.
    let mut key = String::new();
    for name in used {
        if let Some(value) = claims.get(name) {
            key.push_str(&serde_json::to_string(name).unwrap_or_default());
            key.push('=');
            key.push_str(&value.to_string());
            key.push(';');
        }
    }
    key
}

impl PolicyEngine {
    /// Loads and validates every policy in `dir` against `catalog`.
    pub fn load(
        dir: &Path,
        catalog: Arc<Catalog>,
        unrestricted: &[String],
    ) -> Result<Self, Vec<PolicyError>> {
        let policies = config::load_dir(dir, &catalog)?;
        tracing::info!(services = policies.len(), dir = %dir.display(), "loaded policies");
        Ok(PolicyEngine {
            current: RwLock::new(Arc::new(Snapshot::new(policies, catalog))),
            dir: RwLock::new(dir.to_path_buf()),
            unrestricted: RwLock::new(unrestricted.to_vec()),
            encryption: RwLock::new(None),
            counters: RwLock::default(),
            generation: AtomicU64::new(1),
        })
    }

    /// Re-reads `dir`; swaps atomically only if the whole set is valid.
    pub fn reload(&self, dir: &Path, catalog: &Arc<Catalog>) -> Result<(), Vec<PolicyError>> {
        let policies = config::load_dir(dir, catalog)?;
        *self.current.write() = Arc::new(Snapshot::new(policies, catalog.clone()));
        *self.dir.write() = dir.to_path_buf();
        self.generation.fetch_add(1, Ordering::Release);
        tracing::info!(dir = %dir.display(), "reloaded policies");
        Ok(())
    }

    /// Re-reads the current directory against the current catalog (SIGHUP, file change).
    pub fn reload_files(&self) -> Result<(), Vec<PolicyError>> {
        let dir = self.dir.read().clone();
        let catalog = self.catalog();
        self.reload(&dir, &catalog)
    }

    /// The catalog the current policies were compiled against.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.current.read().catalog.clone()
    }

    /// After DDL: recompiles the current policies against a refreshed catalog.
    pub fn set_catalog(&self, catalog: Arc<Catalog>) -> Result<(), Vec<PolicyError>> {
        let dir = self.dir.read().clone();
        self.reload(&dir, &catalog)
    }

    /// Count rewrite-cache answers into these counters (the proxy's `/metrics`).
    pub fn set_counters(&self, counters: Arc<RewriteCounters>) {
        *self.counters.write() = counters;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// How the rewrite cache has answered so far.
    pub fn counters(&self) -> Arc<RewriteCounters> {
        self.counters.read().clone()
    }

    /// The services configured unrestricted, after a SIGHUP reload of `[services]`.
    pub fn set_unrestricted(&self, services: Vec<String>) {
        *self.unrestricted.write() = services;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Apply this transform (field encryption) to every statement, policy-bound and
    /// unrestricted services alike.
    pub fn set_encryption(&self, encryption: Arc<dyn StatementTransform>) {
        *self.encryption.write() = Some(encryption);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn decision(&self, service: &str) -> Decision {
        if self.current.read().policies.contains_key(service) {
            Decision::Policy
        } else if self.unrestricted.read().iter().any(|s| s == service) {
            Decision::Unrestricted
        } else {
            Decision::NoPolicy
        }
    }

    /// Claims the service's policy references; the proxy refuses tokens lacking any.
    pub fn required_claims(&self, service: &str) -> Result<Vec<String>, PolicyDenied> {
        let snap = self.current.read().clone();
        match snap.policies.get(service) {
            Some(p) => Ok(p.claims.iter().cloned().collect()),
            None if self.unrestricted.read().iter().any(|s| s == service) => Ok(Vec::new()),
            None => Err(no_policy(service)),
        }
    }

    /// The compiled policy of a service (for tools such as export-rls).
    pub fn policy(&self, service: &str) -> Option<ServicePolicy> {
        self.current.read().policies.get(service).cloned()
    }

    /// The extra parameters a policy-bound service may set (`[allow].set`), or `None` when no
    /// policy binds it. Checked at connect without copying the whole compiled policy.
    pub fn extra_settable(&self, service: &str) -> Option<Vec<String>> {
        self.current
            .read()
            .policies
            .get(service)
            .map(|p| p.allow.set.clone())
    }

    pub fn services(&self) -> Vec<String> {
        let mut v: Vec<String> = self.current.read().policies.keys().cloned().collect();
        v.sort();
        v
    }

    /// Rewrites a (possibly multi-statement) SQL string for `who`. Cached.
    pub fn rewrite(
        &self,
        who: &PolicyIdentity<'_>,
        sql: &str,
    ) -> Result<Arc<Rewritten>, PolicyDenied> {
        let shape = shape::shape_of(sql);
        self.rewrite_shared(who, sql, shape.as_ref())
            .map(|(rewritten, _)| rewritten)
    }

    /// [`rewrite`](Self::rewrite) for a session, which always asks for the same identity:
    /// what the shared caches answered is also kept in the session's own memo, so its next
    /// statements of the same text or shape skip the shared caches (their locks, the claims
    /// key and the key copies).
    pub fn rewrite_in_session(
        &self,
        memo: &mut SessionMemo,
        who: &PolicyIdentity<'_>,
        sql: &str,
    ) -> Result<Arc<Rewritten>, PolicyDenied> {
        // Read before the snapshot: a reload bumps it after swapping, so an entry remembered
        // from a newer snapshot under an older generation is only ever dropped, never kept.
        let generation = self.generation.load(Ordering::Acquire);
        if memo.generation != generation {
            memo.reset(generation, self.counters.read().clone());
        }
        let shape = shape::shape_of(sql);
        if let Some(hit) = memo.get(sql, shape.as_ref()) {
            return Ok(hit);
        }
        let (rewritten, reuse) = self.rewrite_shared(who, sql, shape.as_ref())?;
        memo.remember(sql, shape.as_ref(), &rewritten, reuse);
        Ok(rewritten)
    }

    /// The shared caches, then a rewrite from scratch. Also says how the result may be reused.
    fn rewrite_shared(
        &self,
        who: &PolicyIdentity<'_>,
        sql: &str,
        shape: Option<&shape::Shape<'_>>,
    ) -> Result<(Arc<Rewritten>, Reuse), PolicyDenied> {
        let snap = self.current.read().clone();
        let encryption = self.encryption.read().clone();
        let Some(policy) = snap.policies.get(who.service) else {
            if self.unrestricted.read().iter().any(|s| s == who.service) {
                let rewritten = unrestricted_rewrite(
                    sql,
                    encryption.as_deref(),
                    Some(&snap.catalog),
                    who.claims,
                )?;
                return Ok((Arc::new(rewritten), Reuse::None));
            }
            return Err(no_policy(who.service));
        };
        // Only the claims the policy references shape the rewrite; keying by just those keeps
        // hits across token refreshes while different identities still never share entries.
        let claims_key = claims_key(&policy.claims, who.claims);
        // Statements differing only in literals share one rewrite (see shape.rs).
        let mut learn = None;
        if let Some(shape) = shape {
            let key = (
                who.service.to_string(),
                claims_key.clone(),
                shape.key().to_string(),
            );
            match snap.shapes.lock().get(&key) {
                Some(ShapeEntry::Template(t)) => {
                    inc(&self.counters.read().shape_hits);
                    return Ok((Arc::new(t.instantiate(shape)), Reuse::Template(t)));
                }
                Some(ShapeEntry::Exact) => {}
                None => learn = Some((shape, key)),
            }
        }
        let key = (who.service.to_string(), claims_key, sql.to_string());
        if let Some(hit) = snap.cache.lock().get(&key) {
            inc(&self.counters.read().exact_hits);
            return Ok((hit, Reuse::Exact));
        }
        inc(&self.counters.read().misses);
        for claim in &policy.claims {
            if !who.claims.contains_key(claim) {
                return Err(PolicyDenied::new(
                    format!(
                        "pgward: service {:?} has no claim {claim:?} in its token",
                        who.service
                    ),
                    None,
                ));
            }
        }
        let rewrite = |text: &str| {
            rewrite_encrypted(
                who.service,
                policy,
                &snap.catalog,
                who.claims,
                text,
                encryption.as_deref(),
            )
        };
        match rewrite(sql) {
            Ok((mut r, outcome)) => {
                r.client_text = Some(RedactedText::of(sql));
                // Made once for what is served again (a template, a cached rewrite). An
                // unrepeatable rewrite is served once: the audit hashes it if it records it,
                // and an unaudited session never pays for it.
                if !outcome.unrepeatable {
                    r.rewritten_redacted_sha256 =
                        Some(crate::sql::fingerprint::redacted_sha256(&r.sql));
                }
                let r = Arc::new(r);
                tracing::debug!(service = who.service, "rewrote statement");
                if let Some((shape, shape_key)) = learn {
                    let entry = learn_shape(shape, &r, &outcome, rewrite);
                    snap.shapes.lock().put(shape_key, entry.clone());
                    if let ShapeEntry::Template(t) = entry {
                        return Ok((r, Reuse::Template(t)));
                    }
                }
                // Embedded ciphertext must not repeat across executions (see crypto::sql).
                if outcome.unrepeatable {
                    return Ok((r, Reuse::None));
                }
                snap.cache.lock().put(key, r.clone());
                Ok((r, Reuse::Exact))
            }
            Err(e) => {
                // A parser error quotes the client's text, which may hold values meant for
                // encrypted columns: logged without it.
                if e.message.contains("cannot parse") {
                    tracing::info!(service = who.service, "refused: statement does not parse");
                } else {
                    tracing::info!(service = who.service, rule = ?e.rule, "refused: {}", e.message);
                }
                Err(e)
            }
        }
    }
}

fn no_policy(service: &str) -> PolicyDenied {
    PolicyDenied::new(
        format!("pgward: service {service:?} has no policy (and is not configured unrestricted)"),
        None,
    )
}

/// The rewrite of an unrestricted service (or of any session when no policies are
/// configured): the client's text unchanged, unless field encryption must transform it.
/// Unparsable text passes unless it may touch an encrypted table (then it is refused: its
/// values could be plaintext going into encrypted columns).
pub fn unrestricted_rewrite(
    sql: &str,
    encryption: Option<&dyn StatementTransform>,
    catalog: Option<&Catalog>,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<Rewritten, PolicyDenied> {
    let parsed = sql::parse_statements(sql);
    let mut statements: Vec<StatementInfo> = parsed
        .as_ref()
        .map(|v| {
            v.iter()
                .map(|st| analysis::unrestricted_info(st, catalog))
                .collect()
        })
        .unwrap_or_default();
    let unchanged = |statements: Vec<StatementInfo>| Rewritten {
        sql: sql.to_string(),
        statements: statements.into(),
        unrestricted: true,
        params: None,
        client_text: None,
        rewritten_redacted_sha256: None,
    };
    let Some(encryption) = encryption else {
        return Ok(unchanged(statements));
    };
    let mut stmts = match parsed {
        Ok(stmts) => stmts,
        Err(e) => {
            return match encryption.may_touch(sql) {
                Some(t) => Err(PolicyDenied::transform(
                    RefusalKind::Encryption,
                    "0A000",
                    format!("pgward cannot parse this statement, and it may touch {t}, which has encrypted columns, so it is refused: {}", crate::sql::unsupported::describe_unparsable(sql, &e)),
                )),
                None => Ok(unchanged(statements)),
            };
        }
    };
    let (texts, outcome) = encrypt_statements(&mut stmts, encryption, catalog, claims)?;
    if !outcome.touched {
        return Ok(unchanged(statements));
    }
    for (info, accessed) in statements.iter_mut().zip(outcome.accessed) {
        info.encrypted_columns = accessed;
    }
    Ok(Rewritten {
        sql: texts.join(";\n"),
        statements: statements.into(),
        unrestricted: true,
        params: outcome.plan,
        client_text: None,
        rewritten_redacted_sha256: None,
    })
}

/// Sanitize and encrypt statements, returning their texts (checked to round-trip).
fn encrypt_statements(
    stmts: &mut [sqlparser::ast::Statement],
    encryption: &dyn StatementTransform,
    catalog: Option<&Catalog>,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<(Vec<String>, TransformOutcome), PolicyDenied> {
    for st in stmts.iter_mut() {
        sql::sanitize(st).map_err(|e| {
            PolicyDenied::transform(
                RefusalKind::Encryption,
                "0A000",
                format!("pgward: cannot encrypt a statement with {}", e.0),
            )
        })?;
    }
    let outcome = encryption
        .apply(stmts, catalog, claims)
        .map_err(transform_refusal)?;
    let texts: Vec<String> = stmts.iter().map(ToString::to_string).collect();
    if outcome.touched && !texts.iter().all(|t| sql::round_trips(t)) {
        return Err(PolicyDenied::transform(
            RefusalKind::Encryption,
            "0A000",
            "pgward: a statement on encrypted columns could not be rewritten faithfully, so it is refused".into(),
        ));
    }
    Ok((texts, outcome))
}

fn transform_refusal(r: crate::sql::stage::TransformRefusal) -> PolicyDenied {
    PolicyDenied::transform(r.kind, r.sqlstate, r.message)
}

/// The columns of `table` a policy-bound service sees (none of a table outside its policy).
fn visible_columns(policy: &ServicePolicy, table: &TableInfo) -> Vec<String> {
    policy
        .table(table)
        .map(|tp| tp.visible.clone())
        .unwrap_or_default()
}

/// What a refused statement names, for its audit record: the tables it reads and writes and
/// the columns it names (`*` as every column), parsed again since the refusal cut the
/// analysis short. Nothing is recorded for text that does not parse.
pub fn refused_analysis(sql: &str, catalog: Option<&Catalog>) -> Rewritten {
    let statements: Vec<StatementInfo> = sql::parse_statements(sql)
        .map(|stmts| {
            stmts
                .iter()
                .map(|st| analysis::unrestricted_info(st, catalog))
                .collect()
        })
        .unwrap_or_default();
    Rewritten {
        sql: sql.to_string(),
        statements: statements.into(),
        unrestricted: true,
        params: None,
        client_text: None,
        rewritten_redacted_sha256: None,
    }
}

/// Rewrites without the cache (used by `rewrite` and the CLI tools).
pub fn rewrite_with(
    service: &str,
    policy: &ServicePolicy,
    catalog: &Catalog,
    claims: &serde_json::Map<String, serde_json::Value>,
    sql: &str,
) -> Result<Rewritten, PolicyDenied> {
    rewrite_encrypted(service, policy, catalog, claims, sql, None).map(|(r, _)| r)
}

/// [`rewrite_with`] with field encryption applied to each statement first (one parse serves
/// both). Also returns what encryption did: a result with embedded ciphertext must not be
/// cached.
pub fn rewrite_encrypted(
    service: &str,
    policy: &ServicePolicy,
    catalog: &Catalog,
    claims: &serde_json::Map<String, serde_json::Value>,
    sql: &str,
    encryption: Option<&dyn StatementTransform>,
) -> Result<(Rewritten, TransformOutcome), PolicyDenied> {
    let mut stmts = sql::parse_statements(sql).map_err(|e| {
        PolicyDenied::new(format!("pgward: service {service:?} sent a statement pgward cannot parse, so it is refused (pgward refuses what it cannot read): {}", crate::sql::unsupported::describe_unparsable(sql, &e)), None)
    })?;
    let mut texts = Vec::with_capacity(stmts.len());
    let mut infos = Vec::with_capacity(stmts.len());
    for st in &mut stmts {
        sql::sanitize(st).map_err(|e| {
            PolicyDenied::new(
                format!("pgward: service {service:?} may not send {}", e.0),
                None,
            )
        })?;
    }
    // Named before encryption and the rewriter change the statements; `*` stands for the
    // columns the policy shows.
    let named: Vec<(Vec<String>, crate::sql::CommandClass)> = stmts
        .iter()
        .map(|st| {
            let named = columns::named_columns(st, catalog, |t| visible_columns(policy, t));
            (named, crate::sql::CommandClass::of(st))
        })
        .collect();
    let outcome = match encryption {
        Some(enc) => {
            // Policy before encryption: a column the service may not read must be refused as
            // the policy refuses it, before encryption's checks could say that it exists and
            // is encrypted ("… is not searchable"), and before its transform turns `email =
            // 'x'` into a blind-index column the policy does not hide.
            for st in &stmts {
                rewrite::Rewriter::new(service, policy, catalog, claims)
                    .statement(&mut st.clone())?;
            }
            enc.apply(&mut stmts, Some(catalog), claims)
                .map_err(transform_refusal)?
        }
        None => TransformOutcome::default(),
    };
    for (k, (st, (named, class))) in stmts.iter_mut().zip(named).enumerate() {
        let (text, mut info) =
            rewrite::Rewriter::new(service, policy, catalog, claims).statement(st)?;
        info.columns_read = named;
        info.class = Some(class);
        info.session_name = crate::sql::SessionName::of(st);
        info.encrypted_columns = outcome.accessed.get(k).cloned().unwrap_or_default();
        // COPY FROM verifies its two parts itself (sqlparser has no COPY ... WHERE).
        if info.kind != Some(crate::sql::StatementKind::CopyFrom) && !sql::round_trips(&text) {
            tracing::warn!(
                service,
                "rewritten statement does not round-trip; refused: {text}"
            );
            return Err(PolicyDenied::new(
                format!("pgward: service {service:?} sent a statement pgward cannot rewrite faithfully, so it is refused"),
                None,
            ));
        }
        texts.push(text);
        infos.push(info);
    }
    Ok((
        Rewritten {
            sql: texts.join(";\n"),
            statements: infos.into(),
            unrestricted: false,
            params: outcome.plan.clone(),
            client_text: None,
            rewritten_redacted_sha256: None,
        },
        outcome,
    ))
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_builtins;
