//! Field encryption on the wire: the protocol side of `crypto`.
//!
//! The SQL side (`crypto::sql`, run by the policy engine) turns literals into ciphertext and
//! predicates into blind-index lookups, and hands the relay a [`ParamPlan`] per statement. This
//! module does the rest, per session:
//!
//! * **Bind**: parameter values going into encrypted columns are encoded to their canonical
//!   form, encrypted (or blind-indexed) and sent as binary `bytea`; parameters pgward added
//!   (the blind index of an inserted value) are filled from the client value they derive from.
//! * **Parse**: declared types of those parameters become `bytea`.
//! * **ParameterDescription / RowDescription**: encrypted columns are reported with their
//!   configured client type; blind-index companions (`<col>_bidx`) are removed from results.
//! * **DataRow**: values of encrypted columns are decrypted and re-encoded in the format the
//!   client asked for (text or binary). Encrypted result columns are recognised by the table
//!   OID and attribute number of RowDescription, which PostgreSQL keeps through subqueries and
//!   CTEs (`resorigtbl`/`resorigcol`); the OIDs are looked up on the session's own upstream
//!   connection when it starts, with the columns of views that carry them (`views.rs`).
//!
//! DataRows of an Execute carry no description of their own, so before every Execute whose
//! portal the client did not describe, pgward inserts a `Describe` of that portal and keeps
//! its answer to itself: every DataRow is then decoded with the formats that produced it.
//!
//! A value that fails to decrypt (tampered, moved to another row's column, unknown key) ends
//! the statement with SQLSTATE XX001 and a message naming the column, never the value; the
//! rest of that response, up to ReadyForQuery, is dropped (statements the server already ran
//! in the same batch are not rolled back by this).
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;

mod views;

use super::copy_in::CopyIn;
use crate::config::Config;
use crate::crypto::manager::KeyManager;
use crate::crypto::sql::{ColumnRef, ParamPlan, ParamUse, SqlEncryption};
use crate::crypto::ProviderKind;
use crate::crypto::{decode_to_wire, encode_for_encryption, ClientType, CryptoError, WireFormat};
use crate::error::{sqlstate, ClientError};
use crate::keys::store::{PgKeyStore, WrappedKeyStore};
use crate::net::{ConnReader, ConnWriter};
use crate::protocol::startup::take_cstr;
use crate::protocol::{backend, build, frontend, Batch, FrameReader, Message};
use crate::upstream::UpstreamTarget;

/// SQLSTATE data_corrupted: a stored value failed its integrity check.
pub const DATA_CORRUPTED: &str = "XX001";
/// SQLSTATE system_error: a key could not be obtained.
pub const KEY_UNAVAILABLE: &str = "58000";
/// SQLSTATE invalid_parameter_value: a bound value is not valid for its column's type.
pub const INVALID_PARAMETER: &str = "22023";

const BYTEA_OID: u32 = 17;

/// Field encryption shared by every session of a proxy.
pub struct Encryption {
    pub manager: Arc<KeyManager>,
    /// The SQL transform (shared with the policy engine).
    pub sql: Arc<SqlEncryption>,
    _poller: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryption")
            .field("manager", &self.manager)
            .finish()
    }
}

impl Encryption {
    /// Build the key manager from `[keys]`/`[vault]`/`[[encrypt]]` and warm its caches; `None`
    /// when no column is encrypted. A key that cannot be fetched now is logged; statements
    /// needing it fail closed until the poller gets it.
    pub async fn start(
        config: &Config,
        upstream: &UpstreamTarget,
        passwords: &HashMap<String, Option<String>>,
    ) -> Result<Option<Arc<Self>>, CryptoError> {
        if config.encrypt.is_empty() {
            return Ok(None);
        }
        let crypto = config.crypto();
        let store = match crypto.keys.provider {
            ProviderKind::Transit => Some(key_store(config, upstream, passwords).await?),
            ProviderKind::Local => {
                tracing::warn!("keys.provider = \"local\": a master key file on disk protects every encrypted column; for development and tests only");
                None
            }
            ProviderKind::Kv2 => None,
        };
        let manager = Arc::new(KeyManager::from_config(&crypto, store)?);
        for e in manager.prefetch().await {
            tracing::warn!(error = %e, "could not load a key at start; statements needing it fail until it is available");
        }
        let poller = manager.spawn_poller(crypto.keys.poll_interval);
        Ok(Some(Arc::new(Encryption {
            sql: Arc::new(SqlEncryption::new(manager.clone())),
            manager,
            _poller: poller,
        })))
    }

    /// The catalog query that maps configured columns to (table OID, attnum).
    fn lookup_sql(&self) -> String {
        let mut tuples = Vec::new();
        for spec in self.manager.columns() {
            let (schema, table) = spec
                .table
                .split_once('.')
                .unwrap_or(("public", &spec.table));
            for column in [spec.column.column.clone(), bidx_name(&spec.column.column)] {
                tuples.push(format!(
                    "({}, {}, {})",
                    crate::policy::sql::quote_literal(schema),
                    crate::policy::sql::quote_literal(table),
                    crate::policy::sql::quote_literal(&column)
                ));
            }
        }
        format!(
            "SELECT c.oid::text, a.attnum::text, n.nspname::text || '.' || c.relname::text, a.attname::text \
             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.attnum > 0 AND NOT a.attisdropped \
             AND (n.nspname::text, c.relname::text, a.attname::text) IN (VALUES {})",
            tuples.join(", ")
        )
    }

    /// The views over tables with encrypted columns (see `views.rs`).
    fn dependent_views_sql(&self) -> String {
        let tables: std::collections::BTreeSet<(&str, &str)> = self
            .manager
            .columns()
            .map(|spec| {
                spec.table
                    .split_once('.')
                    .unwrap_or(("public", &spec.table))
            })
            .collect();
        views::dependent_views_sql(tables.into_iter())
    }

    /// Start the encryption state of one session: look up the OIDs of the encrypted columns
    /// over the session's upstream connection (before any client message is relayed).
    pub async fn open_session(
        self: &Arc<Self>,
        reader: &mut FrameReader<ConnReader>,
        writer: &mut ConnWriter,
    ) -> Result<(ClientHalf, UpstreamHalf), ClientError> {
        let failed = |what: &str| {
            tracing::warn!(what, "encrypted-column lookup failed");
            ClientError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "pgward: could not look up the encrypted columns upstream",
            )
        };
        // Two result sets: the encrypted columns, then the views that depend on their tables.
        let lookup = format!("{}; {}", self.lookup_sql(), self.dependent_views_sql());
        writer
            .write_all(&build::query(&lookup))
            .await
            .map_err(|_| failed("write"))?;
        writer.flush().await.map_err(|_| failed("flush"))?;
        let mut columns = HashMap::new();
        let mut views = Vec::new();
        let mut result_set = 0;
        let mut completed = 0;
        'read: loop {
            let batch = match reader.next_batch().await {
                Ok(Some(batch)) => batch,
                _ => return Err(failed("read")),
            };
            for message in batch.messages() {
                match message.tag() {
                    ROW_DESCRIPTION => result_set += 1,
                    backend::DATA_ROW if result_set == 2 => {
                        let row = parse_data_row(message.body()).ok_or_else(|| failed("row"))?;
                        let text =
                            |i: usize| row.get(i).copied().flatten().map(String::from_utf8_lossy);
                        let (Some(oid), Some(definition)) = (text(0), text(1)) else {
                            return Err(failed("view fields"));
                        };
                        let oid = oid.parse::<u32>().map_err(|_| failed("view oid"))?;
                        views.push((oid, definition.into_owned()));
                    }
                    backend::DATA_ROW => {
                        let row = parse_data_row(message.body()).ok_or_else(|| failed("row"))?;
                        let text = |i: usize| -> Option<String> {
                            row.get(i)
                                .copied()
                                .flatten()
                                .map(|b| String::from_utf8_lossy(b).into_owned())
                        };
                        let (Some(oid), Some(attnum), Some(table), Some(column)) =
                            (text(0), text(1), text(2), text(3))
                        else {
                            return Err(failed("row fields"));
                        };
                        let (Ok(oid), Ok(attnum)) = (oid.parse::<u32>(), attnum.parse::<i16>())
                        else {
                            return Err(failed("row numbers"));
                        };
                        if let Some(role) = self.role_of(&table, &column) {
                            columns.insert((oid, attnum), role);
                        }
                    }
                    backend::COMMAND_COMPLETE => completed += 1,
                    // Without the views the session still works as before (reads through
                    // them return ciphertext); without the columns it cannot.
                    backend::ERROR_RESPONSE if completed >= 1 => {
                        tracing::warn!("could not list the views over encrypted tables; reads through them return ciphertext");
                    }
                    backend::ERROR_RESPONSE => return Err(failed("error")),
                    backend::READY_FOR_QUERY => break 'read,
                    _ => {}
                }
            }
        }
        views::map_view_columns(reader, writer, &views, &mut columns)
            .await
            .map_err(failed)?;
        tracing::debug!(
            columns = columns.len(),
            views = views.len(),
            "encrypted columns located upstream"
        );
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        Ok((
            ClientHalf {
                encryption: self.clone(),
                queue: queue.clone(),
                statements: HashMap::new(),
                described_portals: HashSet::new(),
                next_plan: None,
                portals: HashMap::new(),
                copy_in: None,
            },
            UpstreamHalf {
                encryption: self.clone(),
                queue,
                columns,
                statements: HashMap::new(),
                current: None,
                failed: false,
            },
        ))
    }

    fn role_of(&self, table: &str, column: &str) -> Option<FieldRole> {
        if let Ok(spec) = self.manager.column(table, column) {
            return Some(FieldRole::Encrypted(ColumnRef {
                table: spec.table.clone(),
                column: spec.column.column.clone(),
                ty: spec.column.ty,
            }));
        }
        let base = column.strip_suffix("_bidx")?;
        self.manager
            .column(table, base)
            .ok()
            .filter(|s| s.column.searchable)
            .map(|_| FieldRole::BlindIndex)
    }
}

/// The transit provider keeps wrapped DEKs in `pgward.data_keys` of the policy database,
/// reached with the catalog service's login (`[policy]`).
async fn key_store(
    config: &Config,
    upstream: &UpstreamTarget,
    passwords: &HashMap<String, Option<String>>,
) -> Result<Arc<dyn WrappedKeyStore>, CryptoError> {
    let (Some(policy), Some((name, service))) = (&config.policy, config.catalog_service()) else {
        return Err(CryptoError::Config(
            "the transit provider keeps wrapped data keys in the policy database: configure [policy] (or use provider = \"kv2\")".into(),
        ));
    };
    let password = passwords.get(name).cloned().flatten();
    let client = upstream
        .admin_client(
            &service.upstream_user,
            password.as_deref(),
            &policy.database,
        )
        .await
        .map_err(|e| CryptoError::Config(format!("connecting to the wrapped-key store: {e}")))?;
    let exists = client
        .query_one("SELECT to_regclass('pgward.data_keys') IS NOT NULL", &[])
        .await
        .and_then(|row| row.try_get::<_, bool>(0))
        .unwrap_or(false);
    let store = PgKeyStore::new(Arc::new(client));
    if !exists {
        if let Err(e) = store.migrate().await {
            tracing::warn!(error = %e, "could not create pgward.data_keys (apply migrations/0100_pgward_keys.sql)");
        }
    }
    Ok(Arc::new(store))
}

/// The companion blind-index column of a searchable column.
pub fn bidx_name(column: &str) -> String {
    format!("{column}_bidx")
}

/// What an upstream column is to pgward.
#[derive(Clone, Debug)]
enum FieldRole {
    Encrypted(ColumnRef),
    BlindIndex,
}

/// A client message the relay forwarded and whose response it must recognise.
#[derive(Debug)]
enum Expect {
    /// Simple query or function call: responses until ReadyForQuery.
    Query,
    Parse {
        name: String,
        plan: Option<Arc<ParamPlan>>,
    },
    Bind,
    DescribeStatement {
        name: String,
    },
    /// `hidden`: inserted by pgward before an Execute; its answer is not forwarded.
    DescribePortal {
        hidden: bool,
    },
    Execute,
    Close,
    Sync,
}

/// The client → upstream half of a session's encryption state.
pub struct ClientHalf {
    encryption: Arc<Encryption>,
    queue: Arc<Mutex<VecDeque<Expect>>>,
    /// Parameter plans of the session's prepared statements, in client order.
    statements: HashMap<String, Option<Arc<ParamPlan>>>,
    /// Portals the client described since their last Bind or Execute.
    described_portals: HashSet<String>,
    /// The plan of the next Parse or Query (set by the SQL rewrite of that message).
    next_plan: Option<Arc<ParamPlan>>,
    /// Portal → statement, to find the COPY plan of an Execute.
    portals: HashMap<String, String>,
    /// A COPY FROM STDIN into encrypted columns is running.
    copy_in: Option<CopyState>,
}

/// A running COPY FROM STDIN: its row encryptor, or failed (the rest of the data is dropped).
enum CopyState {
    Running(Box<CopyIn>),
    Failed,
}

impl ClientHalf {
    /// The SQL rewrite of the Parse about to be forwarded produced this parameter plan.
    pub fn set_next_plan(&mut self, plan: Option<Arc<ParamPlan>>) {
        self.next_plan = plan.filter(|p| p.is_active());
    }

    /// Record one message on its way upstream; returns the bytes to send instead, if any.
    pub async fn outgoing(&mut self, message: &Message) -> Result<Option<Bytes>, ClientError> {
        let body = message.body();
        match message.tag() {
            frontend::QUERY => {
                let plan = self.next_plan.take();
                self.copy_in = copy_state(plan.as_deref());
                self.push(Expect::Query);
            }
            frontend::FUNCTION_CALL => self.push(Expect::Query),
            frontend::COPY_DATA => return self.copy_data(message.body()).await,
            frontend::COPY_DONE => return Ok(self.copy_done(message).await),
            frontend::COPY_FAIL => self.copy_in = None,
            frontend::PARSE => return self.parse(body),
            frontend::BIND => return self.bind(body).await,
            frontend::DESCRIBE => {
                let (kind, name) = describe_target(body).ok_or_else(malformed)?;
                if kind == b'S' {
                    self.push(Expect::DescribeStatement { name });
                } else {
                    self.described_portals.insert(name);
                    self.push(Expect::DescribePortal { hidden: false });
                }
            }
            frontend::EXECUTE => {
                let (portal, _) = take_cstr(body).ok_or_else(malformed)?;
                let portal = String::from_utf8_lossy(portal).into_owned();
                let plan = self
                    .portals
                    .get(&portal)
                    .and_then(|s| self.statements.get(s))
                    .cloned()
                    .flatten();
                self.copy_in = copy_state(plan.as_deref());
                // Each Execute needs a description right before it: a portal described once
                // and executed in several row-limited steps gets one per step.
                if self.described_portals.remove(&portal) {
                    self.push(Expect::Execute);
                } else {
                    self.push(Expect::DescribePortal { hidden: true });
                    self.push(Expect::Execute);
                    let mut out = BytesMut::new();
                    out.extend_from_slice(&build::describe(b'P', &portal));
                    out.extend_from_slice(message.raw());
                    return Ok(Some(out.freeze()));
                }
            }
            frontend::CLOSE => {
                if let Some((b'S', name)) = describe_target(body) {
                    self.statements.remove(&name);
                }
                self.push(Expect::Close);
            }
            frontend::SYNC => self.push(Expect::Sync),
            _ => {}
        }
        Ok(None)
    }

    /// CopyData of a COPY into encrypted columns: complete rows encrypted, the rest kept.
    async fn copy_data(&mut self, payload: &[u8]) -> Result<Option<Bytes>, ClientError> {
        let manager = self.encryption.manager.clone();
        match &mut self.copy_in {
            None => Ok(None),
            Some(CopyState::Failed) => Ok(Some(Bytes::new())),
            Some(CopyState::Running(copy)) => match copy.data(&manager, payload).await {
                Ok(rows) if rows.is_empty() => Ok(Some(Bytes::new())),
                Ok(rows) => Ok(Some(copy_data_message(&rows))),
                Err(e) => {
                    self.copy_in = Some(CopyState::Failed);
                    Ok(Some(copy_fail_message(&e.0)))
                }
            },
        }
    }

    /// CopyDone: the last row (without newline) first.
    async fn copy_done(&mut self, message: &Message) -> Option<Bytes> {
        let manager = self.encryption.manager.clone();
        match self.copy_in.take() {
            Some(CopyState::Running(mut copy)) => match copy.finish(&manager).await {
                Ok(rows) if rows.is_empty() => None,
                Ok(rows) => {
                    let mut out = BytesMut::from(&copy_data_message(&rows)[..]);
                    out.extend_from_slice(message.raw());
                    Some(out.freeze())
                }
                Err(e) => Some(copy_fail_message(&e.0)),
            },
            // The server already left COPY (CopyFail sent): nothing more to say.
            Some(CopyState::Failed) => Some(Bytes::new()),
            None => None,
        }
    }

    fn push(&self, expect: Expect) {
        self.queue.lock().push_back(expect);
    }

    /// Responses still awaited from upstream (bounded by the relay: see `MAX_AWAITED`).
    pub fn awaited(&self) -> usize {
        self.queue.lock().len()
    }

    /// Parse: remember the statement's plan; declare encrypted parameters as `bytea`.
    fn parse(&mut self, body: &[u8]) -> Result<Option<Bytes>, ClientError> {
        let plan = self.next_plan.take();
        let (name, rest) = take_cstr(body).ok_or_else(malformed)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let replacement = match &plan {
            Some(p) => Some(retype_parse(rest, name.as_str(), p)?),
            None => None,
        };
        self.statements.insert(name.clone(), plan.clone());
        self.push(Expect::Parse { name, plan });
        Ok(replacement)
    }

    /// Bind: encrypt the values of encrypted parameters, add derived ones.
    async fn bind(&mut self, body: &[u8]) -> Result<Option<Bytes>, ClientError> {
        let bind = ParsedBind::parse(body).ok_or_else(malformed)?;
        self.described_portals.remove(&bind.portal);
        self.portals
            .insert(bind.portal.clone(), bind.statement.clone());
        self.push(Expect::Bind);
        let Some(Some(plan)) = self.statements.get(&bind.statement).cloned() else {
            return Ok(None);
        };
        if bind.values.len() != plan.client_count {
            // The server reports the count mismatch itself.
            return Ok(None);
        }
        let manager = &self.encryption.manager;
        let mut formats = Vec::with_capacity(plan.params.len());
        let mut values: Vec<Option<Vec<u8>>> = Vec::with_capacity(plan.params.len());
        for (source, usage) in &plan.params {
            let value = bind.values.get(*source).copied().flatten();
            let format = bind.format_of(*source);
            match (usage, value) {
                (ParamUse::Plain, v) => {
                    formats.push(format);
                    values.push(v.map(<[u8]>::to_vec));
                }
                (_, None) => {
                    formats.push(1);
                    values.push(None);
                }
                (ParamUse::Encrypt(c), Some(v)) => {
                    let canonical = canonical_param(c, format, v, *source)?;
                    let sealed = manager
                        .encrypt(&c.table, &c.column, &canonical)
                        .await
                        .map_err(|e| crypto_error(&e, c))?;
                    formats.push(1);
                    values.push(Some(sealed));
                }
                (ParamUse::BlindIndex(c), Some(v)) => {
                    let canonical = canonical_param(c, format, v, *source)?;
                    let index = manager
                        .blind_index(&c.table, &c.column, &canonical)
                        .await
                        .map_err(|e| crypto_error(&e, c))?;
                    formats.push(1);
                    values.push(Some(index.to_vec()));
                }
            }
        }
        Ok(Some(bind.rebuild(&formats, &values)))
    }
}

fn copy_state(plan: Option<&ParamPlan>) -> Option<CopyState> {
    plan.and_then(|p| p.copy.clone())
        .map(|c| CopyState::Running(Box::new(CopyIn::new(c))))
}

fn copy_data_message(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 5);
    out.put_u8(frontend::COPY_DATA);
    out.put_u32(0);
    out.extend_from_slice(payload);
    finish(out)
}

fn copy_fail_message(reason: &str) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(frontend::COPY_FAIL);
    out.put_u32(0);
    out.extend_from_slice(reason.replace('\0', "").as_bytes());
    out.put_u8(0);
    finish(out)
}

fn malformed() -> ClientError {
    ClientError::error(sqlstate::PROTOCOL_VIOLATION, "pgward: malformed message")
}

fn canonical_param(
    c: &ColumnRef,
    format: i16,
    value: &[u8],
    index: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ClientError> {
    let format = WireFormat::from_code(format);
    let widened = widen_binary_integer(c.ty, format, value);
    encode_for_encryption(c.ty, format, widened.as_deref().unwrap_or(value))
        .map(zeroize::Zeroizing::new)
        .map_err(|e| {
            ClientError::error(
                INVALID_PARAMETER,
                format!(
                    "pgward: parameter ${} for encrypted column {}.{}: {e}",
                    index + 1,
                    c.table,
                    c.column
                ),
            )
        })
}

/// Drivers bind integers in binary at the width of the value's declared type (psycopg sends
/// `-42` as int2): an int2/int4/int8 value for an int4/int8 column is re-encoded at the
/// column's width (the codec then checks it), since the column's type is what the server
/// was told. Out-of-range values are left alone for the codec to refuse.
fn widen_binary_integer(ty: ClientType, format: WireFormat, value: &[u8]) -> Option<Vec<u8>> {
    if format != WireFormat::Binary {
        return None;
    }
    let n: i64 = match value.len() {
        2 => i64::from(i16::from_be_bytes([value[0], value[1]])),
        4 => i64::from(i32::from_be_bytes([value[0], value[1], value[2], value[3]])),
        8 => i64::from_be_bytes(value.try_into().ok()?),
        _ => return None,
    };
    match ty {
        ClientType::Int4 if value.len() != 4 => {
            i32::try_from(n).ok().map(|v| v.to_be_bytes().to_vec())
        }
        ClientType::Int8 if value.len() != 8 => Some(n.to_be_bytes().to_vec()),
        _ => None,
    }
}

/// The client-facing error for a crypto failure on `c` (never carries a value).
fn crypto_error(e: &CryptoError, c: &ColumnRef) -> ClientError {
    match e {
        CryptoError::Integrity { .. } | CryptoError::Malformed(_) | CryptoError::WrongKey { .. } => {
            ClientError::error(
                DATA_CORRUPTED,
                format!(
                    "pgward: a value of encrypted column {}.{} failed its integrity check (tampered, copied from another row or column, or under an unknown key)",
                    c.table, c.column
                ),
            )
        }
        CryptoError::Codec(codec) => ClientError::error(
            DATA_CORRUPTED,
            format!(
                "pgward: a decrypted value of {}.{} is not a valid {}: {codec}",
                c.table, c.column, c.ty
            ),
        ),
        other => {
            tracing::warn!(table = %c.table, column = %c.column, error = %other, "encryption key unavailable");
            ClientError::error(
                KEY_UNAVAILABLE,
                format!(
                    "pgward: the key of encrypted column {}.{} is not available: {other}",
                    c.table, c.column
                ),
            )
        }
    }
}

/// The upstream → client half of a session's encryption state.
pub struct UpstreamHalf {
    encryption: Arc<Encryption>,
    queue: Arc<Mutex<VecDeque<Expect>>>,
    /// (table OID, attnum) of encrypted and blind-index columns.
    columns: HashMap<(u32, i16), FieldRole>,
    /// Parameter plans of prepared statements, in server order (for ParameterDescription).
    statements: HashMap<String, Option<Arc<ParamPlan>>>,
    /// How DataRows of the running query or portal are decoded (`None`: unchanged).
    current: Option<Arc<RowPlan>>,
    /// A value failed to decrypt: drop the rest of the response up to ReadyForQuery.
    failed: bool,
}

/// How one result column is transformed.
#[derive(Clone, Debug)]
enum FieldAction {
    Keep,
    Drop,
    Decrypt(ColumnRef, WireFormat),
}

/// How the rows of one row description are transformed.
#[derive(Debug)]
struct RowPlan {
    fields: Vec<FieldAction>,
}

impl RowPlan {
    /// How many columns the client sees (blind-index columns are dropped), as the u16 count
    /// of RowDescription and DataRow.
    fn visible_count(&self) -> u16 {
        let kept = self
            .fields
            .iter()
            .filter(|a| !matches!(a, FieldAction::Drop))
            .count();
        u16::try_from(kept).unwrap_or(u16::MAX)
    }
}

impl UpstreamHalf {
    /// Transform one upstream batch; returns a batch to forward (the same one if untouched).
    pub async fn incoming(&mut self, batch: Batch) -> Batch {
        let mut out: Option<BytesMut> = None;
        let all = batch.bytes().clone();
        let mut offset = 0;
        for message in batch.messages() {
            let len = message.raw().len();
            let replacement = self.message(&message).await;
            match replacement {
                None => {
                    if let Some(out) = out.as_mut() {
                        out.extend_from_slice(message.raw());
                    }
                }
                Some(bytes) => {
                    let out = out.get_or_insert_with(|| {
                        let mut b = BytesMut::with_capacity(all.len());
                        b.extend_from_slice(&all[..offset]);
                        b
                    });
                    out.extend_from_slice(&bytes);
                }
            }
            offset += len;
        }
        match out {
            None => batch,
            Some(bytes) => Batch::from_whole_messages(bytes.freeze()),
        }
    }

    /// `None`: forward unchanged; `Some(bytes)`: forward these instead (possibly nothing).
    async fn message(&mut self, message: &Message) -> Option<Bytes> {
        let tag = message.tag();
        if matches!(
            tag,
            backend::PARAMETER_STATUS | backend::NOTICE_RESPONSE | NOTIFICATION_RESPONSE
        ) {
            return None;
        }
        let already_failed = self.failed;
        let replacement = self.track(message).await;
        if tag == backend::READY_FOR_QUERY {
            self.failed = false;
            self.current = None;
            return replacement;
        }
        if already_failed {
            return Some(Bytes::new());
        }
        replacement
    }

    fn pop(&self) -> Option<Expect> {
        self.queue.lock().pop_front()
    }

    fn front_is_query(&self) -> bool {
        matches!(self.queue.lock().front(), Some(Expect::Query))
    }

    /// Update the state for one response and transform it if needed.
    async fn track(&mut self, message: &Message) -> Option<Bytes> {
        let body = message.body();
        match message.tag() {
            PARSE_COMPLETE => {
                if let Some(Expect::Parse { name, plan }) = self.pop() {
                    self.statements.insert(name, plan);
                }
                None
            }
            BIND_COMPLETE | CLOSE_COMPLETE => {
                self.pop();
                None
            }
            PARAMETER_DESCRIPTION => {
                let plan = match self.queue.lock().front() {
                    Some(Expect::DescribeStatement { name }) => {
                        self.statements.get(name).cloned().flatten()
                    }
                    _ => None,
                };
                plan.and_then(|p| retype_parameter_description(body, &p))
            }
            ROW_DESCRIPTION => self.row_description(body),
            NO_DATA => {
                let hidden = matches!(self.pop(), Some(Expect::DescribePortal { hidden: true }));
                self.current = None;
                hidden.then(Bytes::new)
            }
            backend::DATA_ROW => {
                let plan = self.current.clone()?;
                match self.data_row(body, &plan).await {
                    Ok(bytes) => Some(bytes),
                    Err(error) => {
                        self.failed = true;
                        Some(error.to_message())
                    }
                }
            }
            backend::COMMAND_COMPLETE | EMPTY_QUERY_RESPONSE | PORTAL_SUSPENDED => {
                self.current = None;
                if !self.front_is_query() {
                    self.pop();
                }
                None
            }
            backend::ERROR_RESPONSE => {
                self.current = None;
                None
            }
            backend::READY_FOR_QUERY => {
                // Everything up to the request this answers is done (or skipped after an error).
                let mut queue = self.queue.lock();
                while let Some(e) = queue.pop_front() {
                    if matches!(e, Expect::Sync | Expect::Query) {
                        break;
                    }
                }
                None
            }
            _ => None,
        }
    }

    fn row_description(&mut self, body: &[u8]) -> Option<Bytes> {
        let fields = parse_row_description(body)?;
        let plan = self.plan_for(&fields);
        let rewritten = plan.as_ref().map(|p| rewrite_row_description(&fields, p));
        let front = self.queue.lock().front().map(|e| match e {
            Expect::DescribeStatement { .. } => 0,
            Expect::DescribePortal { hidden: false } => 1,
            Expect::DescribePortal { hidden: true } => 2,
            _ => 3,
        });
        match front {
            Some(0) => {
                self.pop();
                rewritten
            }
            Some(1) => {
                self.pop();
                self.current = plan.map(Arc::new);
                rewritten
            }
            Some(2) => {
                self.pop();
                self.current = plan.map(Arc::new);
                Some(Bytes::new())
            }
            _ => {
                // A simple query's (or FETCH's) own description.
                self.current = plan.map(Arc::new);
                rewritten
            }
        }
    }

    /// `None` when no field is encrypted or a blind index.
    fn plan_for(&self, fields: &[RowField<'_>]) -> Option<RowPlan> {
        let mut any = false;
        let actions = fields
            .iter()
            .map(|f| match self.columns.get(&(f.table_oid, f.attnum)) {
                _ if f.table_oid == 0 => FieldAction::Keep,
                Some(FieldRole::Encrypted(c)) => {
                    any = true;
                    FieldAction::Decrypt(c.clone(), WireFormat::from_code(f.format))
                }
                Some(FieldRole::BlindIndex) => {
                    any = true;
                    FieldAction::Drop
                }
                None => FieldAction::Keep,
            })
            .collect();
        any.then_some(RowPlan { fields: actions })
    }

    async fn data_row(&self, body: &[u8], plan: &RowPlan) -> Result<Bytes, ClientError> {
        let values = parse_data_row(body).ok_or_else(malformed)?;
        if values.len() != plan.fields.len() {
            return Err(ClientError::error(
                sqlstate::INTERNAL_ERROR,
                "pgward: a result row does not match its description",
            ));
        }
        let mut out = BytesMut::with_capacity(body.len() + 5);
        out.put_u8(backend::DATA_ROW);
        out.put_u32(0);
        out.put_u16(plan.visible_count());
        for (value, action) in values.iter().zip(&plan.fields) {
            match (action, value) {
                (FieldAction::Drop, _) => {}
                (_, None) => out.put_i32(-1),
                (FieldAction::Keep, Some(v)) => put_value(&mut out, v),
                (FieldAction::Decrypt(c, format), Some(stored)) => {
                    let plain = self.decrypt_field(c, *format, stored).await?;
                    put_value(&mut out, &plain);
                }
            }
        }
        let len = u32::try_from(out.len() - 1).map_err(|_| too_large())?;
        out[1..5].copy_from_slice(&len.to_be_bytes());
        Ok(out.freeze())
    }

    async fn decrypt_field(
        &self,
        c: &ColumnRef,
        format: WireFormat,
        stored: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let ciphertext: std::borrow::Cow<'_, [u8]> = match format {
            WireFormat::Binary => stored.into(),
            // bytea in text output: `\x` then hex.
            WireFormat::Text => stored
                .strip_prefix(b"\\x")
                .and_then(|h| hex::decode(h).ok())
                .ok_or_else(|| crypto_error(&CryptoError::Malformed("not bytea hex"), c))?
                .into(),
        };
        let manager = &self.encryption.manager;
        let canonical = match manager.try_decrypt_now(&c.table, &c.column, &ciphertext) {
            Some(result) => result,
            None => manager.decrypt(&c.table, &c.column, &ciphertext).await,
        }
        .map(zeroize::Zeroizing::new)
        .map_err(|e| crypto_error(&e, c))?;
        decode_to_wire(c.ty, format, &canonical)
            .map_err(|e| crypto_error(&CryptoError::Codec(e), c))
    }
}

fn too_large() -> ClientError {
    ClientError::error(
        sqlstate::INTERNAL_ERROR,
        "pgward: a decrypted row is too large",
    )
}

fn put_value(out: &mut BytesMut, v: &[u8]) {
    // Values come from messages bounded far below 2 GiB.
    out.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
    out.extend_from_slice(v);
}

// Backend tags this module needs beyond `protocol::backend`.
const ROW_DESCRIPTION: u8 = b'T';
const PARSE_COMPLETE: u8 = b'1';
const BIND_COMPLETE: u8 = b'2';
const CLOSE_COMPLETE: u8 = b'3';
const NO_DATA: u8 = b'n';
const PARAMETER_DESCRIPTION: u8 = b't';
const EMPTY_QUERY_RESPONSE: u8 = b'I';
const PORTAL_SUSPENDED: u8 = b's';
const NOTIFICATION_RESPONSE: u8 = b'A';

/// The fields of one RowDescription column.
#[derive(Debug)]
struct RowField<'a> {
    name: &'a [u8],
    table_oid: u32,
    attnum: i16,
    type_oid: u32,
    typlen: i16,
    typmod: i32,
    format: i16,
}

/// A cursor over a message body; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self) -> Option<&'a [u8]> {
        let (s, rest) = take_cstr(self.0)?;
        self.0 = rest;
        Some(s)
    }
    /// A length-prefixed value (-1 = NULL).
    fn value(&mut self) -> Option<Option<&'a [u8]>> {
        let len = self.i32()?;
        if len < 0 {
            return Some(None);
        }
        self.take(usize::try_from(len).ok()?).map(Some)
    }
}

fn parse_row_description(body: &[u8]) -> Option<Vec<RowField<'_>>> {
    let mut r = Reader(body);
    let n = r.u16()?;
    (0..n)
        .map(|_| {
            Some(RowField {
                name: r.cstr()?,
                table_oid: r.u32()?,
                attnum: r.i16()?,
                type_oid: r.u32()?,
                typlen: r.i16()?,
                typmod: r.i32()?,
                format: r.i16()?,
            })
        })
        .collect()
}

fn parse_data_row(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut r = Reader(body);
    let n = r.u16()?;
    (0..n).map(|_| r.value()).collect()
}

/// Storage size PostgreSQL reports for a client type (`typlen`).
fn typlen(ty: ClientType) -> i16 {
    match ty {
        ClientType::Int4 | ClientType::Date => 4,
        ClientType::Int8 | ClientType::Timestamptz => 8,
        ClientType::Bool => 1,
        _ => -1,
    }
}

fn rewrite_row_description(fields: &[RowField<'_>], plan: &RowPlan) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(ROW_DESCRIPTION);
    out.put_u32(0);
    out.put_u16(plan.visible_count());
    for (f, action) in fields.iter().zip(&plan.fields) {
        let (type_oid, len, typmod) = match action {
            FieldAction::Drop => continue,
            FieldAction::Keep => (f.type_oid, f.typlen, f.typmod),
            FieldAction::Decrypt(c, _) => (c.ty.oid(), typlen(c.ty), -1),
        };
        out.extend_from_slice(f.name);
        out.put_u8(0);
        out.put_u32(f.table_oid);
        out.put_i16(f.attnum);
        out.put_u32(type_oid);
        out.put_i16(len);
        out.put_i32(typmod);
        out.put_i16(f.format);
    }
    finish(out)
}

fn finish(mut out: BytesMut) -> Bytes {
    let len = u32::try_from(out.len() - 1).unwrap_or(u32::MAX);
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// ParameterDescription as the client should see it: its own parameters, with the client
/// types of encrypted ones.
fn retype_parameter_description(body: &[u8], plan: &ParamPlan) -> Option<Bytes> {
    let mut r = Reader(body);
    let n = r.u16()?;
    let oids: Vec<u32> = (0..n).map(|_| r.u32()).collect::<Option<_>>()?;
    let mut out = BytesMut::new();
    out.put_u8(PARAMETER_DESCRIPTION);
    out.put_u32(0);
    let count = plan.client_count.min(oids.len());
    out.put_u16(u16::try_from(count).ok()?);
    for (i, oid) in oids.iter().take(count).enumerate() {
        out.put_u32(plan.client_type_oid(i).unwrap_or(*oid));
    }
    Some(finish(out))
}

/// Parse with encrypted parameters declared `bytea` (the SQL casts them too).
fn retype_parse(rest: &[u8], name: &str, plan: &ParamPlan) -> Result<Bytes, ClientError> {
    let mut r = Reader(rest);
    let query = r.cstr().ok_or_else(malformed)?;
    let n = r.u16().ok_or_else(malformed)?;
    let declared: Vec<u32> = (0..n)
        .map(|_| r.u32())
        .collect::<Option<_>>()
        .ok_or_else(malformed)?;
    if declared.len() > plan.client_count && plan.params.len() > plan.client_count {
        // pgward numbers the blind-index parameters it adds after the client's highest $n.
        return Err(ClientError::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "pgward: declare no more parameter types than the statement uses when writing searchable encrypted columns",
        ));
    }
    let mut out = BytesMut::new();
    out.put_u8(frontend::PARSE);
    out.put_u32(0);
    out.extend_from_slice(name.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(query);
    out.put_u8(0);
    let count = declared.len().max(plan.params.len());
    out.put_u16(u16::try_from(count).map_err(|_| malformed())?);
    for i in 0..count {
        let oid = match plan.params.get(i) {
            Some((_, ParamUse::Encrypt(_) | ParamUse::BlindIndex(_))) => BYTEA_OID,
            _ => declared.get(i).copied().unwrap_or(0),
        };
        out.put_u32(oid);
    }
    Ok(finish(out))
}

/// (`S`|`P`, name) of a Describe or Close.
fn describe_target(body: &[u8]) -> Option<(u8, String)> {
    let (&kind, rest) = body.split_first()?;
    let (name, _) = take_cstr(rest)?;
    Some((kind, String::from_utf8_lossy(name).into_owned()))
}

/// A Bind message's fields.
struct ParsedBind<'a> {
    portal: String,
    statement: String,
    portal_raw: &'a [u8],
    statement_raw: &'a [u8],
    formats: Vec<i16>,
    values: Vec<Option<&'a [u8]>>,
    /// Result-format section, copied as is.
    results: &'a [u8],
}

impl<'a> ParsedBind<'a> {
    fn parse(body: &'a [u8]) -> Option<Self> {
        let mut r = Reader(body);
        let portal_raw = r.cstr()?;
        let statement_raw = r.cstr()?;
        let nf = r.u16()?;
        let formats = (0..nf).map(|_| r.i16()).collect::<Option<Vec<_>>>()?;
        let nv = r.u16()?;
        let values = (0..nv).map(|_| r.value()).collect::<Option<Vec<_>>>()?;
        Some(ParsedBind {
            portal: String::from_utf8_lossy(portal_raw).into_owned(),
            statement: String::from_utf8_lossy(statement_raw).into_owned(),
            portal_raw,
            statement_raw,
            formats,
            values,
            results: r.0,
        })
    }

    /// The format code of client parameter `i` (none = all text, one = all alike).
    fn format_of(&self, i: usize) -> i16 {
        match self.formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(0),
        }
    }

    fn rebuild(&self, formats: &[i16], values: &[Option<Vec<u8>>]) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u8(frontend::BIND);
        out.put_u32(0);
        out.extend_from_slice(self.portal_raw);
        out.put_u8(0);
        out.extend_from_slice(self.statement_raw);
        out.put_u8(0);
        out.put_u16(u16::try_from(formats.len()).unwrap_or(u16::MAX));
        for f in formats {
            out.put_i16(*f);
        }
        out.put_u16(u16::try_from(values.len()).unwrap_or(u16::MAX));
        for v in values {
            match v {
                None => out.put_i32(-1),
                Some(v) => put_value(&mut out, v),
            }
        }
        out.extend_from_slice(self.results);
        finish(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_description(fields: &[(&str, u32, i16, u32, i16)]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u16(fields.len() as u16);
        for (name, oid, attnum, ty, format) in fields {
            out.extend_from_slice(name.as_bytes());
            out.put_u8(0);
            out.put_u32(*oid);
            out.put_i16(*attnum);
            out.put_u32(*ty);
            out.put_i16(-1);
            out.put_i32(-1);
            out.put_i16(*format);
        }
        out.to_vec()
    }

    #[test]
    fn row_description_is_retyped_and_blind_indexes_dropped() {
        let body = row_description(&[
            ("id", 10, 1, 20, 0),
            ("email", 10, 2, 17, 1),
            ("email_bidx", 10, 3, 17, 0),
        ]);
        let fields = parse_row_description(&body).unwrap();
        let plan = RowPlan {
            fields: vec![
                FieldAction::Keep,
                FieldAction::Decrypt(
                    ColumnRef {
                        table: "public.t".into(),
                        column: "email".into(),
                        ty: ClientType::Int8,
                    },
                    WireFormat::Binary,
                ),
                FieldAction::Drop,
            ],
        };
        let out = rewrite_row_description(&fields, &plan);
        let msg = Message::from_raw(out).unwrap();
        let back = parse_row_description(msg.body()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].name, b"email");
        assert_eq!(
            (back[1].type_oid, back[1].typlen, back[1].format),
            (20, 8, 1)
        );
        assert_eq!(back[0].type_oid, 20);
    }

    #[test]
    fn binary_integers_are_widened_to_the_column_width() {
        let w = |ty, v: &[u8]| widen_binary_integer(ty, WireFormat::Binary, v);
        assert_eq!(
            w(ClientType::Int4, &(-42i16).to_be_bytes()),
            Some((-42i32).to_be_bytes().to_vec())
        );
        assert_eq!(
            w(ClientType::Int8, &7i32.to_be_bytes()),
            Some(7i64.to_be_bytes().to_vec())
        );
        assert_eq!(w(ClientType::Int4, &(1i64 << 40).to_be_bytes()), None);
        assert_eq!(w(ClientType::Int4, &5i32.to_be_bytes()), None);
        assert_eq!(w(ClientType::Text, &5i16.to_be_bytes()), None);
        assert_eq!(
            widen_binary_integer(ClientType::Int4, WireFormat::Text, b"12"),
            None
        );
    }

    #[test]
    fn malformed_bodies_are_rejected_not_panicking() {
        assert!(parse_row_description(&[0, 1, b'a']).is_none());
        assert!(parse_data_row(&[0, 1, 0, 0, 0, 9, 1]).is_none());
        assert!(ParsedBind::parse(b"p\0s\0\0\x01").is_none());
        assert_eq!(
            parse_data_row(&[0, 2, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 7]).unwrap(),
            vec![None, Some(&[7u8][..])]
        );
    }

    #[test]
    fn bind_rebuild_adds_derived_parameters() {
        let mut body = BytesMut::new();
        body.extend_from_slice(b"\0s1\0");
        body.put_u16(1);
        body.put_i16(0);
        body.put_u16(2);
        put_value(&mut body, b"a@b");
        body.put_i32(-1);
        body.put_u16(1);
        body.put_i16(1);
        let bind = ParsedBind::parse(&body).unwrap();
        assert_eq!(bind.statement, "s1");
        assert_eq!(bind.format_of(1), 0);
        let out = bind.rebuild(&[1, 0, 1], &[Some(vec![9]), None, Some(vec![8, 8])]);
        let msg = Message::from_raw(out).unwrap();
        let again = ParsedBind::parse(msg.body()).unwrap();
        assert_eq!(again.formats, vec![1, 0, 1]);
        assert_eq!(
            again.values,
            vec![Some(&[9u8][..]), None, Some(&[8u8, 8][..])]
        );
        assert_eq!(again.results, &[0, 1, 0, 1]);
    }

    #[test]
    fn parameter_description_shows_client_types_and_hides_added_parameters() {
        let plan = ParamPlan {
            copy: None,
            client_count: 2,
            params: vec![
                (
                    0,
                    ParamUse::Encrypt(ColumnRef {
                        table: "public.t".into(),
                        column: "c".into(),
                        ty: ClientType::Date,
                    }),
                ),
                (1, ParamUse::Plain),
                (
                    0,
                    ParamUse::BlindIndex(ColumnRef {
                        table: "public.t".into(),
                        column: "c".into(),
                        ty: ClientType::Date,
                    }),
                ),
            ],
        };
        let mut body = BytesMut::new();
        body.put_u16(3);
        for oid in [17u32, 23, 17] {
            body.put_u32(oid);
        }
        let out = retype_parameter_description(&body, &plan).unwrap();
        let msg = Message::from_raw(out).unwrap();
        assert_eq!(msg.body(), &[0, 2, 0, 0, 4, 58, 0, 0, 0, 23]);
    }
}
