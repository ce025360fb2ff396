//! Encrypted columns read through views. A RowDescription names the relation a column comes
//! from as the parser saw it: through a view that is the view (PostgreSQL expands views only
//! after it has marked result origins), so without this a view over an encrypted column would
//! hand the client ciphertext. At session start pgward finds the views and materialized views
//! that depend, directly or through other views, on a table with encrypted columns, has the
//! server describe each one's definition (Parse + Describe of `pg_get_viewdef`, nothing runs),
//! and maps every view column whose origin is an encrypted column (or one of another mapped
//! view) to that column — so its values are decrypted with the base column's key and AAD.
//! A view column computed from an encrypted column has no origin and stays as it is.
use std::collections::HashMap;

use tokio::io::AsyncWriteExt;

use super::{FieldRole, ROW_DESCRIPTION};
use crate::net::{ConnReader, ConnWriter};
use crate::policy::sql::quote_literal;
use crate::protocol::view::row_description;
use crate::protocol::{backend, build, FrameReader};

/// Most views described per session (the query's LIMIT): bounds the start-up work.
const MAX_VIEWS: usize = 1000;

/// The catalog query listing (view OID, definition) of every view or materialized view that
/// depends on one of `tables` (`schema`, `table`), through any depth of other views.
pub(super) fn dependent_views_sql<'a>(tables: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let tuples: Vec<String> = tables
        .map(|(schema, table)| format!("({}, {})", quote_literal(schema), quote_literal(table)))
        .collect();
    format!(
        "WITH RECURSIVE base AS (\
           SELECT c.oid FROM pg_catalog.pg_class c \
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
           WHERE (n.nspname::text, c.relname::text) IN (VALUES {})), \
         dependent(oid) AS (\
           SELECT r.ev_class FROM pg_catalog.pg_depend d \
           JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
           WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
             AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
             AND d.refobjid IN (SELECT oid FROM base) AND r.ev_class <> d.refobjid \
           UNION \
           SELECT r.ev_class FROM dependent v \
           JOIN pg_catalog.pg_depend d ON d.refobjid = v.oid \
             AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
             AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
           JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
           WHERE r.ev_class <> v.oid) \
         SELECT c.oid::text, pg_catalog.pg_get_viewdef(c.oid) FROM dependent \
         JOIN pg_catalog.pg_class c ON c.oid = dependent.oid \
         WHERE c.relkind IN ('v', 'm') LIMIT {MAX_VIEWS}",
        tuples.join(", ")
    )
}

/// Adds the view columns that carry an encrypted column's values to `columns`. `views` are
/// (OID, definition). A definition the server cannot describe (say, the session's role may not
/// use a schema it names) leaves that view unmapped, as before. `Err` only when the upstream
/// connection fails.
pub(super) async fn map_view_columns(
    reader: &mut FrameReader<ConnReader>,
    writer: &mut ConnWriter,
    views: &[(u32, String)],
    columns: &mut HashMap<(u32, i16), FieldRole>,
) -> Result<(), &'static str> {
    if views.is_empty() {
        return Ok(());
    }
    // One Sync per view: a definition that fails to parse skips only its own Describe.
    let mut out = Vec::new();
    for (_, definition) in views {
        out.extend_from_slice(&build::parse("", definition));
        out.extend_from_slice(&build::describe(b'S', ""));
        out.extend_from_slice(&build::sync());
    }
    // The client's session starts without an unnamed statement, as it would directly.
    out.extend_from_slice(&build::close(b'S', ""));
    out.extend_from_slice(&build::sync());
    writer.write_all(&out).await.map_err(|_| "write")?;
    writer.flush().await.map_err(|_| "flush")?;
    let mut origins: Vec<(u32, Vec<(u32, i16)>)> = Vec::new();
    let mut view = 0;
    while view <= views.len() {
        let batch = match reader.next_batch().await {
            Ok(Some(batch)) => batch,
            _ => return Err("read"),
        };
        for message in batch.messages() {
            match message.tag() {
                ROW_DESCRIPTION => {
                    let fields = row_description(message.body()).map_err(|_| "description")?;
                    let oid = views.get(view).map_or(0, |(oid, _)| *oid);
                    origins.push((
                        oid,
                        fields.iter().map(|f| (f.table_oid, f.attnum)).collect(),
                    ));
                }
                backend::ERROR_RESPONSE => {
                    tracing::debug!(
                        view = views.get(view).map(|(oid, _)| *oid),
                        "a view over encrypted columns could not be described"
                    );
                }
                backend::READY_FOR_QUERY => view += 1,
                _ => {}
            }
        }
    }
    resolve(&origins, columns);
    Ok(())
}

/// Maps view columns to the encrypted columns their origins are, until nothing changes (a
/// view over a view is described with the inner view as its origin).
fn resolve(origins: &[(u32, Vec<(u32, i16)>)], columns: &mut HashMap<(u32, i16), FieldRole>) {
    loop {
        let mut added = false;
        for (view, fields) in origins {
            for (i, origin) in fields.iter().enumerate() {
                let Ok(attnum) = i16::try_from(i + 1) else {
                    break;
                };
                if columns.contains_key(&(*view, attnum)) {
                    continue;
                }
                if let Some(role) = columns.get(origin).cloned() {
                    // A view column carries no row key: keep that it came through a view.
                    let role = match role {
                        FieldRole::Encrypted(c) => FieldRole::EncryptedViaView(c),
                        other => other,
                    };
                    columns.insert((*view, attnum), role);
                    added = true;
                }
            }
        }
        if !added {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::sql::ColumnRef;
    use crate::crypto::ClientType;

    fn encrypted(column: &str) -> FieldRole {
        FieldRole::Encrypted(ColumnRef {
            table: "public.customers".into(),
            column: column.into(),
            ty: ClientType::Text,
        })
    }

    #[test]
    fn view_columns_take_the_role_of_their_origin_at_any_depth() {
        // customers (oid 10): email = 3, email_bidx = 4. View 20 = (name, email); view 30 over
        // view 20 = (email, upper(name)); view 40 = a computed column only.
        let mut columns = HashMap::from([
            ((10, 3), encrypted("email")),
            ((10, 4), FieldRole::BlindIndex),
        ]);
        let origins = vec![
            (30, vec![(20, 2), (0, 0)]),
            (20, vec![(10, 2), (10, 3), (10, 4)]),
            (40, vec![(0, 0)]),
        ];
        resolve(&origins, &mut columns);
        assert!(
            matches!(columns.get(&(20, 2)), Some(FieldRole::EncryptedViaView(c)) if c.column == "email")
        );
        assert!(matches!(columns.get(&(20, 3)), Some(FieldRole::BlindIndex)));
        assert!(
            matches!(columns.get(&(30, 1)), Some(FieldRole::EncryptedViaView(c)) if c.column == "email")
        );
        assert!(!columns.contains_key(&(20, 1)), "name is not encrypted");
        assert!(!columns.contains_key(&(30, 2)) && !columns.contains_key(&(40, 1)));
    }

    #[test]
    fn the_dependency_query_names_every_table() {
        let sql = dependent_views_sql([("public", "customers"), ("sales", "it's")].into_iter());
        assert!(
            sql.contains("('public', 'customers'), ('sales', 'it''s')"),
            "{sql}"
        );
        assert!(crate::policy::sql::parse_statements(&sql).is_ok(), "{sql}");
    }
}
