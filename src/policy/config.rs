//! Policy files: TOML parsing with spans, strict validation against the catalog, compilation
//! into the structures the rewriter uses.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::path::Path;

use serde::Deserialize;
use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Value, Visit, Visitor,
};
use toml::Spanned;

use super::allow;
use super::catalog::{Catalog, RelKind, TableInfo};
use super::sql::{ident_name, object_name_parts, parse_expr};
use super::PolicyError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    service: Option<Spanned<String>>,
    #[serde(default)]
    claim_types: BTreeMap<String, Spanned<String>>,
    allow: Option<Spanned<AllowToml>>,
    #[serde(default)]
    tables: BTreeMap<String, Spanned<TableToml>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowToml {
    #[serde(default)]
    set: Vec<String>,
    #[serde(default)]
    functions: Vec<String>,
    #[serde(default)]
    procedures: Vec<String>,
    #[serde(default)]
    listen: Vec<String>,
    #[serde(default)]
    copy: bool,
    #[serde(default)]
    explain: bool,
    #[serde(default)]
    ddl: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableToml {
    actions: Spanned<Vec<String>>,
    columns: Option<Spanned<Vec<String>>>,
    except_columns: Option<Spanned<Vec<String>>>,
    filter: Option<Spanned<String>>,
    check: Option<Spanned<String>>,
    #[serde(default)]
    presets: BTreeMap<String, Spanned<String>>,
}

/// Statements beyond plain DML a service may run.
#[derive(Clone, Debug, Default)]
pub struct Allow {
    pub set: Vec<String>,
    pub functions: Vec<String>,
    pub procedures: Vec<String>,
    pub listen: Vec<String>,
    pub copy: bool,
    pub explain: bool,
    pub ddl: bool,
    pub rule: String,
}

/// One table's rules for one service.
#[derive(Clone, Debug)]
pub struct TablePolicy {
    pub info: TableInfo,
    pub select: bool,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub table_rule: String,
    pub actions_rule: String,
    /// Readable/writable columns in catalog order.
    pub visible: Vec<String>,
    pub hidden: BTreeSet<String>,
    pub columns_rule: String,
    /// `None`: every row.
    pub filter: Option<Expr>,
    pub filter_rule: String,
    /// Check for written rows; defaults to the filter.
    pub check: Option<Expr>,
    pub check_rule: String,
    pub presets: Vec<(String, Expr)>,
    pub presets_rule: String,
}

impl TablePolicy {
    pub fn allows(&self, action: Action) -> bool {
        match action {
            Action::Select => self.select,
            Action::Insert => self.insert,
            Action::Update => self.update,
            Action::Delete => self.delete,
        }
    }

    pub fn is_preset(&self, column: &str) -> bool {
        self.presets.iter().any(|(c, _)| c == column)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Select,
    Insert,
    Update,
    Delete,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Select => "read",
            Action::Insert => "insert into",
            Action::Update => "update",
            Action::Delete => "delete from",
        }
    }
}

/// One service's compiled policy.
#[derive(Clone, Debug)]
pub struct ServicePolicy {
    pub service: String,
    pub file: String,
    pub tables: HashMap<(String, String), TablePolicy>,
    pub allow: Allow,
    pub claims: BTreeSet<String>,
    pub claim_types: BTreeMap<String, String>,
}

impl ServicePolicy {
    pub fn table(&self, info: &TableInfo) -> Option<&TablePolicy> {
        self.tables.get(&(info.schema.clone(), info.name.clone()))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|s| s.matches('\n').count() + 1)
        .unwrap_or(1)
}

struct Ctx<'a> {
    file: String,
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl Ctx<'_> {
    fn rule(&self, span: std::ops::Range<usize>) -> String {
        format!("{}:{}", self.file, line_of(self.text, span.start))
    }

    fn err(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        self.errors.push(PolicyError::Invalid {
            file: self.file.clone(),
            line: line_of(self.text, span.start),
            message: message.into(),
        });
    }
}

/// Loads every `*.toml` directly in `dir`. Returns all errors, not just the first.
pub fn load_dir(
    dir: &Path,
    catalog: &Catalog,
) -> Result<HashMap<String, ServicePolicy>, Vec<PolicyError>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        vec![PolicyError::Io {
            path: dir.display().to_string(),
            source: e,
        }]
    })?;
    let mut errors = Vec::new();
    let mut paths = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => paths.push(entry.path()),
            Err(e) => errors.push(PolicyError::Io {
                path: dir.display().to_string(),
                source: e,
            }),
        }
    }
    paths.retain(|p| p.extension().is_some_and(|x| x == "toml"));
    paths.sort();
    // Symlinks are followed (a policy may live elsewhere); what they lead to must be a file.
    // A path whose metadata cannot be read stays: reading it reports why.
    paths.retain(|p| match std::fs::metadata(p) {
        Ok(meta) if !meta.is_file() => {
            errors.push(PolicyError::NotAFile {
                path: p.display().to_string(),
            });
            false
        }
        _ => true,
    });
    let mut out: HashMap<String, ServicePolicy> = HashMap::new();
    for path in paths {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(PolicyError::Io {
                    path: path.display().to_string(),
                    source: e,
                });
                continue;
            }
        };
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        // Rules are named relative to the policy directory (`billing.toml:12`): they reach
        // clients in refusals and audit records, which must not learn the server's layout.
        let relative = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        match compile_file(&relative, &stem, &text, catalog) {
            Ok(p) => {
                if let Some(prev) = out.get(&p.service) {
                    errors.push(PolicyError::Invalid {
                        file: p.file.clone(),
                        line: 1,
                        message: format!(
                            "service {:?} already defined in {}",
                            p.service, prev.file
                        ),
                    });
                } else {
                    out.insert(p.service.clone(), p);
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Parses and validates one policy file.
pub fn compile_file(
    file: &str,
    stem: &str,
    text: &str,
    catalog: &Catalog,
) -> Result<ServicePolicy, Vec<PolicyError>> {
    let mut ctx = Ctx {
        file: file.to_string(),
        text,
        errors: Vec::new(),
    };
    let parsed: FileToml = match toml::from_str(text) {
        Ok(p) => p,
        Err(e) => {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            return Err(vec![PolicyError::Invalid {
                file: file.to_string(),
                line,
                message: e.message().to_string(),
            }]);
        }
    };
    let service = parsed
        .service
        .as_ref()
        .map(|s| s.get_ref().clone())
        .unwrap_or_else(|| stem.to_string());
    let mut claim_types = BTreeMap::new();
    for (claim, ty) in &parsed.claim_types {
        if !allow::is_safe_type(ty.get_ref()) {
            ctx.err(
                ty.span(),
                format!("claim type {:?} is not an allowed type", ty.get_ref()),
            );
        }
        claim_types.insert(claim.clone(), ty.get_ref().to_ascii_lowercase());
    }
    let allow = match &parsed.allow {
        Some(a) => {
            let rule = ctx.rule(a.span());
            let a = a.get_ref();
            for p in &a.set {
                let lower = p.to_ascii_lowercase();
                if allow::FORBIDDEN_SET_PARAMS.contains(&lower.as_str()) {
                    ctx.err(
                        0..0,
                        format!("parameter {p:?} may never be set by a service"),
                    );
                }
                // `app.<claim>` carries the token's claims to the server's own row-level
                // security (`[policy] claims_as_settings`): a service that could set one could
                // claim another tenant.
                if lower.starts_with("app.") {
                    ctx.err(
                        0..0,
                        format!("parameter {p:?} may never be set by a service: app.* settings carry the token's claims"),
                    );
                }
            }
            Allow {
                set: a.set.iter().map(|s| s.to_ascii_lowercase()).collect(),
                functions: a.functions.iter().map(|s| s.to_ascii_lowercase()).collect(),
                procedures: a
                    .procedures
                    .iter()
                    .map(|s| s.to_ascii_lowercase())
                    .collect(),
                listen: a.listen.clone(),
                copy: a.copy,
                explain: a.explain,
                ddl: a.ddl,
                rule,
            }
        }
        None => Allow {
            rule: format!("{file}:1"),
            ..Allow::default()
        },
    };
    let mut claims = BTreeSet::new();
    let mut tables = HashMap::new();
    for (name, table) in &parsed.tables {
        if let Some(tp) = compile_table(&mut ctx, name, table, catalog, &allow, &mut claims) {
            tables.insert((tp.info.schema.clone(), tp.info.name.clone()), tp);
        }
    }
    if ctx.errors.is_empty() {
        Ok(ServicePolicy {
            service,
            file: file.to_string(),
            tables,
            allow,
            claims,
            claim_types,
        })
    } else {
        Err(ctx.errors)
    }
}

fn compile_table(
    ctx: &mut Ctx<'_>,
    name: &str,
    table: &Spanned<TableToml>,
    catalog: &Catalog,
    allow: &Allow,
    claims: &mut BTreeSet<String>,
) -> Option<TablePolicy> {
    let span = table.span();
    let t = table.get_ref();
    let parts: Vec<String> = name.split('.').map(str::to_string).collect();
    let info = match catalog.resolve(&parts) {
        Some(info) if info.schema != "pg_catalog" && info.schema != "information_schema" => {
            info.clone()
        }
        _ => {
            ctx.err(span, format!("unknown table {name:?}"));
            return None;
        }
    };
    if !matches!(
        info.kind,
        RelKind::Table | RelKind::View | RelKind::MaterializedView
    ) {
        ctx.err(span.clone(), format!("{name:?} is not a table or view"));
    }
    let (mut select, mut insert, mut update, mut delete) = (false, false, false, false);
    for a in t.actions.get_ref() {
        match a.as_str() {
            "select" => select = true,
            "insert" => insert = true,
            "update" => update = true,
            "delete" => delete = true,
            other => ctx.err(
                t.actions.span(),
                format!("unknown action {other:?} (select, insert, update, delete)"),
            ),
        }
    }
    let column_names: Vec<String> = info.columns.iter().map(|c| c.name.clone()).collect();
    let (visible, columns_rule) = match (&t.columns, &t.except_columns) {
        (Some(_), Some(e)) => {
            ctx.err(e.span(), "use either columns or except_columns, not both");
            (column_names.clone(), ctx.rule(span.clone()))
        }
        (Some(cols), None) => {
            check_columns(ctx, cols, &info);
            let keep: Vec<String> = column_names
                .iter()
                .filter(|c| cols.get_ref().contains(c))
                .cloned()
                .collect();
            (keep, ctx.rule(cols.span()))
        }
        (None, Some(except)) => {
            check_columns(ctx, except, &info);
            let keep: Vec<String> = column_names
                .iter()
                .filter(|c| !except.get_ref().contains(c))
                .cloned()
                .collect();
            (keep, ctx.rule(except.span()))
        }
        (None, None) => (column_names.clone(), ctx.rule(span.clone())),
    };
    // A blind-index companion (`<col>_bidx`, field encryption) is visible exactly when its
    // column is: hiding a column must also hide equality tests on it.
    let visible: Vec<String> = column_names
        .iter()
        .filter(|c| match c.strip_suffix("_bidx") {
            Some(base) if column_names.iter().any(|n| n == base) => {
                visible.iter().any(|v| v == base)
            }
            _ => visible.contains(c),
        })
        .cloned()
        .collect();
    let hidden: BTreeSet<String> = column_names
        .iter()
        .filter(|c| !visible.contains(c))
        .cloned()
        .collect();
    let filter = t
        .filter
        .as_ref()
        .and_then(|f| compile_expr(ctx, f, &info, allow, claims));
    let check = match &t.check {
        Some(c) => compile_expr(ctx, c, &info, allow, claims),
        None => filter.clone(),
    };
    let mut presets = Vec::new();
    for (col, value) in &t.presets {
        if info.column(col).is_none() {
            ctx.err(
                value.span(),
                format!("unknown column {}.{col} in presets", info.name),
            );
            continue;
        }
        if let Some(e) = compile_expr(ctx, value, &info, allow, claims) {
            presets.push((col.clone(), e));
        }
    }
    let filter_rule = t
        .filter
        .as_ref()
        .map(|f| ctx.rule(f.span()))
        .unwrap_or_else(|| ctx.rule(span.clone()));
    let check_rule = t
        .check
        .as_ref()
        .map(|f| ctx.rule(f.span()))
        .unwrap_or_else(|| filter_rule.clone());
    let presets_rule = t
        .presets
        .values()
        .next()
        .map(|v| ctx.rule(v.span()))
        .unwrap_or_else(|| ctx.rule(span.clone()));
    Some(TablePolicy {
        info,
        select,
        insert,
        update,
        delete,
        table_rule: ctx.rule(span.clone()),
        actions_rule: ctx.rule(t.actions.span()),
        visible,
        hidden,
        columns_rule,
        filter,
        filter_rule,
        check,
        check_rule,
        presets,
        presets_rule,
    })
}

fn check_columns(ctx: &mut Ctx<'_>, cols: &Spanned<Vec<String>>, info: &TableInfo) {
    for c in cols.get_ref() {
        if info.column(c).is_none() {
            ctx.err(cols.span(), format!("unknown column {}.{c}", info.name));
        }
    }
}

/// Parses a policy expression and checks it only uses the table's columns, `claim('x')`,
/// and allowed functions. No subqueries: policy expressions are qualified and substituted
/// column by column, which is only sound without nested scopes.
fn compile_expr(
    ctx: &mut Ctx<'_>,
    src: &Spanned<String>,
    info: &TableInfo,
    allow: &Allow,
    claims: &mut BTreeSet<String>,
) -> Option<Expr> {
    let expr = match parse_expr(src.get_ref()) {
        Ok(e) => e,
        Err(e) => {
            ctx.err(
                src.span(),
                format!("unparsable SQL expression {:?}: {e}", src.get_ref()),
            );
            return None;
        }
    };
    let mut v = PolicyExprValidator {
        info,
        allow,
        claims: BTreeSet::new(),
        problems: Vec::new(),
    };
    let _ = expr.visit(&mut v);
    for p in v.problems {
        ctx.err(src.span(), p);
    }
    claims.extend(v.claims);
    Some(expr)
}

struct PolicyExprValidator<'a> {
    info: &'a TableInfo,
    allow: &'a Allow,
    claims: BTreeSet<String>,
    problems: Vec<String>,
}

/// If `f` is `claim('name')`, the claim name.
pub fn claim_call(expr: &Expr) -> Option<Result<String, ()>> {
    let Expr::Function(f) = expr else { return None };
    let parts = object_name_parts(&f.name)?;
    if parts.len() != 1 || parts[0] != "claim" {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return Some(Err(()));
    };
    match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))] => match &v.value {
            Value::SingleQuotedString(s) => Some(Ok(s.clone())),
            _ => Some(Err(())),
        },
        _ => Some(Err(())),
    }
}

impl Visitor for PolicyExprValidator<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, _q: &sqlparser::ast::Query) -> ControlFlow<()> {
        self.problems
            .push("subqueries are not supported in policy expressions".into());
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Identifier(id) => {
                let name = ident_name(id);
                if self.info.column(&name).is_none() {
                    self.problems
                        .push(format!("unknown column {}.{name}", self.info.name));
                }
            }
            Expr::CompoundIdentifier(_) => self
                .problems
                .push("use unqualified column names in policy expressions".into()),
            Expr::Subquery(_) | Expr::Exists { .. } => self
                .problems
                .push("subqueries are not supported in policy expressions".into()),
            Expr::Value(v) if matches!(v.value, Value::Placeholder(_)) => self
                .problems
                .push("parameters are not allowed in policy expressions".into()),
            Expr::Function(f) => match claim_call(expr) {
                Some(Ok(c)) => {
                    self.claims.insert(c);
                }
                Some(Err(())) => self
                    .problems
                    .push("claim() takes one string literal: claim('name')".into()),
                None => {
                    let name = object_name_parts(&f.name)
                        .map(|p| p.join("."))
                        .unwrap_or_default();
                    let last = name.rsplit('.').next().unwrap_or_default();
                    if !(allow::is_safe_function(last) || self.allow.functions.contains(&name)) {
                        self.problems.push(format!(
                            "function {name:?} is not allowed in policy expressions"
                        ));
                    }
                }
            },
            _ => {}
        }
        ControlFlow::Continue(())
    }
}
