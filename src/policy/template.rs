//! Statement-shape templates: what the engine learns from the first statement of a shape
//! (see `shape.rs`), and how a template becomes the rewrite of a statement of that shape.
use std::sync::Arc;

use super::shape;
use super::{sql, PolicyDenied, Rewritten, StagePlan, StatementInfo, TransformOutcome};
use crate::sql::fingerprint::RedactedText;

/// What the engine learned about a statement shape (see `shape.rs`).
#[derive(Clone)]
pub(super) enum ShapeEntry {
    /// Statements of this shape are rewritten by filling the template with their literals.
    Template(Arc<ShapeTemplate>),
    /// This shape takes the exact-text path (its template could not be made or checked).
    Exact,
}

pub(super) struct ShapeTemplate {
    template: shape::Template,
    statements: Arc<[StatementInfo]>,
    /// The relay's plan of every statement of this shape (field encryption: result columns it
    /// added), the same whatever the literals: a template never transforms values.
    params: Option<StagePlan>,
    /// The redacted client text and fingerprint of the first statement of the shape: every
    /// statement of the shape redacts alike (they differ only in literals).
    client_text: Option<RedactedText>,
    /// The hash of the first statement's rewrite, redacted: the same for every statement of
    /// the shape, since they differ only in literals.
    rewritten_redacted_sha256: Option<Arc<str>>,
}

impl ShapeTemplate {
    pub(super) fn instantiate(&self, shape: &shape::Shape<'_>) -> Rewritten {
        Rewritten {
            sql: self.template.fill(shape),
            statements: self.statements.clone(),
            unrestricted: false,
            params: self.params.clone(),
            client_text: self.client_text.clone(),
            rewritten_redacted_sha256: self.rewritten_redacted_sha256.clone(),
        }
    }
}

/// Learns a statement shape from the first statement of that shape and its exact rewrite:
/// rewrites the parameterised text and keeps the template only if no value of it goes
/// through field encryption, it analyses the same, and filled with this statement's literals
/// it is this statement's exact rewrite. Anything else makes the shape take the exact path.
///
/// A statement that only *reads* encrypted columns (`SELECT card_number … WHERE id = 5`)
/// takes a template: the transform decided on the columns, not on the literal, and the
/// values are decrypted from the results (the template keeps the exact rewrite's plan, e.g.
/// the row-key columns it added). Any literal the transform would seal, blind-index or bind
/// to a row shows up as transformed values — embedded ciphertext in the exact rewrite, or a
/// parameter plan for its placeholder in the parameterised one — and keeps the shape on the
/// exact path, so no literal meant for an encrypted column is ever filled in as is.
pub(super) fn learn_shape(
    shape: &shape::Shape<'_>,
    exact: &Rewritten,
    outcome: &TransformOutcome,
    rewrite: impl Fn(&str) -> Result<(Rewritten, TransformOutcome), PolicyDenied>,
) -> ShapeEntry {
    let literal_free = |o: &TransformOutcome| !o.unrepeatable && !o.transforms_values;
    if !literal_free(outcome) {
        return ShapeEntry::Exact;
    }
    let Ok((parameterized, p_outcome)) = rewrite(shape.parameterized()) else {
        return ShapeEntry::Exact;
    };
    if !literal_free(&p_outcome) || parameterized.statements != exact.statements {
        return ShapeEntry::Exact;
    }
    let Some(template) = shape::Template::from_rewritten(&parameterized.sql, shape.literal_count())
    else {
        return ShapeEntry::Exact;
    };
    if !same_statements(&template.fill(shape), &exact.sql) {
        tracing::debug!("statement shape's template differs from its exact rewrite; exact path");
        return ShapeEntry::Exact;
    }
    ShapeEntry::Template(Arc::new(ShapeTemplate {
        template,
        statements: parameterized.statements,
        params: exact.params.clone(),
        client_text: exact.client_text.clone(),
        rewritten_redacted_sha256: exact.rewritten_redacted_sha256.clone(),
    }))
}

/// Whether `filled` says what `exact` (a rewrite, in sqlparser's printed form) says: equal, or
/// equal once parsed, sanitized and printed (a literal such as `'it''s'` prints as `E'it\'s'`).
pub(super) fn same_statements(filled: &str, exact: &str) -> bool {
    if filled == exact {
        return true;
    }
    let Ok(mut stmts) = sql::parse_statements(filled) else {
        return false;
    };
    let mut texts = Vec::with_capacity(stmts.len());
    for st in &mut stmts {
        if sql::sanitize(st).is_err() {
            return false;
        }
        texts.push(st.to_string());
    }
    texts.join(";\n") == exact
}
