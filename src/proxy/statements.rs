//! The session's prepared statements and portals, as the client named them: one registry
//! every stage reads, kept by the pipeline in message order.
//!
//! A Parse registers what each stage needs of its statement — field encryption's parameter
//! plan, the audit's analysis shared by the records of its Executes — in one entry; a Bind
//! binds a portal to that entry (so a later Parse under the same name does not change what
//! the portal runs, as in PostgreSQL); a Close drops it. The pipeline looks each message's
//! statement up once, in order, before any stage acts, and hands the entry to the stages
//! ([`SessionStatements::resolve`]): a batch that closes and re-parses a name between a Bind
//! and its Execute still encrypts and records the statement the portal was bound to.

use std::collections::HashMap;
use std::sync::Arc;

use super::audit::Prepared;
use crate::audit::BoundParam;
use crate::crypto::sql::ParamPlan;
use crate::protocol::view::Frontend;

/// Named statements and portals above which a session is refused more (each entry holds
/// a statement's analysis: a client must not grow the proxy's memory without bound). Far
/// above what drivers keep (their statement caches hold a few hundred).
pub const MAX_STATEMENTS: usize = 10_000;

/// One prepared statement: what each stage knows of it.
#[derive(Debug, Default)]
pub struct Statement {
    /// Field encryption's plan for its parameters (`None`: nothing to encrypt).
    pub plan: Option<Arc<ParamPlan>>,
    /// The audit's view of it (`None` when the session is not audited).
    pub audit: Option<Arc<Prepared>>,
}

/// One bound portal.
#[derive(Debug)]
pub struct Portal {
    /// The client's name of the statement it was bound from, as its records name it.
    pub statement_name: String,
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

    /// A Parse: `name` now stands for this statement (replacing any before it).
    pub fn parsed(&mut self, name: &str, statement: Statement) {
        self.statements.insert(name.to_owned(), Arc::new(statement));
    }

    /// A Bind of `portal` to `statement` (resolved before it): the portal runs that entry
    /// until it is bound again or closed. An unknown statement binds nothing (the server
    /// answers with an error).
    pub fn bound(
        &mut self,
        portal: &str,
        statement_name: &str,
        statement: Option<&Arc<Statement>>,
        params: Vec<BoundParam>,
    ) {
        match statement {
            Some(statement) => {
                self.portals.insert(
                    portal.to_owned(),
                    Portal {
                        statement_name: statement_name.to_owned(),
                        statement: statement.clone(),
                        params,
                    },
                );
            }
            None => {
                self.portals.remove(portal);
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
        statement.plan.is_some()
    }

    #[test]
    fn a_portal_keeps_the_statement_it_was_bound_to_when_the_name_is_parsed_again() {
        let mut registry = SessionStatements::default();
        registry.parsed(
            "s1",
            Statement {
                plan: Some(Arc::new(ParamPlan::default())),
                audit: None,
            },
        );
        let bind = bind("p1", "s1");
        let bind_view = Frontend::decode(&bind).unwrap();
        let statement = registry.resolve(&bind_view);
        assert!(statement.as_deref().is_some_and(plan_marker));
        registry.bound("p1", "s1", statement.as_ref(), Vec::new());
        registry.closed(b'S', "s1");
        registry.parsed("s1", Statement::default());
        let execute = execute("p1");
        let resolved = registry.resolve(&Frontend::decode(&execute).unwrap());
        assert!(
            resolved.as_deref().is_some_and(plan_marker),
            "the Execute runs the statement its portal was bound to"
        );
        assert_eq!(registry.portal("p1").unwrap().statement_name, "s1");
        // A Bind of an unknown statement leaves no portal behind.
        registry.bound("p1", "nope", None, Vec::new());
        assert!(registry
            .resolve(&Frontend::decode(&execute).unwrap())
            .is_none());
    }

    #[test]
    fn a_session_cannot_register_statements_without_bound() {
        let mut registry = SessionStatements::default();
        for i in 0..MAX_STATEMENTS {
            registry.parsed(&format!("s{i}"), Statement::default());
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
}
