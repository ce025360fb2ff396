//! Predicates on encrypted columns: equality through blind indexes, and the refusal of every
//! other use that would compute on ciphertext.

use super::write::is_excluded_copy;
use super::*;

impl Transform<'_> {
    /// Rewrite equality predicates to blind indexes, then refuse every remaining reference to
    /// an encrypted column that is not a plain selection in an output position (see
    /// `outputs`), an IS [NOT] NULL test or an `EXCLUDED.col` copy into its own column.
    pub(super) fn predicates(&mut self, st: &mut Statement) -> Result<(), Refused> {
        struct Rewrite<'b, 'c> {
            t: &'b mut Transform<'c>,
            /// References in allowed positions.
            allowed: usize,
            /// Every reference to an encrypted column (each wildcard or `TABLE t` reading
            /// some counts once).
            total: usize,
            first: Option<ColumnRef>,
        }
        impl Rewrite<'_, '_> {
            fn count(&mut self, found: Vec<ColumnRef>) {
                self.total += found.len();
                if let Some(c) = found.into_iter().next() {
                    self.first.get_or_insert(c);
                }
            }
            fn query(&mut self, q: &Query) -> Result<(), Refused> {
                // A CTE's SELECT list is an output position (references to the CTE are held
                // to the rules of what it exposes, see `derived`).
                for cte in q.with.iter().flat_map(|w| &w.cte_tables) {
                    self.allowed += self.t.output_items(&cte.query)?;
                }
                let mut tables = Vec::new();
                self.t.table_branches(&q.body, &mut tables);
                self.count(tables);
                self.t.refuse_sorted_outputs(q)
            }
            fn expr(&mut self, expr: &mut Expr) -> Result<(), Refused> {
                // The values of an EXISTS subquery are never seen.
                if let Expr::Exists { subquery, .. } = &*expr {
                    self.allowed += self.t.output_items(subquery)?;
                }
                self.t.refuse_whole_row(expr)?;
                if let Some(n) = self.t.rewrite_predicate(expr)? {
                    self.allowed += n;
                }
                if let Some(c) = self.t.column_of(expr)? {
                    self.count(vec![c.col]);
                }
                Ok(())
            }
        }
        fn flow(r: Result<(), Refused>) -> ControlFlow<Refused> {
            match r {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => ControlFlow::Break(e),
            }
        }
        impl VisitorMut for Rewrite<'_, '_> {
            type Break = Refused;
            fn pre_visit_statement(&mut self, st: &mut Statement) -> ControlFlow<Refused> {
                if let Statement::Insert(i) = &*st {
                    self.allowed += self.t.excluded_copies(i);
                }
                ControlFlow::Continue(())
            }
            fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<Refused> {
                flow(self.query(q))
            }
            fn pre_visit_select(&mut self, s: &mut sqlparser::ast::Select) -> ControlFlow<Refused> {
                let result = self.t.encrypted_wildcards(s).and_then(|found| {
                    self.count(found);
                    self.t.refuse_grouped_outputs(s)
                });
                flow(result)
            }
            fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<Refused> {
                // A derived table's SELECT list is an output position.
                if let TableFactor::Derived { subquery, .. } = tf {
                    match self.t.output_items(subquery) {
                        Ok(n) => self.allowed += n,
                        Err(e) => return ControlFlow::Break(e),
                    }
                }
                ControlFlow::Continue(())
            }
            fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Refused> {
                flow(self.expr(expr))
            }
        }
        // The statement's own result.
        let allowed = match &*st {
            Statement::Query(q) => self.output_items(q)?,
            Statement::Insert(i) => self.plain_items(i.returning.as_deref())?,
            Statement::Update(u) => self.plain_items(u.returning.as_deref())?,
            Statement::Delete(d) => self.plain_items(d.returning.as_deref())?,
            _ => 0,
        };
        let mut r = Rewrite {
            t: self,
            allowed,
            total: 0,
            first: None,
        };
        if let ControlFlow::Break(e) = st.visit(&mut r) {
            return Err(e);
        }
        if r.total > r.allowed {
            let c = r.first.unwrap_or_else(|| ColumnRef {
                table: String::new(),
                column: String::new(),
                ty: ClientType::Text,
            });
            return Err(refuse(format!(
                "pgward: column {}.{} is encrypted; pgward can only select it, test it with IS [NOT] NULL, or compare it with =, <> or IN when it is searchable — not compute on it (ORDER BY, GROUP BY, DISTINCT, ranges, LIKE, functions, casts, set operations, subqueries used as values, whole-row references, joins with other columns)",
                c.table, c.column
            )));
        }
        Ok(())
    }

    /// `SET col = EXCLUDED.col` copies of an upsert into its own encrypted columns: ciphertext
    /// pgward sealed for this very statement, moved within its column.
    fn excluded_copies(&self, i: &Insert) -> usize {
        let (TableObject::TableName(name), Some(OnInsert::OnConflict(oc))) = (&i.table, &i.on)
        else {
            return 0;
        };
        let OnConflictAction::DoUpdate(du) = &oc.action else {
            return 0;
        };
        let Some(cols) = self.qualify(name).and_then(|t| self.enc_table(&t)) else {
            return 0;
        };
        du.assignments
            .iter()
            .filter(|a| match &a.target {
                AssignmentTarget::ColumnName(n) => object_name_parts(n)
                    .and_then(|p| p.last().cloned())
                    .is_some_and(|c| cols.contains_key(&c) && is_excluded_copy(&a.value, &c)),
                AssignmentTarget::Tuple(_) => false,
            })
            .count()
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
