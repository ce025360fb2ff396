//! Reads: FROM items, joins and derived tables, each protected table behind its barrier (or
//! filtered in place for a top-level point lookup), and the notes an audit record needs.
use super::*;

impl<'a> Rewriter<'a> {
    pub(super) fn table_with_joins(
        &mut self,
        twj: &mut TableWithJoins,
        scope: &mut Vec<String>,
        pushdown: &Pushdown,
    ) -> R<()> {
        self.table_factor(&mut twj.relation, scope, pushdown)?;
        for j in &mut twj.joins {
            self.table_factor(&mut j.relation, scope, pushdown)?;
            self.check_node(&mut j.join_operator, scope)?;
        }
        Ok(())
    }

    pub(super) fn table_factor(
        &mut self,
        tf: &mut TableFactor,
        scope: &mut Vec<String>,
        pushdown: &Pushdown,
    ) -> R<()> {
        match tf {
            TableFactor::Table {
                name,
                alias,
                args,
                with_hints,
                version,
                with_ordinality,
                partitions,
                json_path,
                sample,
                index_directives,
                inheritance,
            } => {
                let unsupported = [
                    (!with_hints.is_empty(), "table hints WITH (…) in FROM"),
                    (version.is_some(), "AS OF (time travel) in FROM"),
                    (!partitions.is_empty(), "PARTITION (…) in FROM"),
                    (json_path.is_some(), "a JSON path in FROM"),
                    (sample.is_some(), "TABLESAMPLE"),
                    (!index_directives.is_empty(), "index hints in FROM"),
                    (
                        inheritance.is_some(),
                        "FROM ONLY / table * (inheritance forms; name the table alone)",
                    ),
                ];
                if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
                    return Err(self.refuse(what));
                }
                if let Some(args) = args {
                    // A set-returning function in FROM.
                    self.check_function_name(name)?;
                    return self.check_node(&mut args.args, scope);
                }
                if *with_ordinality {
                    return Err(self.refuse("WITH ORDINALITY on a table"));
                }
                let parts =
                    object_name_parts(name).ok_or_else(|| self.refuse("this relation name"))?;
                if parts.len() == 1 && scope.contains(&parts[0]) {
                    return Ok(()); // a CTE in scope
                }
                let shown = name.to_string();
                let info = self
                    .catalog
                    .resolve(&parts)
                    .ok_or_else(|| {
                        self.deny(format!("may not read unknown relation {shown}"), None)
                    })?
                    .clone();
                let alias_text = match alias {
                    Some(a) if a.columns.is_empty() => a.name.to_string(),
                    Some(a) => format!(
                        "{}({})",
                        a.name,
                        a.columns
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => match name.0.last() {
                        Some(p) => p.to_string(),
                        None => return Err(self.refuse("this relation name")),
                    },
                };
                let alias_norm = alias
                    .as_ref()
                    .map(|a| ident_name(&a.name))
                    .unwrap_or_else(|| parts.last().cloned().unwrap_or_default());
                if let Some(tp) = self.policy.table(&info) {
                    let tp = tp.clone();
                    if !tp.select {
                        return Err(self.deny(
                            format!("may not read table {}", info.name),
                            Some(&tp.actions_rule),
                        ));
                    }
                    if alias.as_ref().is_some_and(|a| !a.columns.is_empty())
                        && !tp.hidden.is_empty()
                    {
                        return Err(self.deny(
                            format!(
                                "may not use a column alias list on {} (hidden columns)",
                                info.name
                            ),
                            Some(&tp.columns_rule),
                        ));
                    }
                    self.note_read(&tp.info, &tp.visible);
                    let pushed: Vec<String> = pushdown
                        .iter()
                        .filter(|(rel, col, _)| {
                            rel == &alias_norm
                                && tp.visible.contains(col)
                                && leakproof_type(&tp.info, col)
                        })
                        .map(|(_, col, rhs)| format!("{} = {rhs}", quote_ident(col)))
                        .collect();
                    *tf = self.barrier(&tp, &alias_text, &pushed)?;
                    Ok(())
                } else if let Some(cols) = allow::catalog_relation(&info.schema, &info.name) {
                    if let Some(stand_in) = self.catalog_stand_in(&info, cols, &alias_text)? {
                        *tf = stand_in;
                    }
                    Ok(())
                } else if info.schema == "pg_catalog"
                    && (info.name.starts_with("pg_stat") || info.name.starts_with("pg_statio"))
                {
                    Err(self.deny(
                        format!(
                            "may not read statistics relation {} (statistics describe every \
                             tenant's rows)",
                            info.qualified()
                        ),
                        Some(&format!("{}:1", self.policy.file)),
                    ))
                } else {
                    let what = if matches!(info.kind, crate::sql::RelKind::View) {
                        "view"
                    } else {
                        "relation"
                    };
                    Err(self.deny(
                        format!(
                            "may not read {what} {} (not in its policy)",
                            info.qualified()
                        ),
                        Some(&format!("{}:1", self.policy.file)),
                    ))
                }
            }
            TableFactor::Derived {
                subquery,
                sample: None,
                ..
            } => self.query(subquery, scope),
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => self.table_with_joins(table_with_joins, scope, pushdown),
            TableFactor::UNNEST { array_exprs, .. } => self.check_node(array_exprs, scope),
            TableFactor::Function { name, args, .. } => {
                self.check_function_name(name)?;
                self.check_node(args, scope)
            }
            TableFactor::Derived { .. } => Err(self.refuse("TABLESAMPLE on a subquery")),
            other => Err(self.refuse(format!(
                "the FROM item {} (tables, subqueries, joins, set-returning functions and \
                 UNNEST are supported)",
                without_values(other)
            ))),
        }
    }

    /// Whether a top-level SELECT can filter its table in place instead of through a barrier
    /// subquery: the barrier exists so the service's predicates never run on rows the filter
    /// hides, so it can go when there are none that could leak. That holds when the statement
    /// is one SELECT (no outer query whose predicates the planner could push down into it, no
    /// INSERT check or CTE around it) over one protected table with a filter and no hidden
    /// columns (`*` and whole-row references then mean the same rows and columns), whose WHERE
    /// is only leakproof `col = literal/$n` conjuncts — the same ones the barrier form copies
    /// inside the barrier anyway — and which has no HAVING (the planner moves aggregate-free
    /// HAVING clauses into WHERE). Everything else of the SELECT runs on rows that passed
    /// WHERE. Saves the server planning a subquery: measurably faster for point lookups.
    /// Returns the table's policy and the alias to qualify the filter with.
    pub(super) fn flat_table(
        &self,
        s: &sqlparser::ast::Select,
        scope: &[String],
    ) -> Option<(TablePolicy, String)> {
        let [twj] = s.from.as_slice() else {
            return None;
        };
        let TableFactor::Table {
            name,
            alias,
            args: None,
            with_hints,
            version: None,
            with_ordinality: false,
            partitions,
            json_path: None,
            sample: None,
            index_directives,
            inheritance: None,
        } = &twj.relation
        else {
            return None;
        };
        if !twj.joins.is_empty()
            || !with_hints.is_empty()
            || !partitions.is_empty()
            || !index_directives.is_empty()
            || alias.as_ref().is_some_and(|a| !a.columns.is_empty())
            || s.having.is_some()
        {
            return None;
        }
        let parts = object_name_parts(name)?;
        if parts.len() == 1 && scope.contains(&parts[0]) {
            return None;
        }
        let info = self.catalog.resolve(&parts)?;
        let tp = self.policy.table(info)?;
        if !tp.select || tp.filter.is_none() || !tp.hidden.is_empty() {
            return None;
        }
        let (alias_text, alias_norm) = match alias {
            Some(a) => (a.name.to_string(), ident_name(&a.name)),
            None => (name.0.last()?.to_string(), parts.last()?.clone()),
        };
        let leakproof = |c: &Expr| {
            leakproof_eq(c).is_some_and(|(rel, col, _)| {
                rel.is_none_or(|r| r == alias_norm) && leakproof_type(&tp.info, &col)
            })
        };
        if let Some(selection) = &s.selection {
            if !conjuncts(selection).into_iter().all(leakproof) {
                return None;
            }
        }
        Some((tp.clone(), alias_text))
    }

    /// A SELECT `flat_table` accepted: `FROM "schema"."table" AS alias WHERE (filter) AND
    /// (the service's WHERE)`.
    pub(super) fn flat_select(
        &mut self,
        s: &mut sqlparser::ast::Select,
        scope: &mut Vec<String>,
        tp: &TablePolicy,
        alias: &str,
    ) -> R<()> {
        self.note_read(&tp.info, &tp.visible);
        let relation = format!(
            "{}.{} AS {alias}",
            quote_ident(&tp.info.schema),
            quote_ident(&tp.info.name)
        );
        s.from[0].relation = parse_table_factor(&relation)
            .map_err(|e| self.refuse(format!("(internal: table did not parse: {e})")))?;
        self.select_clauses(s, scope)?;
        let Some(filter) = &tp.filter else {
            return Err(self.refuse("(internal: no filter)"));
        };
        let filter = self.render(filter, tp, &|c| Some(format!("{alias}.{}", quote_ident(c))))?;
        let filter = parse_expr(&filter)
            .map_err(|e| self.refuse(format!("(internal: filter did not parse: {e})")))?;
        let filter = Expr::Nested(Box::new(filter));
        s.selection = Some(match s.selection.take() {
            Some(own) => Expr::BinaryOp {
                left: Box::new(filter),
                op: BinaryOperator::And,
                right: Box::new(Expr::Nested(Box::new(own))),
            },
            None => filter,
        });
        Ok(())
    }

    /// The filtered, column-restricted stand-in for a protected table.
    pub(super) fn barrier(
        &self,
        tp: &TablePolicy,
        alias: &str,
        pushed: &[String],
    ) -> R<TableFactor> {
        let cols: Vec<String> = tp.visible.iter().map(|c| quote_ident(c)).collect();
        let base = format!(
            "{}.{}",
            quote_ident(&tp.info.schema),
            quote_ident(&tp.info.name)
        );
        let text = match &tp.filter {
            Some(f) => {
                let filter = self.render(f, tp, &|c| Some(quote_ident(c)))?;
                let mut conds = vec![format!("({filter})")];
                conds.extend(pushed.iter().cloned());
                format!(
                    "(SELECT {} FROM {base} WHERE {} OFFSET 0) AS {alias}",
                    cols.join(", "),
                    conds.join(" AND ")
                )
            }
            None if tp.hidden.is_empty() => format!("{base} AS {alias}"),
            None => format!("(SELECT {} FROM {base}) AS {alias}", cols.join(", ")),
        };
        parse_table_factor(&text)
            .map_err(|e| self.refuse(format!("(internal: barrier did not parse: {e})")))
    }

    pub(super) fn note_read(&mut self, info: &TableInfo, cols: &[String]) {
        let q = info.qualified();
        if !self.info.tables_read.contains(&q) {
            self.info.tables_read.push(q);
            self.info
                .columns_read
                .extend(cols.iter().map(|c| format!("{}.{c}", info.name)));
        }
    }

    pub(super) fn note_write(&mut self, info: &TableInfo) {
        let q = info.qualified();
        if !self.info.tables_written.contains(&q) {
            self.info.tables_written.push(q);
        }
    }

    /// Columns a write stores values in (the client's and the presets), for the audit record.
    pub(super) fn note_columns_written<'c>(
        &mut self,
        info: &TableInfo,
        cols: impl IntoIterator<Item = &'c String>,
    ) {
        for c in cols {
            let q = format!("{}.{c}", info.name);
            if !self.info.columns_written.contains(&q) {
                self.info.columns_written.push(q);
            }
        }
    }

    /// `rel.col = literal` / `col = $n` conjuncts of a WHERE clause, by relation name.
    pub(super) fn pushdown_candidates(
        &self,
        from: &[TableWithJoins],
        selection: Option<&Expr>,
    ) -> Pushdown {
        let single = match from {
            [twj] if twj.joins.is_empty() => match &twj.relation {
                TableFactor::Table {
                    name,
                    alias,
                    args: None,
                    ..
                } => Some(
                    alias
                        .as_ref()
                        .map(|a| ident_name(&a.name))
                        .or_else(|| object_name_parts(name).and_then(|p| p.last().cloned()))
                        .unwrap_or_default(),
                ),
                _ => None,
            },
            _ => None,
        };
        let mut out = Vec::new();
        if let Some(sel) = selection {
            for c in conjuncts(sel) {
                if let Some((rel, col, rhs)) = leakproof_eq(c) {
                    match (rel, &single) {
                        (Some(r), _) => out.push((r, col, rhs)),
                        (None, Some(s)) => out.push((s.clone(), col, rhs)),
                        _ => {}
                    }
                }
            }
        }
        out
    }
}
