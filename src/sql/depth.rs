//! How deep a statement's syntax tree can grow, estimated from its tokens before it is parsed.
//!
//! sqlparser bounds the nesting of brackets itself, but it builds a chain of operators
//! (`1+1+…`, `a AND b AND …`, `x::int::int…`, `SELECT … UNION ALL SELECT …`) into a tree as
//! deep as the chain is long, and everything that walks that tree afterwards — clone, visit,
//! print, drop — recurses once per level: a few kilobytes of SQL would overflow a worker
//! thread's stack and abort the whole proxy. The estimate counts the operators of each
//! comma-separated run plus those of the runs enclosing it (an overestimate: a flat list of
//! any length counts nothing, a long chain counts its length); a statement past
//! [`MAX_DEPTH`] is refused before it is parsed.
use super::lex::{Kind, Tokens};

/// The deepest operator chain pgward parses. PostgreSQL itself reads deeper chains; a
/// statement that needs more is refused with an error that says so.
pub const MAX_DEPTH: usize = 1000;

/// Keywords that chain like binary operators.
const CHAINING_WORDS: [&str; 12] = [
    "and",
    "or",
    "not",
    "union",
    "intersect",
    "except",
    "is",
    "like",
    "ilike",
    "between",
    "collate",
    "at",
];

/// The most statements one message may hold. Each parsed statement costs kilobytes while it
/// is analysed, so a text of a hundred thousand `SELECT 1;` would cost gigabytes.
pub const MAX_STATEMENTS: usize = 10_000;

/// Why `sql` is not parsed: its chains run deeper than [`MAX_DEPTH`], or it holds more than
/// [`MAX_STATEMENTS`] statements.
pub fn too_deep(sql: &str) -> Option<String> {
    let (depth, statements) = measure(sql);
    if depth > MAX_DEPTH {
        return Some(format!(
            "an expression or set operation chained more than {MAX_DEPTH} operators deep (pgward's limit; split it, or use IN (…) or = ANY($1) for long lists)"
        ));
    }
    (statements > MAX_STATEMENTS).then(|| {
        format!("more than {MAX_STATEMENTS} statements in one message (pgward's limit; send them in batches)")
    })
}

/// The estimated depth of the deepest operator chain in `sql`.
pub fn estimate(sql: &str) -> usize {
    measure(sql).0
}

/// The estimated depth of the deepest operator chain, and how many statements the text
/// holds (separators outside brackets, plus one for a last statement without its `;`).
fn measure(sql: &str) -> (usize, usize) {
    let mut statements = 0;
    let mut pending = false;
    // Per open bracket: the depth carried into it and the run it interrupted.
    let mut open: Vec<(usize, usize)> = Vec::new();
    let (mut carried, mut run, mut deepest) = (0usize, 0usize, 0usize);
    for token in Tokens::from(sql, 0) {
        match token.kind {
            Kind::Punct => match token.text(sql) {
                "(" | "[" => {
                    open.push((carried, run + 1));
                    carried += run + 1;
                    run = 0;
                }
                ")" | "]" => {
                    if let Some((outer_carried, outer_run)) = open.pop() {
                        (carried, run) = (outer_carried, outer_run);
                    }
                }
                "," => run = 0,
                ";" => {
                    run = 0;
                    if std::mem::take(&mut pending) {
                        statements += 1;
                    }
                }
                _ => {
                    run += 1;
                    pending = true;
                }
            },
            Kind::Word => {
                pending = true;
                let word = token.text(sql);
                if CHAINING_WORDS.iter().any(|w| word.eq_ignore_ascii_case(w)) {
                    run += 1;
                }
            }
            Kind::Space | Kind::Comment { .. } => {}
            _ => pending = true,
        }
        deepest = deepest.max(carried + run);
    }
    (deepest, statements + usize::from(pending))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(op: &str, n: usize) -> String {
        format!("SELECT 1{}", format!("{op}1").repeat(n))
    }

    #[test]
    fn a_chain_counts_its_length_and_a_list_counts_nothing() {
        assert_eq!(estimate("SELECT 1"), 0);
        assert!(estimate(&chain("+", 2000)) >= 2000);
        assert!(estimate(&chain(" AND ", 3000)) >= 3000);
        assert!(estimate(&chain("::int::", 5000)) >= 5000);
        assert!(estimate(&"SELECT 1 UNION ALL ".repeat(5000)) >= 5000);
        let list = format!(
            "SELECT id FROM t WHERE id IN ({})",
            vec!["1"; 100_000].join(",")
        );
        assert!(estimate(&list) < 10, "{}", estimate(&list));
        let rows = format!(
            "INSERT INTO t VALUES {}",
            vec!["($1::int, $2::text, $3::numeric)"; 1000].join(", ")
        );
        assert!(estimate(&rows) < 10, "{}", estimate(&rows));
    }

    #[test]
    fn statements_are_counted_by_their_separators() {
        assert_eq!(measure("SELECT 1").1, 1);
        assert_eq!(measure("SELECT 1; SELECT 2;").1, 2);
        assert_eq!(measure(";;  ; -- nothing").1, 0);
        assert_eq!(measure("SELECT ';'; SELECT 2 /* ; */").1, 2);
        assert!(too_deep(&"SELECT 1;".repeat(MAX_STATEMENTS)).is_none());
        let many = too_deep(&"SELECT 1;".repeat(MAX_STATEMENTS + 1));
        assert!(many.is_some_and(|why| why.contains("statements")));
    }

    #[test]
    fn chains_inside_brackets_add_to_the_chain_around_them() {
        let inner = chain("+", 600).replacen("SELECT ", "", 1);
        let sql = format!("SELECT {} + ({inner})", vec!["1"; 600].join(" + "));
        assert!(estimate(&sql) >= 1200, "{}", estimate(&sql));
        // Strings and comments are not operators.
        assert_eq!(estimate("SELECT '+ + + AND' -- + + +"), 0);
    }
}
