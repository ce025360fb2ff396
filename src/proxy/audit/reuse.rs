//! What an analysis touches, made once per session and reused: the statements of a shape
//! served from its template, and the hits of a cached rewrite, share one analysis, so a session
//! that runs a shape again and again (the simple protocol sends a new text per value) gets its
//! records' tables, columns and their serialised form from here instead of copying the same
//! lists and serialising them per statement.

use std::sync::Arc;

use super::{StatementInfo, Touched};

/// Analyses remembered per session; the oldest makes room for a new one.
const REMEMBERED: usize = 16;

/// Largest record part remembered, as the bytes of the names it lists: a statement may name
/// as many tables and columns as `max_message_bytes` holds, and sixteen of those kept for each
/// session would hold memory no session asked for. A larger one is made per statement.
const LARGEST_REMEMBERED: usize = 8 * 1024;

#[derive(Default)]
pub(super) struct TouchedReuse {
    entries: Vec<Entry>,
    /// Where the next entry goes once all are taken.
    next: usize,
}

struct Entry {
    /// Held, so that no other analysis can be allocated where this one is while it is
    /// remembered (entries are matched by address).
    statements: Arc<[StatementInfo]>,
    rewritten_hash: Option<Arc<str>>,
    touched: Arc<Touched>,
}

impl TouchedReuse {
    /// Whether what `statements` touch may be reused: not when a statement creates, runs or
    /// drops a cursor or prepared statement, since what that touches depends on the session's
    /// names at the time.
    pub(super) fn applies_to(statements: &[StatementInfo]) -> bool {
        statements.iter().all(|s| s.session_name.is_none())
    }

    pub(super) fn get(
        &self,
        statements: &Arc<[StatementInfo]>,
        rewritten_hash: Option<&Arc<str>>,
    ) -> Option<Arc<Touched>> {
        self.entries
            .iter()
            .find(|e| {
                Arc::ptr_eq(&e.statements, statements)
                    && e.rewritten_hash.as_ref() == rewritten_hash
            })
            .map(|e| e.touched.clone())
    }

    pub(super) fn put(
        &mut self,
        statements: &Arc<[StatementInfo]>,
        rewritten_hash: Option<&Arc<str>>,
        touched: Arc<Touched>,
    ) {
        if name_bytes(&touched) > LARGEST_REMEMBERED {
            return;
        }
        let entry = Entry {
            statements: statements.clone(),
            rewritten_hash: rewritten_hash.cloned(),
            touched,
        };
        if self.entries.len() < REMEMBERED {
            self.entries.push(entry);
        } else {
            self.entries[self.next] = entry;
            self.next = (self.next + 1) % REMEMBERED;
        }
    }
}

/// The bytes of the names a record part lists.
fn name_bytes(touched: &Touched) -> usize {
    [
        &touched.tables_read,
        &touched.tables_written,
        &touched.columns_read,
        &touched.columns_written,
        &touched.encrypted_columns,
    ]
    .into_iter()
    .flatten()
    .map(String::len)
    .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analysis(table: &str) -> Arc<[StatementInfo]> {
        Arc::from(vec![StatementInfo {
            tables_read: vec![table.to_string()],
            ..StatementInfo::default()
        }])
    }

    #[test]
    fn an_analysis_is_found_by_identity_and_hash_and_the_oldest_makes_room() {
        let mut reuse = TouchedReuse::default();
        let first = analysis("public.a");
        let hash: Arc<str> = "h1".into();
        let touched = Arc::new(Touched::default());
        reuse.put(&first, Some(&hash), touched.clone());
        let found = reuse.get(&first, Some(&hash)).unwrap();
        assert!(Arc::ptr_eq(&found, &touched));
        // An equal analysis made elsewhere is another analysis; another hash another rewrite.
        assert!(reuse.get(&analysis("public.a"), Some(&hash)).is_none());
        assert!(reuse.get(&first, Some(&"h2".into())).is_none());
        assert!(reuse.get(&first, None).is_none());
        let later: Vec<_> = (0..REMEMBERED)
            .map(|i| analysis(&format!("t{i}")))
            .collect();
        for a in &later {
            reuse.put(a, None, Arc::new(Touched::default()));
        }
        assert!(
            reuse.get(&first, Some(&hash)).is_none(),
            "the oldest made room"
        );
        assert!(later.iter().all(|a| reuse.get(a, None).is_some()));
    }

    #[test]
    fn a_part_naming_more_than_the_limit_is_not_remembered() {
        let mut reuse = TouchedReuse::default();
        let statements = analysis("public.wide");
        let mut wide = Touched::default();
        wide.columns_read = (0..2000).map(|i| format!("wide.column_{i}")).collect();
        assert!(name_bytes(&wide) > LARGEST_REMEMBERED);
        reuse.put(&statements, None, Arc::new(wide));
        assert!(reuse.get(&statements, None).is_none());
    }

    #[test]
    fn statements_with_session_names_are_never_reused() {
        let named = StatementInfo {
            session_name: crate::sql::SessionName::of(
                &crate::sql::parse::parse_statements("FETCH 5 FROM c").unwrap()[0],
            ),
            ..StatementInfo::default()
        };
        assert!(named.session_name.is_some());
        assert!(!TouchedReuse::applies_to(&[named]));
        assert!(TouchedReuse::applies_to(&analysis("public.a")));
    }
}
