//! Which built-in functions, operators and types a policy-bound statement may use, classified
//! from the server's own catalog (`pg_proc`, `pg_operator`, `pg_type` of `pg_catalog`) instead
//! of a hand-written list, so every harmless helper of the server's version is usable.
//!
//! Fail closed. A function name is safe only if **every** `pg_catalog` overload of it is:
//! a plain function, aggregate or window function (`prokind` f/a/w), immutable or stable
//! (volatile ones may have side effects), implemented in C or internally (a SQL or PL body
//! could read tables), taking and returning no OID-alias type that resolves names (regclass,
//! regnamespace, regrole…: they reveal which relations and roles exist), no cursor and no
//! pseudo-type such as `internal`, and not on [`DENIED`] — the families that can read data,
//! files, settings or other sessions, or reveal catalog facts about relations (has_*, pg_*,
//! to_reg*, *_to_xml, current_setting, txid_*…). An operator name is safe only if every
//! operator of that name is implemented by a safe function; a type only if it is a base,
//! range or multirange type of `pg_catalog` whose input cannot resolve relation names.
//! Overloads are not resolved here, hence the "every overload" rule.
use std::collections::{BTreeMap, BTreeSet};

/// Function names refused even when their catalog entry looks harmless, by exact name or
/// prefix (`*` at the end) or substring (`*` on both sides). Why each family:
/// `pg_*` are the server's administration and introspection helpers (statistics, settings,
/// files, other backends, object definitions); the few drivers need are listed by the policy
/// layer's reviewed allowlist instead. `has_*` and `row_security_active` answer for any
/// relation name; `to_reg*` resolve names; `*to_xml*` run a query or read a whole table;
/// `current_setting`/`set_config` read or change settings; `txid_*`, `*val` touch
/// transaction ids and sequences; `lo_*`/`lo*` large objects; `dblink*` other servers;
/// `inet_client_*`/`inet_server_*` network addresses; `fmgr_*`/`*_validator`/
/// `binary_upgrade_*` internal hooks; `satisfies_hash_partition` opens a relation by OID;
/// `current_query` shows the proxied (rewritten) statement text.
pub const DENIED: &[&str] = &[
    "pg_*",
    "has_*",
    "row_security_active",
    "to_reg*",
    "*to_xml*",
    "*xmlschema*",
    "current_setting",
    "set_config",
    "txid_*",
    "nextval",
    "currval",
    "setval",
    "lastval",
    "lo_*",
    "loread",
    "lowrite",
    "dblink*",
    "inet_client_*",
    "inet_server_*",
    "fmgr_*",
    "*_validator",
    "binary_upgrade_*",
    "satisfies_hash_partition",
    "current_query",
    "ts_stat",
    "query_to_xml",
];

/// Type names that must never appear among a safe function's argument or result types.
const UNSAFE_ARG_TYPES: &[&str] = &[
    "regclass",
    "regnamespace",
    "regrole",
    "regoper",
    "regoperator",
    "regcollation",
    "refcursor",
    "internal",
    "cstring",
    "trigger",
    "event_trigger",
    "language_handler",
    "fdw_handler",
    "index_am_handler",
    "table_am_handler",
    "tsm_handler",
];

/// The types (and their arrays) a policy-bound service may not declare a parameter as: those
/// whose input resolves a name the policy may hide — a relation, a role, an operator, a
/// collation, a type (a table's row type): a parameter declared as one answers the name's
/// existence and OID, whatever the statement's text says — and the transaction counter's
/// (`age($1)` with `$1` an `xid`). In the statement's text, a cast to `regclass` or `regtype`
/// is answered through the rewriter's guards instead (drivers use `'…'::regtype`).
pub const REFUSED_PARAMETER_TYPE_OIDS: [(u32, &str); 16] = [
    (28, "xid"),
    (1011, "xid[]"),
    (5069, "xid8"),
    (271, "xid8[]"),
    (2205, "regclass"),
    (2210, "regclass[]"),
    (4096, "regrole"),
    (4097, "regrole[]"),
    (2203, "regoper"),
    (2207, "regoper[]"),
    (2204, "regoperator"),
    (2208, "regoperator[]"),
    (4191, "regcollation"),
    (4192, "regcollation[]"),
    (2206, "regtype"),
    (2211, "regtype[]"),
];

const SAFE_REG_TYPES: &[&str] = &[
    "regtype",
    "regnamespace",
    "regproc",
    "regprocedure",
    "regconfig",
    "regdictionary",
];

/// Whether `name` is on the deny list.
pub fn is_denied(name: &str) -> bool {
    DENIED.iter().any(|pat| {
        match (
            pat.strip_prefix('*').and_then(|p| p.strip_suffix('*')),
            pat.strip_suffix('*'),
        ) {
            (Some(inner), _) => name.contains(inner),
            (None, Some(prefix)) => name.starts_with(prefix),
            (None, None) => name == *pat,
        }
    })
}

/// One `pg_catalog.pg_proc` row as the classifier needs it.
#[derive(Clone, Debug)]
pub struct ProcRow {
    pub oid: u32,
    pub name: String,
    /// `prokind`: f(unction), a(ggregate), w(indow), p(rocedure).
    pub kind: char,
    /// `provolatile`: i(mmutable), s(table), v(olatile).
    pub volatility: char,
    /// `pg_language.lanname`.
    pub language: String,
    /// `typname` of every argument and of the result.
    pub types: Vec<String>,
}

impl ProcRow {
    /// Whether this one overload is safe for a policy-bound service.
    pub fn is_safe(&self) -> bool {
        matches!(self.kind, 'f' | 'a' | 'w')
            && matches!(self.volatility, 'i' | 's')
            && matches!(self.language.as_str(), "internal" | "c")
            && !is_denied(&self.name)
            && !self
                .types
                .iter()
                .any(|t| UNSAFE_ARG_TYPES.contains(&t.as_str()))
    }
}

/// One `pg_catalog.pg_type` row.
#[derive(Clone, Debug)]
pub struct TypeRow {
    pub name: String,
    /// `typtype`: b(ase), c(omposite), d(omain), e(num), p(seudo), r(ange), m(ultirange).
    pub kind: char,
}

/// Types whose values read the server's transaction counter (`age('3'::xid)` counts every
/// transaction since, every tenant's included: what the denied `txid_*` functions would tell).
const TRANSACTION_COUNTER_TYPES: &[&str] = &["xid", "xid8", "cid", "txid_snapshot"];

impl TypeRow {
    pub fn is_safe(&self) -> bool {
        let reg = self.name.starts_with("reg");
        matches!(self.kind, 'b' | 'r' | 'm')
            && !self.name.starts_with("pg_")
            && !self.name.starts_with('_')
            && (!reg || SAFE_REG_TYPES.contains(&self.name.as_str()))
            && !TRANSACTION_COUNTER_TYPES.contains(&self.name.as_str())
    }
}

/// The classified routines of `pg_catalog`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routines {
    functions: BTreeSet<String>,
    operators: BTreeSet<String>,
    types: BTreeSet<String>,
}

impl Routines {
    /// Classifies the catalog rows; `operators` are (operator name, implementing proc OID).
    pub fn classify(procs: &[ProcRow], operators: &[(String, u32)], types: &[TypeRow]) -> Self {
        let mut by_name: BTreeMap<&str, bool> = BTreeMap::new();
        let mut by_oid: BTreeMap<u32, bool> = BTreeMap::new();
        for p in procs {
            let safe = p.is_safe();
            by_oid.insert(p.oid, safe);
            let e = by_name.entry(p.name.as_str()).or_insert(true);
            *e &= safe;
        }
        let mut ops: BTreeMap<&str, bool> = BTreeMap::new();
        for (name, code) in operators {
            let e = ops.entry(name.as_str()).or_insert(true);
            *e &= by_oid.get(code).copied().unwrap_or(false);
        }
        Routines {
            functions: keep_true(by_name),
            operators: keep_true(ops),
            types: types
                .iter()
                .filter(|t| t.is_safe())
                .map(|t| t.name.clone())
                .collect(),
        }
    }

    pub fn is_safe_function(&self, name: &str) -> bool {
        self.functions.contains(name)
    }

    pub fn is_safe_operator(&self, name: &str) -> bool {
        self.operators.contains(name)
    }

    /// `name`: the server's `typname` (`int4`, `inet`, `tsvector`).
    pub fn is_safe_type(&self, name: &str) -> bool {
        self.types.contains(name)
    }

    pub fn is_empty(&self) -> bool {
        self.functions.is_empty() && self.operators.is_empty() && self.types.is_empty()
    }
}

fn keep_true(m: BTreeMap<&str, bool>) -> BTreeSet<String> {
    m.into_iter()
        .filter(|(_, ok)| *ok)
        .map(|(n, _)| n.to_string())
        .collect()
}

pub(crate) const PROCS_SQL: &str = "
SELECT p.oid, p.proname::text, p.prokind::text, p.provolatile::text, l.lanname::text,
       p.proargtypes::oid[], p.prorettype
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE n.nspname = 'pg_catalog'";

pub(crate) const OPERATORS_SQL: &str = "
SELECT o.oprname::text, o.oprcode::oid
FROM pg_catalog.pg_operator o
JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
WHERE n.nspname = 'pg_catalog'";

/// Every type (argument types may live outside `pg_catalog`), with whether it is built in.
pub(crate) const TYPES_SQL: &str = "
SELECT t.oid, t.typname::text, t.typtype::text, n.nspname = 'pg_catalog'
FROM pg_catalog.pg_type t
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace";

fn first_char(s: &str) -> char {
    s.chars().next().unwrap_or('?')
}

/// Reads and classifies the upstream's `pg_catalog` routines (three plain scans; the names
/// of argument types are joined here, which keeps the load to a few milliseconds).
pub(crate) async fn load(
    client: &tokio_postgres::Client,
) -> Result<Routines, tokio_postgres::Error> {
    let mut type_names: BTreeMap<u32, String> = BTreeMap::new();
    let mut types = Vec::new();
    for row in client.query(TYPES_SQL, &[]).await? {
        let oid: u32 = row.try_get(0)?;
        let name: String = row.try_get(1)?;
        if row.try_get::<_, bool>(3)? {
            types.push(TypeRow {
                name: name.clone(),
                kind: first_char(&row.try_get::<_, String>(2)?),
            });
        }
        type_names.insert(oid, name);
    }
    let mut procs = Vec::new();
    for row in client.query(PROCS_SQL, &[]).await? {
        let mut oids: Vec<u32> = row.try_get(5)?;
        oids.push(row.try_get(6)?);
        procs.push(ProcRow {
            oid: row.try_get(0)?,
            name: row.try_get(1)?,
            kind: first_char(&row.try_get::<_, String>(2)?),
            volatility: first_char(&row.try_get::<_, String>(3)?),
            language: row.try_get(4)?,
            // An unknown type OID counts as unsafe ("internal"): fail closed.
            types: oids
                .iter()
                .map(|o| {
                    type_names
                        .get(o)
                        .cloned()
                        .unwrap_or_else(|| "internal".into())
                })
                .collect(),
        });
    }
    let mut operators = Vec::new();
    for row in client.query(OPERATORS_SQL, &[]).await? {
        operators.push((row.try_get(0)?, row.try_get(1)?));
    }
    let r = Routines::classify(&procs, &operators, &types);
    tracing::debug!(
        functions = r.functions.len(),
        operators = r.operators.len(),
        types = r.types.len(),
        "classified pg_catalog routines"
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(oid: u32, name: &str, vol: char, lang: &str, types: &[&str]) -> ProcRow {
        ProcRow {
            oid,
            name: name.into(),
            kind: 'f',
            volatility: vol,
            language: lang.into(),
            types: types.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn escapes_are_denied_whatever_the_catalog_says() {
        for name in [
            "query_to_xml",
            "table_to_xml",
            "cursor_to_xml",
            "database_to_xml_and_xmlschema",
            "dblink_exec",
            "lo_import",
            "pg_read_file",
            "pg_read_binary_file",
            "pg_ls_dir",
            "pg_stat_file",
            "pg_stat_get_live_tuples",
            "set_config",
            "current_setting",
            "pg_advisory_lock",
            "nextval",
            "currval",
            "setval",
            "pg_sleep",
            "txid_current",
            "pg_current_xact_id",
            "pg_terminate_backend",
            "pg_cancel_backend",
            "pg_reload_conf",
            "pg_notify",
            "has_table_privilege",
            "to_regclass",
            "inet_server_addr",
            "satisfies_hash_partition",
        ] {
            assert!(is_denied(name), "{name}");
            assert!(
                !proc(1, name, 'i', "internal", &["text"]).is_safe(),
                "{name}"
            );
        }
        for name in ["pi", "current_user", "length", "lower", "to_tsvector"] {
            assert!(!is_denied(name), "{name}");
        }
    }

    #[test]
    fn every_overload_must_be_safe() {
        let procs = [
            proc(1, "pi", 'i', "internal", &["float8"]),
            proc(2, "length", 'i', "internal", &["text", "int4"]),
            proc(3, "length", 'i', "internal", &["bytea", "int4"]),
            // one SQL-bodied overload makes the name unsafe
            proc(4, "mixed", 'i', "internal", &["text"]),
            proc(5, "mixed", 'i', "sql", &["int4"]),
            proc(6, "vol", 'v', "internal", &["int4"]),
            proc(7, "byrel", 's', "internal", &["regclass", "int8"]),
            proc(8, "textregexeq", 'i', "internal", &["text", "text", "bool"]),
        ];
        let ops = [
            ("~".to_string(), 8),
            ("@@@".to_string(), 8),
            ("@@@".to_string(), 7),
            ("?!".to_string(), 99), // implemented by an unknown proc
        ];
        let r = Routines::classify(&procs, &ops, &[]);
        assert!(r.is_safe_function("pi"));
        assert!(r.is_safe_function("length"));
        assert!(!r.is_safe_function("mixed"));
        assert!(!r.is_safe_function("vol"));
        assert!(!r.is_safe_function("byrel"));
        assert!(!r.is_safe_function("unknown"));
        assert!(r.is_safe_operator("~"));
        assert!(!r.is_safe_operator("@@@"));
        assert!(!r.is_safe_operator("?!"));
    }

    #[test]
    fn name_resolving_and_transaction_counter_types_are_not_castable() {
        let t = |name: &str, kind| TypeRow {
            name: name.into(),
            kind,
        };
        let types = [
            t("inet", 'b'),
            t("point", 'b'),
            t("money", 'b'),
            t("tsvector", 'b'),
            t("int4range", 'r'),
            t("regtype", 'b'),
            t("regclass", 'b'),
            t("regnamespace", 'b'),
            t("regrole", 'b'),
            t("record", 'p'),
            t("pg_node_tree", 'b'),
            t("information_schema_stuff", 'd'),
            t("xid", 'b'),
            t("xid8", 'b'),
        ];
        let r = Routines::classify(&[], &[], &types);
        for ok in [
            "inet",
            "point",
            "money",
            "tsvector",
            "int4range",
            "regtype",
            "regnamespace",
        ] {
            assert!(r.is_safe_type(ok), "{ok}");
        }
        for bad in [
            "regclass",
            "regrole",
            "record",
            "pg_node_tree",
            "information_schema_stuff",
            "xid",
            "xid8",
        ] {
            assert!(!r.is_safe_type(bad), "{bad}");
        }
    }
}
