//! Predicates on encrypted columns: equality through blind indexes, and the refusal of every
//! other use that would compute on ciphertext.

use super::*;

impl Transform<'_> {
    /// Rewrite equality predicates to blind indexes, then refuse every remaining reference to
    /// an encrypted column that is not a plain selection or an IS [NOT] NULL test.
    pub(super) fn predicates(&mut self, st: &mut Statement) -> Result<(), Refused> {
        struct Rewrite<'b, 'c> {
            t: &'b mut Transform<'c>,
            /// References in allowed positions (IS NULL operands, plain select items).
            allowed: usize,
            /// Plain selections inside expression subqueries (counted in `allowed` by
            /// `pre_visit_query`, taken back here).
            penalty: usize,
            /// Every reference to an encrypted column.
            total: usize,
            first: Option<ColumnRef>,
        }
        impl VisitorMut for Rewrite<'_, '_> {
            type Break = Refused;
            fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<Refused> {
                match self.t.plain_query_items(q) {
                    Ok(n) => self.allowed += n,
                    Err(e) => return ControlFlow::Break(e),
                }
                ControlFlow::Continue(())
            }
            fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Refused> {
                // A subquery used as a value loses the column's origin (its result would
                // be ciphertext) or compares ciphertext (`IN (SELECT col …)`): its plain
                // selections of encrypted columns do not count as allowed.
                if let Expr::Subquery(q)
                | Expr::In {
                    target: sqlparser::ast::InTarget::Subquery(q),
                    ..
                } = &*expr
                {
                    match self.t.plain_query_items(q) {
                        Ok(n) => self.penalty += n,
                        Err(e) => return ControlFlow::Break(e),
                    }
                }
                match self.t.rewrite_predicate(expr) {
                    Ok(Some(n)) => self.allowed += n,
                    Ok(None) => {}
                    Err(e) => return ControlFlow::Break(e),
                }
                match self.t.column_of(expr) {
                    Ok(Some(c)) => {
                        self.total += 1;
                        self.first.get_or_insert(c.col);
                    }
                    Ok(None) => {}
                    Err(e) => return ControlFlow::Break(e),
                }
                ControlFlow::Continue(())
            }
        }
        let mut r = Rewrite {
            t: self,
            allowed: 0,
            penalty: 0,
            total: 0,
            first: None,
        };
        if let ControlFlow::Break(e) = st.visit(&mut r) {
            return Err(e);
        }
        let (allowed, total, first) = (r.allowed.saturating_sub(r.penalty), r.total, r.first);
        let returning_allowed = match st {
            Statement::Insert(i) => self.plain_items(i.returning.as_deref())?,
            Statement::Update(u) => self.plain_items(u.returning.as_deref())?,
            Statement::Delete(d) => self.plain_items(d.returning.as_deref())?,
            _ => 0,
        };
        if total > allowed + returning_allowed {
            let c = first.unwrap_or_else(|| ColumnRef {
                table: String::new(),
                column: String::new(),
                ty: ClientType::Text,
            });
            return Err(refuse(format!(
                "pgward: column {}.{} is encrypted; pgward can only select it, test it with IS [NOT] NULL, or compare it with =, <> or IN when it is searchable — not compute on it (ORDER BY, GROUP BY, DISTINCT, ranges, LIKE, functions, casts, set operations, joins with other columns)",
                c.table, c.column
            )));
        }
        Ok(())
    }

    /// Plain selections of encrypted columns in a query's own (non-DISTINCT) SELECT list.
    pub(super) fn plain_query_items(&self, q: &Query) -> Result<usize, Refused> {
        match &*q.body {
            SetExpr::Select(s) if s.distinct.is_none() => self.plain_items(Some(&s.projection)),
            _ => Ok(0),
        }
    }

    pub(super) fn plain_items(&self, items: Option<&[SelectItem]>) -> Result<usize, Refused> {
        let mut n = 0;
        for item in items.unwrap_or_default() {
            if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item {
                if self.column_of(e)?.is_some() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Rewrite one allowed predicate shape; returns how many encrypted references it leaves
    /// in allowed positions (`None`: not such a predicate).
    pub(super) fn rewrite_predicate(&mut self, expr: &mut Expr) -> Result<Option<usize>, Refused> {
        match expr {
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => Ok(self.column_of(inner)?.map(|_| 1)),
            Expr::BinaryOp {
                left,
                op: op @ (BinaryOperator::Eq | BinaryOperator::NotEq),
                right,
            } => {
                let negated = matches!(op, BinaryOperator::NotEq);
                let (lc, rc) = (self.column_of(left)?, self.column_of(right)?);
                let (col, values) = match (lc, rc) {
                    (Some(a), Some(b)) => {
                        if a.col != b.col || !a.searchable {
                            return Err(refuse(format!(
                                "pgward: {}.{} and {}.{} can only be compared when they are the same searchable encrypted column",
                                a.col.table, a.col.column, b.col.table, b.col.column
                            )));
                        }
                        to_bidx(left);
                        to_bidx(right);
                        return Ok(Some(0));
                    }
                    (Some(c), None) => (&mut **left, self.compare(c, right)?),
                    (None, Some(c)) => (&mut **right, self.compare(c, left)?),
                    (None, None) => return Ok(None),
                };
                to_bidx(col);
                let col = col.clone();
                *expr = match_any(col, values, negated);
                Ok(Some(0))
            }
            Expr::In {
                expr: col,
                target: sqlparser::ast::InTarget::List(list),
                ..
            } => {
                let Some(c) = self.column_of(col)? else {
                    return Ok(None);
                };
                self.searchable(&c)?;
                let mut out = Vec::with_capacity(list.len());
                for v in list.iter() {
                    let w = self.comparand(v, &c)?;
                    out.extend(self.search_values(&c, &w)?);
                }
                *list = out;
                to_bidx(col);
                Ok(Some(0))
            }
            _ => Ok(None),
        }
    }

    pub(super) fn searchable(&self, c: &EncCol) -> Result<(), Refused> {
        if c.searchable {
            Ok(())
        } else {
            Err(refuse(format!(
                "pgward: encrypted column {}.{} is not searchable; equality search needs searchable = true (a blind index)",
                c.col.table, c.col.column
            )))
        }
    }

    pub(super) fn comparand(&self, v: &Expr, c: &EncCol) -> Result<Written, Refused> {
        match self.written(v, c) {
            Ok(Written::Default) | Err(_) => Err(refuse(format!(
                "pgward: encrypted column {}.{} can only be compared with a literal or a parameter",
                c.col.table, c.col.column
            ))),
            Ok(w) => Ok(w),
        }
    }

    /// The index values a comparison of `c` with `value` matches.
    pub(super) fn compare(&mut self, c: EncCol, value: &Expr) -> Result<Vec<Expr>, Refused> {
        self.searchable(&c)?;
        let w = self.comparand(value, &c)?;
        self.search_values(&c, &w)
    }

    /// The SQL values an equality search for `w` in `c` matches: the value's index under the
    /// root writes use and, while the index root rotates, under the root it replaces. A
    /// parameter always becomes two (pgward adds the second, and binds the same index twice
    /// when no rotation is in progress), so a prepared statement outlives a rotation; a
    /// literal becomes two only during a rotation, and its statement is never cached (the
    /// roots may change before it is run again).
    pub(super) fn search_values(&mut self, c: &EncCol, w: &Written) -> Result<Vec<Expr>, Refused> {
        match w {
            Written::Null => Ok(vec![null()]),
            Written::Default => Ok(vec![default()]),
            Written::Param(i) => {
                self.params.claim(*i, ParamUse::BlindIndex(c.col.clone()))?;
                let n = self
                    .params
                    .add(*i, ParamUse::PreviousBlindIndex(c.col.clone()));
                Ok(vec![
                    bytea_param(*i + 1),
                    bytea_param(self.params.max_client + n),
                ])
            }
            Written::Literal(text) => {
                let canonical = self.canonical(c, text)?;
                let indexes = self
                    .enc
                    .manager
                    .search_indexes_now(&c.col.table, &c.col.column, self.scope, &canonical)
                    .map_err(|e| self.key_error(c, e))?;
                self.literals = true;
                Ok(indexes.values().iter().map(|v| bytea_literal(v)).collect())
            }
        }
    }
}

/// `col = v` (`<>` when negated) for one value, `col [NOT] IN (…)` for several.
fn match_any(col: Expr, mut values: Vec<Expr>, negated: bool) -> Expr {
    if values.len() == 1 {
        if let Some(value) = values.pop() {
            return Expr::BinaryOp {
                left: Box::new(col),
                op: if negated {
                    BinaryOperator::NotEq
                } else {
                    BinaryOperator::Eq
                },
                right: Box::new(value),
            };
        }
    }
    Expr::In {
        expr: Box::new(col),
        target: sqlparser::ast::InTarget::List(values),
        negated,
        global: false,
    }
}
