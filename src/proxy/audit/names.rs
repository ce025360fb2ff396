//! The names a session gives cursors and SQL prepared statements, with what the statement
//! behind each one touches: the audit record of a `FETCH` or `EXECUTE` names that, where its
//! own text names only the cursor or statement.

use std::collections::HashMap;

use super::{add_touched, StatementInfo, Touched};
use crate::sql::{NameKind, SessionName};

/// The cursors and SQL prepared statements the session created, with what each one's
/// statement touches: the record of a `FETCH` or `EXECUTE` names it, where its own text names
/// only the cursor or statement. A name is forgotten when it is closed or deallocated (one by
/// one, or all: `CLOSE ALL`, `DEALLOCATE ALL`, `DISCARD ALL`). Creations are noted as they
/// are forwarded, before the server says whether they succeeded, so a name created again adds
/// what the new statement touches to what it had: the server refuses a `DECLARE` or `PREPARE`
/// of a name that is still open, and replacing would let a second, failing one make the
/// first one's fetches look harmless. A cursor the server dropped with its transaction is kept
/// (a `FETCH` of it fails on the server, and its record names what it tried to read).
#[derive(Default)]
pub(super) struct SessionNames {
    created: HashMap<(NameKind, String), NamedTouch>,
    /// Names created so far, to tell the oldest.
    count: u64,
}

/// What the statement that created a name touches, as it was analysed.
struct NamedTouch {
    /// Its place among the session's creations.
    order: u64,
    touched: Touched,
}

/// Names remembered per session; a session holding more at once has its oldest forgotten
/// rather than growing without bound (each creation is on record, so pushing a name out this
/// way shows in the log).
const MAX_SESSION_NAMES: usize = 1024;

impl SessionNames {
    /// What `info` does with a name: a creation that will run is remembered, a statement
    /// running a name gets what it touches in `touched`, a drop that will run forgets.
    pub(super) fn apply(&mut self, info: &StatementInfo, runs: bool, touched: &mut Touched) {
        match &info.session_name {
            Some(SessionName::Create(kind, name)) if runs => {
                add_touched(self.created(*kind, name), &info.into());
            }
            Some(SessionName::Run(kind, name)) => {
                if let Some(named) = self.created.get(&(*kind, name.clone())) {
                    add_touched(touched, &(&named.touched).into());
                }
            }
            Some(SessionName::Drop(kind, name)) if runs => {
                self.created.remove(&(*kind, name.clone()));
            }
            Some(SessionName::DropAll(kind)) if runs => {
                self.created
                    .retain(|(k, _), _| kind.is_some_and(|dropped| dropped != *k));
            }
            _ => {}
        }
    }

    /// A statement prepared or a portal bound through the protocol: the same names as SQL's
    /// (`EXECUTE` runs a protocol-prepared statement, `FETCH` reads a bound portal), so their
    /// records name what it touches too.
    pub(super) fn remember(&mut self, kind: NameKind, name: &str, touched: &Touched) {
        if !name.is_empty() {
            add_touched(self.created(kind, name), &touched.into());
        }
    }

    /// What the name created now touches, to add to (a name still known keeps what it had;
    /// past the cap the oldest name is forgotten first).
    fn created(&mut self, kind: NameKind, name: &str) -> &mut Touched {
        let key = (kind, name.to_string());
        if self.created.len() >= MAX_SESSION_NAMES && !self.created.contains_key(&key) {
            self.forget_oldest();
        }
        self.count += 1;
        let named = self.created.entry(key).or_insert_with(|| NamedTouch {
            order: 0,
            touched: Touched::default(),
        });
        named.order = self.count;
        &mut named.touched
    }

    /// A protocol Close of a statement or portal.
    pub(super) fn forget(&mut self, kind: NameKind, name: &str) {
        self.created.remove(&(kind, name.to_string()));
    }

    fn forget_oldest(&mut self) {
        let oldest = self.created.iter().min_by_key(|(_, t)| t.order);
        if let Some(key) = oldest.map(|(key, _)| key.clone()) {
            self.created.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named_info(use_of: SessionName, columns: &[&str]) -> StatementInfo {
        StatementInfo {
            session_name: Some(use_of),
            columns_read: columns.iter().map(|c| c.to_string()).collect(),
            ..StatementInfo::default()
        }
    }

    fn create(kind: NameKind, name: &str, column: &str) -> StatementInfo {
        named_info(SessionName::Create(kind, name.into()), &[column])
    }

    fn drop(kind: NameKind, name: &str) -> StatementInfo {
        named_info(SessionName::Drop(kind, name.into()), &[])
    }

    /// The columns a statement running `name` is recorded as reading.
    fn run(names: &mut SessionNames, kind: NameKind, name: &str) -> Vec<String> {
        let mut touched = Touched::default();
        let info = named_info(SessionName::Run(kind, name.into()), &[]);
        names.apply(&info, true, &mut touched);
        touched.columns_read
    }

    #[test]
    fn a_fetch_or_execute_touches_what_created_its_name_until_it_is_dropped() {
        use NameKind::{Cursor, Prepared};
        let mut names = SessionNames::default();
        let mut touched = Touched::default();
        names.apply(&create(Cursor, "c", "t.secret"), true, &mut touched);
        names.apply(&create(Cursor, "refused", "t.secret"), false, &mut touched);
        names.apply(&create(Prepared, "c", "t.other"), true, &mut touched);
        assert_eq!(run(&mut names, Cursor, "c"), ["t.secret"]);
        assert_eq!(
            run(&mut names, Prepared, "c"),
            ["t.other"],
            "its own namespace"
        );
        assert!(
            run(&mut names, Cursor, "refused").is_empty(),
            "never declared"
        );
        // A refused CLOSE closes nothing; a second DECLARE of the open name (which the server
        // refuses) cannot make the first one's fetches look harmless: they name both.
        names.apply(&drop(Cursor, "c"), false, &mut touched);
        names.apply(&create(Cursor, "c", "t.harmless"), true, &mut touched);
        assert_eq!(run(&mut names, Cursor, "c"), ["t.secret", "t.harmless"]);
        names.apply(&drop(Cursor, "c"), true, &mut touched);
        assert!(run(&mut names, Cursor, "c").is_empty());
        names.apply(&create(Cursor, "c", "t.third"), true, &mut touched);
        assert_eq!(
            run(&mut names, Cursor, "c"),
            ["t.third"],
            "closed, then declared anew"
        );
        names.apply(&drop(Cursor, "c"), true, &mut touched);
        assert_eq!(run(&mut names, Prepared, "c"), ["t.other"]);
        // CLOSE ALL closes cursors only; DISCARD ALL forgets everything.
        names.apply(&create(Cursor, "d", "t.secret"), true, &mut touched);
        let close_all = named_info(SessionName::DropAll(Some(Cursor)), &[]);
        names.apply(&close_all, true, &mut touched);
        assert!(run(&mut names, Cursor, "d").is_empty());
        assert_eq!(run(&mut names, Prepared, "c"), ["t.other"]);
        let discard_all = named_info(SessionName::DropAll(None), &[]);
        names.apply(&discard_all, true, &mut touched);
        assert!(run(&mut names, Prepared, "c").is_empty());
    }

    #[test]
    fn a_session_holding_too_many_names_forgets_only_its_oldest() {
        let mut names = SessionNames::default();
        let mut touched = Touched::default();
        for i in 0..=MAX_SESSION_NAMES {
            let declare = create(NameKind::Cursor, &format!("c{i}"), "t.a");
            names.apply(&declare, true, &mut touched);
        }
        assert_eq!(names.created.len(), MAX_SESSION_NAMES);
        assert!(
            run(&mut names, NameKind::Cursor, "c0").is_empty(),
            "the oldest"
        );
        assert_eq!(run(&mut names, NameKind::Cursor, "c1"), ["t.a"]);
        let newest = format!("c{MAX_SESSION_NAMES}");
        assert_eq!(run(&mut names, NameKind::Cursor, &newest), ["t.a"]);
    }
}
