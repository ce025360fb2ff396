//! The client → upstream half: Parse retyped, Bind values encrypted, COPY rows sealed, and
//! each forwarded request queued for the other half, which reads the answers by it.

use super::*;

/// The client → upstream half of a session's encryption state.
pub struct ClientHalf {
    encryption: Arc<Encryption>,
    queue: Expected,
    /// Portals the client described since their last Bind or Execute.
    described_portals: HashSet<String>,
    /// The portal of the last Bind and its result-format section as the client sent it: how
    /// the portal's Execute is described (buffers kept from Bind to Bind).
    last_bind: (String, Vec<u8>),
    /// The plan of the next Parse or Query (set by the SQL rewrite of that message).
    next_plan: Option<Arc<ParamPlan>>,
    /// A COPY FROM STDIN into encrypted columns is running.
    copy_in: Option<CopyState>,
    /// The session's claims that select per-tenant keys.
    scope: KeyScope,
}

/// A running COPY FROM STDIN: its row encryptor, or failed (the rest of the data is dropped).
pub(super) enum CopyState {
    Running(Box<CopyIn>),
    Failed,
}

impl ClientHalf {
    pub(super) fn new(encryption: Arc<Encryption>, queue: Expected, scope: KeyScope) -> Self {
        Self {
            scope,
            encryption,
            queue,
            described_portals: HashSet::new(),
            last_bind: (String::new(), Vec::new()),
            next_plan: None,
            copy_in: None,
        }
    }

    /// The SQL rewrite of the Parse about to be forwarded produced this parameter plan.
    pub fn set_next_plan(&mut self, plan: Option<Arc<ParamPlan>>) {
        self.next_plan = plan.filter(|p| p.is_active());
    }

    /// Record one message on its way upstream (decoded once by the relay); returns the bytes
    /// to send instead, if any. `statement` is what field encryption keeps of the prepared
    /// statement the message refers to (a Bind's, an Execute's portal's, a described one),
    /// looked up by the pipeline.
    pub async fn outgoing(
        &mut self,
        message: &Message,
        view: &Frontend<'_>,
        statement: Option<&StatementCrypto>,
    ) -> Result<Option<Bytes>, ClientError> {
        let plan = statement.and_then(|s| s.plan.clone());
        match view {
            Frontend::Query { .. } => {
                let plan = self.next_plan.take();
                self.copy_in = copy_state(plan.as_deref());
                self.push(Request::Query, Expect::default());
            }
            Frontend::FunctionCall => self.push(Request::FunctionCall, Expect::default()),
            Frontend::CopyData(payload) => {
                self.copy_sent();
                return self.copy_data(payload).await;
            }
            Frontend::CopyDone => {
                self.copy_sent();
                return Ok(self.copy_done(message).await);
            }
            Frontend::CopyFail => {
                self.copy_sent();
                self.copy_in = None;
            }
            Frontend::Parse(parse) => return self.parse(parse),
            Frontend::Bind(bind) => return self.bind(bind, plan).await,
            Frontend::Describe(target) => {
                if target.is_statement() {
                    let expect = Expect {
                        plan,
                        ..Expect::default()
                    };
                    self.push(Request::DescribeStatement, expect);
                } else {
                    self.described_portals.insert(target.name.to_owned());
                    self.push(Request::DescribePortal, Expect::default());
                }
            }
            Frontend::Execute { portal, .. } => {
                self.copy_in = copy_state(plan.as_deref());
                let rows = statement.and_then(|s| s.rows.as_ref());
                return Ok(self.execute(message, portal, rows));
            }
            Frontend::Close(_) => self.push(Request::Close, Expect::default()),
            Frontend::Sync => self.push(Request::Sync, Expect::default()),
            Frontend::Flush | Frontend::Terminate | Frontend::Other(_) => {}
        }
        Ok(None)
    }

    /// Execute: each needs a description of its portal right before it (a portal described
    /// once and executed in several row-limited steps needs one per step): the client's, the
    /// one learned for the portal's statement and result formats (`rows`, when the statement's
    /// result columns are fixed), or a Describe pgward sends first and keeps the answer of
    /// (which teaches `rows`).
    fn execute(
        &mut self,
        message: &Message,
        portal: &str,
        rows: Option<&Arc<StatementRows>>,
    ) -> Option<Bytes> {
        if self.forget_described(portal) {
            self.push(Request::Execute, Expect::default());
            return None;
        }
        // Only the portal just bound is known to have the statement's description.
        let rows = rows.filter(|_| self.last_bind.0 == portal);
        if let Some(plan) = rows.and_then(|r| r.plan_for(&self.last_bind.1)) {
            let learned = Expect {
                rows: plan,
                ..Expect::default()
            };
            self.push(Request::Execute, learned);
            return None;
        }
        let hidden = Expect {
            hidden: true,
            learn: rows.map(|r| (r.clone(), self.last_bind.1.as_slice().into())),
            ..Expect::default()
        };
        self.push(Request::DescribePortal, hidden);
        self.push(Request::Execute, Expect::default());
        let mut out = BytesMut::new();
        out.extend_from_slice(&build::describe(b'P', portal));
        out.extend_from_slice(message.raw());
        Some(out.freeze())
    }

    /// CopyData of a COPY into encrypted columns: complete rows encrypted, the rest kept.
    pub(super) async fn copy_data(&mut self, payload: &[u8]) -> Result<Option<Bytes>, ClientError> {
        let manager = self.encryption.manager.clone();
        let scope = self.scope.clone();
        match &mut self.copy_in {
            None => Ok(None),
            Some(CopyState::Failed) => Ok(Some(Bytes::new())),
            Some(CopyState::Running(copy)) => match copy.data(&manager, &scope, payload).await {
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
    pub(super) async fn copy_done(&mut self, message: &Message) -> Option<Bytes> {
        let manager = self.encryption.manager.clone();
        let scope = self.scope.clone();
        match self.copy_in.take() {
            Some(CopyState::Running(mut copy)) => match copy.finish(&manager, &scope).await {
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

    /// A request goes upstream (forgotten at once when the server will skip it after an
    /// error: its answer never comes).
    pub(super) fn push(&self, request: Request, expect: Expect) {
        let _skipped = self.queue.lock().sent_unless_skipped(request, expect);
    }

    /// Copy data goes upstream: Syncs sent into COPY FROM STDIN get no answer.
    fn copy_sent(&self) {
        drop(self.queue.lock().copy_sent());
    }

    /// Responses still awaited from upstream (bounded by the relay: see `MAX_AWAITED`).
    pub fn awaited(&self) -> usize {
        self.queue.lock().len()
    }

    /// Parse: declare encrypted parameters as `bytea` (the pipeline registers the plan).
    pub(super) fn parse(&mut self, parse: &ParseView<'_>) -> Result<Option<Bytes>, ClientError> {
        let plan = self.next_plan.take();
        let replacement = match &plan {
            Some(p) => Some(retype_parse(parse, p)?),
            None => None,
        };
        self.push(Request::Parse, Expect::default());
        Ok(replacement)
    }

    /// Forgets that the client described `portal`; whether it had. Every Bind and Execute
    /// asks, and most sessions never describe a portal: an empty set is not asked (which would
    /// hash the name each time).
    fn forget_described(&mut self, portal: &str) -> bool {
        !self.described_portals.is_empty() && self.described_portals.remove(portal)
    }

    /// Bind: encrypt the values of encrypted parameters (by the plan of the statement it
    /// binds), add derived ones.
    pub(super) async fn bind(
        &mut self,
        bind: &BindView<'_>,
        plan: Option<Arc<ParamPlan>>,
    ) -> Result<Option<Bytes>, ClientError> {
        self.forget_described(bind.portal);
        let (portal, formats) = &mut self.last_bind;
        portal.clear();
        portal.push_str(bind.portal);
        formats.clear();
        formats.extend_from_slice(bind.results);
        self.push(Request::Bind, Expect::default());
        let Some(plan) = plan else {
            return Ok(None);
        };
        if bind.values.len() != plan.client_count {
            // Refused here, never forwarded for the server to judge: the statement upstream
            // has more parameters than the client's (the derived blind indexes), so a Bind
            // with exactly the upstream count would pass the server's check with the
            // client's plaintext in the encrypted column's place.
            return Err(parameter_count_mismatch(
                bind.values.len(),
                bind.statement,
                plan.client_count,
            ));
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
                    let row = row_key(bind, plan.row_key(*source), c)?;
                    let sealed = manager
                        .encrypt_row(&c.table, &c.column, &self.scope, row.as_deref(), &canonical)
                        .await
                        .map_err(|e| crypto_error(&e, c))?;
                    formats.push(1);
                    values.push(Some(sealed));
                }
                (ParamUse::BlindIndex(c), Some(v)) => {
                    let canonical = canonical_param(c, format, v, *source)?;
                    let index = manager
                        .blind_index(&c.table, &c.column, &self.scope, &canonical)
                        .await
                        .map_err(|e| crypto_error(&e, c))?;
                    formats.push(1);
                    values.push(Some(index.to_vec()));
                }
                (ParamUse::PreviousBlindIndex(c), Some(v)) => {
                    let canonical = canonical_param(c, format, v, *source)?;
                    let index = manager
                        .search_indexes(&c.table, &c.column, &self.scope, &canonical)
                        .await
                        .map_err(|e| crypto_error(&e, c))?
                        .previous_or_write();
                    formats.push(1);
                    values.push(Some(index.to_vec()));
                }
            }
        }
        let results = with_key_formats(bind.results, plan.result_keys);
        rebuild_bind(
            bind,
            &formats,
            &values,
            results.as_deref().unwrap_or(bind.results),
        )
        .map(Some)
    }
}

/// The canonical text of the primary key a row-bound parameter value is sealed to.
fn row_key(
    bind: &BindView<'_>,
    key: Option<&RowKey>,
    c: &ColumnRef,
) -> Result<Option<String>, ClientError> {
    let (index, ty) = match key {
        None => return Ok(None),
        Some(RowKey::Literal(text)) => return Ok(Some(text.clone())),
        Some(RowKey::Param { index, ty }) => (*index, *ty),
    };
    let invalid = || {
        ClientError::error(
            INVALID_PARAMETER,
            format!(
                "pgward: parameter ${} is the primary key the value of {}.{} is bound to, and it is NULL or not a valid key",
                index + 1,
                c.table,
                c.column
            ),
        )
    };
    let value = bind
        .values
        .get(index)
        .copied()
        .flatten()
        .ok_or_else(invalid)?;
    let canonical = match bind.format_of(index) {
        1 => ty.canonical_binary(value),
        _ => std::str::from_utf8(value)
            .ok()
            .and_then(|t| ty.canonical_text(t)),
    };
    canonical.map(Some).ok_or_else(invalid)
}

/// A Bind's result-format section with a text code for each of the `keys` row-key columns
/// pgward appended, when it names one format per column (`None`: unchanged — none or one
/// code applies to every column, the keys included).
pub(super) fn with_key_formats(results: &[u8], keys: usize) -> Option<Vec<u8>> {
    let count = usize::from(u16::from_be_bytes([*results.first()?, *results.get(1)?]));
    if keys == 0 || count <= 1 {
        return None;
    }
    let total = u16::try_from(count + keys).ok()?;
    let mut out = Vec::with_capacity(results.len() + 2 * keys);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(results.get(2..)?);
    out.resize(out.len() + 2 * keys, 0);
    Some(out)
}

pub(super) fn copy_state(plan: Option<&ParamPlan>) -> Option<CopyState> {
    plan.and_then(|p| p.copy.clone())
        .map(|c| CopyState::Running(Box::new(CopyIn::new(c))))
}

pub(super) fn copy_data_message(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 5);
    out.put_u8(frontend::COPY_DATA);
    out.put_u32(0);
    out.extend_from_slice(payload);
    finish(out)
}

pub(super) fn copy_fail_message(reason: &str) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(frontend::COPY_FAIL);
    out.put_u32(0);
    out.extend_from_slice(reason.replace('\0', "").as_bytes());
    out.put_u8(0);
    finish(out)
}

pub(super) fn malformed() -> ClientError {
    ClientError::error(sqlstate::PROTOCOL_VIOLATION, "pgward: malformed message")
}

pub(super) fn canonical_param(
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
pub(super) fn widen_binary_integer(
    ty: ClientType,
    format: WireFormat,
    value: &[u8],
) -> Option<Vec<u8>> {
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
pub(super) fn crypto_error(e: &CryptoError, c: &ColumnRef) -> ClientError {
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
        // A row-bound value where the result carries no row key (a view, an ambiguous name).
        CryptoError::RowKeyMissing { .. } => ClientError::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!(
                "pgward: values of encrypted column {}.{} are bound to their rows' primary keys, which this result does not carry (read through a view?): select the column from its table",
                c.table, c.column
            ),
        ),
        // The column has per-tenant keys and the session's token lacks the claim choosing one.
        CryptoError::NoKeyContext { .. } => ClientError::error(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("pgward: encrypted column {}.{}: {e}", c.table, c.column),
        ),
        // Shredded on purpose: the value is gone for good, not temporarily unavailable.
        // Retired: the value predates its key's retirement (a restored row); same state.
        CryptoError::KeyUnavailable(KeyFailure::Destroyed | KeyFailure::Retired) => ClientError::error(
            KEY_DESTROYED,
            format!("pgward: a value of encrypted column {}.{}: {e}", c.table, c.column),
        ),
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

/// Parse with encrypted parameters declared `bytea` (the SQL casts them too).
pub(super) fn retype_parse(parse: &ParseView<'_>, plan: &ParamPlan) -> Result<Bytes, ClientError> {
    let declared: Vec<u32> = parse.param_types().collect();
    if declared.len() > plan.client_count && plan.params.len() > plan.client_count {
        // pgward numbers the blind-index parameters it adds after the client's highest $n.
        return Err(ClientError::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "pgward: declare no more parameter types than the statement uses when writing or searching searchable encrypted columns",
        ));
    }
    let mut out = BytesMut::new();
    out.put_u8(frontend::PARSE);
    out.put_u32(0);
    out.extend_from_slice(parse.name.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(parse.sql.as_bytes());
    out.put_u8(0);
    let count = declared.len().max(plan.params.len());
    out.put_u16(u16::try_from(count).map_err(|_| malformed())?);
    for i in 0..count {
        let oid = match plan.params.get(i) {
            Some((
                _,
                ParamUse::Encrypt(_) | ParamUse::BlindIndex(_) | ParamUse::PreviousBlindIndex(_),
            )) => BYTEA_OID,
            _ => declared.get(i).copied().unwrap_or(0),
        };
        out.put_u32(oid);
    }
    Ok(finish(out))
}

/// A Bind with these parameter formats and values in place of the client's (the portal,
/// statement and result formats are the client's).
pub(super) fn rebuild_bind(
    bind: &BindView<'_>,
    formats: &[i16],
    values: &[Option<Vec<u8>>],
    results: &[u8],
) -> Result<Bytes, ClientError> {
    let count = |n: usize| u16::try_from(n).map_err(|_| too_many_parameters());
    let mut out = BytesMut::new();
    out.put_u8(frontend::BIND);
    out.put_u32(0);
    out.extend_from_slice(bind.portal.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(bind.statement.as_bytes());
    out.put_u8(0);
    out.put_u16(count(formats.len())?);
    for f in formats {
        out.put_i16(*f);
    }
    out.put_u16(count(values.len())?);
    for v in values {
        match v {
            None => out.put_i32(-1),
            Some(v) => put_value(&mut out, v)?,
        }
    }
    out.extend_from_slice(results);
    Ok(finish(out))
}

/// PostgreSQL's own error for a Bind whose value count is not the statement's.
fn parameter_count_mismatch(supplied: usize, statement: &str, required: usize) -> ClientError {
    ClientError::error(
        "08P01",
        format!(
            "bind message supplies {supplied} parameters, but prepared statement \"{statement}\" requires {required}"
        ),
    )
}

fn too_many_parameters() -> ClientError {
    ClientError::error(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        "pgward: the statement has too many parameters once encrypted columns are added",
    )
}
