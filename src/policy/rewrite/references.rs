//! Foreign keys in written rows: a reference must point at a row the service may read.
//!
//! Without this check a tenant could write another tenant's key into a foreign-key column:
//! the server's answer (success, or 23503 "is not present") tells whether that hidden row
//! exists, its foreign-key check holds a lock on it for the rest of the transaction, and
//! from then on the other tenant's row is tied to this one (its delete fails, or cascades into
//! this tenant's rows). So every foreign key whose columns a statement writes gets a check
//! over the new row: its values are NULL (no reference) or name a row of the referenced
//! table's filtered stand-in — the same answer, an error with SQLSTATE 42501, whether the
//! row is hidden or missing.
use super::*;

impl Rewriter<'_> {
    /// One `pgward.assert_row` per foreign key of `tp` whose columns the statement writes
    /// (`written`), over the new row's values (`value_of`); `None` when there is none.
    pub(super) fn reference_checks(
        &self,
        tp: &TablePolicy,
        written: &dyn Fn(&str) -> bool,
        value_of: &dyn Fn(&str) -> Option<String>,
    ) -> R<Option<String>> {
        let mut asserts = Vec::new();
        for key in self.references_written(tp, written) {
            asserts.push(self.reference_check(tp, key, value_of)?);
        }
        Ok((!asserts.is_empty()).then(|| asserts.join(" AND ")))
    }

    /// The first foreign key of `tp` whose columns the statement writes (`written`).
    pub(super) fn reference_written(
        &self,
        tp: &TablePolicy,
        written: &dyn Fn(&str) -> bool,
    ) -> Option<&crate::sql::ForeignKey> {
        self.references_written(tp, written).into_iter().next()
    }

    /// The foreign keys of `tp` whose columns the statement writes (`written`). A column the
    /// write check holds to a claim (`tenant_id = claim('tenant_id')`) is as trusted as a
    /// preset, which is not the statement's to write: its row is the token's own.
    fn references_written(
        &self,
        tp: &TablePolicy,
        written: &dyn Fn(&str) -> bool,
    ) -> Vec<&crate::sql::ForeignKey> {
        let pinned = pinned_to_claims(tp.check.as_ref());
        self.catalog
            .foreign_keys(&tp.info)
            .iter()
            .filter(|key| {
                key.columns
                    .iter()
                    .any(|c| written(c) && !pinned.contains(c.as_str()))
            })
            .collect()
    }

    /// Fails closed: a reference into a table the service may not read (or through columns
    /// it may not see) is refused outright, as is one whose values the statement leaves to
    /// the columns' defaults.
    fn reference_check(
        &self,
        tp: &TablePolicy,
        key: &crate::sql::ForeignKey,
        value_of: &dyn Fn(&str) -> Option<String>,
    ) -> R<String> {
        let columns = format!("{}.({})", tp.info.name, key.columns.join(", "));
        let (schema, name) = &key.referenced;
        let referenced = self
            .catalog
            .get(schema, name)
            .and_then(|info| self.policy.table(info))
            .filter(|r| r.select)
            .ok_or_else(|| {
                self.deny(
                    format!(
                        "may not write {columns}: it references {schema}.{name}, which its policy does not let it read"
                    ),
                    Some(&tp.table_rule),
                )
            })?;
        if let Some(hidden) = key
            .referenced_columns
            .iter()
            .find(|c| referenced.hidden.contains(*c))
        {
            return Err(self.deny(
                format!(
                    "may not write {columns}: it references {name}.{hidden}, which it may not read"
                ),
                Some(&referenced.columns_rule),
            ));
        }
        // Cast to the column's type: the check may be a parameter's first use (an UPDATE's
        // WHERE is read before its SET), which must give it the type the column does.
        let typed = |c: &String| {
            let ty = tp.info.column(c)?.type_name.clone();
            Some(format!("CAST(({}) AS {ty})", value_of(c)?))
        };
        let values = key
            .columns
            .iter()
            .map(typed)
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| {
                self.deny(
                    format!("must supply every column of the reference {columns}"),
                    Some(&tp.table_rule),
                )
            })?;
        let stand_in = self.barrier(referenced, "pgward_ref", &[])?;
        let nulls: Vec<String> = values.iter().map(|v| format!("{v} IS NULL")).collect();
        let matches: Vec<String> = key
            .referenced_columns
            .iter()
            .zip(&values)
            .map(|(r, v)| format!("pgward_ref.{} = {v}", quote_ident(r)))
            .collect();
        let cond = format!(
            "{} OR EXISTS (SELECT 1 FROM {stand_in} WHERE {})",
            nulls.join(" OR "),
            matches.join(" AND ")
        );
        let rule = match referenced.filter {
            Some(_) => &referenced.filter_rule,
            None => &referenced.table_rule,
        };
        let message = format!(
            "pgward: service {:?} may not write {columns}: a reference must name a row of {name} it can see ({rule})",
            self.service
        );
        Ok(self.assert_sql(&format!("({cond})"), &message))
    }
}

/// The columns a write check requires to equal a claim: `col = claim('…')` (either way round,
/// parenthesised or not) as a conjunct of its top-level ANDs.
fn pinned_to_claims(check: Option<&Expr>) -> BTreeSet<String> {
    fn unnested(e: &Expr) -> &Expr {
        match e {
            Expr::Nested(inner) => unnested(inner),
            other => other,
        }
    }
    fn column(e: &Expr) -> Option<String> {
        match unnested(e) {
            Expr::Identifier(id) => Some(ident_name(id)),
            _ => None,
        }
    }
    fn is_claim(e: &Expr) -> bool {
        matches!(claim_call(unnested(e)), Some(Ok(_)))
    }
    fn walk(e: &Expr, out: &mut BTreeSet<String>) {
        let Expr::BinaryOp { left, op, right } = unnested(e) else {
            return;
        };
        match op {
            BinaryOperator::And => {
                walk(left, out);
                walk(right, out);
            }
            BinaryOperator::Eq => {
                let pinned = match (column(left), column(right)) {
                    (Some(c), _) if is_claim(right) => Some(c),
                    (_, Some(c)) if is_claim(left) => Some(c),
                    _ => None,
                };
                out.extend(pinned);
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    if let Some(check) = check {
        walk(check, &mut out);
    }
    out
}
