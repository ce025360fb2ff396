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
//! DataRows of an Execute carry no description of their own, so before an Execute whose
//! portal the client did not describe, pgward inserts a `Describe` of that portal and keeps
//! its answer to itself: every DataRow is then decoded with the formats that produced it.
//! A query's or data change's result columns are fixed when it is prepared, so what that
//! answer says of a portal holds for every later portal of the same statement bound with the
//! same result formats ([`StatementRows`]): drivers that prepare once and then only Bind and
//! Execute (tokio-postgres, asyncpg, JDBC) cost one such Describe per statement, not one
//! per Execute.
//!
//! A value that fails to decrypt (tampered, moved to another row's column, unknown key) ends
//! the statement with SQLSTATE XX001 and a message naming the column, never the value; the
//! rest of that response, up to ReadyForQuery, is dropped (statements the server already ran
//! in the same batch are not rolled back by this). The session's response tracker still reads
//! what was dropped ([`Tracked`]): the audit and the registry follow what the server ran.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;

mod client;
mod upstream;
mod views;

pub use client::ClientHalf;
use client::*;
use upstream::*;
pub use upstream::{relay, Incoming, StatementCrypto, StatementRows, Tracked, UpstreamHalf};

use super::copy_in::CopyIn;
use crate::config::Config;
use crate::crypto::error::KeyFailure;
use crate::crypto::manager::KeyManager;
use crate::crypto::scope::KeyScope;
use crate::crypto::sql::{
    ColumnRef, ParamPlan, ParamUse, RowKey, SqlEncryption, CARRIED_KEY_PREFIX, RESULT_KEY_PREFIX,
};
use crate::crypto::ProviderKind;
use crate::crypto::{decode_to_wire, encode_for_encryption, ClientType, CryptoError, WireFormat};
use crate::error::{sqlstate, ClientError};
use crate::keys::store::{PgKeyStore, WrappedKeyStore};
use crate::net::{ConnReader, ConnWriter};
use crate::protocol::cursor::Cursor;
use crate::protocol::replies::{Replies, Reply, Request};
use crate::protocol::view::{data_row, row_description, BindView, Frontend, ParseView, RowField};
use crate::protocol::{backend, build, frontend, Batch, FrameReader, Message};
use crate::upstream::UpstreamTarget;

/// SQLSTATE data_corrupted: a stored value failed its integrity check.
pub const DATA_CORRUPTED: &str = "XX001";
/// SQLSTATE system_error: a key could not be obtained.
pub const KEY_UNAVAILABLE: &str = "58000";
/// SQLSTATE for a value whose data key was destroyed on purpose (`pgward keys shred`) or
/// retired after every value was moved off it (`pgward keys retire`, a restored row):
/// object_not_in_prerequisite_state — the value exists but can never be decrypted, which no
/// retry changes (unlike 58000).
pub const KEY_DESTROYED: &str = "55000";
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
        scope: KeyScope,
    ) -> Result<(ClientHalf, UpstreamHalf), ClientError> {
        // The session's per-tenant keys, loaded before its first statement (SQL literals
        // are encrypted without waiting for Vault).
        for e in self.manager.prefetch_scope(&scope).await {
            tracing::warn!(error = %e, "could not load a per-tenant key for this session; statements needing it fail until it is available");
        }
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
                        let row = data_row(message.body()).map_err(|_| failed("row"))?;
                        let text =
                            |i: usize| row.get(i).copied().flatten().map(String::from_utf8_lossy);
                        let (Some(oid), Some(definition)) = (text(0), text(1)) else {
                            return Err(failed("view fields"));
                        };
                        let oid = oid.parse::<u32>().map_err(|_| failed("view oid"))?;
                        views.push((oid, definition.into_owned()));
                    }
                    backend::DATA_ROW => {
                        let row = data_row(message.body()).map_err(|_| failed("row"))?;
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
        let queue = Arc::new(Mutex::new(Replies::default()));
        Ok((
            ClientHalf::new(self.clone(), queue.clone(), scope.clone()),
            UpstreamHalf::new(self.clone(), queue, columns, scope),
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
        .query_one(
            "SELECT to_regclass('pgward.data_keys') IS NOT NULL AND to_regclass('pgward.retired_keys') IS NOT NULL",
            &[],
        )
        .await
        .and_then(|row| row.try_get::<_, bool>(0))
        .unwrap_or(false);
    let store = PgKeyStore::reconnecting(
        client,
        reconnect_key_store(upstream, service, password, policy),
    );
    if !exists {
        if let Err(e) = store.migrate().await {
            tracing::warn!(error = %e, "could not create the pgward key tables (apply migrations/0100_pgward_keys.sql, 0110_pgward_retired_keys.sql and 0120_pgward_index_roots.sql)");
        }
    }
    Ok(Arc::new(store))
}

/// How the key store opens a new connection when the upstream closed its own (a restart, a
/// terminated backend): the same login as the first.
fn reconnect_key_store(
    upstream: &UpstreamTarget,
    service: &crate::config::ServiceConfig,
    password: Option<String>,
    policy: &crate::config::PolicyConfig,
) -> crate::keys::store::Reconnect {
    let upstream = upstream.clone();
    let user = service.upstream_user.clone();
    let database = policy.database.clone();
    Arc::new(move || {
        let (upstream, user, password, database) = (
            upstream.clone(),
            user.clone(),
            password.clone(),
            database.clone(),
        );
        Box::pin(async move {
            upstream
                .admin_client(&user, password.as_deref(), &database)
                .await
                .map_err(|e| {
                    crate::keys::KeyError::Store(format!("reconnecting to the key store: {e}"))
                })
        })
    })
}

/// The companion blind-index column of a searchable column.
pub fn bidx_name(column: &str) -> String {
    format!("{column}_bidx")
}

/// What an upstream column is to pgward.
#[derive(Clone, Debug)]
enum FieldRole {
    Encrypted(ColumnRef),
    /// An encrypted column read through a view: its row key is never in the result.
    EncryptedViaView(ColumnRef),
    BlindIndex,
}

/// What field encryption keeps of a request it forwarded, for its answer (the request
/// itself and the reply rules are the queue's, [`Replies`]).
#[derive(Debug, Default)]
struct Expect {
    /// A described statement's parameter plan, for its ParameterDescription.
    plan: Option<Arc<ParamPlan>>,
    /// A Describe of a portal inserted by pgward before an Execute: its answer is not
    /// forwarded.
    hidden: bool,
    /// Such a Describe whose answer describes every portal of its statement bound with these
    /// result formats (the client's Bind section): learned for the Executes after it.
    learn: Option<(Arc<StatementRows>, Box<[u8]>)>,
    /// An Execute pgward sent no Describe before: how its rows are transformed, as learned
    /// for its statement.
    rows: Option<Arc<RowPlan>>,
}

/// The requests field encryption forwarded, shared by its two halves.
type Expected = Arc<Mutex<Replies<Expect>>>;

#[cfg(test)]
mod tests;
