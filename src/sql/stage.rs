//! The interface between the policy engine and a statement transform that runs in the same
//! pass over the parsed statements, before the row-policy rewrite (field encryption is the
//! transform pgward has).
//!
//! Both sides depend on this module and not on each other: `crypto::sql` implements
//! [`StatementTransform`], the policy engine runs whatever transform the proxy hands it, and
//! the transform's per-statement plan travels to the relay as a typed [`StagePlan`] without the
//! policy engine knowing what it holds.
use std::any::Any;
use std::fmt;
use std::sync::Arc;

use sqlparser::ast::Statement;

use super::catalog::Catalog;
use crate::error::RefusalKind;

/// A transform of parsed statements, applied before the row-policy rewrite.
pub trait StatementTransform: Send + Sync + fmt::Debug {
    /// Transform the statements of one Query or Parse in place. `claims`: the session's token
    /// claims, which may select what the transform applies (field encryption's per-tenant keys).
    fn apply(
        &self,
        statements: &mut [Statement],
        catalog: Option<&Catalog>,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<TransformOutcome, TransformRefusal>;

    /// For text that does not parse: a relation this transform governs whose name appears in
    /// it, so the text is refused rather than passed on unexamined.
    fn may_touch(&self, sql: &str) -> Option<String>;
}

/// What a transform did to one text.
#[derive(Debug, Default)]
pub struct TransformOutcome {
    /// Some statement concerns the transform (and was transformed or checked).
    pub touched: bool,
    /// The result embeds values that must not repeat across executions (ciphertext): it must
    /// not be cached.
    pub unrepeatable: bool,
    /// What the relay must do per execution (e.g. encrypt bound parameters), if anything.
    pub plan: Option<StagePlan>,
    /// Some value of the text, a literal or a bound parameter, is transformed on its own
    /// (sealed, blind-indexed, bound to its row): a text of the same shape with other literals
    /// needs its own transform. False when the transform decided on the statement's
    /// structure alone (e.g. it only reads governed columns).
    pub transforms_values: bool,
    /// Per statement, the columns the transform governs that the statement touches
    /// (`table.column`, for its audit record).
    pub accessed: Vec<Vec<String>>,
}

/// A transform's refusal of a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransformRefusal {
    pub kind: RefusalKind,
    pub sqlstate: &'static str,
    pub message: String,
}

/// A transform's plan for the relay, typed by the transform and opaque to the stages in
/// between. Equal when it is the same plan.
#[derive(Clone)]
pub struct StagePlan(Arc<dyn Any + Send + Sync>);

impl StagePlan {
    pub fn new<T: Any + Send + Sync>(plan: Arc<T>) -> Self {
        Self(plan)
    }

    /// The plan, if it is a `T`.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.0.clone().downcast::<T>().ok()
    }
}

impl fmt::Debug for StagePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StagePlan(..)")
    }
}

impl PartialEq for StagePlan {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for StagePlan {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_recovered_only_as_its_own_type() {
        let plan = StagePlan::new(Arc::new(7u32));
        assert_eq!(plan.get::<u32>().as_deref(), Some(&7));
        assert!(plan.get::<String>().is_none());
        assert_eq!(plan.clone(), plan);
        assert_ne!(plan, StagePlan::new(Arc::new(7u32)));
    }
}
