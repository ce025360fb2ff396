//! The hook point every client message passes through on its way upstream.
//!
//! The relay hands each framed client message to [`Interceptor::client_message`], which decides
//! to forward it untouched (zero-copy), replace it, or refuse it. For a policy-bound service
//! every simple Query and every Parse is rewritten by the policy engine (or refused), and the
//! fast-path FunctionCall, which would bypass SQL analysis, is refused. An unrestricted service
//! on the policy database is only watched for DDL; elsewhere the interceptor reports itself as
//! pass-through and the relay skips per-message work beyond bookkeeping.

use std::sync::Arc;

use super::encryption::ClientHalf;
use super::policy::{may_be_ddl, Policies, SessionPolicy};
use crate::auth::Identity;
use crate::crypto::sql::{ParamPlan, SqlEncryption};
use crate::error::{sqlstate, Refusal, RefusalKind};
use crate::policy::{AnalysisMemo, Rewritten, SessionMemo, StagePlan};
use crate::protocol::view::{Frontend, ParseView};

/// What happens to one client message.
#[derive(Debug)]
pub enum Verdict {
    /// Send it upstream as it arrived.
    Forward,
    /// Send the statement with this rewritten text instead (a Parse keeps its name and
    /// declared parameter types; the relay builds the message, with field encryption's
    /// parameter retyping when the rewrite has a parameter plan).
    Rewrite(Arc<Rewritten>),
    /// Do not run it; the client gets the refusal's error in the message's place in the
    /// response stream, and the audit record the refusal as it is.
    Refuse(Refusal),
}

/// The label a verdict gets in `pgward_service_statements_total{decision}`.
impl From<&Verdict> for crate::metrics::StatementDecision {
    fn from(verdict: &Verdict) -> Self {
        match verdict {
            Verdict::Forward => Self::Forwarded,
            Verdict::Rewrite(_) => Self::Rewritten,
            Verdict::Refuse(_) => Self::Refused,
        }
    }
}

/// Per-session interception state.
pub struct Interceptor {
    identity: Identity,
    policy: SessionPolicy,
    /// DDL went upstream: the catalog must be reloaded once the session is idle again.
    ddl_pending: bool,
    /// The policy analysis of the last rewritten message, for its audit record.
    last_analysis: Option<Arc<Rewritten>>,
    /// Field encryption's SQL transform, for sessions no policy engine rewrites.
    encryption: Option<Arc<SqlEncryption>>,
    /// Parameter plan of the last Query or Parse rewritten (taken by the relay's encryption layer).
    param_plan: Option<Arc<ParamPlan>>,
    /// Field encryption's protocol state for messages going upstream.
    crypto: Option<ClientHalf>,
    /// The rewrites this session used, for its next statements of the same text or shape.
    memo: SessionMemo,
    /// Audited and not otherwise parsed (unrestricted, no field encryption): statements are
    /// analysed for the tables their audit records name, through this memo.
    audit_analysis: Option<AnalysisMemo>,
}

impl Interceptor {
    /// The interceptor of one authenticated session.
    pub fn new(identity: Identity, policy: SessionPolicy) -> Self {
        Self {
            identity,
            policy,
            ddl_pending: false,
            last_analysis: None,
            encryption: None,
            param_plan: None,
            crypto: None,
            memo: SessionMemo::default(),
            audit_analysis: None,
        }
    }

    /// Analyse the statements of an unrestricted session for its audit records.
    pub fn with_audit_analysis(mut self, audited: bool) -> Self {
        self.audit_analysis = audited.then(AnalysisMemo::default);
        self
    }

    /// Field encryption's protocol state (set once the session's columns are located).
    pub fn set_crypto(&mut self, crypto: Option<ClientHalf>) {
        self.crypto = crypto;
    }

    /// Field encryption's protocol state, if the proxy encrypts columns.
    pub fn crypto_mut(&mut self) -> Option<&mut ClientHalf> {
        self.crypto.as_mut()
    }

    /// Encrypt literals and rewrite predicates on encrypted columns in every statement.
    pub fn with_encryption(mut self, encryption: Option<Arc<SqlEncryption>>) -> Self {
        self.encryption = encryption;
        self
    }

    /// The parameter plan of the Query or Parse just decided (field encryption), if any.
    pub fn take_param_plan(&mut self) -> Option<Arc<ParamPlan>> {
        self.param_plan.take()
    }

    /// The session's verified identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// True when the policy engine rewrites every statement (and refuses, among others, the
    /// settings that would make the server read SQL differently).
    pub fn is_policy_bound(&self) -> bool {
        matches!(self.policy, SessionPolicy::Bound(_))
    }

    /// True when no layer needs to see individual messages.
    pub fn is_passthrough(&self) -> bool {
        matches!(self.policy, SessionPolicy::Unrestricted) && self.encryption.is_none()
    }

    /// Decide the fate of one client message (decoded once by the relay).
    pub fn client_message(&mut self, view: &Frontend<'_>) -> Verdict {
        self.param_plan = None;
        match (&self.policy, view) {
            (SessionPolicy::Bound(_), Frontend::Query { sql }) => self.rewrite(sql),
            (SessionPolicy::Bound(_), Frontend::Parse(parse)) => {
                match refused_parameter_type(parse) {
                    Some(ty) => self.refuse_declared_type(parse.sql, ty),
                    None => self.rewrite(parse.sql),
                }
            }
            (SessionPolicy::Bound(_), Frontend::FunctionCall) => {
                Verdict::Refuse(Refusal::new(
                    RefusalKind::Policy,
                    sqlstate::INSUFFICIENT_PRIVILEGE,
                    format!(
                        "pgward: service {:?} may not use fast-path function calls (they bypass statement analysis)",
                        self.identity.service
                    ),
                ))
            }
            (
                SessionPolicy::WatchDdl(_) | SessionPolicy::Unrestricted,
                Frontend::Query { sql } | Frontend::Parse(ParseView { sql, .. }),
            ) => {
                let watch_ddl = matches!(self.policy, SessionPolicy::WatchDdl(_));
                if watch_ddl && may_be_ddl(sql) {
                    self.ddl_pending = true;
                }
                if self.encryption.is_some() {
                    return self.rewrite(sql);
                }
                sized_for_the_worker(sql, || self.analyse_for_audit(sql));
                Verdict::Forward
            }
            _ => Verdict::Forward,
        }
    }

    /// A Parse declaring a parameter of a refused type: refused as a cast to it is.
    fn refuse_declared_type(&mut self, sql: &str, ty: &str) -> Verdict {
        let catalog = match &self.policy {
            SessionPolicy::Bound(p) | SessionPolicy::WatchDdl(p) => Some(p.engine().catalog()),
            SessionPolicy::Unrestricted => None,
        };
        let analysis = crate::policy::refused_analysis(sql, catalog.as_deref());
        self.last_analysis = Some(Arc::new(analysis));
        Verdict::Refuse(Refusal::new(
            RefusalKind::Policy,
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!(
                "pgward: service {:?} may not declare a parameter of type {ty}: its input resolves names the policy may hide or reads the transaction counter",
                self.identity.service
            ),
        ))
    }

    /// An unrestricted, unencrypted statement forwarded as it is: what it touches, for its
    /// audit record.
    fn analyse_for_audit(&mut self, sql: &str) {
        let Some(memo) = self.audit_analysis.as_mut() else {
            return;
        };
        let analysis = memo.analyse(sql, || match &self.policy {
            SessionPolicy::WatchDdl(policies) => Some(policies.engine().catalog()),
            _ => None,
        });
        if analysis.statements.iter().any(|s| s.is_ddl) {
            memo.clear();
        }
        self.last_analysis = Some(analysis);
    }

    /// The policy analysis of the message just decided on (once).
    pub fn take_analysis(&mut self) -> Option<Arc<Rewritten>> {
        self.last_analysis.take()
    }

    /// The claims the session's policy uses (recorded in the audit log instead of the token).
    pub fn claims_used(&self) -> serde_json::Map<String, serde_json::Value> {
        let SessionPolicy::Bound(policies) = &self.policy else {
            return serde_json::Map::new();
        };
        let required = policies
            .engine()
            .required_claims(&self.identity.service)
            .unwrap_or_default();
        self.identity
            .claims
            .iter()
            .filter(|(k, _)| required.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The policies whose catalog must be refreshed because this session ran DDL (once).
    pub fn take_ddl_pending(&mut self) -> Option<Arc<Policies>> {
        if !std::mem::take(&mut self.ddl_pending) {
            return None;
        }
        match &self.policy {
            SessionPolicy::Bound(p) | SessionPolicy::WatchDdl(p) => Some(p.clone()),
            SessionPolicy::Unrestricted => None,
        }
    }

    /// Rewrite a Query or Parse: by the policy engine (which also applies field encryption)
    /// when the session has one, else by field encryption alone.
    fn rewrite(&mut self, sql: &str) -> Verdict {
        sized_for_the_worker(sql, || self.rewrite_now(sql))
    }

    fn rewrite_now(&mut self, sql: &str) -> Verdict {
        let result = match &self.policy {
            SessionPolicy::Bound(policies) | SessionPolicy::WatchDdl(policies) => {
                policies.rewrite(&mut self.memo, &self.identity, sql)
            }
            SessionPolicy::Unrestricted => match &self.encryption {
                Some(enc) => crate::policy::unrestricted_rewrite(
                    sql,
                    Some(enc.as_ref()),
                    None,
                    &self.identity.claims,
                )
                .map(Arc::new),
                None => return Verdict::Forward,
            },
        };
        let rewritten = match result {
            Ok(rewritten) => rewritten,
            Err(denied) => {
                // The record of a refusal names what the statement named, as any other.
                let catalog = match &self.policy {
                    SessionPolicy::Bound(p) | SessionPolicy::WatchDdl(p) => {
                        Some(p.engine().catalog())
                    }
                    SessionPolicy::Unrestricted => None,
                };
                let analysis = crate::policy::refused_analysis(sql, catalog.as_deref());
                self.last_analysis = Some(Arc::new(analysis));
                return Verdict::Refuse(denied.into());
            }
        };
        // Field encryption's plan, as its transform typed it.
        self.param_plan = rewritten
            .params
            .as_ref()
            .and_then(StagePlan::get::<ParamPlan>);
        if rewritten.statements.iter().any(|s| s.is_ddl) {
            self.ddl_pending = true;
        }
        let verdict = if rewritten.sql == sql {
            Verdict::Forward
        } else {
            Verdict::Rewrite(rewritten.clone())
        };
        self.last_analysis = Some(rewritten);
        verdict
    }
}

/// Statement texts longer than this are analysed with the worker's other tasks handed over.
const LARGE_STATEMENT: usize = 64 * 1024;

/// Runs the analysis of `sql`: past [`LARGE_STATEMENT`], with this worker's other sessions
/// handed to the rest of the runtime (it can take seconds of CPU; they must not wait for it).
fn sized_for_the_worker<T>(sql: &str, analyse: impl FnOnce() -> T) -> T {
    if sql.len() > LARGE_STATEMENT {
        crate::blocking::hand_over_worker(analyse)
    } else {
        analyse()
    }
}

/// The first declared parameter type of `parse` a bound service may not declare (`regclass`,
/// `regrole`, `xid`, …).
fn refused_parameter_type(parse: &ParseView<'_>) -> Option<&'static str> {
    parse.param_types().find_map(|oid| {
        crate::sql::routines::REFUSED_PARAMETER_TYPE_OIDS
            .iter()
            .find(|(known, _)| *known == oid)
            .map(|(_, name)| *name)
    })
}
