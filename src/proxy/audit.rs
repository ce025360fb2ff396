//! The proxy's side of auditing: one record per statement (each statement of a simple Query,
//! each extended Execute with its prepared statement, each refusal), made durable before the
//! statement is forwarded, and a completion record when the server has answered it.
//!
//! Records are built from what the relay already has in hand: the client's message, the
//! interceptor's verdict and the policy analysis. Each record's [`Awaiting`] rides with its
//! request in the session's one response tracker (`proxy::replies`), which hands it back with
//! the server's answer; [`Completions`] writes the completion record from it. The log itself
//! lives in [`crate::audit`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::statements::{Portal, Prepared, SessionStatements, Statement};
use crate::audit::{
    AuditError, AuditEvent, AuditHandle, BoundParam, Decision, DurableReceipt, Protocol,
    SessionInfo, SqlText, StatementRecord, Touched,
};
use crate::error::Refusal;
use crate::policy::{Rewritten, StatementInfo};
use crate::protocol::replies::{Outcome, Request};
use crate::protocol::view::{BindView, Frontend, ParseView};
use crate::protocol::{backend, Message};
use crate::sql::fingerprint::split_statements;
use crate::sql::NameKind;

mod names;
mod reuse;
use names::SessionNames;
use reuse::TouchedReuse;

/// What the interceptor decided about a message, as the audit record needs it.
pub struct Observed<'a> {
    /// Where the message is in its batch (its records are awaited with it).
    pub position: usize,
    pub message: &'a Message,
    /// The message decoded (once, by the relay).
    pub view: &'a Frontend<'a>,
    pub refused: Option<&'a Refusal>,
    pub analysis: Option<Arc<Rewritten>>,
}

/// What the audit stage gives the session's registry for one message.
pub enum Registered {
    /// A Parse's statement.
    Statement(Arc<Prepared>),
    /// A Bind's parameters.
    Params(Vec<BoundParam>),
    Nothing,
}

/// The completion a request's answer makes of its statement record.
#[derive(Debug)]
pub struct Awaiting {
    /// Sequence number of the statement record; `None` when it has none of its own (a
    /// multi-statement Query: its statements have) or its record was not written.
    seq: Option<u64>,
    /// The statements of a multi-statement Query, in order: each completes at its own
    /// CommandComplete or error; those still here at the ReadyForQuery were skipped.
    parts: VecDeque<Awaiting>,
    started: Instant,
    rows: Option<u64>,
    command: Option<String>,
    sqlstate: Option<String>,
    /// Still awaited at ReadyForQuery: never run, after an earlier statement's error.
    skipped: bool,
    /// DataRows seen for it: an Execute that stops at PortalSuspended has no CommandComplete
    /// to count them, and the rows it returned must still be on record.
    data_rows: u64,
    /// Answered by PortalSuspended: the portal has more rows for later Executes.
    suspended: bool,
}

/// Per-session audit state of the client direction.
pub struct SessionAudit {
    handle: AuditHandle,
    session: Arc<SessionInfo>,
    /// The session's fields of every statement record, serialised once.
    session_json: Option<Arc<str>>,
    /// Statement records written (for the connection-closed record).
    pub statements_recorded: u64,
    /// Encrypted columns are configured: literals and parameters may be plaintext of one, so
    /// only redacted text and parameter types are ever recorded, whatever `record_values` says.
    literals_may_be_sensitive: bool,
    /// Fingerprints by redacted text: a shape is lexed for its fingerprint once per session.
    fingerprints: crate::sql::fingerprint::FingerprintMemo,
    names: SessionNames,
    /// What recent analyses touch, for the next statements of the same analysis.
    touched_reuse: TouchedReuse,
}

/// One audited batch: records to make durable, then what to await for each.
#[derive(Default)]
pub struct BatchRecords {
    events: Vec<AuditEvent>,
    /// For each message whose answer completes records (by its position in the batch): the
    /// index into `events` of its own record and of each statement's of a multi-statement
    /// Query.
    awaiting: Vec<(usize, AwaitedRecords)>,
}

#[derive(Default)]
struct AwaitedRecords {
    record: Option<usize>,
    parts: Vec<usize>,
}

impl BatchRecords {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.awaiting.is_empty()
    }
}

impl SessionAudit {
    pub fn new(
        handle: AuditHandle,
        session: Arc<SessionInfo>,
        literals_may_be_sensitive: bool,
    ) -> Self {
        Self {
            handle,
            session_json: crate::audit::statement_session_json(&session).ok(),
            session,
            statements_recorded: 0,
            literals_may_be_sensitive,
            fingerprints: Default::default(),
            names: SessionNames::default(),
            touched_reuse: TouchedReuse::default(),
        }
    }

    pub fn session(&self) -> &Arc<SessionInfo> {
        &self.session
    }

    pub fn handle(&self) -> &AuditHandle {
        &self.handle
    }

    /// The writer of this session's completion records (the upstream direction's side).
    pub fn completions(&self) -> Completions {
        Completions::new(self.handle.clone(), &self.session)
    }

    /// Add what one client message means for the audit log to `batch`; an Execute's record
    /// is made from its portal in the session's registry. Returns what the registry keeps of
    /// a Parse's statement or a Bind's parameters for the records of later Executes.
    pub fn observe(
        &mut self,
        observed: Observed<'_>,
        batch: &mut BatchRecords,
        statements: &SessionStatements,
        statement: Option<&Statement>,
    ) -> Registered {
        let message = observed.message;
        match observed.view {
            Frontend::Query { sql } => {
                self.query(sql, &observed, batch);
            }
            Frontend::FunctionCall => {
                let oid = message
                    .body()
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                let sql = format!("<fast-path function call, function oid {oid}>");
                let record = self.record(Protocol::Simple, None, &sql, &observed, Vec::new());
                batch.push(observed.position, record, observed.refused.is_none());
            }
            Frontend::Parse(parse) => {
                let prepared = self.parse(parse, &observed, batch);
                if !prepared.refused {
                    self.names
                        .remember(NameKind::Prepared, parse.name, &prepared.touched);
                }
                return Registered::Statement(prepared);
            }
            Frontend::Bind(bind) => {
                let prepared = statement.and_then(|s| s.audit.as_deref());
                if let Some(prepared) = prepared.filter(|p| !p.refused) {
                    self.names
                        .remember(NameKind::Cursor, bind.portal, &prepared.touched);
                }
                return Registered::Params(self.bound_params(bind, prepared));
            }
            Frontend::Close(target) => {
                let kind = if target.is_statement() {
                    NameKind::Prepared
                } else {
                    NameKind::Cursor
                };
                self.names.forget(kind, target.name);
            }
            Frontend::Execute { portal, .. } => {
                self.execute(&observed, statements.portal(portal), batch)
            }
            _ => {}
        }
        Registered::Nothing
    }

    /// A simple Query: one record per statement of its text, as pgAudit logs substatements,
    /// each with its own text, analysis and completion. A Query of one statement, or a
    /// refused one (nothing of it runs: its refusal is the one record), is one record.
    fn query(&mut self, sql: &str, observed: &Observed<'_>, batch: &mut BatchRecords) {
        // Without a `;` the text is one statement at most, and so it is when the parser saw
        // one (`SELECT …;`): no need to lex it for the split.
        let one_parsed = observed
            .analysis
            .as_ref()
            .is_some_and(|a| a.statements.len() == 1);
        let parts = if observed.refused.is_none() && !one_parsed && sql.contains(';') {
            split_statements(sql)
        } else {
            Vec::new()
        };
        if parts.len() < 2 {
            let record = self.record(Protocol::Simple, None, sql, observed, Vec::new());
            batch.push(observed.position, record, observed.refused.is_none());
            return;
        }
        let analysis = observed.analysis.as_deref();
        // Each statement gets its own analysis when the parser saw the statements the split
        // did; otherwise (a text the parser rejects) each names everything the text touches.
        let infos = analysis.map(|a| &a.statements[..]);
        let paired = infos.filter(|i| i.len() == parts.len());
        let rewritten = analysis.filter(|a| !a.unrestricted).map(|a| {
            let split = split_statements(&a.sql);
            (
                a.sql.as_str(),
                (split.len() == parts.len()).then_some(split),
            )
        });
        let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        let mut awaited = AwaitedRecords::default();
        for (i, part) in parts.iter().enumerate() {
            // Each part is redacted on its own: the analysis's text is the whole Query's.
            let mut record = self.new_record(Protocol::Simple, part, None);
            record.part = Some((u32::try_from(i + 1).unwrap_or(u32::MAX), count));
            record.session_json = self.session_json.clone();
            let touched = record.touched_mut();
            match (paired, infos) {
                (Some(infos), _) => {
                    let info = infos.get(i..=i).unwrap_or(&[]);
                    add_analysis(touched, info, &mut self.names, true)
                }
                (None, Some(infos)) => add_analysis(touched, infos, &mut self.names, true),
                (None, None) => {}
            }
            match &rewritten {
                Some((_, Some(split))) => touched.set_rewritten(split.get(i).unwrap_or(&""), None),
                Some((whole, None)) => touched.set_rewritten(whole, None),
                None => {}
            }
            self.statements_recorded += 1;
            awaited.parts.push(batch.events.len());
            batch.events.push(AuditEvent::Statement(Box::new(record)));
        }
        batch.awaiting.push((observed.position, awaited));
    }

    fn parse(
        &mut self,
        parse: &ParseView<'_>,
        observed: &Observed<'_>,
        batch: &mut BatchRecords,
    ) -> Arc<Prepared> {
        let (name, sql) = (parse.name, parse.sql);
        let param_types = parse.param_types().collect();
        let refused = observed.refused.is_some();
        if refused {
            // The refusal is the record; nothing of this statement will run.
            let event = self.record(Protocol::Extended, Some(name), sql, observed, Vec::new());
            batch.events.push(event);
        }
        let (text, fingerprint) = self.text_of(sql, observed.analysis.as_deref());
        Arc::new(Prepared {
            text,
            fingerprint,
            touched: self.touched_by(observed.analysis.as_deref(), !refused),
            param_types,
            refused,
        })
    }

    /// A Bind's parameters as its Executes' records show them (types only when literals may
    /// be plaintext of an encrypted column).
    fn bound_params(&self, bind: &BindView<'_>, statement: Option<&Prepared>) -> Vec<BoundParam> {
        let Some(statement) = statement else {
            return Vec::new();
        };
        bind.values
            .iter()
            .enumerate()
            .map(|(i, &value)| {
                let type_oid = statement.param_types.get(i).copied().unwrap_or(0);
                if self.literals_may_be_sensitive {
                    BoundParam::sensitive(type_oid)
                } else {
                    BoundParam::plain(type_oid, value)
                }
            })
            .collect()
    }

    fn execute(
        &mut self,
        execute: &Observed<'_>,
        portal: Option<&Portal>,
        batch: &mut BatchRecords,
    ) {
        let Some((portal, statement)) = portal.and_then(|p| Some((p, p.statement.audit.clone()?)))
        else {
            // Unknown portal: the server will answer with an error; nothing ran.
            return;
        };
        if statement.refused {
            return;
        }
        // Allowed (a refused Parse never gets here), and what it touches was found at Parse.
        let observed = Observed {
            position: execute.position,
            message: execute.message,
            view: execute.view,
            refused: None,
            analysis: None,
        };
        let mut record = StatementRecord::with_fingerprint(
            self.session.clone(),
            Protocol::Extended,
            statement.text.clone(),
            statement.fingerprint.clone(),
        );
        record.touched = statement.touched.clone();
        let name = &portal.statement.name;
        record.statement_name = (!name.is_empty()).then(|| name.to_string());
        record.params = portal.params.clone();
        let event = self.finish_record(record, &observed);
        batch.push(observed.position, event, true);
    }

    fn record(
        &mut self,
        protocol: Protocol,
        name: Option<&str>,
        sql: &str,
        observed: &Observed<'_>,
        params: Vec<BoundParam>,
    ) -> AuditEvent {
        // The analysis is of this text only for a Query or Parse (a function call's record
        // text is pgward's own).
        let analysis = match observed.view {
            Frontend::Query { .. } | Frontend::Parse(_) => observed.analysis.as_deref(),
            _ => None,
        };
        let mut record = self.new_record(protocol, sql, analysis);
        record.statement_name = name.filter(|n| !n.is_empty()).map(str::to_string);
        record.params = params;
        self.finish_record(record, observed)
    }

    /// A record of `sql`, redacted as the session's settings require.
    fn new_record(
        &mut self,
        protocol: Protocol,
        sql: &str,
        analysis: Option<&Rewritten>,
    ) -> StatementRecord {
        let (text, fingerprint) = self.text_of(sql, analysis);
        StatementRecord::with_fingerprint(self.session.clone(), protocol, text, fingerprint)
    }

    /// `sql` as its records carry it, and its fingerprint: from the analysis of the text when
    /// the policy engine made them (once per statement shape), else redacted here.
    fn text_of(&mut self, sql: &str, analysis: Option<&Rewritten>) -> (SqlText, Arc<str>) {
        let sensitive = self.literals_may_be_sensitive;
        if let Some(known) = analysis.and_then(|a| a.client_text.as_ref()) {
            let text = SqlText::with_redacted(sql, known.redacted.clone(), sensitive);
            return (text, known.fingerprint.clone());
        }
        let text = SqlText::new(sql, sensitive);
        let fingerprint = self.fingerprints.of(text.redacted());
        (text, fingerprint)
    }

    /// Decision, rule and policy analysis onto a record.
    fn finish_record(
        &mut self,
        mut record: StatementRecord,
        observed: &Observed<'_>,
    ) -> AuditEvent {
        record.session_json = self.session_json.clone();
        if let Some(refusal) = observed.refused {
            record.decision = if refusal.kind.is_decision() {
                Decision::Refused
            } else {
                Decision::Failed
            };
            record.rule = refusal.rule.clone();
            record.reason = Some(refusal.error.message.clone());
            record.sqlstate = Some(refusal.error.sqlstate.to_string());
        }
        if observed.analysis.is_some() {
            let runs = observed.refused.is_none();
            record.touched = self.touched_by(observed.analysis.as_deref(), runs);
        }
        self.statements_recorded += 1;
        AuditEvent::Statement(Box::new(record))
    }

    /// What an analysed text touches, for its records (nothing known without an analysis);
    /// `runs`: it will be forwarded (a refused `DECLARE` or `PREPARE` creates nothing).
    fn touched_by(&mut self, analysis: Option<&Rewritten>, runs: bool) -> Arc<Touched> {
        let Some(analysis) = analysis else {
            return Arc::default();
        };
        // A policy-bound analysis whose hash the engine did not make is hashed from its text
        // here, per statement: only reused where the hash is the analysis's own.
        let hash = analysis.rewritten_redacted_sha256.as_ref();
        let reusable = TouchedReuse::applies_to(&analysis.statements)
            && (analysis.unrestricted || hash.is_some());
        if reusable {
            if let Some(touched) = self.touched_reuse.get(&analysis.statements, hash) {
                return touched;
            }
        }
        let mut touched = Touched::default();
        if !analysis.unrestricted {
            touched.set_rewritten(&analysis.sql, hash);
        }
        add_analysis(&mut touched, &analysis.statements, &mut self.names, runs);
        let touched = Arc::new(touched);
        if reusable {
            self.touched_reuse
                .put(&analysis.statements, hash, touched.clone());
        }
        touched
    }

    /// Write the batch's records to the log (durable too with `durability =
    /// "before_forward"`). Returns what the answers to the batch's messages complete (by
    /// position in the batch; always, so completions stay matched) and whether the records
    /// were written, with the receipt of their durability.
    pub async fn commit(
        &self,
        batch: BatchRecords,
    ) -> (Vec<(usize, Awaiting)>, Result<DurableReceipt, AuditError>) {
        let started = Instant::now();
        let written = if batch.events.is_empty() {
            Ok((Vec::new(), DurableReceipt::already_durable()))
        } else {
            self.handle.append_staged(batch.events, false).await
        };
        let seqs = written
            .as_ref()
            .map(|(seqs, _)| seqs.as_slice())
            .unwrap_or_default();
        let awaiting = |index: Option<usize>| Awaiting {
            seq: index.and_then(|i| seqs.get(i).copied()),
            parts: VecDeque::new(),
            started,
            rows: None,
            command: None,
            sqlstate: None,
            skipped: false,
            data_rows: 0,
            suspended: false,
        };
        let awaited = batch
            .awaiting
            .into_iter()
            .map(|(position, records)| {
                let mut own = awaiting(records.record);
                own.parts = records
                    .parts
                    .into_iter()
                    .map(|i| awaiting(Some(i)))
                    .collect();
                (position, own)
            })
            .collect();
        (awaited, written.map(|(_, receipt)| receipt))
    }
}

impl BatchRecords {
    /// A message's record, completed by the message's answer unless `completes` is false (a
    /// refusal's own record: the server's answer to its stand-in says nothing about it).
    fn push(&mut self, position: usize, event: AuditEvent, completes: bool) {
        if completes {
            let record = Some(self.events.len());
            let parts = Vec::new();
            self.awaiting
                .push((position, AwaitedRecords { record, parts }));
        }
        self.events.push(event);
    }
}

/// What the analysed statements touch, onto their record (a `FETCH` or `EXECUTE`: what the
/// statement that created its cursor or prepared statement touches).
fn add_analysis(
    touched: &mut Touched,
    infos: &[StatementInfo],
    names: &mut SessionNames,
    runs: bool,
) {
    for info in infos {
        names.apply(info, runs, touched);
        add_touched(touched, &info.into());
        if let Some(class) = info.class.map(|c| c.as_str()) {
            if !touched.command_class.contains(&class) {
                touched.command_class.push(class);
            }
        }
    }
}

/// The tables and columns a statement touches, wherever they were found (its analysis, or
/// the statement that created the name it runs).
struct TouchedLists<'a> {
    tables_read: &'a [String],
    tables_written: &'a [String],
    columns_read: &'a [String],
    columns_written: &'a [String],
    encrypted_columns: &'a [String],
}

impl<'a> From<&'a StatementInfo> for TouchedLists<'a> {
    fn from(i: &'a StatementInfo) -> Self {
        TouchedLists {
            tables_read: &i.tables_read,
            tables_written: &i.tables_written,
            columns_read: &i.columns_read,
            columns_written: &i.columns_written,
            encrypted_columns: &i.encrypted_columns,
        }
    }
}

impl<'a> From<&'a Touched> for TouchedLists<'a> {
    fn from(t: &'a Touched) -> Self {
        TouchedLists {
            tables_read: &t.tables_read,
            tables_written: &t.tables_written,
            columns_read: &t.columns_read,
            columns_written: &t.columns_written,
            encrypted_columns: &t.encrypted_columns,
        }
    }
}

/// Adds `lists` to what `touched` names, each item once.
fn add_touched(touched: &mut Touched, lists: &TouchedLists<'_>) {
    extend_unique(&mut touched.tables_read, lists.tables_read);
    extend_unique(&mut touched.tables_written, lists.tables_written);
    extend_unique(&mut touched.columns_read, lists.columns_read);
    extend_unique(&mut touched.columns_written, lists.columns_written);
    extend_unique(&mut touched.encrypted_columns, lists.encrypted_columns);
}

fn extend_unique(into: &mut Vec<String>, from: &[String]) {
    for item in from {
        if !into.contains(item) {
            into.push(item.clone());
        }
    }
}

/// The upstream direction's side: completion records, written from the [`Awaiting`] the
/// session's response tracker hands back with each answer.
pub struct Completions {
    handle: AuditHandle,
    session_id: u64,
    service: Arc<str>,
}

impl Completions {
    pub fn new(handle: AuditHandle, session: &SessionInfo) -> Self {
        Self {
            handle,
            session_id: session.session_id,
            service: session.service.as_str().into(),
        }
    }

    /// A message that is part of the answer to a Query or FunctionCall still awaited: each
    /// CommandComplete, EmptyQueryResponse or error ends one of its statements.
    pub fn part(&self, awaiting: &mut Awaiting, message: &Message) {
        if !matches!(
            message.tag(),
            backend::COMMAND_COMPLETE | backend::EMPTY_QUERY_RESPONSE | backend::ERROR_RESPONSE
        ) {
            return;
        }
        match awaiting.parts.pop_front() {
            Some(mut statement) => {
                statement.answered_by(message);
                self.complete(statement);
            }
            // A Query of one statement completes at its ReadyForQuery.
            None => awaiting.answered_by(message),
        }
    }

    /// A request left the tracker: `answer` settled it (an error, a completion, or the
    /// ReadyForQuery that closed its segment; none when it was skipped before it was sent).
    pub fn settled(
        &self,
        request: Request,
        outcome: Outcome,
        mut awaiting: Awaiting,
        answer: Option<&Message>,
    ) {
        match (request, outcome) {
            (Request::Query | Request::FunctionCall, _) => {
                // Statements still awaited at the ReadyForQuery were skipped after an error.
                let skipped = outcome == Outcome::Failed;
                for mut statement in std::mem::take(&mut awaiting.parts) {
                    statement.skipped = skipped;
                    self.complete(statement);
                }
            }
            (_, Outcome::Skipped) => awaiting.skipped = true,
            (_, Outcome::Done | Outcome::Failed) => {
                if let Some(answer) = answer {
                    awaiting.answered_by(answer);
                }
            }
        }
        self.complete(awaiting);
    }

    fn complete(&self, item: Awaiting) {
        let Some(statement_seq) = item.seq else {
            return;
        };
        self.handle.append_nowait(AuditEvent::StatementCompleted {
            session_id: self.session_id,
            service: self.service.clone(),
            statement_seq,
            rows: item.rows,
            command: item.command,
            duration: item.started.elapsed(),
            sqlstate: item.sqlstate,
            skipped: item.skipped,
            suspended: item.suspended,
        });
    }
}

impl Awaiting {
    /// DataRows answered for it: an Execute that stops at PortalSuspended has no
    /// CommandComplete to count them.
    pub fn rows_seen(&mut self, rows: u64) {
        self.data_rows += rows;
    }

    /// The client got an error with `sqlstate` instead of the rest of this statement's rows
    /// (of the statement running, for a multi-statement Query).
    pub fn failed_for_client(&mut self, sqlstate: &str) {
        let statement = match self.parts.front_mut() {
            Some(part) => part,
            None => self,
        };
        statement.sqlstate = Some(sqlstate.to_owned());
    }

    /// What the server's answer says about the statement.
    fn answered_by(&mut self, message: &Message) {
        match message.tag() {
            backend::PORTAL_SUSPENDED => {
                // This Execute's part of the portal's rows; each later Execute of the
                // portal gets its own record and completion with its own part.
                self.rows = Some(self.data_rows);
                self.suspended = true;
            }
            backend::COMMAND_COMPLETE => {
                let (command, rows) = command_tag(message.body());
                self.command = Some(command);
                self.rows = Some(self.rows.unwrap_or(0) + rows.unwrap_or(0));
            }
            backend::ERROR_RESPONSE => {
                let fields =
                    crate::protocol::fields::ErrorFields::parse(message.body()).unwrap_or_default();
                self.sqlstate = Some(fields.code.unwrap_or_else(|| "XX000".into()));
            }
            _ => {}
        }
    }
}

/// Command name and row count of a CommandComplete tag (`INSERT 0 5` → (`INSERT`, 5)).
fn command_tag(body: &[u8]) -> (String, Option<u64>) {
    let text = crate::protocol::view::command_tag(body).unwrap_or("");
    let mut words = text.split(' ');
    let command = words.next().unwrap_or("").to_string();
    let rows = text.rsplit(' ').next().and_then(|n| n.parse().ok());
    (command, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_tags_give_command_and_rows() {
        assert_eq!(command_tag(b"INSERT 0 5\0"), ("INSERT".into(), Some(5)));
        assert_eq!(command_tag(b"SELECT 12\0"), ("SELECT".into(), Some(12)));
        assert_eq!(command_tag(b"BEGIN\0"), ("BEGIN".into(), None));
    }
}
