//! The upstream → client half: RowDescription retyped, DataRow values decrypted, blind-index
//! companions dropped, and the answers to pgward's own Describes kept from the client.

use super::*;

/// The upstream → client half of a session's encryption state.
pub struct UpstreamHalf {
    encryption: Arc<Encryption>,
    queue: Expected,
    /// (table OID, attnum) of encrypted and blind-index columns.
    columns: HashMap<(u32, i16), FieldRole>,
    /// How DataRows of the running query or portal are decoded (`None`: unchanged).
    current: Option<Arc<RowPlan>>,
    /// `current` is what it is for the running answer: set by its description, or looked up
    /// on the Execute it answers (one pgward sent no Describe before) at its first row.
    current_known: bool,
    /// The last row description seen and what it became: a session repeating a statement
    /// gets the same description every time, planned once.
    last_description: Option<Described>,
    /// A value failed to decrypt: drop the rest of the response up to ReadyForQuery.
    failed: bool,
    /// The session's claims that select per-tenant keys.
    scope: KeyScope,
}

/// What one upstream message becomes for the client and for the session's tracker.
#[derive(Debug)]
pub(super) enum Relayed {
    /// Forwarded as it is.
    Unchanged,
    /// The client gets these bytes instead (a retyped description, a decrypted row); the
    /// tracker reads the server's message, an answer of the same kind.
    Replaced(Bytes),
    /// The answer to pgward's own Describe: neither the client nor the tracker sees it.
    Hidden,
    /// A value of this row failed to decrypt: the client gets this error instead, and nothing
    /// more up to ReadyForQuery.
    Failed(ClientError),
    /// Kept from the client after such a failure; the tracker still reads it (the server ran
    /// the statement, and the requests after it).
    Withheld,
}

impl Relayed {
    fn replaced(bytes: Option<Bytes>) -> Self {
        bytes.map_or(Relayed::Unchanged, Relayed::Replaced)
    }
}

/// One upstream batch as field encryption relays it.
pub struct Incoming {
    /// What the client gets.
    pub client: Batch,
    /// What the session's tracker reads instead, when that differs (`None`: the client's).
    pub tracked: Option<Tracked>,
}

/// The server's answers as the session's tracker must read them after a value failed to
/// decrypt: the client got an error and nothing more up to ReadyForQuery, but the server ran
/// that statement and every later request of the pipeline, and its records and registry must
/// say so.
pub struct Tracked {
    /// The server's answers, without those to pgward's own Describes.
    pub batch: Batch,
    /// Where (byte offset in `batch`) each row the client got an error for instead starts,
    /// with that error's SQLSTATE.
    pub failures: Vec<(usize, &'static str)>,
}

/// `batch` as the session's field encryption relays it (as it is, when it has none).
pub async fn relay(crypto: Option<&mut UpstreamHalf>, batch: Batch) -> Incoming {
    match crypto {
        Some(crypto) => crypto.incoming(batch).await,
        None => Incoming {
            client: batch,
            tracked: None,
        },
    }
}

/// A [`Tracked`] being built.
struct Tracking {
    bytes: BytesMut,
    failures: Vec<(usize, &'static str)>,
}

impl Tracking {
    /// Starts with what the client was sent so far in the batch.
    fn starting_with(sent: &[u8]) -> Self {
        let mut bytes = BytesMut::with_capacity(sent.len() * 2);
        bytes.extend_from_slice(sent);
        Tracking {
            bytes,
            failures: Vec::new(),
        }
    }

    /// The tracker reads the server's message `raw`, unless it answers pgward's own Describe.
    fn read(&mut self, raw: &[u8], relayed: &Relayed) {
        match relayed {
            Relayed::Hidden => return,
            Relayed::Failed(error) => self.failures.push((self.bytes.len(), error.sqlstate)),
            _ => {}
        }
        self.bytes.extend_from_slice(raw);
    }

    fn finish(self) -> Tracked {
        Tracked {
            batch: Batch::from_whole_messages(self.bytes.freeze()),
            failures: self.failures,
        }
    }
}

/// What field encryption keeps of one prepared statement, on the session's registry entry for
/// it (`proxy::statements`).
#[derive(Debug, Default)]
pub struct StatementCrypto {
    /// The plan of its parameters (`None`: nothing to encrypt).
    pub plan: Option<Arc<ParamPlan>>,
    /// What it learns of its rows (`None`: its result columns are not fixed when it is
    /// prepared, or the session encrypts nothing).
    pub rows: Option<Arc<StatementRows>>,
}

/// What field encryption learned of one prepared statement's rows: how the rows of its
/// portals bound with one set of result formats are transformed, from the first description
/// of such a portal that pgward asked for. PostgreSQL fixes the result columns of a query or
/// data change when it is prepared ([`crate::sql::StatementKind::has_fixed_result`]), so every
/// portal of it bound with the same formats is described alike: their Executes need no
/// Describe of their own, and the server no RowDescription per Execute.
#[derive(Debug, Default)]
pub struct StatementRows(std::sync::OnceLock<LearnedRows>);

/// [`StatementRows`], once learned.
#[derive(Debug)]
struct LearnedRows {
    /// The client's result-format section of the Bind the description answered for.
    formats: Box<[u8]>,
    /// `None`: nothing to transform.
    plan: Option<Arc<RowPlan>>,
}

impl StatementRows {
    /// The plan of the rows of a portal bound with the result-format section `formats`, if
    /// learned (`Some(None)`: nothing to transform).
    pub(super) fn plan_for(&self, formats: &[u8]) -> Option<Option<Arc<RowPlan>>> {
        let learned = self.0.get().filter(|l| *l.formats == *formats)?;
        Some(learned.plan.clone())
    }

    /// A portal bound with `formats` is described by `plan`. The first description learned
    /// stays: a portal bound with other formats is described by the server each time.
    fn learn(&self, formats: Box<[u8]>, plan: Option<Arc<RowPlan>>) {
        let _first_stays = self.0.set(LearnedRows { formats, plan });
    }
}

impl Expect {
    /// This answered pgward's own Describe, which describes its portal by `plan`: the
    /// statement it was sent for learns it (when its rows are fixed, see [`StatementRows`]).
    fn teach(self, plan: Option<Arc<RowPlan>>) {
        if let Some((rows, formats)) = self.learn {
            rows.learn(formats, plan);
        }
    }
}

/// A row description (its body), the plan of its rows and the description the client gets
/// (`None`: no field is transformed).
struct Described {
    body: Bytes,
    plan: Option<Arc<RowPlan>>,
    rewritten: Option<Bytes>,
}

/// How one result column is transformed.
#[derive(Clone, Debug)]
pub(super) enum FieldAction {
    Keep,
    Drop,
    /// Decrypt, verifying a row-bound value with the row key in field `.2` of the same row
    /// (a key column pgward appended, see `crypto::sql::rowkey`; dropped from the result).
    Decrypt(ColumnRef, WireFormat, Option<usize>),
}

/// How the rows of one row description are transformed.
#[derive(Debug)]
pub(super) struct RowPlan {
    pub(super) fields: Vec<FieldAction>,
}

impl RowPlan {
    /// How many columns the client sees (blind-index columns are dropped), as the u16 count
    /// of RowDescription and DataRow.
    pub(super) fn visible_count(&self) -> u16 {
        let kept = self
            .fields
            .iter()
            .filter(|a| !matches!(a, FieldAction::Drop))
            .count();
        u16::try_from(kept).unwrap_or(u16::MAX)
    }
}

impl UpstreamHalf {
    pub(super) fn new(
        encryption: Arc<Encryption>,
        queue: Expected,
        columns: HashMap<(u32, i16), FieldRole>,
        scope: KeyScope,
    ) -> Self {
        Self {
            scope,
            encryption,
            queue,
            columns,
            current: None,
            current_known: false,
            last_description: None,
            failed: false,
        }
    }

    /// Transform one upstream batch: what the client gets (the same batch if untouched) and,
    /// after a value failed to decrypt, what the session's tracker must read instead.
    pub async fn incoming(&mut self, batch: Batch) -> Incoming {
        let all = batch.bytes().clone();
        let mut out: Option<BytesMut> = None;
        let mut tracking: Option<Tracking> = None;
        let mut offset = 0;
        for message in batch.messages() {
            let raw = message.raw();
            let relayed = self.message(&message).await;
            let diverges = matches!(relayed, Relayed::Failed(_) | Relayed::Withheld);
            if diverges && tracking.is_none() {
                // Up to here the tracker reads what the client gets (a retyped description
                // answers the same request as the server's).
                let sent = out.as_ref().map_or(&all[..offset], |out| &out[..]);
                tracking = Some(Tracking::starting_with(sent));
            }
            if let Some(tracking) = tracking.as_mut() {
                tracking.read(raw, &relayed);
            }
            let replacement = match relayed {
                Relayed::Unchanged => None,
                Relayed::Replaced(bytes) => Some(bytes),
                Relayed::Failed(error) => Some(error.to_message()),
                Relayed::Hidden | Relayed::Withheld => Some(Bytes::new()),
            };
            match (replacement, out.as_mut()) {
                (None, None) => {}
                (None, Some(out)) => out.extend_from_slice(raw),
                (Some(bytes), _) => {
                    let out = out.get_or_insert_with(|| {
                        let mut b = BytesMut::with_capacity(all.len());
                        b.extend_from_slice(&all[..offset]);
                        b
                    });
                    out.extend_from_slice(&bytes);
                }
            }
            offset += raw.len();
        }
        let client = match out {
            None => batch,
            Some(bytes) => Batch::from_whole_messages(bytes.freeze()),
        };
        Incoming {
            client,
            tracked: tracking.map(Tracking::finish),
        }
    }

    /// What one upstream message becomes for the client and for the session's tracker.
    pub(super) async fn message(&mut self, message: &Message) -> Relayed {
        let tag = message.tag();
        if matches!(
            tag,
            backend::PARAMETER_STATUS | backend::NOTICE_RESPONSE | NOTIFICATION_RESPONSE
        ) {
            return Relayed::Unchanged;
        }
        let already_failed = self.failed;
        let relayed = self.track(message).await;
        if tag == backend::READY_FOR_QUERY {
            self.failed = false;
            self.answer_ended();
            return relayed;
        }
        match relayed {
            Relayed::Hidden => Relayed::Hidden,
            _ if already_failed => Relayed::Withheld,
            relayed => relayed,
        }
    }

    /// The request `tag` answers leaves the queue if it settles it; returns what field
    /// encryption kept of the request this message answers last (`None`: the message is part
    /// of an answer still going on, or answers nothing).
    fn answer(&self, tag: u8) -> Option<(Request, Expect)> {
        let mut answered = None;
        let reply = self.queue.lock().answer(tag, |request, _, expect| {
            // The first settled request is the one this message answers; the rest were
            // skipped after an error.
            if answered.is_none() {
                answered = Some((request, expect));
            }
        });
        answered.filter(|_| reply == Reply::Settled)
    }

    /// Update the state for one response and transform it if needed.
    pub(super) async fn track(&mut self, message: &Message) -> Relayed {
        let body = message.body();
        match message.tag() {
            PARAMETER_DESCRIPTION => {
                let plan = match self.queue.lock().front() {
                    Some((Request::DescribeStatement, expect)) => expect.plan.clone(),
                    _ => None,
                };
                Relayed::replaced(plan.and_then(|p| retype_parameter_description(body, &p)))
            }
            ROW_DESCRIPTION => self.row_description(body),
            NO_DATA => {
                let answered = self.answer(NO_DATA);
                let hidden = answered.as_ref().is_some_and(|(_, e)| e.hidden);
                // The statement returns no rows: nothing to transform, ever.
                if let Some((_, expect)) = answered {
                    expect.teach(None);
                }
                self.answer_ended();
                match hidden {
                    true => Relayed::Hidden,
                    false => Relayed::Unchanged,
                }
            }
            backend::DATA_ROW => {
                // After a failure the rest of the response is withheld: nothing to decrypt.
                let Some(plan) = self.rows_plan().filter(|_| !self.failed) else {
                    return Relayed::Unchanged;
                };
                match self.data_row(body, &plan).await {
                    Ok(bytes) => Relayed::Replaced(bytes),
                    Err(error) => {
                        self.failed = true;
                        Relayed::Failed(error)
                    }
                }
            }
            tag => {
                if matches!(
                    tag,
                    backend::COMMAND_COMPLETE
                        | EMPTY_QUERY_RESPONSE
                        | PORTAL_SUSPENDED
                        | backend::ERROR_RESPONSE
                ) {
                    self.answer_ended();
                }
                self.answer(tag);
                Relayed::Unchanged
            }
        }
    }

    pub(super) fn row_description(&mut self, body: &[u8]) -> Relayed {
        let answered = self.answer(ROW_DESCRIPTION);
        let hidden = matches!(answered, Some((_, Expect { hidden: true, .. })));
        let Some((plan, rewritten)) = self.described(body) else {
            // Forwarded as it is, unless pgward asked for it.
            return match hidden {
                true => Relayed::Hidden,
                false => Relayed::Unchanged,
            };
        };
        match answered {
            Some((Request::DescribeStatement, _)) => Relayed::replaced(rewritten),
            Some((_, expect)) if expect.hidden => {
                expect.teach(plan.clone());
                self.set_current(plan);
                Relayed::Hidden
            }
            _ => {
                // A Describe of a portal, or a simple query's (or FETCH's) own description.
                self.set_current(plan);
                Relayed::replaced(rewritten)
            }
        }
    }

    /// The rows that follow are decoded by `plan`.
    fn set_current(&mut self, plan: Option<Arc<RowPlan>>) {
        self.current = plan;
        self.current_known = true;
    }

    /// The running answer ended (or one without rows came): the next rows are another's.
    fn answer_ended(&mut self) {
        self.current = None;
        self.current_known = false;
    }

    /// How the running answer's rows are decoded: by its description, or, for an Execute
    /// pgward sent no Describe before, by the plan learned for its statement (looked up on
    /// the request once, at the first row).
    fn rows_plan(&mut self) -> Option<Arc<RowPlan>> {
        if !self.current_known {
            self.current = match self.queue.lock().front() {
                Some((Request::Execute, expect)) => expect.rows.clone(),
                _ => None,
            };
            self.current_known = true;
        }
        self.current.clone()
    }

    /// The plan and the client's description of a row description body (`None`: it does
    /// not decode; it is forwarded as it is). The same body as last time is not planned again.
    fn described(&mut self, body: &[u8]) -> Option<(Option<Arc<RowPlan>>, Option<Bytes>)> {
        if let Some(last) = self.last_description.as_ref().filter(|d| d.body == body) {
            return Some((last.plan.clone(), last.rewritten.clone()));
        }
        let fields = row_description(body).ok()?;
        let plan = self.plan_for(&fields);
        let rewritten = plan.as_ref().map(|p| rewrite_row_description(&fields, p));
        let plan = plan.map(Arc::new);
        self.last_description = Some(Described {
            body: Bytes::copy_from_slice(body),
            plan: plan.clone(),
            rewritten: rewritten.clone(),
        });
        Some((plan, rewritten))
    }

    /// `None` when no field is encrypted, a blind index or a row key.
    ///
    /// Row keys: each field of an encrypted table column (not one through a view) is paired
    /// with the first unused `pgward_rk:<its name>` field, in order — the transform appends
    /// one per such output column, in the order of the SELECT list.
    pub(super) fn plan_for(&self, fields: &[RowField<'_>]) -> Option<RowPlan> {
        let mut any = false;
        let is_key = |name: &[u8]| {
            name.starts_with(RESULT_KEY_PREFIX.as_bytes())
                || name.starts_with(CARRIED_KEY_PREFIX.as_bytes())
        };
        let mut actions: Vec<FieldAction> = fields
            .iter()
            .map(|f| match self.columns.get(&(f.table_oid, f.attnum)) {
                _ if is_key(f.name) => {
                    any = true;
                    FieldAction::Drop
                }
                _ if f.table_oid == 0 => FieldAction::Keep,
                Some(FieldRole::Encrypted(c) | FieldRole::EncryptedViaView(c)) => {
                    any = true;
                    FieldAction::Decrypt(c.clone(), WireFormat::from_code(f.format), None)
                }
                Some(FieldRole::BlindIndex) => {
                    any = true;
                    FieldAction::Drop
                }
                None => FieldAction::Keep,
            })
            .collect();
        let mut used = vec![false; fields.len()];
        let table_column = |f: &RowField<'_>| {
            matches!(
                self.columns.get(&(f.table_oid, f.attnum)),
                Some(FieldRole::Encrypted(_))
            )
        };
        for (i, f) in fields.iter().enumerate() {
            if !table_column(f) {
                continue;
            }
            // The transform appends exactly one key per such output column of a name; any
            // other count means one went without (never guess: its values fail closed).
            let columns = fields
                .iter()
                .filter(|g| g.name == f.name && table_column(g))
                .count();
            let keys = fields
                .iter()
                .filter(|k| k.name.strip_prefix(RESULT_KEY_PREFIX.as_bytes()) == Some(f.name))
                .count();
            if columns != keys {
                continue;
            }
            let key = fields.iter().enumerate().position(|(j, k)| {
                !used[j] && k.name.strip_prefix(RESULT_KEY_PREFIX.as_bytes()) == Some(f.name)
            });
            if let (Some(j), Some(FieldAction::Decrypt(_, _, slot))) = (key, actions.get_mut(i)) {
                used[j] = true;
                *slot = Some(j);
            }
        }
        any.then_some(RowPlan { fields: actions })
    }

    pub(super) async fn data_row(&self, body: &[u8], plan: &RowPlan) -> Result<Bytes, ClientError> {
        let values = data_row(body).map_err(|_| malformed())?;
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
                (FieldAction::Keep, Some(v)) => put_value(&mut out, v)?,
                (FieldAction::Decrypt(c, format, key), Some(stored)) => {
                    let row = match key.and_then(|k| values.get(k).copied().flatten()) {
                        Some(k) => Some(std::str::from_utf8(k).map_err(|_| malformed())?),
                        None => None,
                    };
                    let plain = self.decrypt_field(c, *format, stored, row).await?;
                    put_value(&mut out, &plain)?;
                }
            }
        }
        let len = u32::try_from(out.len() - 1).map_err(|_| too_large())?;
        out[1..5].copy_from_slice(&len.to_be_bytes());
        Ok(out.freeze())
    }

    /// Decrypt one stored value of `c`, read from the row whose primary key has the
    /// canonical text `row` when the result carries it.
    pub(super) async fn decrypt_field(
        &self,
        c: &ColumnRef,
        format: WireFormat,
        stored: &[u8],
        row: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        let ciphertext: std::borrow::Cow<'_, [u8]> = match format {
            WireFormat::Binary => stored.into(),
            // bytea in text output: `\x` then hex.
            WireFormat::Text => stored
                .strip_prefix(b"\\x")
                .and_then(crate::crypto::codec::bytes_of_hex)
                .ok_or_else(|| crypto_error(&CryptoError::Malformed("not bytea hex"), c))?
                .into(),
        };
        let manager = &self.encryption.manager;
        let canonical =
            match manager.try_decrypt_now_row(&c.table, &c.column, &self.scope, row, &ciphertext) {
                Some(result) => result,
                None => {
                    manager
                        .decrypt_row(&c.table, &c.column, &self.scope, row, &ciphertext)
                        .await
                }
            }
            .map(zeroize::Zeroizing::new)
            .map_err(|e| crypto_error(&e, c))?;
        decode_to_wire(c.ty, format, &canonical)
            .map_err(|e| crypto_error(&CryptoError::Codec(e), c))
    }
}

pub(super) fn too_large() -> ClientError {
    ClientError::error(
        sqlstate::INTERNAL_ERROR,
        "pgward: a decrypted row is too large",
    )
}

/// A length-prefixed value; one that does not fit the protocol's 32-bit length is an error.
pub(super) fn put_value(out: &mut BytesMut, v: &[u8]) -> Result<(), ClientError> {
    out.put_i32(i32::try_from(v.len()).map_err(|_| too_large())?);
    out.extend_from_slice(v);
    Ok(())
}

pub(super) use crate::protocol::backend::{
    EMPTY_QUERY_RESPONSE, NOTIFICATION_RESPONSE, NO_DATA, PARAMETER_DESCRIPTION, PORTAL_SUSPENDED,
    ROW_DESCRIPTION,
};

/// Storage size PostgreSQL reports for a client type (`typlen`).
pub(super) fn typlen(ty: ClientType) -> i16 {
    match ty {
        ClientType::Int4 | ClientType::Date => 4,
        ClientType::Int8 | ClientType::Timestamptz => 8,
        ClientType::Bool => 1,
        _ => -1,
    }
}

pub(super) fn rewrite_row_description(fields: &[RowField<'_>], plan: &RowPlan) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(ROW_DESCRIPTION);
    out.put_u32(0);
    out.put_u16(plan.visible_count());
    for (f, action) in fields.iter().zip(&plan.fields) {
        let (type_oid, len, typmod) = match action {
            FieldAction::Drop => continue,
            FieldAction::Keep => (f.type_oid, f.typlen, f.typmod),
            FieldAction::Decrypt(c, _, _) => (c.ty.oid(), typlen(c.ty), -1),
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

pub(super) fn finish(mut out: BytesMut) -> Bytes {
    let len = u32::try_from(out.len() - 1).unwrap_or(u32::MAX);
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// ParameterDescription as the client should see it: its own parameters, with the client
/// types of encrypted ones.
pub(super) fn retype_parameter_description(body: &[u8], plan: &ParamPlan) -> Option<Bytes> {
    let mut c = Cursor::new(body, "ParameterDescription");
    let n = c.u16().ok()?;
    let oids: Vec<u32> = (0..n).map(|_| c.u32()).collect::<Result<_, _>>().ok()?;
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
