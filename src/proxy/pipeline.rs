//! The client → upstream pipeline of one batch.
//!
//! Each client message is decoded once ([`Frontend`]); the same view then goes through the
//! ordered stages over the session's state: the policy stage (the interceptor: the policy
//! rewrite with field encryption's SQL transform in the same pass over the parsed statements),
//! the audit stage (records written — and made durable per `[audit] durability` — before
//! anything is forwarded), and field encryption's protocol stage (Parse retyped, Bind values
//! encrypted). Decisions travel as typed values ([`Verdict`], [`Refusal`]); what goes upstream
//! is assembled last, with unchanged runs of the batch kept as zero-copy slices.

use std::sync::{Arc, Weak};

use bytes::Bytes;

use super::audit::{Awaiting, BatchRecords, Observed, Registered, SessionAudit};
use super::encryption::{ClientHalf, StatementCrypto, StatementRows};
use super::intercept::{Interceptor, Verdict};
use super::replies::{Awaited, Sent};
use super::state::SessionState;
use super::statements::{SessionStatements, Statement};
use super::Shared;
use crate::audit::OnFailure;
use crate::crypto::sql::ParamPlan;
use crate::error::{sqlstate, ClientError, Refusal, RefusalKind};
use crate::metrics::inc;
use crate::policy::Rewritten;
use crate::protocol::replies::Request;
use crate::protocol::view::{Frontend, ParseView};
use crate::protocol::{build, frontend, Batch, Message, ProtocolError};

/// Run every message of a batch through the stages, make its audit records durable,
/// then assemble what goes upstream; unchanged runs stay zero-copy slices.
pub(super) async fn run_batch(
    shared: &Shared,
    state: &SessionState,
    (interceptor, statements): (&mut Interceptor, &mut SessionStatements),
    mut audit: Option<&mut SessionAudit>,
    batch: &Batch,
) -> Vec<Bytes> {
    // Each message is decoded once; every stage reads the same view.
    let messages: Vec<Message> = batch.messages().collect();
    let views: Vec<Result<Frontend<'_>, ProtocolError>> =
        messages.iter().map(Frontend::decode).collect();
    let mut verdicts = Vec::with_capacity(messages.len());
    let mut plans = Vec::with_capacity(messages.len());
    let mut resolved = Vec::with_capacity(messages.len());
    let mut named_parses = Vec::with_capacity(messages.len());
    let mut records = BatchRecords::default();
    statements.forget_failed(state.replies.take_failed());
    let encrypting = interceptor.crypto_mut().is_some();
    for (position, (message, view)) in messages.iter().zip(&views).enumerate() {
        // Looked up once, in message order, before this message changes the registry.
        let statement = view.as_ref().ok().and_then(|view| statements.resolve(view));
        let registry_refusal = view
            .as_ref()
            .ok()
            .and_then(|v| registry_refusal(state, statements, v, statement.as_ref()));
        let registrable = registry_refusal.is_none();
        let verdict = match (view, registry_refusal) {
            (_, Some(refusal)) => Verdict::Refuse(refusal),
            (Ok(Frontend::Query { sql } | Frontend::Parse(ParseView { sql, .. })), None)
                if state.reads_sql_differently()
                    || (!interceptor.is_policy_bound()
                        && crate::sql::settings::may_set_unsafely(sql)) =>
            {
                Verdict::Refuse(read_differently(state))
            }
            (Ok(view), None) => interceptor.client_message(view),
            (Err(e), None) => malformed_message(state, e),
        };
        let plan = interceptor.take_param_plan();
        let analysis = interceptor.take_analysis();
        let rows = match view {
            Ok(Frontend::Parse(_)) if encrypting => statement_rows(analysis.as_deref()),
            _ => None,
        };
        let mut registered = Registered::Nothing;
        if let (Some(audit), Ok(view)) = (audit.as_deref_mut(), view) {
            let refused = match &verdict {
                Verdict::Refuse(error) => Some(error),
                _ => None,
            };
            let observed = Observed {
                position,
                message,
                view,
                refused,
                analysis,
            };
            registered = audit.observe(observed, &mut records, statements, statement.as_deref());
        }
        let named = match view {
            Ok(view) if registrable => register(
                statements,
                view,
                &verdict,
                (&plan, rows),
                statement.as_ref(),
                registered,
            ),
            _ => None,
        };
        named_parses.push(named.as_ref().map(Arc::downgrade));
        plans.push(plan);
        resolved.push(statement);
        verdicts.push(verdict);
    }
    let mut audited = Vec::new();
    if let Some(audit) = audit {
        if !records.is_empty() {
            let (awaiting, written) = audit.commit(records).await;
            audited = awaiting;
            match written {
                Ok(receipt) => state.hold_responses_until(receipt),
                Err(e) => {
                    inc(&shared.metrics.audit_write_failures);
                    tracing::error!(session = state.id, error = %e, "audit log cannot write");
                    if audit.handle().on_failure() == OnFailure::Refuse {
                        refuse_all_statements(batch, &mut verdicts, &e);
                    }
                }
            }
        }
    }
    state.replies.sent(awaited_requests(
        &messages,
        &verdicts,
        named_parses,
        audited,
    ));
    assemble(
        shared,
        state,
        batch,
        (&messages, &views),
        Decided {
            verdicts,
            plans,
            statements: resolved,
        },
        interceptor.crypto_mut(),
    )
    .await
}

/// A batch of a pass-through, unaudited session: forwarded as it is, its requests queued in
/// the session's response tracker (for the statement latency and the pipelining cap).
pub(super) fn forward_unchanged(state: &SessionState, batch: &Batch) -> Vec<Bytes> {
    let requests = batch.messages().filter_map(|message| {
        let tag = message.tag();
        match Request::of(&message) {
            Some(request) => Some(Sent::Request(request, Awaited::default())),
            None => is_copy(tag).then_some(Sent::Copy),
        }
    });
    state.replies.sent(requests);
    vec![batch.bytes().clone()]
}

fn is_copy(tag: u8) -> bool {
    matches!(
        tag,
        frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL
    )
}

/// What the session's response tracker awaits for each message of the batch, in order: the
/// request the server will answer (for a refused message, its stand-in's), the named Parse's
/// registry entry and the audit records its answer completes.
fn awaited_requests<'a>(
    messages: &'a [Message],
    verdicts: &'a [Verdict],
    named_parses: Vec<Option<Weak<Statement>>>,
    audited: Vec<(usize, Awaiting)>,
) -> impl Iterator<Item = Sent> + 'a {
    let mut audited = audited.into_iter().peekable();
    let batch = messages.iter().zip(verdicts).zip(named_parses).enumerate();
    batch.filter_map(move |(position, ((message, verdict), statement))| {
        let tag = message.tag();
        let request = match verdict {
            Verdict::Refuse(_) if !matches!(tag, frontend::QUERY | frontend::FUNCTION_CALL) => {
                Some(Request::Parse)
            }
            _ => Request::of(message),
        };
        // Taken in order whether or not the message makes a request, so none is left behind.
        let audit = audited
            .next_if(|(at, _)| *at == position)
            .map(|(_, awaiting)| awaiting);
        match request {
            Some(request) => Some(Sent::Request(request, Awaited::new(statement, audit))),
            None => is_copy(tag).then_some(Sent::Copy),
        }
    })
}

/// Field encryption's slot for what it learns of a prepared statement's rows, for a
/// statement whose result columns PostgreSQL fixes when it is prepared (one query or data
/// change; a statement the analysis did not type gets none).
fn statement_rows(analysis: Option<&Rewritten>) -> Option<Arc<StatementRows>> {
    let [statement] = &*analysis?.statements else {
        return None;
    };
    let fixed = statement.kind.is_some_and(|kind| kind.has_fixed_result());
    fixed.then(Arc::default)
}

/// What the session's registry keeps of one message it did not refuse: a Parse's statement
/// (with field encryption's parameter plan and slot for its rows, and the audit's view;
/// returned when named, for the outcome of its Parse), a Bind's portal, a Close, a
/// `DEALLOCATE`.
fn register(
    statements: &mut SessionStatements,
    view: &Frontend<'_>,
    verdict: &Verdict,
    (plan, rows): (&Option<Arc<ParamPlan>>, Option<Arc<StatementRows>>),
    statement: Option<&Arc<Statement>>,
    registered: Registered,
) -> Option<Arc<Statement>> {
    match view {
        Frontend::Parse(parse) => {
            let refused = matches!(verdict, Verdict::Refuse(_));
            // A refused Parse keeps nothing of field encryption: its marker runs instead.
            let plan = plan.clone().filter(|p| !refused && p.is_active());
            let rows = rows.filter(|_| !refused);
            let audit = match registered {
                Registered::Statement(prepared) => Some(prepared),
                _ => None,
            };
            let entry = statements.parsed(parse.name, StatementCrypto { plan, rows }, audit);
            return (!parse.name.is_empty()).then_some(entry);
        }
        Frontend::Bind(bind) => {
            let params = match registered {
                Registered::Params(params) => params,
                _ => Vec::new(),
            };
            if let Some(statement) = statement {
                statements.bound(bind.portal, statement, params);
            }
        }
        Frontend::Close(target) => statements.closed(target.kind, target.name),
        Frontend::Query { sql } if !matches!(verdict, Verdict::Refuse(_)) => {
            statements.deallocated(sql)
        }
        _ => {}
    }
    None
}

/// A message the registry refuses: it would take the session past its statements (54000),
/// or PostgreSQL would not run it as the registry sees it (a Parse of a name already
/// prepared, 42P05; a Bind of a statement never prepared, 26000).
fn registry_refusal(
    state: &SessionState,
    statements: &SessionStatements,
    view: &Frontend<'_>,
    statement: Option<&Arc<Statement>>,
) -> Option<Refusal> {
    if let Some((code, message)) = statements.conflict(view, statement) {
        return Some(Refusal::new(RefusalKind::Protocol, code, message));
    }
    statements
        .would_overflow(view)
        .then(|| too_many_statements(state))
}

/// A Parse or Bind of a new name when the session holds all the statements and portals it
/// may ([`super::statements::MAX_STATEMENTS`]).
fn too_many_statements(state: &SessionState) -> Refusal {
    tracing::info!(
        session = state.id,
        "prepared statement refused: the session holds too many"
    );
    Refusal::new(
        RefusalKind::Protocol,
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!(
            "pgward: this session holds {} prepared statements and portals, the most it may; close some before preparing more",
            super::statements::MAX_STATEMENTS
        ),
    )
}

/// The stages' decisions on each message of a batch, in order: the verdict, the parameter
/// plan of a Parse's or Query's rewrite, and the registered statement the message refers to.
struct Decided {
    verdicts: Vec<Verdict>,
    plans: Vec<Option<Arc<ParamPlan>>>,
    statements: Vec<Option<Arc<Statement>>>,
}

/// A message whose body does not match its type is refused (never forwarded unanalysed).
fn malformed_message(state: &SessionState, error: &ProtocolError) -> Verdict {
    tracing::info!(session = state.id, %error, "malformed client message refused");
    Verdict::Refuse(Refusal::new(
        RefusalKind::Protocol,
        sqlstate::PROTOCOL_VIOLATION,
        format!("pgward: {error}"),
    ))
}

/// A statement the server would read differently from pgward's analysis (see
/// `sql::settings`), or one that would make it do so.
fn read_differently(state: &SessionState) -> Refusal {
    let why = if state.reads_sql_differently() {
        "this session's standard_conforming_strings is off or its client_encoding embeds ASCII bytes in its characters (SJIS, BIG5, GBK, UHC, GB18030, JOHAB), so the server would read statements differently from pgward's analysis; reconnect with the defaults"
    } else {
        "a statement may not turn standard_conforming_strings off or set an ASCII-embedding client_encoding (SJIS, BIG5, GBK, UHC, GB18030, JOHAB): the server would then read SQL differently from pgward's analysis"
    };
    Refusal::new(
        RefusalKind::Protocol,
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!("pgward: {why}"),
    )
}

/// Unaudited statements must not run: every message of the batch that would start one is
/// refused (the first refusal makes the server skip the rest up to Sync).
fn refuse_all_statements(
    batch: &Batch,
    verdicts: &mut [Verdict],
    error: &crate::audit::AuditError,
) {
    for (message, verdict) in batch.messages().zip(verdicts.iter_mut()) {
        if matches!(
            message.tag(),
            frontend::QUERY | frontend::PARSE | frontend::EXECUTE | frontend::FUNCTION_CALL
        ) {
            *verdict = Verdict::Refuse(Refusal {
                kind: RefusalKind::AuditUnavailable,
                rule: None,
                error: audit_unavailable(error),
            });
        }
    }
}

/// The bytes to send upstream for a batch and the verdicts on its messages.
async fn assemble(
    shared: &Shared,
    state: &SessionState,
    batch: &Batch,
    (messages, views): (&[Message], &[Result<Frontend<'_>, ProtocolError>]),
    decided: Decided,
    mut crypto: Option<&mut ClientHalf>,
) -> Vec<Bytes> {
    let all = batch.bytes();
    let mut out = Vec::new();
    let mut run_start = 0;
    let mut offset = 0;
    let decisions = decided
        .verdicts
        .into_iter()
        .zip(decided.plans)
        .zip(decided.statements);
    for ((message, view), ((verdict, plan), statement)) in messages.iter().zip(views).zip(decisions)
    {
        let statement = statement.as_deref().map(|s| &s.crypto);
        let len = message.raw().len();
        state.series.judged(message.tag(), (&verdict).into());
        if let Some(crypto) = crypto.as_deref_mut() {
            if matches!(message.tag(), frontend::PARSE | frontend::QUERY) {
                crypto.set_next_plan(plan);
            }
        }
        let replacement = match (verdict, view) {
            (Verdict::Forward, Ok(view)) => match crypto.as_deref_mut() {
                Some(crypto) => {
                    encrypt_outgoing(shared, state, crypto, (message, view, statement)).await
                }
                None => None,
            },
            (Verdict::Forward, Err(_)) => None,
            (Verdict::Rewrite(rewritten), Ok(view)) => Some(
                rewritten_message(
                    shared,
                    state,
                    crypto.as_deref_mut(),
                    message,
                    view,
                    &rewritten.sql,
                )
                .await,
            ),
            (Verdict::Refuse(refusal), _) => {
                inc(&shared.metrics.statements_refused);
                Some(stand_in(state, crypto.as_deref_mut(), message, refusal.error).await)
            }
            // A rewrite comes from a decoded message; anything else is refused, never sent.
            (Verdict::Rewrite(_), Err(e)) => {
                let error =
                    ClientError::error(sqlstate::PROTOCOL_VIOLATION, format!("pgward: {e}"));
                Some(stand_in(state, crypto.as_deref_mut(), message, error).await)
            }
        };
        if let Some(bytes) = replacement {
            if offset > run_start {
                out.push(all.slice(run_start..offset));
            }
            out.push(bytes);
            run_start = offset + len;
        }
        offset += len;
    }
    if offset > run_start {
        out.push(all.slice(run_start..offset));
    }
    out
}

/// Field encryption's pass over one client message on its way upstream: Bind values
/// encrypted, Describe inserted before Execute, responses expected. A value that cannot be
/// encrypted refuses the message.
async fn encrypt_outgoing(
    shared: &Shared,
    state: &SessionState,
    crypto: &mut ClientHalf,
    (message, view, statement): (&Message, &Frontend<'_>, Option<&StatementCrypto>),
) -> Option<Bytes> {
    match crypto.outgoing(message, view, statement).await {
        Ok(replacement) => replacement,
        Err(error) => {
            inc(&shared.metrics.statements_refused);
            Some(stand_in(state, Some(crypto), message, error).await)
        }
    }
}

/// The Query or Parse to send for a rewritten statement: the rewritten text, with the
/// client's statement name and declared parameter types (retyped by field encryption when
/// the rewrite has a parameter plan).
async fn rewritten_message(
    shared: &Shared,
    state: &SessionState,
    crypto: Option<&mut ClientHalf>,
    message: &Message,
    view: &Frontend<'_>,
    sql: &str,
) -> Bytes {
    let rewritten = match view {
        Frontend::Parse(parse) => Frontend::Parse(parse.with_sql(sql)),
        _ => Frontend::Query { sql },
    };
    if let Some(crypto) = crypto {
        // A rewritten Query or Parse refers to no registered statement.
        let outgoing = (message, &rewritten, None);
        if let Some(bytes) = encrypt_outgoing(shared, state, crypto, outgoing).await {
            return bytes;
        }
    }
    match &rewritten {
        Frontend::Parse(parse) => {
            build::parse_with_param_types(parse.name, sql, parse.param_section())
        }
        _ => build::query(sql),
    }
}

/// The stand-in for a refused message (see [`refusal_stand_in`]), recorded by field
/// encryption like any message it forwards so that responses stay matched.
async fn stand_in(
    state: &SessionState,
    crypto: Option<&mut ClientHalf>,
    message: &Message,
    error: ClientError,
) -> Bytes {
    let stand_in = refusal_stand_in(state, message, error);
    let Some(crypto) = crypto else {
        return stand_in;
    };
    let Ok(built) = Message::from_raw(stand_in.clone()) else {
        return stand_in;
    };
    match Frontend::decode(&built) {
        Ok(view) => match crypto.outgoing(&built, &view, None).await {
            Ok(Some(bytes)) => bytes,
            _ => stand_in,
        },
        Err(_) => stand_in,
    }
}

/// The message sent upstream in place of a refused one: a statement that fails to parse and
/// whose error carries a marker. The server then does exactly what it does for any failed
/// statement — skips to Sync, aborts the transaction, sends the right ReadyForQuery status — and
/// the upstream→client direction swaps the marker's error for pgward's refusal, in order.
fn refusal_stand_in(state: &SessionState, message: &Message, error: ClientError) -> Bytes {
    let marker = state.register_refusal(error);
    match message.tag() {
        // Both are answered with their own ReadyForQuery, no Sync follows.
        frontend::QUERY | frontend::FUNCTION_CALL => build::query(&marker),
        frontend::PARSE => {
            let name = match Frontend::decode(message) {
                Ok(Frontend::Parse(parse)) => parse.name,
                _ => "",
            };
            build::parse(name, &marker)
        }
        _ => build::parse("", &marker),
    }
}

/// The error a statement gets when its audit record cannot be made durable.
pub(super) fn audit_unavailable(error: &crate::audit::AuditError) -> ClientError {
    ClientError::error(
        sqlstate::IO_ERROR,
        "pgward: the audit log cannot be written, so the statement was not run",
    )
    .with_hint(format!("ops: check the audit directory ({error})"))
}
