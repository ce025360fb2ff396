//! Expressions: every expression a statement carries is checked (functions, operators, casts,
//! hidden columns, nested queries) and claims are substituted as literals.
use super::*;
use sqlparser::ast::{ArrayElemTypeDef, DataType};

impl<'a> Rewriter<'a> {
    /// Checks every expression inside `node` (and rewrites nested queries).
    pub(super) fn check_node<T: VisitMut + ?Sized>(
        &mut self,
        node: &mut T,
        scope: &mut Vec<String>,
    ) -> R<()> {
        let mut checker = ExprChecker {
            rw: self,
            scope,
            depth: 0,
        };
        match node.visit(&mut checker) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(e) => Err(e),
        }
    }

    pub(super) fn check_function_name(&mut self, name: &ObjectName) -> R<()> {
        let parts = object_name_parts(name).ok_or_else(|| self.refuse("this function name"))?;
        let full = parts.join(".");
        let builtin = match parts.as_slice() {
            [n] => Some(n.as_str()),
            [s, n] if s == "pg_catalog" => Some(n.as_str()),
            _ => None,
        };
        if builtin.is_some_and(allow::is_volatile_function) {
            self.saw_volatile = true;
        }
        let safe_builtin = builtin.is_some_and(|n| {
            allow::is_safe_function(n) || self.catalog.routines().is_safe_function(n)
        });
        if safe_builtin
            || allow::SAFE_QUALIFIED_FUNCTIONS.contains(&full.as_str())
            || self.policy.allow.functions.contains(&full)
        {
            Ok(())
        } else {
            Err(self.deny(
                format!(
                    "may not call function {full} (only built-in functions that cannot read \
                     tables, files or settings, and the policy's [allow] functions)"
                ),
                Some(&self.policy.allow.rule),
            ))
        }
    }

    /// Operators spelled as symbols sqlparser does not know (`~<~`, `OPERATOR(pg_catalog.~)`):
    /// allowed when every `pg_catalog` operator of that name is implemented by a safe function.
    fn check_custom_operator(&self, op: &BinaryOperator) -> R<()> {
        let symbol = match op {
            BinaryOperator::Custom(s) => Some(s.as_str()),
            BinaryOperator::PGCustomBinaryOperator(parts) => match parts.as_slice() {
                [s] => Some(s.as_str()),
                [schema, s] if schema == "pg_catalog" => Some(s.as_str()),
                _ => None,
            },
            _ => return Ok(()),
        };
        if symbol.is_some_and(|s| self.catalog.routines().is_safe_operator(s)) {
            Ok(())
        } else {
            Err(self.refuse(format!(
                "operator {op} (only built-in operators whose function cannot read tables)"
            )))
        }
    }

    /// Whether a cast or typed literal may name `dt`: built-in types resolved the way the
    /// server resolves them (quoted, `pg_catalog`-qualified, SQL aliases, arrays), whose
    /// input cannot read data or resolve relation names.
    pub(super) fn safe_type(&self, dt: &DataType) -> bool {
        match dt {
            DataType::Array(
                ArrayElemTypeDef::SquareBracket(inner, _) | ArrayElemTypeDef::AngleBracket(inner),
            ) => self.safe_type(inner),
            DataType::Custom(name, _) => {
                let Some(parts) = object_name_parts(name) else {
                    return false;
                };
                let base = match parts.as_slice() {
                    [n] => n.as_str(),
                    [s, n] if s == "pg_catalog" => n.as_str(),
                    _ => return false,
                };
                // exact: a quoted "INT4" is not int4 to the server either
                allow::SAFE_TYPES.contains(&base) || self.catalog.routines().is_safe_type(base)
            }
            other => {
                let rendered = other.to_string();
                allow::is_safe_type(&rendered)
                    || self
                        .catalog
                        .routines()
                        .is_safe_type(&rendered.to_ascii_lowercase())
            }
        }
    }

    /// `current_setting('<name>' [, missing_ok])` of a parameter the service may SHOW, and
    /// `set_config('<name>', <literal or $n>, <bool>)` of one it may SET (never
    /// client_encoding): the same as SHOW and SET, as asyncpg toggles `jit` around its type
    /// introspection.
    fn showable_setting(&self, f: &sqlparser::ast::Function) -> bool {
        use sqlparser::ast::{FunctionArg, FunctionArgExpr, FunctionArguments, Value};
        let Some(parts) = object_name_parts(&f.name) else {
            return false;
        };
        let name = match parts.as_slice() {
            [n] => n.as_str(),
            [s, n] if s == "pg_catalog" => n.as_str(),
            _ => return false,
        };
        let FunctionArguments::List(list) = &f.args else {
            return false;
        };
        if list.duplicate_treatment.is_some()
            || !list.clauses.is_empty()
            || f.filter.is_some()
            || f.over.is_some()
        {
            return false;
        }
        let value = |a: &FunctionArg| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v))) => Some(v.value.clone()),
            _ => None,
        };
        let param = |a: &FunctionArg| match value(a) {
            Some(Value::SingleQuotedString(p)) => Some(p.to_ascii_lowercase()),
            _ => None,
        };
        let boolean = |a: &FunctionArg| matches!(value(a), Some(Value::Boolean(_)));
        match (name, list.args.as_slice()) {
            ("current_setting", [p]) | ("current_setting", [p, _]) => {
                { list.args.len() == 1 || boolean(&list.args[1]) }
                    .then(|| param(p))
                    .flatten()
                    .is_some_and(|p| {
                        self.is_settable(&p) || allow::SAFE_SHOW_PARAMS.contains(&p.as_str())
                    })
            }
            ("set_config", [p, v, local]) => {
                boolean(local)
                    && matches!(
                        value(v),
                        Some(Value::SingleQuotedString(_) | Value::Placeholder(_))
                    )
                    && param(p).is_some_and(|p| p != "client_encoding" && self.is_settable(&p))
            }
            _ => false,
        }
    }

    pub(super) fn check_column(&self, col: &str) -> R<()> {
        if allow::is_system_column(col) {
            // ctid, xmin, … of a visible row tell where and when rows were written, other
            // tenants' included; no user column can carry these names.
            return Err(self.deny(
                format!("may not read system column {col} (it reveals other rows' writes)"),
                Some(&self.policy.allow.rule),
            ));
        }
        if let Some((table, rule)) = self.hidden.get(col) {
            return Err(self.deny(format!("may not read column {table}.{col}"), Some(rule)));
        }
        if let Some(table) = self.forbid_rows.get(col) {
            return Err(self.deny(
                format!("may not use a whole-row reference to {table} (it has hidden columns)"),
                None,
            ));
        }
        Ok(())
    }

    pub(super) fn check_expr(&mut self, expr: &mut Expr) -> R<()> {
        match expr {
            Expr::Identifier(id) => self.check_column(&ident_name(id)),
            Expr::CompoundIdentifier(parts) => {
                let schema_qualified = parts.len() == 3
                    && self
                        .catalog
                        .resolve(&[ident_name(&parts[0]), ident_name(&parts[1])])
                        .is_some();
                if schema_qualified {
                    // schema.table.col: the barrier is aliased by the bare table name.
                    parts.remove(0);
                } else if parts.len() >= 3 {
                    return Err(self.refuse("this column reference"));
                }
                match parts.last() {
                    Some(last) => self.check_column(&ident_name(last)),
                    None => Ok(()),
                }
            }
            Expr::BinaryOp { op, .. } => self.check_custom_operator(op),
            Expr::Cast {
                data_type, format, ..
            } => {
                if format.is_none() && is_regclass(data_type) {
                    return Ok(()); // answered through `guarded_regclass` after the walk
                }
                if format.is_some() || !self.safe_type(data_type) {
                    return Err(self.refuse(format!(
                        "a cast to {data_type} (only built-in types whose input cannot read \
                         data or resolve relation names)"
                    )));
                }
                Ok(())
            }
            Expr::TypedString(ts) => {
                if !self.safe_type(&ts.data_type) {
                    return Err(self.refuse(format!(
                        "a literal of type {} (only built-in types whose input cannot read \
                         data or resolve relation names)",
                        ts.data_type
                    )));
                }
                Ok(())
            }
            Expr::Function(f) => {
                if !matches!(f.parameters, sqlparser::ast::FunctionArguments::None) {
                    return Err(self.refuse("this function call syntax"));
                }
                // `f(t.*)` on a write target with hidden columns would pass the whole row.
                if let sqlparser::ast::FunctionArguments::List(list) = &f.args {
                    for a in &list.args {
                        let (sqlparser::ast::FunctionArg::Unnamed(arg)
                        | sqlparser::ast::FunctionArg::Named { arg, .. }
                        | sqlparser::ast::FunctionArg::ExprNamed { arg, .. }) = a;
                        if let sqlparser::ast::FunctionArgExpr::QualifiedWildcard(n) = arg {
                            if let Some(last) = object_name_parts(n).and_then(|p| p.last().cloned())
                            {
                                self.check_column(&last)?;
                            }
                        }
                    }
                }
                if is_array_or_row_constructor(f) {
                    // `ARRAY(SELECT …)` / `ROW(a, b)` are syntax, not calls; the subquery
                    // inside ARRAY() is a query like any other (rewritten by the visitor).
                    return Ok(());
                }
                if self.showable_setting(f) {
                    return Ok(());
                }
                let name = f.name.clone();
                self.check_function_name(&name)
            }
            Expr::IsFalse(_)
            | Expr::IsNotFalse(_)
            | Expr::IsTrue(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsUnknown(_)
            | Expr::IsNotUnknown(_)
            | Expr::IsDistinctFrom(..)
            | Expr::IsNotDistinctFrom(..)
            | Expr::In { .. }
            | Expr::Between { .. }
            | Expr::Like { .. }
            | Expr::ILike { .. }
            | Expr::SimilarTo { .. }
            | Expr::AnyOp { .. }
            | Expr::AllOp { .. }
            | Expr::UnaryOp { .. }
            | Expr::AtTimeZone { .. }
            | Expr::Extract { .. }
            | Expr::Ceil { .. }
            | Expr::Floor { .. }
            | Expr::Position { .. }
            | Expr::Substring { .. }
            | Expr::Trim { .. }
            | Expr::Overlay { .. }
            | Expr::Collate { .. }
            | Expr::Nested(_)
            | Expr::Value(_)
            | Expr::Case { .. }
            | Expr::Exists { .. }
            | Expr::Subquery(_)
            | Expr::GroupingSets(_)
            | Expr::Cube(_)
            | Expr::Rollup(_)
            | Expr::Tuple(_)
            | Expr::Array(_)
            | Expr::Interval(_)
            | Expr::CompoundFieldAccess { .. } => Ok(()),
            other => Err(self.refuse(format!("the expression {}", without_values(other)))),
        }
    }

    // ---------------------------------------------------------------- policy expressions

    /// Renders a policy expression: claims become literals, column names go through `map`.
    pub(super) fn render(
        &self,
        expr: &Expr,
        tp: &TablePolicy,
        map: &dyn Fn(&str) -> Option<String>,
    ) -> R<String> {
        let mut e = expr.clone();
        let mut sub = Substituter {
            rw: self,
            tp,
            map,
            err: None,
        };
        let _ = e.visit(&mut sub);
        if let Some(err) = sub.err {
            return Err(err);
        }
        Ok(e.to_string())
    }

    pub(super) fn claim_literal(&self, name: &str) -> R<String> {
        let value = self
            .claims
            .get(name)
            .ok_or_else(|| self.deny(format!("has no claim {name:?} in its token"), None))?;
        claim_literal(value, self.policy.claim_types.get(name).map(String::as_str))
            .ok_or_else(|| self.deny(format!("has an unusable value for claim {name:?}"), None))
    }

    pub(super) fn assert_sql(&self, cond: &str, message: &str) -> String {
        format!("pgward.assert_row({cond}, {})", quote_literal(message))
    }

    pub(super) fn write_message(&self, what: &str, tp: &TablePolicy) -> String {
        format!(
            "pgward: service {:?} may not {what} {} ({})",
            self.service, tp.info.name, tp.check_rule
        )
    }
}

/// sqlparser reads the `ARRAY(subquery)` and `ROW(…)` constructors as calls of functions
/// named `array` / `row`. Only the unquoted, unqualified keyword spellings are constructors
/// (`"array"(…)` would be a call of a function of that name).
fn is_array_or_row_constructor(f: &sqlparser::ast::Function) -> bool {
    use sqlparser::ast::{FunctionArguments, ObjectNamePart};
    let [ObjectNamePart::Identifier(id)] = f.name.0.as_slice() else {
        return false;
    };
    if id.quote_style.is_some()
        || f.filter.is_some()
        || f.over.is_some()
        || !f.within_group.is_empty()
    {
        return false;
    }
    match &f.args {
        FunctionArguments::Subquery(_) => id.value.eq_ignore_ascii_case("array"),
        FunctionArguments::List(l) => {
            id.value.eq_ignore_ascii_case("row")
                && l.duplicate_treatment.is_none()
                && l.clauses.is_empty()
        }
        FunctionArguments::None => false,
    }
}

/// `regclass` or `pg_catalog.regclass`, as sqlparser spells it.
fn is_regclass(dt: &DataType) -> bool {
    match dt {
        DataType::Regclass => true,
        DataType::Custom(name, mods) if mods.is_empty() => {
            matches!(object_name_parts(name).as_deref(), Some([n]) if n == "regclass")
                || matches!(object_name_parts(name).as_deref(), Some([s, n]) if s == "pg_catalog" && n == "regclass")
        }
        _ => false,
    }
}

/// `regtype` or `pg_catalog.regtype`, as sqlparser spells it.
fn is_regtype(dt: &DataType) -> bool {
    match dt {
        DataType::Custom(name, mods) if mods.is_empty() => {
            matches!(object_name_parts(name).as_deref(), Some([n]) if n == "regtype")
                || matches!(object_name_parts(name).as_deref(), Some([s, n]) if s == "pg_catalog" && n == "regtype")
        }
        _ => false,
    }
}

struct ExprChecker<'r, 'a> {
    rw: &'r mut Rewriter<'a>,
    scope: &'r mut Vec<String>,
    depth: usize,
}

impl VisitorMut for ExprChecker<'_, '_> {
    type Break = PolicyDenied;

    fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<PolicyDenied> {
        if self.depth == 0 {
            // A nested query: rewrite it with its own scope handling, then let the visitor
            // walk over the (already rewritten) result without looking at it.
            let mut scope = self.scope.clone();
            if let Err(e) = self.rw.query(q, &mut scope) {
                return ControlFlow::Break(e);
            }
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &mut Query) -> ControlFlow<PolicyDenied> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<PolicyDenied> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        match self.rw.check_expr(e) {
            Ok(()) => ControlFlow::Continue(()),
            Err(err) => ControlFlow::Break(err),
        }
    }

    /// After the operand was checked: a cast to regclass becomes its guarded form (built here,
    /// so the guard itself is not walked again).
    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<PolicyDenied> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        if let Expr::Cast {
            expr,
            data_type,
            format: None,
            ..
        } = e
        {
            let guarded = if is_regclass(data_type) {
                Some(self.rw.guarded_regclass(expr))
            } else if is_regtype(data_type) {
                Some(self.rw.guarded_regtype(expr))
            } else {
                None
            };
            match guarded {
                Some(Ok(guarded)) => *e = Expr::Nested(Box::new(guarded)),
                Some(Err(err)) => return ControlFlow::Break(err),
                None => {}
            }
        } else if let Expr::Function(f) = e {
            if let Err(err) = self.rw.guard_catalog_helper(f) {
                return ControlFlow::Break(err);
            }
        }
        ControlFlow::Continue(())
    }
}

struct Substituter<'r, 'a> {
    rw: &'r Rewriter<'a>,
    tp: &'r TablePolicy,
    map: &'r dyn Fn(&str) -> Option<String>,
    err: Option<PolicyDenied>,
}

impl Substituter<'_, '_> {
    fn replacement(&self, e: &Expr) -> R<Option<Expr>> {
        if let Some(Ok(claim)) = claim_call(e) {
            let lit = self.rw.claim_literal(&claim)?;
            return parse_expr(&lit)
                .map(Some)
                .map_err(|err| self.rw.refuse(format!("(internal: {err})")));
        }
        if let Expr::Identifier(id) = e {
            let col = ident_name(id);
            let text = (self.map)(&col).ok_or_else(|| {
                self.rw.deny(
                    format!(
                        "must supply column {}.{col} (used by the write check)",
                        self.tp.info.name
                    ),
                    Some(&self.tp.check_rule),
                )
            })?;
            let parsed =
                parse_expr(&text).map_err(|err| self.rw.refuse(format!("(internal: {err})")))?;
            return Ok(Some(Expr::Nested(Box::new(parsed))));
        }
        Ok(None)
    }
}

impl VisitorMut for Substituter<'_, '_> {
    type Break = ();

    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        match self.replacement(e) {
            Ok(Some(new)) => *e = new,
            Ok(None) => {}
            Err(err) => {
                self.err = Some(err);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }
}
