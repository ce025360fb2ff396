//! Catalog introspection for a policy-bound service: every reference to a system catalog or
//! `information_schema` view that drivers and tools read becomes a derived table holding only
//! the rows about what the service's policy lets it see — its tables, their visible columns,
//! the indexes and constraints over visible columns only, and the system catalogs themselves.
//! Tables and columns outside the policy are absent, not errors; statistics relations stay
//! refused (they are not listed in `allow::CATALOG_RELATIONS`); relations psql reads for
//! features a service has no use for (triggers, row-security policies, publications,
//! extended statistics, inheritance, roles) are present but empty.
//!
//! The stand-ins are built from the catalog and the policy only (no client text), and are
//! inserted after the client's statement was checked, like the row-filter barriers.
use super::*;

/// Relations psql's `\d` reads that are answered empty.
const EMPTY: &[&str] = &[
    "pg_policy",
    "pg_statistic_ext",
    "pg_publication",
    "pg_publication_namespace",
    "pg_publication_rel",
    "pg_trigger",
    "pg_inherits",
    "pg_roles",
    "pg_auth_members",
    "pg_rewrite",
    "pg_sequence",
    "pg_partitioned_table",
];

/// Namespaces whose relations are public knowledge (the server's own catalogs).
const SYSTEM_NAMESPACES: &str = "(SELECT pgward_n.oid FROM pg_catalog.pg_namespace AS pgward_n \
     WHERE pgward_n.nspname IN ('pg_catalog', 'information_schema'))";

impl<'a> Rewriter<'a> {
    /// The OIDs of the tables in the service's policy (`0` when there are none: never a table).
    fn visible_oids(&self) -> String {
        let mut oids: Vec<u32> = self.policy.tables.values().map(|tp| tp.info.oid).collect();
        oids.sort_unstable();
        if oids.is_empty() {
            return "0".into();
        }
        oids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `VALUES (schema, table, column) …` of every visible column (one impossible row when none).
    fn visible_columns(&self) -> Vec<(String, String, u32, String)> {
        let mut cols: Vec<(String, String, u32, String)> = self
            .policy
            .tables
            .values()
            .flat_map(|tp| {
                tp.visible.iter().map(|c| {
                    (
                        tp.info.schema.clone(),
                        tp.info.name.clone(),
                        tp.info.oid,
                        c.clone(),
                    )
                })
            })
            .collect();
        cols.sort();
        cols
    }

    /// `(attrelid, attname)` pairs of visible columns, as an `IN (…)` list.
    fn visible_attr_pairs(&self) -> String {
        let cols = self.visible_columns();
        if cols.is_empty() {
            return "(0, '')".into();
        }
        cols.iter()
            .map(|(_, _, oid, c)| format!("({oid}, {})", quote_literal(c)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn visible_table_names(&self) -> String {
        let mut names: Vec<String> = self
            .policy
            .tables
            .values()
            .map(|tp| {
                format!(
                    "({}, {})",
                    quote_literal(&tp.info.schema),
                    quote_literal(&tp.info.name)
                )
            })
            .collect();
        names.sort();
        if names.is_empty() {
            return "('', '')".into();
        }
        names.join(", ")
    }

    fn visible_column_triples(&self) -> String {
        let cols = self.visible_columns();
        if cols.is_empty() {
            return "('', '', '')".into();
        }
        cols.iter()
            .map(|(s, t, _, c)| {
                format!(
                    "({}, {}, {})",
                    quote_literal(s),
                    quote_literal(t),
                    quote_literal(c)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// SQL condition: every column of relation `rel` numbered in the int2 array `nums` is
    /// visible (dropped or system columns count as not visible).
    fn all_visible(&self, rel: &str, nums: &str) -> String {
        format!(
            "NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS pgward_a \
             WHERE pgward_a.attrelid = {rel} AND pgward_a.attnum = ANY ({nums}) \
             AND (pgward_a.attrelid, pgward_a.attname::text) NOT IN ({}))",
            self.visible_attr_pairs()
        )
    }

    /// Indexes of visible tables over visible plain columns only.
    fn visible_index_condition(&self) -> String {
        format!(
            "indrelid IN ({}) AND indexprs IS NULL AND indpred IS NULL AND {}",
            self.visible_oids(),
            self.all_visible("indrelid", "indkey::pg_catalog.int2[]")
        )
    }

    fn visible_constraint_condition(&self) -> String {
        let oids = self.visible_oids();
        format!(
            "(conrelid IN ({oids}) AND (confrelid = 0 OR confrelid IN ({oids})) \
             AND {} AND {}) OR (conrelid = 0 AND contypid <> 0)",
            self.all_visible("conrelid", "coalesce(conkey, '{}')"),
            self.all_visible("confrelid", "coalesce(confkey, '{}')")
        )
    }

    /// The WHERE condition restricting system relation `name` of `schema`, if it is one the
    /// service reads filtered.
    fn introspection_filter(&self, schema: &str, name: &str) -> Option<String> {
        let oids = self.visible_oids();
        let pairs = self.visible_attr_pairs();
        let sys = SYSTEM_NAMESPACES;
        let index_oids = format!(
            "(SELECT indexrelid FROM pg_catalog.pg_index WHERE {})",
            self.visible_index_condition()
        );
        let system_rel =
            format!("(SELECT pgward_c.oid FROM pg_catalog.pg_class AS pgward_c WHERE pgward_c.relnamespace IN {sys})");
        let cond = match (schema, name) {
            ("pg_catalog", "pg_class") => format!(
                "oid IN ({oids}) OR relnamespace IN {sys} OR oid IN {index_oids}"
            ),
            ("pg_catalog", "pg_attribute") => format!(
                "(attrelid, attname::text) IN ({pairs}) OR attrelid IN {system_rel} \
                 OR attrelid IN {index_oids}"
            ),
            ("pg_catalog", "pg_index") => self.visible_index_condition(),
            ("pg_catalog", "pg_constraint") => self.visible_constraint_condition(),
            ("pg_catalog", "pg_attrdef") => format!(
                "EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS pgward_a \
                 WHERE pgward_a.attrelid = adrelid AND pgward_a.attnum = adnum \
                 AND (pgward_a.attrelid, pgward_a.attname::text) IN ({pairs}))"
            ),
            ("pg_catalog", "pg_description") => format!(
                "classoid <> 'pg_catalog.pg_class'::pg_catalog.regclass \
                 OR objoid IN {system_rel} \
                 OR (objoid IN ({oids}) AND (objsubid = 0 OR EXISTS (SELECT 1 \
                 FROM pg_catalog.pg_attribute AS pgward_a WHERE pgward_a.attrelid = objoid \
                 AND pgward_a.attnum = objsubid \
                 AND (pgward_a.attrelid, pgward_a.attname::text) IN ({pairs}))))"
            ),
            // `pg_type.`: the stand-in reads the table unaliased.
            ("pg_catalog", "pg_type") => self.type_visible("pg_type."),
            ("pg_catalog", n) if EMPTY.contains(&n) => "false".into(),
            ("information_schema", "tables") => format!(
                "table_schema::text IN ('pg_catalog', 'information_schema') \
                 OR (table_schema::text, table_name::text) IN ({})",
                self.visible_table_names()
            ),
            ("information_schema", "columns")
            | ("information_schema", "key_column_usage")
            | ("information_schema", "constraint_column_usage") => format!(
                "table_schema::text IN ('pg_catalog', 'information_schema') \
                 OR (table_schema::text, table_name::text, column_name::text) IN ({})",
                self.visible_column_triples()
            ),
            ("information_schema", "table_constraints")
            | ("information_schema", "referential_constraints") => format!(
                "(constraint_schema::text, constraint_name::text) IN (SELECT \
                 pgward_ns.nspname::text, pgward_co.conname::text \
                 FROM pg_catalog.pg_constraint AS pgward_co \
                 JOIN pg_catalog.pg_namespace AS pgward_ns ON pgward_ns.oid = pgward_co.connamespace \
                 WHERE {})",
                self.visible_constraint_condition()
            ),
            _ => return None,
        };
        Some(cond)
    }

    /// The stand-in for system relation `info` (listed in `allow::CATALOG_RELATIONS`): its
    /// allowed columns, and only the rows about what the service may see.
    pub(super) fn catalog_stand_in(
        &self,
        info: &TableInfo,
        allowed: Option<&[&str]>,
        alias_text: &str,
    ) -> R<Option<TableFactor>> {
        let filter = self.introspection_filter(&info.schema, &info.name);
        if allowed.is_none() && filter.is_none() {
            return Ok(None);
        }
        let list: Vec<String> = info
            .columns
            .iter()
            .filter(|c| allowed.is_none_or(|cols| cols.contains(&c.name.as_str())))
            .map(|c| quote_ident(&c.name))
            .collect();
        // OFFSET 0 keeps the server from pushing the service's own conditions into the
        // stand-in, where they would run on the rows the filter hides: `CAST(attname AS int)`
        // would quote a hidden column's name in its error, a division by zero would tell
        // whether a hidden name exists.
        let text = format!(
            "(SELECT {} FROM {}.{}{} OFFSET 0) AS {alias_text}",
            list.join(", "),
            quote_ident(&info.schema),
            quote_ident(&info.name),
            filter.map(|f| format!(" WHERE {f}")).unwrap_or_default()
        );
        parse_table_factor(&text)
            .map(Some)
            .map_err(|e| self.refuse(format!("(internal: catalog stand-in did not parse: {e})")))
    }

    /// Whether the `pg_type` row `t` (a qualifier ending in a dot) is about what the service
    /// may see: a type of no relation, of a visible or system relation, or an array of such
    /// a type — the array of a hidden table's row type (`_tenants`) names that table.
    fn type_visible(&self, t: &str) -> String {
        let oids = self.visible_oids();
        let sys = SYSTEM_NAMESPACES;
        let relation_visible = |r: &str| {
            format!(
                "({r}typrelid = 0 OR {r}typrelid IN ({oids}) OR {r}typrelid IN \
                 (SELECT pgward_c.oid FROM pg_catalog.pg_class AS pgward_c WHERE pgward_c.relnamespace IN {sys}))"
            )
        };
        format!(
            "{} AND ({t}typelem = 0 OR EXISTS (SELECT 1 FROM pg_catalog.pg_type AS pgward_e \
             WHERE pgward_e.oid = {t}typelem AND {}))",
            relation_visible(t),
            relation_visible("pgward_e.")
        )
    }

    /// The OIDs of the types the service may see (SQL subquery).
    fn visible_types(&self) -> String {
        format!(
            "SELECT pgward_t.oid FROM pg_catalog.pg_type AS pgward_t WHERE {}",
            self.type_visible("pgward_t.")
        )
    }

    /// `X::regtype` names a type by OID or name: answered only for the types the service may
    /// see (NULL otherwise), so no cast reveals a hidden table through its row type.
    pub(super) fn guarded_regtype(&self, operand: &Expr) -> R<Expr> {
        self.guarded_name_cast(operand, "regtype", &self.visible_types())
    }

    /// `X::regclass` names a relation by OID or name: answered only for the service's own
    /// tables (NULL otherwise), so no cast reveals a relation outside its policy.
    pub(super) fn guarded_regclass(&self, operand: &Expr) -> R<Expr> {
        self.guarded_name_cast(operand, "regclass", &self.visible_oids())
    }

    /// A cast of `operand` to the OID-alias type `ty` (by OID or by name, as its input reads
    /// it), answered only when the object is among `allowed` (SQL subquery), NULL otherwise.
    fn guarded_name_cast(&self, operand: &Expr, ty: &str, allowed: &str) -> R<Expr> {
        let x = format!("CAST(({operand}) AS text)");
        let text = format!(
            "CASE WHEN {x} ~ '^[0-9]+$' THEN CASE WHEN CAST({x} AS oid) IN ({allowed}) \
             THEN CAST(CAST({x} AS oid) AS {ty}) END \
             ELSE CASE WHEN CAST(to_{ty}({x}) AS oid) IN ({allowed}) THEN to_{ty}({x}) END END"
        );
        parse_expr(&text)
            .map_err(|e| self.refuse(format!("(internal: {ty} guard did not parse: {e})")))
    }

    /// For the catalog helpers that take the OID of an object and describe it: the set of
    /// OIDs the service may ask about (SQL subquery), so probing other OIDs yields NULL
    /// instead of another table's index, constraint or comment.
    fn oid_guard(&self, function: &str) -> Option<String> {
        let relations = || {
            self.introspection_filter("pg_catalog", "pg_class")
                .map(|f| format!("SELECT oid FROM pg_catalog.pg_class WHERE {f}"))
        };
        match function {
            "pg_get_indexdef" => Some(format!(
                "SELECT indexrelid FROM pg_catalog.pg_index WHERE {}",
                self.visible_index_condition()
            )),
            "pg_get_constraintdef" => Some(format!(
                "SELECT oid FROM pg_catalog.pg_constraint WHERE {}",
                self.visible_constraint_condition()
            )),
            // a hidden table's row type (or its array) would be named by its OID
            "format_type" | "pg_type_is_visible" => Some(self.visible_types()),
            // triggers and extended statistics are answered empty
            "pg_get_triggerdef" | "pg_get_statisticsobjdef_columns" => Some("SELECT 0".into()),
            "pg_partition_ancestors"
            | "pg_relation_is_publishable"
            | "pg_table_is_visible"
            | "col_description"
            | "obj_description" => relations(),
            _ => None,
        }
    }

    /// Replaces the first argument `x` of a guarded catalog helper by
    /// `CASE WHEN CAST(x AS oid) IN (<allowed>) THEN CAST(x AS oid) END`.
    pub(super) fn guard_catalog_helper(&self, f: &mut sqlparser::ast::Function) -> R<()> {
        use sqlparser::ast::{FunctionArg, FunctionArgExpr, FunctionArguments};
        let Some(parts) = object_name_parts(&f.name) else {
            return Ok(());
        };
        let name = match parts.as_slice() {
            [n] => n.as_str(),
            [s, n] if s == "pg_catalog" => n.as_str(),
            _ => return Ok(()),
        };
        let by_name = matches!(name, "pg_get_serial_sequence" | "to_regtype");
        let allowed = if name == "to_regtype" {
            self.visible_types()
        } else if by_name {
            self.visible_oids()
        } else {
            match self.oid_guard(name) {
                Some(allowed) => allowed,
                None => return Ok(()),
            }
        };
        let FunctionArguments::List(list) = &mut f.args else {
            return Ok(());
        };
        let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(first))) = list.args.first_mut() else {
            return Err(self.refuse(format!("{name} with these arguments")));
        };
        // pg_get_serial_sequence and to_regtype take a name: resolved the way the server will.
        let text = if by_name {
            let resolve = if name == "to_regtype" {
                "to_regtype"
            } else {
                "to_regclass"
            };
            format!(
                "CASE WHEN CAST({resolve}(CAST(({first}) AS text)) AS oid) IN ({allowed}) \
                 THEN CAST(({first}) AS text) END"
            )
        } else {
            format!(
                "CASE WHEN CAST(({first}) AS oid) IN ({allowed}) THEN CAST(({first}) AS oid) END"
            )
        };
        *first = parse_expr(&text)
            .map_err(|e| self.refuse(format!("(internal: catalog helper guard: {e})")))?;
        Ok(())
    }
}
