//! Built-in allowlists. Everything not listed here (or in a service's `[allow]` section) is
//! refused: the rewriter is fail-closed.

/// Built-in functions any service may call. Criteria: they cannot read tables, files, other
/// sessions or server state, cannot change settings, and cannot execute dynamic SQL.
/// Deliberately absent: set_config, current_setting, pg_*, lo_*, dblink*, query_to_xml and
/// friends, ts_stat, nextval/setval/currval, pg_sleep, txid_*, format_type-like helpers that
/// are harmless but not needed, and anything user-defined.
pub const SAFE_FUNCTIONS: &[&str] = &[
    // comparison / conditional
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "num_nonnulls",
    "num_nulls",
    // arithmetic
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "sign",
    "mod",
    "power",
    "pow",
    "sqrt",
    "cbrt",
    "exp",
    "ln",
    "log",
    "log10",
    "div",
    "width_bucket",
    "random",
    // strings
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "lower",
    "upper",
    "initcap",
    "btrim",
    "ltrim",
    "rtrim",
    "trim",
    "lpad",
    "rpad",
    "substr",
    "substring",
    "replace",
    "translate",
    "concat",
    "concat_ws",
    "left",
    "right",
    "repeat",
    "reverse",
    "split_part",
    "strpos",
    "position",
    "starts_with",
    "md5",
    "format",
    "to_hex",
    "ascii",
    "chr",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "regexp_split_to_array",
    "string_to_array",
    "array_to_string",
    "quote_literal",
    "quote_ident",
    "quote_nullable",
    // formatting / dates
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    "now",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "clock_timestamp",
    "date_trunc",
    "date_part",
    "extract",
    "age",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "date_bin",
    "isfinite",
    // aggregates
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "bool_and",
    "bool_or",
    "every",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "corr",
    "covar_pop",
    "covar_samp",
    // window functions
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    // json / arrays
    "to_json",
    "to_jsonb",
    "row_to_json",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_typeof",
    "json_typeof",
    "jsonb_array_length",
    "json_array_length",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "json_extract_path",
    "json_extract_path_text",
    "jsonb_pretty",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "json_array_elements",
    "json_array_elements_text",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_object_keys",
    "array_length",
    "array_position",
    "array_positions",
    "array_append",
    "array_prepend",
    "array_cat",
    "array_remove",
    "array_replace",
    "array_lower",
    "array_upper",
    "array_ndims",
    "cardinality",
    "unnest",
    "generate_series",
    "generate_subscripts",
    // misc
    "gen_random_uuid",
    "version",
    "current_schema",
    "current_database",
    "current_schemas",
    // catalog helpers drivers use for type/schema introspection (read catalog metadata only)
    "format_type",
    "pg_get_expr",
    "pg_get_userbyid",
    // psycopg's TypeInfo.fetch; answers for visible types only (guarded like a regtype cast)
    "to_regtype",
    // psql's `\d` footers; their arguments come from the filtered catalog stand-ins
    "pg_get_triggerdef",
    "pg_get_statisticsobjdef_columns",
    "pg_partition_ancestors",
    "pg_relation_is_publishable",
    // SQLAlchemy's column reflection; the table name is guarded like a regclass cast
    "pg_get_serial_sequence",
    // visibility of non-relation objects in the search path (collations, operators…)
    "pg_collation_is_visible",
    "pg_operator_is_visible",
    "pg_opclass_is_visible",
    "pg_conversion_is_visible",
    "pg_ts_config_is_visible",
    "pg_get_constraintdef",
    "pg_get_indexdef",
    // psql's `\df`: a function's signature, as pg_proc's readable columns already tell it
    "pg_get_function_result",
    "pg_get_function_arguments",
    "pg_table_is_visible",
    "pg_type_is_visible",
    "pg_function_is_visible",
    "col_description",
    "obj_description",
    "pg_encoding_to_char",
];

/// Schema-qualified built-ins outside pg_catalog that drivers call: pgjdbc's getPrimaryKeys
/// expands index keys with information_schema._pg_expandarray (an immutable SQL function over
/// its array argument only).
pub const SAFE_QUALIFIED_FUNCTIONS: &[&str] = &["information_schema._pg_expandarray"];

/// Functions whose result differs per call. They are refused where the rewriter must evaluate
/// an expression twice (UPDATE SET values re-evaluated in the write check).
pub const VOLATILE_FUNCTIONS: &[&str] = &["random", "gen_random_uuid", "clock_timestamp"];

/// Types user SQL may cast to. Domains, composite and other user types (arbitrary input
/// functions) are refused.
pub const SAFE_TYPES: &[&str] = &[
    "smallint",
    "int",
    "integer",
    "bigint",
    "int2",
    "int4",
    "int8",
    "real",
    "float",
    "float4",
    "float8",
    "double precision",
    "double",
    "numeric",
    "decimal",
    "text",
    "varchar",
    "character varying",
    "char",
    "character",
    "bpchar",
    "boolean",
    "bool",
    "date",
    "time",
    "timestamp",
    "timestamptz",
    "timestamp with time zone",
    "timestamp without time zone",
    "time with time zone",
    "time without time zone",
    "timetz",
    "interval",
    "uuid",
    "json",
    "jsonb",
    "bytea",
    "name",
    "oid",
    // name lookups drivers use (`'pg_catalog.array_in'::regproc`, psycopg's `'…'::regtype`):
    // they resolve function and type names only. Not regrole, and regclass only through the
    // rewriter's guard (`rewrite::introspect`), which answers for the service's own tables.
    "regproc",
    "regprocedure",
    "regtype",
    // schema names: pg_namespace is readable anyway
    "regnamespace",
];

/// Session parameters any service may SET / RESET / SHOW: what drivers and ORMs send at
/// connect time. Never: role, session_authorization, search_path, standard_conforming_strings
/// (would change how our quoted literals are read), session_replication_role, and anything
/// not listed.
pub const SAFE_SET_PARAMS: &[&str] = &[
    "datestyle",
    "timezone",
    "time zone",
    "extra_float_digits",
    "application_name",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "client_encoding",
    "intervalstyle",
    "client_min_messages",
    "bytea_output",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "transaction_isolation",
    "geqo",
    "jit",
    "work_mem",
    "synchronous_commit",
];

/// The only client encodings a policy-bound session may use: the rewritten text is UTF-8, and
/// a multibyte encoding such as SJIS or BIG5 would let the server read its quoting differently.
///
/// Names are compared the way PostgreSQL's `pg_char_to_encoding` does (`clean_encoding_name`
/// in encnames.c): only ASCII letters and digits count, case-insensitively, so `'utf-8'`
/// (quotes included, as asyncpg sends it), `UTF_8` and `Unicode` are all UTF8. Its alias table
/// names UTF8 `utf8` and `unicode`; anything else that the server would read as another
/// encoding is refused.
pub fn is_utf8_encoding(name: &str) -> bool {
    let clean: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    matches!(clean.as_str(), "utf8" | "unicode")
}

/// PostgreSQL's system columns (`ctid`, `xmin`, …): a row's physical place and the
/// transactions that wrote it, which reveal other rows' inserts, updates and deletes. The server
/// refuses user columns with these names, so a column reference with one is a system column.
pub fn is_system_column(name: &str) -> bool {
    matches!(
        name,
        "ctid" | "xmin" | "xmax" | "cmin" | "cmax" | "tableoid"
    )
}

/// Whether a policy-bound service may set parameter `name` (lowercase): built-in safe
/// parameters and its policy's `[allow].set`, never the forbidden ones.
pub fn is_settable(name: &str, policy_extra: &[String]) -> bool {
    !FORBIDDEN_SET_PARAMS.contains(&name)
        && (SAFE_SET_PARAMS.contains(&name) || policy_extra.iter().any(|s| s == name))
}

/// Parameters a service may never SET even if its policy lists them.
pub const FORBIDDEN_SET_PARAMS: &[&str] = &[
    "role",
    "session_authorization",
    "search_path",
    "standard_conforming_strings",
    "session_replication_role",
    "row_security",
    "default_transaction_deferrable",
];

/// Parameters that may be read with SHOW in addition to the settable ones.
pub const SAFE_SHOW_PARAMS: &[&str] = &[
    "server_version",
    "server_version_num",
    "server_encoding",
    "standard_conforming_strings",
    "integer_datetimes",
    "max_identifier_length",
    "transaction isolation level",
    "transaction_read_only",
    "is_superuser",
];

/// System relations drivers and ORMs read for type information and schema introspection,
/// with the columns they may see (`None` = all). Excluded columns leak table-wide statistics
/// (pg_class.reltuples/relpages/relallvisible) or code (pg_proc.prosrc). Everything else in
/// pg_catalog (pg_stats, pg_statistic, pg_stat_*, pg_locks, pg_prepared_statements,
/// pg_cursors, pg_settings, pg_authid, pg_largeobject...) is refused.
pub const CATALOG_RELATIONS: &[(&str, &str, Option<&[&str]>)] = &[
    ("pg_catalog", "pg_type", None),
    ("pg_catalog", "pg_namespace", None),
    ("pg_catalog", "pg_range", None),
    ("pg_catalog", "pg_enum", None),
    ("pg_catalog", "pg_index", None),
    ("pg_catalog", "pg_attrdef", None),
    ("pg_catalog", "pg_constraint", None),
    ("pg_catalog", "pg_description", None),
    ("pg_catalog", "pg_am", None),
    ("pg_catalog", "pg_collation", None),
    ("pg_catalog", "pg_opclass", None),
    ("pg_catalog", "pg_opfamily", None),
    ("pg_catalog", "pg_operator", None),
    (
        "pg_catalog",
        "pg_attribute",
        Some(&[
            "attrelid",
            "attname",
            "atttypid",
            "attlen",
            "attnum",
            "attndims",
            "atttypmod",
            "attnotnull",
            "atthasdef",
            "attidentity",
            "attgenerated",
            "attisdropped",
            "attcollation",
            "attislocal",
            "attinhcount",
            // psql's `\d+`: how a column is stored and its statistics target
            "attstorage",
            "attcompression",
            "attstattarget",
        ]),
    ),
    (
        "pg_catalog",
        "pg_class",
        Some(&[
            "oid",
            "relname",
            "relnamespace",
            "reltype",
            "reloftype",
            "relowner",
            "relam",
            "relkind",
            "relnatts",
            "relchecks",
            "relhasindex",
            "relisshared",
            "relpersistence",
            "relispartition",
            "relhasrules",
            "relhastriggers",
            "relhassubclass",
            "relrowsecurity",
            "relispopulated",
            "relreplident",
            "relforcerowsecurity",
            "reltablespace",
            "reltoastrelid",
            "reloptions",
            "relpartbound",
        ]),
    ),
    (
        "pg_catalog",
        "pg_proc",
        Some(&[
            "oid",
            "proname",
            "pronamespace",
            "prokind",
            "proretset",
            "provariadic",
            "pronargs",
            "prorettype",
            "proargtypes",
            "proallargtypes",
            "proargmodes",
            "proargnames",
        ]),
    ),
    (
        "pg_catalog",
        "pg_database",
        Some(&["oid", "datname", "encoding", "datcollate", "datctype"]),
    ),
    // psql's `\d` footers: answered empty (`rewrite::introspect::EMPTY`)
    ("pg_catalog", "pg_policy", None),
    ("pg_catalog", "pg_statistic_ext", None),
    ("pg_catalog", "pg_publication", None),
    ("pg_catalog", "pg_publication_namespace", None),
    ("pg_catalog", "pg_publication_rel", None),
    ("pg_catalog", "pg_trigger", None),
    ("pg_catalog", "pg_inherits", None),
    ("pg_catalog", "pg_roles", None),
    ("pg_catalog", "pg_auth_members", None),
    ("pg_catalog", "pg_rewrite", None),
    ("pg_catalog", "pg_sequence", None),
    ("pg_catalog", "pg_partitioned_table", None),
    ("information_schema", "tables", None),
    ("information_schema", "columns", None),
    ("information_schema", "schemata", None),
    ("information_schema", "table_constraints", None),
    ("information_schema", "key_column_usage", None),
    ("information_schema", "constraint_column_usage", None),
    ("information_schema", "referential_constraints", None),
];

pub fn is_safe_function(name: &str) -> bool {
    SAFE_FUNCTIONS.contains(&name)
}

pub fn is_volatile_function(name: &str) -> bool {
    VOLATILE_FUNCTIONS.contains(&name)
}

/// Normalizes a rendered type (`character varying(20)[]`) to its base name.
pub fn is_safe_type(rendered: &str) -> bool {
    let lower = rendered.trim().to_ascii_lowercase();
    let base = lower.trim_end_matches("[]");
    let base = match base.find('(') {
        Some(i) => {
            // keep suffixes like "timestamp(3) with time zone" comparable
            let (head, tail) = base.split_at(i);
            let rest = tail.find(')').map(|j| &tail[j + 1..]).unwrap_or("");
            format!("{}{}", head.trim_end(), rest)
        }
        None => base.to_string(),
    };
    SAFE_TYPES.contains(&base.trim())
}

pub fn catalog_relation(schema: &str, name: &str) -> Option<Option<&'static [&'static str]>> {
    CATALOG_RELATIONS
        .iter()
        .find(|(s, n, _)| *s == schema && *n == name)
        .map(|(_, _, cols)| *cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_encoding_names_as_postgres_cleans_them() {
        for name in [
            "UTF8",
            "utf8",
            "utf-8",
            "'utf-8'",
            "\"UTF-8\"",
            "Utf_8",
            "UNICODE",
            "unicode",
        ] {
            assert!(is_utf8_encoding(name), "{name}");
        }
        for name in [
            "SJIS", "BIG5", "LATIN1", "utf16", "utf8mb4", "", "'", "win1252", "utf-8x",
        ] {
            assert!(!is_utf8_encoding(name), "{name}");
        }
    }

    #[test]
    fn types_normalize() {
        assert!(is_safe_type("BIGINT"));
        assert!(is_safe_type("character varying(20)"));
        assert!(is_safe_type("int[]"));
        assert!(is_safe_type("NUMERIC(10,2)"));
        assert!(!is_safe_type("customers"));
        assert!(!is_safe_type("my_domain"));
    }

    #[test]
    fn dangerous_functions_absent() {
        for f in [
            "set_config",
            "current_setting",
            "pg_read_file",
            "lo_import",
            "dblink",
            "query_to_xml",
            "ts_stat",
            "nextval",
            "pg_sleep",
        ] {
            assert!(!is_safe_function(f), "{f}");
        }
    }
}
