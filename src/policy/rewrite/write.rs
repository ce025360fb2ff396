//! Writes: UPDATE, DELETE and INSERT targets (filter and check guarded in the statement
//! itself), upserts, RETURNING, and COPY FROM.
use super::*;

impl<'a> Rewriter<'a> {
    pub(super) fn dml(&mut self, st: &mut Statement, scope: &mut Vec<String>) -> R<()> {
        match st {
            Statement::Insert(i) => self.insert(i, scope),
            Statement::Update(u) => self.update(u, scope),
            Statement::Delete(d) => self.delete(d, scope),
            _ => Err(self.refuse("this statement here")),
        }
    }

    pub(super) fn target(&self, name: &ObjectName, action: Action) -> R<TablePolicy> {
        let parts = object_name_parts(name).ok_or_else(|| self.refuse("this relation name"))?;
        let info = self.catalog.resolve(&parts).ok_or_else(|| {
            self.deny(
                format!("may not {} unknown relation {name}", action.verb()),
                None,
            )
        })?;
        let tp = self.policy.table(info).ok_or_else(|| {
            self.deny(
                format!(
                    "may not {} {} (not in its policy)",
                    action.verb(),
                    info.qualified()
                ),
                Some(&format!("{}:1", self.policy.file)),
            )
        })?;
        if !tp.allows(action) {
            return Err(self.deny(
                format!("may not {} table {}", action.verb(), info.name),
                Some(&tp.actions_rule),
            ));
        }
        Ok(tp.clone())
    }

    pub(super) fn writable_column(&self, tp: &TablePolicy, col: &str) -> R<()> {
        if tp.info.column(col).is_none() {
            return Err(self.deny(
                format!("may not write unknown column {}.{col}", tp.info.name),
                None,
            ));
        }
        if tp.hidden.contains(col) {
            return Err(self.deny(
                format!("may not write column {}.{col}", tp.info.name),
                Some(&tp.columns_rule),
            ));
        }
        if tp.is_preset(col) {
            return Err(self.deny(
                format!("may not write preset column {}.{col}", tp.info.name),
                Some(&tp.presets_rule),
            ));
        }
        Ok(())
    }

    /// SET list → column → SQL of the new value.
    pub(super) fn assignments(
        &mut self,
        tp: &TablePolicy,
        assignments: &mut [sqlparser::ast::Assignment],
        scope: &mut Vec<String>,
    ) -> R<HashMap<String, String>> {
        let mut map = HashMap::new();
        for a in assignments.iter_mut() {
            let col = match &a.target {
                AssignmentTarget::ColumnName(n) => object_name_parts(n)
                    .and_then(|p| p.last().cloned())
                    .ok_or_else(|| self.refuse("this SET target"))?,
                AssignmentTarget::Tuple(_) => return Err(self.refuse("tuple assignments")),
            };
            self.writable_column(tp, &col)?;
            self.saw_volatile = false;
            self.check_node(&mut a.value, scope)?;
            if self.saw_volatile {
                // The value is evaluated again inside the write check; it must be stable.
                return Err(self.refuse(format!("a volatile function in the new value of {col}")));
            }
            self.note_columns_written(&tp.info, [&col]);
            map.insert(col, format!("({})", a.value));
        }
        Ok(map)
    }

    /// What the new row of an UPDATE or ON CONFLICT DO UPDATE must pass — the write check
    /// and the references it writes — over the old row (`rel`) with the SET values
    /// (`set_map`) substituted.
    fn updated_row_checks(
        &self,
        tp: &TablePolicy,
        set_map: &HashMap<String, String>,
        rel: &str,
    ) -> R<Option<String>> {
        let new_value = |col: &str| {
            Some(
                set_map
                    .get(col)
                    .cloned()
                    .unwrap_or_else(|| format!("{rel}.{}", quote_ident(col))),
            )
        };
        let check = match &tp.check {
            Some(c) => {
                let cond = self.render(c, tp, &new_value)?;
                Some(self.assert_sql(&cond, &self.write_message("write this row to", tp)))
            }
            None => None,
        };
        let references = self.reference_checks(tp, &|c| set_map.contains_key(c), &new_value)?;
        Ok(both(check, references))
    }

    pub(super) fn returning(
        &mut self,
        r: &mut Option<Vec<SelectItem>>,
        tp: &TablePolicy,
        (rel, rel_norm): (&str, &str),
        scope: &mut Vec<String>,
    ) -> R<()> {
        let Some(items) = r else { return Ok(()) };
        let mut out = Vec::new();
        for item in items.drain(..) {
            // Does a qualified `x.*` name the write target (else: a barrier-wrapped FROM item)?
            let names_target = match &item {
                SelectItem::Wildcard(_) => true,
                SelectItem::QualifiedWildcard(
                    SelectItemQualifiedWildcardKind::ObjectName(n),
                    _,
                ) => {
                    object_name_parts(n)
                        .and_then(|p| p.last().cloned())
                        .as_deref()
                        == Some(rel_norm)
                }
                SelectItem::QualifiedWildcard(..) => {
                    return Err(self.refuse("this RETURNING wildcard"));
                }
                _ => false,
            };
            match &item {
                SelectItem::Wildcard(o) | SelectItem::QualifiedWildcard(_, o)
                    if names_target && !tp.hidden.is_empty() =>
                {
                    check_wildcard(o).map_err(|_| self.refuse("wildcard options"))?;
                    // `*` on a table with hidden columns means its visible columns.
                    for c in &tp.visible {
                        let e = parse_expr(&format!("{rel}.{}", quote_ident(c)))
                            .map_err(|e| self.refuse(format!("(internal: {e})")))?;
                        out.push(SelectItem::UnnamedExpr(e));
                    }
                }
                SelectItem::Wildcard(o) | SelectItem::QualifiedWildcard(_, o) => {
                    check_wildcard(o).map_err(|_| self.refuse("wildcard options"))?;
                    out.push(item);
                }
                _ => out.push(item),
            }
        }
        *items = out;
        self.check_node(items, scope)
    }

    /// `filter AND pk = c AND (CASE WHEN filter THEN <guarded> END)`.
    /// The WHERE of an UPDATE/DELETE target: the row filter, the leakproof conjuncts hoisted
    /// next to it (indexes), and the service's own predicate evaluated only on rows the filter
    /// admits (with the write check, for UPDATE); records the table as written.
    pub(super) fn guard_target_rows(
        &mut self,
        selection: &mut Option<Expr>,
        (tp, rel, rel_norm): (&TablePolicy, &str, &str),
        sole_source: bool,
        filter: Option<String>,
        check: Option<String>,
    ) -> R<()> {
        let hoisted = self.hoisted(selection.as_ref(), tp, rel_norm, rel, sole_source);
        let text = self.guarded_where(
            filter,
            hoisted,
            selection.as_ref().map(|e| e.to_string()),
            check,
        );
        *selection = Some(parse_expr(&text).map_err(|e| self.refuse(format!("(internal: {e})")))?);
        self.note_write(&tp.info);
        Ok(())
    }

    pub(super) fn guarded_where(
        &self,
        filter: Option<String>,
        hoisted: Vec<String>,
        user: Option<String>,
        check: Option<String>,
    ) -> String {
        let body = match (user, check) {
            (Some(u), Some(c)) => format!("CASE WHEN ({u}) THEN {c} END"),
            (Some(u), None) => format!("({u})"),
            (None, Some(c)) => c,
            (None, None) => "TRUE".to_string(),
        };
        let mut parts = Vec::new();
        if let Some(f) = &filter {
            parts.push(format!("({f})"));
        }
        parts.extend(hoisted);
        match filter {
            Some(f) => parts.push(format!("(CASE WHEN ({f}) THEN {body} END)")),
            None => parts.push(body),
        }
        parts.join(" AND ")
    }

    pub(super) fn hoisted(
        &self,
        selection: Option<&Expr>,
        tp: &TablePolicy,
        rel_norm: &str,
        rel: &str,
        single: bool,
    ) -> Vec<String> {
        let Some(sel) = selection else {
            return Vec::new();
        };
        conjuncts(sel)
            .into_iter()
            .filter_map(leakproof_eq)
            .filter(|(r, col, _)| {
                (r.as_deref() == Some(rel_norm) || (r.is_none() && single))
                    && tp.visible.contains(col)
            })
            .filter(|(_, col, _)| leakproof_type(&tp.info, col))
            .map(|(_, col, rhs)| format!("{rel}.{} = {rhs}", quote_ident(&col)))
            .collect()
    }

    pub(super) fn update(&mut self, u: &mut Update, scope: &mut Vec<String>) -> R<()> {
        if u.on_cluster.is_some()
            || u.output.is_some()
            || u.or.is_some()
            || !u.order_by.is_empty()
            || u.limit.is_some()
            || u.settings.is_some()
            || !u.optimizer_hints.is_empty()
            || !u.table.joins.is_empty()
        {
            return Err(self.refuse("this UPDATE syntax"));
        }
        let (name, alias) = match &u.table.relation {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } if alias.as_ref().is_none_or(|a| a.columns.is_empty()) => {
                (name.clone(), alias.clone())
            }
            _ => return Err(self.refuse("this UPDATE target")),
        };
        let tp = self.target(&name, Action::Update)?;
        let (rel, rel_norm) = rel_names(&name, alias.as_ref().map(|a| &a.name));
        if !tp.hidden.is_empty() {
            self.forbid_rows
                .insert(rel_norm.clone(), tp.info.name.clone());
        }
        let has_from = u.from.is_some();
        if let Some(from) = &mut u.from {
            let (UpdateTableFromKind::BeforeSet(v) | UpdateTableFromKind::AfterSet(v)) = from;
            for twj in v.iter_mut() {
                self.table_with_joins(twj, scope, &Vec::new())?;
            }
        }
        let set_map = self.assignments(&tp, &mut u.assignments, scope)?;
        self.check_node(&mut u.selection, scope)?;
        self.returning(&mut u.returning, &tp, (&rel, &rel_norm), scope)?;
        let filter = tp
            .filter
            .as_ref()
            .map(|f| self.render(f, &tp, &|c| Some(format!("{rel}.{}", quote_ident(c)))))
            .transpose()?;
        let check = self.updated_row_checks(&tp, &set_map, &rel)?;
        let target = (&tp, rel.as_str(), rel_norm.as_str());
        self.guard_target_rows(&mut u.selection, target, !has_from, filter, check)
    }

    pub(super) fn delete(&mut self, d: &mut Delete, scope: &mut Vec<String>) -> R<()> {
        if !d.tables.is_empty()
            || d.on_cluster.is_some()
            || d.output.is_some()
            || !d.order_by.is_empty()
            || d.limit.is_some()
            || d.settings.is_some()
            || !d.optimizer_hints.is_empty()
        {
            return Err(self.refuse("this DELETE syntax"));
        }
        let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
        let (name, alias) = match from.as_slice() {
            [twj] if twj.joins.is_empty() => match &twj.relation {
                TableFactor::Table {
                    name,
                    alias,
                    args: None,
                    ..
                } if alias.as_ref().is_none_or(|a| a.columns.is_empty()) => {
                    (name.clone(), alias.clone())
                }
                _ => return Err(self.refuse("this DELETE target")),
            },
            _ => return Err(self.refuse("this DELETE target")),
        };
        let tp = self.target(&name, Action::Delete)?;
        let (rel, rel_norm) = rel_names(&name, alias.as_ref().map(|a| &a.name));
        if !tp.hidden.is_empty() {
            self.forbid_rows
                .insert(rel_norm.clone(), tp.info.name.clone());
        }
        let has_using = d.using.is_some();
        if let Some(using) = &mut d.using {
            for twj in using.iter_mut() {
                self.table_with_joins(twj, scope, &Vec::new())?;
            }
        }
        self.check_node(&mut d.selection, scope)?;
        self.returning(&mut d.returning, &tp, (&rel, &rel_norm), scope)?;
        let filter = tp
            .filter
            .as_ref()
            .map(|f| self.render(f, &tp, &|c| Some(format!("{rel}.{}", quote_ident(c)))))
            .transpose()?;
        let target = (&tp, rel.as_str(), rel_norm.as_str());
        self.guard_target_rows(&mut d.selection, target, !has_using, filter, None)
    }

    pub(super) fn insert(&mut self, i: &mut Insert, scope: &mut Vec<String>) -> R<()> {
        if i.or.is_some()
            || i.ignore
            || i.overwrite
            || i.partitioned.is_some()
            || !i.after_columns.is_empty()
            || i.by_name
            || i.replace_into
            || i.priority.is_some()
            || i.insert_alias.is_some()
            || !i.assignments.is_empty()
            || i.output.is_some()
            || i.overriding.is_some()
            || !i.optimizer_hints.is_empty()
        {
            return Err(self.refuse("this INSERT syntax"));
        }
        let TableObject::TableName(name) = &i.table else {
            return Err(self.refuse("this INSERT target"));
        };
        let name = name.clone();
        let tp = self.target(&name, Action::Insert)?;
        let alias_ident = i.table_alias.as_ref().map(|a| a.alias.clone());
        let (rel, rel_norm) = rel_names(&name, alias_ident.as_ref());
        if !tp.hidden.is_empty() {
            self.forbid_rows
                .insert(rel_norm.clone(), tp.info.name.clone());
        }
        let mut cols: Vec<String> = Vec::new();
        for c in &i.columns {
            let col = object_name_parts(c)
                .and_then(|p| p.last().cloned())
                .ok_or_else(|| self.refuse("this column name"))?;
            if cols.contains(&col) {
                return Err(self.refuse(format!("INSERT naming column {col} twice")));
            }
            cols.push(col);
        }
        let Some(source) = i.source.as_mut() else {
            return Err(self.refuse("INSERT ... DEFAULT VALUES"));
        };
        let values_rows = match (
            &*source.body,
            &source.with,
            &source.order_by,
            &source.limit_clause,
        ) {
            (SetExpr::Values(v), None, None, None) => Some(v.rows.len()),
            _ => None,
        };
        if cols.is_empty() {
            let n = match &*source.body {
                SetExpr::Values(v) if values_rows.is_some() => {
                    v.rows.first().map(|r| r.len()).unwrap_or(0)
                }
                _ => {
                    return Err(self.deny(
                        format!(
                            "must name the columns of INSERT INTO {} ... SELECT",
                            tp.info.name
                        ),
                        None,
                    ))
                }
            };
            cols = tp
                .info
                .columns
                .iter()
                .take(n)
                .map(|c| c.name.clone())
                .collect();
        }
        // A column that is DEFAULT in every VALUES row is not written by the client (it is
        // dropped below): ORMs write DEFAULT for columns left to the database, presets included.
        let all_default = |i: usize| match (&values_rows, &*source.body) {
            (Some(_), SetExpr::Values(v)) => {
                !v.rows.is_empty() && v.rows.iter().all(|r| r.get(i).is_some_and(is_default))
            }
            _ => false,
        };
        for (i, c) in cols.iter().enumerate() {
            if !all_default(i) {
                self.writable_column(&tp, c)?;
            }
        }
        if values_rows.is_some() {
            let SetExpr::Values(v) = &mut *source.body else {
                return Err(self.refuse("(internal)"));
            };
            drop_default_columns(&mut cols, &mut v.rows)
                .map_err(|()| self.refuse("DEFAULT in only some VALUES rows of a column"))?;
            if cols.is_empty() {
                return Err(self.refuse("INSERT of only DEFAULT values"));
            }
            for row in v.rows.iter_mut() {
                if row.len() != cols.len() {
                    return Err(
                        self.refuse("VALUES rows whose length differs from the column list")
                    );
                }
                for (e, col) in row.iter_mut().zip(&cols) {
                    if is_default(e) {
                        return Err(self.refuse("DEFAULT in VALUES (omit the column instead)"));
                    }
                    self.check_node(e, scope)?;
                    let ty = tp
                        .info
                        .column(col)
                        .map(|c| c.type_name.clone())
                        .unwrap_or_default();
                    // The cast gives $n parameters the column's type.
                    *e = parse_expr(&format!("CAST(({e}) AS {ty})"))
                        .map_err(|err| self.refuse(format!("(internal: {err})")))?;
                }
            }
        } else {
            self.query(source, scope)?;
        }
        let type_of = |c: &str| {
            tp.info
                .column(c)
                .map(|c| c.type_name.clone())
                .unwrap_or_default()
        };
        let mut value_of: HashMap<String, String> = cols
            .iter()
            .map(|c| {
                (
                    c.clone(),
                    format!("CAST(pgward_v.{} AS {})", quote_ident(c), type_of(c)),
                )
            })
            .collect();
        let mut out_cols = cols.clone();
        for (col, e) in &tp.presets {
            let v = self.render(e, &tp, &|_| None)?;
            value_of.insert(col.clone(), format!("CAST(({v}) AS {})", type_of(col)));
            out_cols.push(col.clone());
        }
        self.note_columns_written(&tp.info, &out_cols);
        let select_list: Vec<String> = out_cols
            .iter()
            .filter_map(|c| value_of.get(c).cloned())
            .collect();
        let mut text = format!(
            "SELECT {} FROM ({source}) AS pgward_v({})",
            select_list.join(", "),
            cols.iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(check) = &tp.check {
            let missing = std::cell::RefCell::new(BTreeSet::new());
            let cond = self.render(check, &tp, &|c| {
                let v = value_of.get(c).cloned();
                if v.is_none() {
                    missing.borrow_mut().insert(c.to_string());
                }
                v
            });
            if let Some(c) = missing.borrow().iter().next() {
                return Err(self.deny(
                    format!(
                        "must supply column {}.{c} (used by the write check)",
                        tp.info.name
                    ),
                    Some(&tp.check_rule),
                ));
            }
            text.push_str(&format!(
                " WHERE {}",
                self.assert_sql(&cond?, &self.write_message("insert this row into", &tp))
            ));
        }
        let references = self.reference_checks(&tp, &|c| cols.iter().any(|x| x == c), &|c| {
            value_of.get(c).cloned()
        })?;
        if let Some(references) = references {
            let joiner = if tp.check.is_some() {
                " AND "
            } else {
                " WHERE "
            };
            text.push_str(&format!("{joiner}{references}"));
        }
        i.source = Some(parse_query(&text).map_err(|e| self.refuse(format!("(internal: {e})")))?);
        i.columns = out_cols
            .iter()
            .map(|c| ObjectName::from(vec![sqlparser::ast::Ident::with_quote('"', c.clone())]))
            .collect();
        match &mut i.on {
            None => {}
            Some(OnInsert::OnConflict(oc)) => {
                if let Some(ConflictTarget::Columns { columns, predicate }) =
                    &mut oc.conflict_target
                {
                    for c in columns.iter() {
                        self.check_column(&ident_name(c))?;
                    }
                    self.check_node(predicate, scope)?;
                }
                if let OnConflictAction::DoUpdate(du) = &mut oc.action {
                    if !tp.update {
                        return Err(self.deny(
                            format!(
                                "may not update table {} (ON CONFLICT DO UPDATE)",
                                tp.info.name
                            ),
                            Some(&tp.actions_rule),
                        ));
                    }
                    let set_map = self.assignments(&tp, &mut du.assignments, scope)?;
                    self.check_node(&mut du.selection, scope)?;
                    let check = self.updated_row_checks(&tp, &set_map, &rel)?;
                    let body = self.guarded_where(
                        None,
                        Vec::new(),
                        du.selection.as_ref().map(|e| e.to_string()),
                        check,
                    );
                    let text = match &tp.filter {
                        Some(f) => {
                            // Like RLS: conflicting with a row the service cannot see is an error.
                            let f = self
                                .render(f, &tp, &|c| Some(format!("{rel}.{}", quote_ident(c))))?;
                            let msg = format!("pgward: service {:?} may not update a conflicting row of {} it cannot see ({})", self.service, tp.info.name, tp.filter_rule);
                            format!("CASE WHEN {} THEN {body} END", self.assert_sql(&f, &msg))
                        }
                        None => body,
                    };
                    du.selection = Some(
                        parse_expr(&text).map_err(|e| self.refuse(format!("(internal: {e})")))?,
                    );
                }
            }
            Some(_) => return Err(self.refuse("this ON CONFLICT form")),
        }
        self.returning(&mut i.returning, &tp, (&rel, &rel_norm), scope)?;
        self.note_write(&tp.info);
        Ok(())
    }

    pub(super) fn copy(&mut self, st: &mut Statement) -> R<String> {
        if !self.policy.allow.copy {
            return Err(self.refuse("COPY (allow.copy is off)"));
        }
        let Statement::Copy {
            source,
            to,
            target,
            payload,
            ..
        } = st
        else {
            return Err(self.refuse("(internal)"));
        };
        if payload.is_some() {
            return Err(self.refuse("COPY with inline data"));
        }
        if *to {
            if !matches!(target, CopyTarget::Stdout) {
                return Err(self.refuse("COPY TO a file or program"));
            }
            if let CopySource::Table {
                table_name,
                columns,
            } = source
            {
                let cols = if columns.is_empty() {
                    "*".to_string()
                } else {
                    columns
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let q = parse_query(&format!("SELECT {cols} FROM {table_name}"))
                    .map_err(|e| self.refuse(format!("(internal: {e})")))?;
                *source = CopySource::Query(q);
            }
            if let CopySource::Query(q) = source {
                self.query(q, &mut Vec::new())?;
            }
            return Ok(st.to_string());
        }
        if !matches!(target, CopyTarget::Stdin) {
            return Err(self.refuse("COPY FROM a file or program"));
        }
        let CopySource::Table {
            table_name,
            columns,
        } = source
        else {
            return Err(self.refuse("this COPY form"));
        };
        let tp = self.target(table_name, Action::Insert)?;
        if !tp.presets.is_empty() {
            return Err(self.deny(
                format!(
                    "may not COPY into {} (it has presets; use INSERT)",
                    tp.info.name
                ),
                Some(&tp.presets_rule),
            ));
        }
        let cols: Vec<String> = if columns.is_empty() {
            tp.info.columns.iter().map(|c| c.name.clone()).collect()
        } else {
            columns.iter().map(ident_name).collect()
        };
        for c in &cols {
            self.writable_column(&tp, c)?;
        }
        // COPY's WHERE runs per row without subqueries: no reference can be checked there.
        if let Some(key) = self.reference_written(&tp, &|c| cols.iter().any(|x| x == c)) {
            return Err(self.deny(
                format!(
                    "may not COPY into {}.({}): it references {}, and COPY cannot check that each row names one it can see (use INSERT)",
                    tp.info.name,
                    key.columns.join(", "),
                    key.referenced.1
                ),
                Some(&tp.table_rule),
            ));
        }
        self.note_columns_written(&tp.info, &cols);
        let mut text = st.to_string();
        if !crate::sql::parse::round_trips(&text) {
            return Err(self.refuse("this COPY statement (it does not round-trip)"));
        }
        if let Some(check) = &tp.check {
            let cond = self.render(check, &tp, &|c| {
                cols.iter().any(|x| x == c).then(|| quote_ident(c))
            })?;
            let assert = self.assert_sql(&cond, &self.write_message("copy this row into", &tp));
            if !crate::sql::parse::expr_round_trips(&assert) {
                return Err(self.refuse("this COPY statement (check does not round-trip)"));
            }
            // COPY FROM ... WHERE runs per row inside the server: bound data is verified there.
            text.push_str(&format!(" WHERE {assert}"));
        }
        self.note_write(&tp.info);
        Ok(text)
    }
}

/// Two optional conditions, both required.
fn both(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => Some(format!("{a} AND {b}")),
        (a, b) => a.or(b),
    }
}
