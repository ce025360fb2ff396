//! Writes into encrypted columns: `INSERT … VALUES`, `UPDATE … SET`, `ON CONFLICT DO UPDATE`
//! and `COPY … FROM STDIN` plans.

use super::*;

impl Transform<'_> {
    pub(super) fn insert(&mut self, i: &mut Insert) -> Result<(), Refused> {
        let TableObject::TableName(name) = &i.table else {
            return Ok(());
        };
        let Some(table) = self.qualify(name) else {
            return Ok(());
        };
        let Some(cols) = self.enc_table(&table).cloned() else {
            return Ok(());
        };
        let mut names: Vec<String> = Vec::new();
        for c in &i.columns {
            names.push(
                object_name_parts(c)
                    .and_then(|p| p.last().cloned())
                    .unwrap_or_default(),
            );
        }
        if names.is_empty() {
            names = self.default_columns(&table, &cols, i)?;
            i.columns = names
                .iter()
                .map(|n| ObjectName(vec![ObjectNamePart::Identifier(Ident::new(n.clone()))]))
                .collect();
        }
        refuse_bidx_targets(&cols, names.iter())?;
        let targets: Vec<(usize, EncCol)> = names
            .iter()
            .enumerate()
            .filter_map(|(k, n)| cols.get(n).map(|c| (k, c.clone())))
            .collect();
        // Row binding: the primary key's position in the column list, if any target binds.
        let bound = targets.iter().any(|(_, c)| c.bind_row);
        let pk = if bound {
            Some(self.primary_key(&table)?)
        } else {
            None
        };
        let pk_pos = pk
            .as_ref()
            .and_then(|(pk, _)| names.iter().position(|n| n == pk));
        let mut row_keys: Vec<Option<RowKey>> = Vec::new();
        if !targets.is_empty() {
            let Some(source) = i.source.as_mut() else {
                return Ok(());
            };
            let SetExpr::Values(values) = &mut *source.body else {
                return Err(refuse(format!(
                    "pgward: INSERT … SELECT into encrypted column {table}.{} is not supported (it would store unencrypted or computed values); use VALUES",
                    targets[0].1.col.column
                )));
            };
            for (_, c) in targets.iter().filter(|(_, c)| c.searchable) {
                i.columns
                    .push(ObjectName(vec![ObjectNamePart::Identifier(Ident::new(
                        bidx_column(&c.col.column),
                    ))]));
            }
            for row in values.rows.iter_mut() {
                let row_key = match (&pk, pk_pos.and_then(|p| row.content.get(p))) {
                    (Some((_, ty)), Some(expr)) => self.row_key_of(&table, expr, *ty)?,
                    _ => None,
                };
                let mut extra = Vec::new();
                for (k, c) in &targets {
                    let Some(expr) = row.content.get(*k) else {
                        continue;
                    };
                    let w = self.written(expr, c)?;
                    let sealed = self.sealed(c, &w, row_key.as_ref())?;
                    if c.searchable {
                        extra.push(self.index(c, &w, true)?);
                    }
                    row.content[*k] = sealed;
                }
                row.content.extend(extra);
                row_keys.push(row_key);
            }
        }
        if let Some(OnInsert::OnConflict(oc)) = &mut i.on {
            // The conflicting row has the inserted row's key only when the conflict is on
            // the primary key; otherwise values bound to the inserted row must not move there.
            let on_pk = match (&pk, &oc.conflict_target) {
                (Some((pk, _)), Some(ConflictTarget::Columns { columns, .. })) => {
                    columns.len() == 1 && ident_name(&columns[0]) == *pk
                }
                _ => false,
            };
            let conflict_row = match row_keys.as_slice() {
                [Some(key)] if on_pk => Some(key.clone()),
                _ => None,
            };
            let excluded_bound = !on_pk && row_keys.iter().any(Option::is_some);
            if let Some(ConflictTarget::Columns { columns, .. }) = &mut oc.conflict_target {
                for id in columns.iter_mut() {
                    if let Some(c) = cols.get(&ident_name(id)) {
                        if !c.searchable {
                            return Err(refuse(format!(
                                "pgward: ON CONFLICT on encrypted column {table}.{} needs it searchable (a unique index on {})",
                                c.col.column,
                                bidx_column(&c.col.column)
                            )));
                        }
                        *id = Ident::new(bidx_column(&c.col.column));
                    }
                }
            }
            if let OnConflictAction::DoUpdate(du) = &mut oc.action {
                let excluded = if excluded_bound {
                    Excluded::RefusedBound
                } else {
                    Excluded::Allowed
                };
                self.assignments(
                    &table,
                    &cols,
                    &mut du.assignments,
                    excluded,
                    conflict_row.as_ref(),
                )?;
            }
        }
        Ok(())
    }

    /// `COPY t [(cols)] FROM STDIN` in text or CSV format: the column list gains the blind
    /// indexes, and the relay encrypts each row's fields ([`CopyPlan`]).
    pub(super) fn copy_from(
        &mut self,
        table_name: &ObjectName,
        columns: &mut Vec<Ident>,
        options: &[sqlparser::ast::CopyOption],
        legacy: &[sqlparser::ast::CopyLegacyOption],
    ) -> Result<(), Refused> {
        use sqlparser::ast::{CopyLegacyCsvOption as Csv, CopyLegacyOption as L, CopyOption as O};
        let Some(table) = self.qualify(table_name) else {
            return Ok(());
        };
        let Some(cols) = self.enc_table(&table).cloned() else {
            return Ok(());
        };
        if self.params.copy.is_some() {
            return Err(refuse(
                "pgward: one COPY into a table with encrypted columns per query",
            ));
        }
        let unsupported = |what: &str| {
            refuse(format!(
                "pgward: COPY into {table} (it has encrypted columns) supports text and CSV without {what}"
            ))
        };
        let byte = |c: char, what: &str| -> Result<u8, Refused> {
            u8::try_from(c)
                .ok()
                .filter(u8::is_ascii)
                .ok_or_else(|| unsupported(what))
        };
        let mut plan = CopyPlan {
            csv: false,
            delimiter: b'\t',
            null: "\\N".into(),
            header: false,
            quote: b'"',
            escape: b'"',
            fields: Vec::new(),
            blind_indexes: Vec::new(),
            appended_names: Vec::new(),
        };
        let (mut delimiter, mut null, mut escape) = (None, None, None);
        for o in options {
            match o {
                O::Format(f) => match ident_name(f).as_str() {
                    "text" => plan.csv = false,
                    "csv" => plan.csv = true,
                    _ => return Err(unsupported("binary format")),
                },
                O::Freeze(_) => {}
                O::Delimiter(c) => delimiter = Some(byte(*c, "a non-ASCII delimiter")?),
                O::Null(n) => null = Some(n.clone()),
                O::Header(h) => plan.header = *h,
                O::Quote(c) => plan.quote = byte(*c, "a non-ASCII quote")?,
                O::Escape(c) => escape = Some(byte(*c, "a non-ASCII escape")?),
                O::ForceNotNull(_) | O::ForceNull(_) | O::ForceQuote(_) | O::Encoding(_) => {
                    return Err(unsupported("FORCE_* or ENCODING options"))
                }
            }
        }
        for o in legacy {
            match o {
                L::Delimiter(c) => delimiter = Some(byte(*c, "a non-ASCII delimiter")?),
                L::Null(n) => null = Some(n.clone()),
                L::Csv(csv) => {
                    plan.csv = true;
                    for c in csv {
                        match c {
                            Csv::Header => plan.header = true,
                            Csv::Quote(q) => plan.quote = byte(*q, "a non-ASCII quote")?,
                            Csv::Escape(e) => escape = Some(byte(*e, "a non-ASCII escape")?),
                            _ => return Err(unsupported("FORCE options")),
                        }
                    }
                }
                _ => return Err(unsupported("this option")),
            }
        }
        if plan.csv {
            plan.delimiter = b',';
            plan.null = String::new();
        }
        plan.delimiter = delimiter.unwrap_or(plan.delimiter);
        plan.null = null.unwrap_or(plan.null);
        plan.escape = escape.unwrap_or(plan.quote);
        let mut names: Vec<String> = columns.iter().map(ident_name).collect();
        if names.is_empty() {
            let info = self
                .catalog
                .and_then(|c| {
                    let (s, t) = table.split_once('.')?;
                    c.get(s, t)
                })
                .ok_or_else(|| {
                    refuse(format!(
                        "pgward: name the columns of COPY {table} (it has encrypted columns)"
                    ))
                })?;
            names = info
                .columns
                .iter()
                .map(|c| c.name.clone())
                .filter(|n| {
                    !n.strip_suffix("_bidx")
                        .and_then(|b| cols.get(b))
                        .is_some_and(|c| c.searchable)
                })
                .collect();
            *columns = names.iter().map(|n| Ident::new(n.clone())).collect();
        }
        refuse_bidx_targets(&cols, names.iter())?;
        for (i, n) in names.iter().enumerate() {
            let c = cols.get(n);
            plan.fields.push(c.map(|c| c.col.clone()));
            if let Some(c) = c.filter(|c| c.searchable) {
                plan.blind_indexes.push(i);
                plan.appended_names.push(bidx_column(&c.col.column));
                columns.push(Ident::new(bidx_column(&c.col.column)));
            }
        }
        self.params.copy = Some(plan);
        Ok(())
    }

    /// The column list PostgreSQL would use for `INSERT INTO t VALUES (…)`, minus blind indexes.
    pub(super) fn default_columns(
        &self,
        table: &str,
        cols: &HashMap<String, EncCol>,
        i: &Insert,
    ) -> Result<Vec<String>, Refused> {
        let width = match i.source.as_deref().map(|q| &*q.body) {
            Some(SetExpr::Values(v)) => v.rows.first().map_or(0, |r| r.content.len()),
            None => return Ok(Vec::new()),
            _ => {
                return Err(refuse(format!(
                    "pgward: name the columns of INSERT INTO {table} (it has encrypted columns)"
                )))
            }
        };
        let info = self
            .catalog
            .and_then(|c| {
                let (s, t) = table.split_once('.')?;
                c.get(s, t)
            })
            .ok_or_else(|| {
                refuse(format!(
                    "pgward: name the columns of INSERT INTO {table} (it has encrypted columns)"
                ))
            })?;
        let is_bidx = |n: &str| {
            n.strip_suffix("_bidx")
                .and_then(|b| cols.get(b))
                .is_some_and(|c| c.searchable)
        };
        Ok(info
            .columns
            .iter()
            .map(|c| c.name.clone())
            .filter(|n| !is_bidx(n))
            .take(width)
            .collect())
    }

    pub(super) fn update(&mut self, u: &mut Update) -> Result<(), Refused> {
        let TableFactor::Table { name, .. } = &u.table.relation else {
            return Ok(());
        };
        let Some(table) = self.qualify(name) else {
            return Ok(());
        };
        let Some(cols) = self.enc_table(&table).cloned() else {
            return Ok(());
        };
        let row = if cols.values().any(|c| c.bind_row) {
            self.update_row_key(u, &table)?
        } else {
            None
        };
        self.assignments(
            &table,
            &cols,
            &mut u.assignments,
            Excluded::No,
            row.as_ref(),
        )
    }

    /// `SET col = v` of UPDATE or ON CONFLICT DO UPDATE (`excluded`: whether `EXCLUDED.col`
    /// may be copied), sealing row-bound columns to `row` when it is known.
    pub(super) fn assignments(
        &mut self,
        table: &str,
        cols: &HashMap<String, EncCol>,
        assignments: &mut Vec<sqlparser::ast::Assignment>,
        excluded: Excluded,
        row: Option<&RowKey>,
    ) -> Result<(), Refused> {
        if cols.values().any(|c| c.bind_row) {
            // A new primary key would orphan every value bound to the old one.
            let (pk, _) = self.primary_key(table)?;
            let sets_pk = assignments.iter().any(|a| match &a.target {
                AssignmentTarget::ColumnName(n) => {
                    object_name_parts(n).and_then(|p| p.last().cloned()) == Some(pk.clone())
                }
                AssignmentTarget::Tuple(ns) => ns.iter().any(|n| {
                    object_name_parts(n).and_then(|p| p.last().cloned()) == Some(pk.clone())
                }),
            });
            if sets_pk {
                return Err(refuse(format!(
                    "pgward: the primary key {pk} of {table} cannot be changed through pgward: values of its encrypted columns are bound to it"
                )));
            }
        }
        let mut extra = Vec::new();
        for a in assignments.iter_mut() {
            let names: Vec<String> = match &a.target {
                AssignmentTarget::ColumnName(n) => object_name_parts(n)
                    .and_then(|p| p.last().cloned())
                    .into_iter()
                    .collect(),
                AssignmentTarget::Tuple(ns) => ns
                    .iter()
                    .filter_map(|n| object_name_parts(n).and_then(|p| p.last().cloned()))
                    .collect(),
            };
            refuse_bidx_targets(cols, names.iter())?;
            let Some(c) = names.iter().find_map(|n| cols.get(n)).cloned() else {
                continue;
            };
            if matches!(a.target, AssignmentTarget::Tuple(_)) {
                return Err(refuse(format!(
                    "pgward: assign encrypted column {table}.{} on its own, not in a tuple",
                    c.col.column
                )));
            }
            let bidx_target =
                AssignmentTarget::ColumnName(ObjectName(vec![ObjectNamePart::Identifier(
                    Ident::new(bidx_column(&c.col.column)),
                )]));
            if excluded != Excluded::No && is_excluded_copy(&a.value, &c.col.column) {
                if excluded == Excluded::RefusedBound && c.bind_row {
                    return Err(refuse(format!(
                        "pgward: EXCLUDED.{} is bound to the inserted row's primary key; with ON CONFLICT on another column it would land in a row with another key (conflict on the primary key, or set it from a value)",
                        c.col.column
                    )));
                }
                if c.searchable {
                    extra.push(sqlparser::ast::Assignment {
                        target: bidx_target,
                        value: Expr::CompoundIdentifier(vec![
                            Ident::new("EXCLUDED"),
                            Ident::new(bidx_column(&c.col.column)),
                        ]),
                    });
                }
                // Mark the reference as handled: it copies ciphertext within its own column.
                a.value = Expr::CompoundIdentifier(vec![
                    Ident::new("EXCLUDED"),
                    Ident::new(c.col.column.clone()),
                ]);
                continue;
            }
            let w = self.written(&a.value, &c)?;
            let sealed = self.sealed(&c, &w, row)?;
            if c.searchable {
                extra.push(sqlparser::ast::Assignment {
                    target: bidx_target,
                    value: self.index(&c, &w, true)?,
                });
            }
            a.value = sealed;
        }
        assignments.extend(extra);
        Ok(())
    }
}

/// Whether `EXCLUDED.col` may be copied in an assignment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Excluded {
    /// Not an ON CONFLICT: `EXCLUDED` means nothing.
    No,
    Allowed,
    /// Allowed except for row-bound columns (their inserted values are bound to another key).
    RefusedBound,
}

/// Refuse writing a blind-index column directly: pgward maintains it.
fn refuse_bidx_targets<'a>(
    cols: &HashMap<String, EncCol>,
    names: impl Iterator<Item = &'a String>,
) -> Result<(), Refused> {
    for n in names {
        if let Some(c) = n.strip_suffix("_bidx").and_then(|b| cols.get(b)) {
            if c.searchable {
                return Err(refuse(format!(
                    "pgward: {n} is the blind index of encrypted column {}.{}; pgward maintains it",
                    c.col.table, c.col.column
                )));
            }
        }
    }
    Ok(())
}

pub(super) fn is_excluded_copy(value: &Expr, column: &str) -> bool {
    matches!(value, Expr::CompoundIdentifier(p) if p.len() == 2
        && ident_name(&p[0]) == "excluded" && ident_name(&p[1]) == column)
}
