//! The session's prepared statements and portals, as the client named them: one registry
//! every stage reads, kept by the pipeline in message order.
//!
//! A Parse registers what each stage needs of its statement — field encryption's parameter
//! plan and what it learns of the statement's rows, the audit's analysis shared by the
//! records of its Executes — in one entry; a Bind
//! binds a portal to that entry (so a later Parse under the same name does not change what
//! the portal runs, as in PostgreSQL); a Close drops it. The pipeline looks each message's
//! statement up once, in order, before any stage acts, and hands the entry to the stages
//! ([`SessionStatements::resolve`]): a batch that closes and re-parses a name between a Bind
//! and its Execute still encrypts and records the statement the portal was bound to.
//!
//! The registry must never disagree with the server about what a name runs: a Parse of a
//! name it holds is refused as PostgreSQL refuses it (42P05) instead of replacing the entry
//! (the server keeps the old statement, so its Binds would be encrypted and audited as the
//! new one); a Bind of a name it does not hold is refused as PostgreSQL refuses it (26000)
//! instead of forwarding values no plan has looked at; and a named Parse the server rejected
//! is forgotten once its answer comes back (the session's response tracker,
//! [`super::replies`], reports it), so the name can be prepared again.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::encryption::StatementCrypto;
use crate::audit::{BoundParam, SqlText, Touched};
use crate::protocol::view::Frontend;

/// PostgreSQL's `duplicate_prepared_statement`.
const DUPLICATE_STATEMENT: &str = "42P05";

/// Named statements and portals above which a session is refused more (each entry holds
/// a statement's analysis: a client must not grow the proxy's memory without bound). Far
/// above what drivers keep (their statement caches hold a few hundred).
pub const MAX_STATEMENTS: usize = 10_000;

/// The audit's view of a prepared statement, for the records of its Executes (made by the
/// audit stage, `proxy::audit`, at Parse).
#[derive(Debug)]
pub struct Prepared {
    /// Redacted text, fingerprint and what it touches, computed once at Parse for all its
    /// executions.
    pub(super) text: SqlText,
    pub(super) fingerprint: Arc<str>,
    pub(super) touched: Arc<Touched>,
    /// Declared parameter types (0 = unspecified).
    pub(super) param_types: Vec<u32>,
    /// Refused at Parse: its Executes never run (the refusal has its own record).
    pub(super) refused: bool,
}

/// One prepared statement: what each stage knows of it.
#[derive(Debug)]
pub struct Statement {
    /// The client's name for it, as records name it.
    pub name: Arc<str>,
    /// What field encryption keeps of it: its parameters' plan, what it learns of its rows.
    pub crypto: StatementCrypto,
    /// The audit's view of it (`None` when the session is not audited).
    pub audit: Option<Arc<Prepared>>,
}

/// One bound portal.
#[derive(Debug)]
pub struct Portal {
    pub statement: Arc<Statement>,
    /// Its parameters as the audit records them.
    pub params: Vec<BoundParam>,
}

/// The registry of one session.
#[derive(Debug, Default)]
pub struct SessionStatements {
    statements: HashMap<String, Arc<Statement>>,
    portals: HashMap<String, Portal>,
}

impl SessionStatements {
    /// The statement a message refers to, as registered before it: a Bind's or a statement
    /// Describe's statement, an Execute's or portal Describe's portal's statement.
    pub fn resolve(&self, view: &Frontend<'_>) -> Option<Arc<Statement>> {
        match view {
            Frontend::Bind(bind) => self.statements.get(bind.statement).cloned(),
            Frontend::Describe(target) if target.is_statement() => {
                self.statements.get(target.name).cloned()
            }
            Frontend::Describe(target) => self.portal(target.name).map(|p| p.statement.clone()),
            Frontend::Execute { portal, .. } => self.portal(portal).map(|p| p.statement.clone()),
            _ => None,
        }
    }

    /// A Parse: `name` now stands for this statement (replacing the unnamed one; a named one
    /// it holds is refused before it gets here, see [`SessionStatements::conflict`]).
    pub fn parsed(
        &mut self,
        name: &str,
        crypto: StatementCrypto,
        audit: Option<Arc<Prepared>>,
    ) -> Arc<Statement> {
        let statement = Arc::new(Statement {
            name: name.into(),
            crypto,
            audit,
        });
        self.statements.insert(name.to_owned(), statement.clone());
        statement
    }

    /// Why PostgreSQL will not run `view` as pgward would see it: a Parse of a name already
    /// prepared, a Bind of a statement never prepared (`statement`: what
    /// [`SessionStatements::resolve`] found for it). Refused here, the registry never holds
    /// an entry the server does not run.
    pub fn conflict(
        &self,
        view: &Frontend<'_>,
        statement: Option<&Arc<Statement>>,
    ) -> Option<(&'static str, String)> {
        match view {
            Frontend::Parse(parse)
                if !parse.name.is_empty() && self.statements.contains_key(parse.name) =>
            {
                Some((
                    DUPLICATE_STATEMENT,
                    format!("prepared statement \"{}\" already exists", parse.name),
                ))
            }
            Frontend::Bind(bind) if statement.is_none() => Some((
                crate::error::sqlstate::INVALID_SQL_STATEMENT_NAME,
                if bind.statement.is_empty() {
                    "unnamed prepared statement does not exist".to_owned()
                } else {
                    format!("prepared statement \"{}\" does not exist", bind.statement)
                },
            )),
            _ => None,
        }
    }

    /// A simple Query that deallocates statements (`DEALLOCATE name`, `DEALLOCATE ALL`,
    /// `DISCARD ALL`).
    pub fn deallocated(&mut self, sql: &str) {
        match crate::pool::session_state::deallocation(sql) {
            Some(Some(name)) => {
                self.statements.remove(&name);
            }
            Some(None) => self.statements.clear(),
            None => {}
        }
    }

    /// Forgets the named statements whose Parse the server rejected or skipped (unless the
    /// name was closed and prepared again since).
    pub fn forget_failed(&mut self, failed: Vec<Weak<Statement>>) {
        // Entries dropped since (closed, deallocated) are gone already.
        for failed in failed.iter().filter_map(Weak::upgrade) {
            let current = self.statements.get(&*failed.name);
            if current.is_some_and(|c| Arc::ptr_eq(c, &failed)) {
                self.statements.remove(&*failed.name);
            }
        }
    }

    /// A Bind of `portal` to `statement` (resolved before it): the portal runs that entry
    /// until it is bound again or closed.
    pub fn bound(&mut self, portal: &str, statement: &Arc<Statement>, params: Vec<BoundParam>) {
        let portal_entry = Portal {
            statement: statement.clone(),
            params,
        };
        match self.portals.get_mut(portal) {
            // The unnamed portal, bound again and again: no new key each time.
            Some(held) => *held = portal_entry,
            None => {
                self.portals.insert(portal.to_owned(), portal_entry);
            }
        }
    }

    pub fn portal(&self, name: &str) -> Option<&Portal> {
        self.portals.get(name)
    }

    /// A Close of a statement (`kind` `S`) or a portal.
    pub fn closed(&mut self, kind: u8, name: &str) {
        if kind == b'S' {
            self.statements.remove(name);
        } else {
            self.portals.remove(name);
        }
    }

    /// Whether registering what `view` names would take the session past [`MAX_STATEMENTS`]
    /// (replacing a name it holds, or the unnamed statement or portal, never does).
    pub fn would_overflow(&self, view: &Frontend<'_>) -> bool {
        // Cheap first: below the cap (plus the unnamed pair) no message can pass it.
        if self.statements.len() + self.portals.len() < MAX_STATEMENTS {
            return false;
        }
        // The unnamed statement and portal are one each at most: only names count.
        let named = |len: usize, unnamed: bool| len - usize::from(unnamed);
        let held = named(self.statements.len(), self.statements.contains_key(""))
            + named(self.portals.len(), self.portals.contains_key(""));
        let full = held >= MAX_STATEMENTS;
        full && match view {
            Frontend::Parse(parse) => {
                !parse.name.is_empty() && !self.statements.contains_key(parse.name)
            }
            Frontend::Bind(bind) => {
                !bind.portal.is_empty() && !self.portals.contains_key(bind.portal)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::sql::ParamPlan;
    use crate::protocol::Message;

    /// A frontend message of `tag` with `body`.
    fn message(tag: u8, body: &[u8]) -> Message {
        let mut raw = vec![tag];
        raw.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        raw.extend_from_slice(body);
        Message::from_raw(raw.into()).unwrap()
    }

    /// Bind of `portal` to `statement`, no parameters, default result formats.
    fn bind(portal: &str, statement: &str) -> Message {
        let body = [
            portal.as_bytes(),
            b"\0",
            statement.as_bytes(),
            b"\0",
            &[0; 6],
        ]
        .concat();
        message(b'B', &body)
    }

    fn execute(portal: &str) -> Message {
        message(b'E', &[portal.as_bytes(), b"\0", &[0; 4]].concat())
    }

    fn parse(name: &str) -> Message {
        message(b'P', &[name.as_bytes(), b"\0SELECT 1\0", &[0; 2]].concat())
    }

    fn plan_marker(statement: &Statement) -> bool {
        statement.crypto.plan.is_some()
    }

    #[test]
    fn a_portal_keeps_the_statement_it_was_bound_to_when_the_name_is_parsed_again() {
        let mut registry = SessionStatements::default();
        let crypto = StatementCrypto {
            plan: Some(Arc::new(ParamPlan::default())),
            rows: None,
        };
        registry.parsed("s1", crypto, None);
        let bind_p1 = bind("p1", "s1");
        let bind_view = Frontend::decode(&bind_p1).unwrap();
        let statement = registry.resolve(&bind_view);
        assert!(statement.as_deref().is_some_and(plan_marker));
        registry.bound("p1", statement.as_ref().unwrap(), Vec::new());
        registry.closed(b'S', "s1");
        registry.parsed("s1", StatementCrypto::default(), None);
        let execute = execute("p1");
        let resolved = registry.resolve(&Frontend::decode(&execute).unwrap());
        assert!(
            resolved.as_deref().is_some_and(plan_marker),
            "the Execute runs the statement its portal was bound to"
        );
        assert_eq!(&*registry.portal("p1").unwrap().statement.name, "s1");
        // A Bind of an unknown statement is what PostgreSQL refuses.
        let unknown = bind("p1", "nope");
        let view = Frontend::decode(&unknown).unwrap();
        assert!(registry
            .conflict(&view, registry.resolve(&view).as_ref())
            .is_some());
    }

    #[test]
    fn a_session_cannot_register_statements_without_bound() {
        let mut registry = SessionStatements::default();
        for i in 0..MAX_STATEMENTS {
            registry.parsed(&format!("s{i}"), StatementCrypto::default(), None);
        }
        let new = parse("one_more");
        assert!(registry.would_overflow(&Frontend::decode(&new).unwrap()));
        // Replacing what it holds, or the unnamed statement, stays possible.
        let again = parse("s7");
        assert!(!registry.would_overflow(&Frontend::decode(&again).unwrap()));
        let unnamed = parse("");
        assert!(!registry.would_overflow(&Frontend::decode(&unnamed).unwrap()));
        let named_portal = bind("p", "s1");
        assert!(registry.would_overflow(&Frontend::decode(&named_portal).unwrap()));
        registry.closed(b'S', "s1");
        assert!(!registry.would_overflow(&Frontend::decode(&new).unwrap()));
    }

    #[test]
    fn a_parse_of_a_held_name_and_a_bind_of_an_unknown_one_are_what_postgres_refuses() {
        let mut registry = SessionStatements::default();
        registry.parsed("s1", StatementCrypto::default(), None);
        let again = parse("s1");
        let (code, _) = registry
            .conflict(&Frontend::decode(&again).unwrap(), None)
            .unwrap();
        assert_eq!(code, "42P05");
        let unnamed = parse("");
        assert!(registry
            .conflict(&Frontend::decode(&unnamed).unwrap(), None)
            .is_none());
        let unknown = bind("", "nope");
        let (code, message) = registry
            .conflict(&Frontend::decode(&unknown).unwrap(), None)
            .unwrap();
        assert_eq!(code, "26000");
        assert!(message.contains("\"nope\""), "{message}");
        registry.deallocated("DEALLOCATE s1");
        assert!(registry
            .conflict(&Frontend::decode(&again).unwrap(), None)
            .is_none());
    }
}
