//! Field encryption through the proxy: a real PostgreSQL, the `local` key provider, and
//! clients that only ever see plaintext of the configured types.
use pgward::crypto::scope::KeyScope;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pgward::crypto::manager::{CachePolicy, KeyManager};
use pgward::crypto::{encode_for_encryption, ClientType, EncryptColumn, WireFormat};
use pgward::keys::local::LocalProvider;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{self, ProxyOptions, TestProxy};

/// Encrypted columns of the test table `vault_items`: (column, type, searchable).
const COLUMNS: [(&str, ClientType, bool); 10] = [
    ("c_text", ClientType::Text, true),
    ("c_varchar", ClientType::Varchar, false),
    ("c_int4", ClientType::Int4, true),
    ("c_int8", ClientType::Int8, false),
    ("c_numeric", ClientType::Numeric, false),
    ("c_bool", ClientType::Bool, false),
    ("c_date", ClientType::Date, false),
    ("c_tstz", ClientType::Timestamptz, false),
    ("c_bytea", ClientType::Bytea, false),
    ("c_jsonb", ClientType::Jsonb, false),
];

/// A database with `vault_items` (every column stored as bytea), a proxy encrypting it, and
/// a library-side key manager over the same master key.
struct Fixture {
    proxy: TestProxy,
    database: String,
    manager: Arc<KeyManager>,
    _dir: tempfile::TempDir,
}

fn encrypt_columns() -> Vec<EncryptColumn> {
    COLUMNS
        .iter()
        .map(|(c, ty, searchable)| EncryptColumn {
            table: "vault_items".into(),
            column: (*c).into(),
            key: "pii".into(),
            ty: *ty,
            searchable: *searchable,
            context_claim: None,
            bind_primary_key: false,
        })
        .collect()
}

fn encrypt_toml(key_file: &std::path::Path) -> String {
    let mut toml = format!(
        "[keys]\nprovider = \"local\"\nlocal_master_key_file = {key_file:?}\npoll_interval = \"1s\"\n"
    );
    for c in encrypt_columns() {
        toml.push_str(&format!(
            "[[encrypt]]\ntable = {:?}\ncolumn = {:?}\nkey = {:?}\ntype = {:?}\nsearchable = {}\n",
            c.table,
            c.column,
            c.key,
            c.ty.name(),
            c.searchable
        ));
    }
    toml
}

async fn fixture() -> Fixture {
    fixture_with(|_| String::new()).await
}

/// [`fixture`] with more proxy settings, made from the fixture's temp dir.
async fn fixture_with(extra: impl FnOnce(&std::path::Path) -> String) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    LocalProvider::generate_file(&key_file).unwrap();
    let database = harness::fresh_database("enc", false).await;
    let mut ddl = String::from("CREATE TABLE vault_items (id int PRIMARY KEY, note text");
    for (c, _, searchable) in COLUMNS {
        ddl.push_str(&format!(", {c} bytea"));
        if searchable {
            ddl.push_str(&format!(", {c}_bidx bytea"));
        }
    }
    ddl.push(')');
    direct(&database).await.batch_execute(&ddl).await.unwrap();
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: encrypt_toml(&key_file) + &extra(dir.path()),
        ..ProxyOptions::default()
    })
    .await;
    let manager = Arc::new(
        KeyManager::new(
            Arc::new(LocalProvider::from_file(&key_file).unwrap()),
            None,
            &encrypt_columns(),
            CachePolicy {
                ttl: Duration::from_secs(60),
                max_stale: Duration::from_secs(60),
                blocking_threshold: 64 * 1024,
            },
        )
        .unwrap(),
    );
    Fixture {
        proxy,
        database,
        manager,
        _dir: dir,
    }
}

async fn direct(database: &str) -> Client {
    let (client, conn) = harness::postgres()
        .direct(database)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Sample values per type, in text form (NULL as None).
fn samples(ty: ClientType) -> Vec<Option<&'static str>> {
    let mut v = match ty {
        ClientType::Text | ClientType::Varchar => vec!["", "héllo wörld ✓ 日本", "a'b\\c"],
        ClientType::Int4 => vec!["0", "-2147483648", "2147483647"],
        ClientType::Int8 => vec!["0", "-9223372036854775808", "9223372036854775807"],
        ClientType::Numeric => vec!["0", "-12345.678900", "NaN"],
        ClientType::Bool => vec!["t", "f", "t"],
        ClientType::Date => vec!["2000-01-01", "1970-06-30", "infinity"],
        ClientType::Timestamptz => vec![
            "2000-01-01 00:00:00+00",
            "2026-11-25 06:30:00.123456+00",
            "-infinity",
        ],
        ClientType::Bytea => vec!["\\x", "\\x00ff10", "\\xdeadbeef"],
        ClientType::Jsonb => vec!["{}", "{\"k\": [1, \"ü\"]}", "null"],
    }
    .into_iter()
    .map(Some)
    .collect::<Vec<_>>();
    v.push(None);
    v
}

impl Fixture {
    async fn client(&self) -> Client {
        self.proxy.connect("app", &self.database).await
    }

    /// Store row `id` with ciphertext made by the library (bypassing the proxy's write path).
    async fn seed_directly(&self, id: i32, index: usize) {
        let db = direct(&self.database).await;
        let mut sql = String::from("INSERT INTO vault_items (id");
        let mut values = Vec::new();
        for (c, ty, searchable) in COLUMNS {
            sql.push_str(&format!(", {c}"));
            let text = samples(ty)[index];
            let (ct, bidx) = match text {
                None => (None, None),
                Some(t) => {
                    let canonical =
                        encode_for_encryption(ty, WireFormat::Text, t.as_bytes()).unwrap();
                    let ct = self
                        .manager
                        .encrypt("vault_items", c, &KeyScope::default(), &canonical)
                        .await
                        .unwrap();
                    let bidx = if searchable {
                        Some(
                            self.manager
                                .blind_index("vault_items", c, &KeyScope::default(), &canonical)
                                .await
                                .unwrap()
                                .to_vec(),
                        )
                    } else {
                        None
                    };
                    (Some(ct), bidx)
                }
            };
            values.push(ct);
            if searchable {
                sql.push_str(&format!(", {c}_bidx"));
                values.push(bidx);
            }
        }
        sql.push_str(") VALUES ($1");
        for i in 0..values.len() {
            sql.push_str(&format!(", ${}", i + 2));
        }
        sql.push(')');
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id];
        for v in &values {
            params.push(v);
        }
        db.execute(&sql, &params).await.unwrap();
    }
}

fn column_list() -> String {
    COLUMNS.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
}

/// Simple-protocol rows as text.
async fn simple_rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Asserts that `sql` is refused with `sqlstate` through the simple and the extended
/// protocol; returns the simple protocol's message.
async fn refused_in_both_protocols(client: &Client, sql: &str, sqlstate: &str) -> String {
    let e = client.simple_query(sql).await.unwrap_err();
    let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e}"));
    assert_eq!(db.code().code(), sqlstate, "{sql}: {}", db.message());
    let message = db.message().to_string();
    let e = client.query(sql, &[]).await.unwrap_err();
    let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e}"));
    assert_eq!(db.code().code(), sqlstate, "{sql}: {}", db.message());
    message
}

/// What PostgreSQL prints for a sample (the codec's canonical text output).
fn expected_text(ty: ClientType, text: Option<&str>) -> Option<String> {
    let t = text?;
    let canonical = encode_for_encryption(ty, WireFormat::Text, t.as_bytes()).unwrap();
    Some(
        String::from_utf8(
            pgward::crypto::decode_to_wire(ty, WireFormat::Text, &canonical).unwrap(),
        )
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_decrypt_every_type_in_text_and_binary() {
    let fx = fixture().await;
    for i in 0..4 {
        fx.seed_directly(i as i32, i).await;
    }
    let client = fx.client().await;

    // Simple protocol (text format): every value as PostgreSQL would print it.
    let rows = simple_rows(
        &client,
        &format!("SELECT id, {} FROM vault_items ORDER BY id", column_list()),
    )
    .await;
    assert_eq!(rows.len(), 4);
    for (i, row) in rows.iter().enumerate() {
        for (j, (c, ty, _)) in COLUMNS.iter().enumerate() {
            assert_eq!(
                row[j + 1],
                expected_text(*ty, samples(*ty)[i]),
                "{c} row {i}"
            );
        }
    }

    // Extended protocol (tokio-postgres asks for binary results): types as configured.
    let stmt = client
        .prepare(&format!(
            "SELECT {} FROM vault_items WHERE id = $1",
            column_list()
        ))
        .await
        .unwrap();
    let types: Vec<Type> = stmt.columns().iter().map(|c| c.type_().clone()).collect();
    assert_eq!(
        types,
        vec![
            Type::TEXT,
            Type::VARCHAR,
            Type::INT4,
            Type::INT8,
            Type::NUMERIC,
            Type::BOOL,
            Type::DATE,
            Type::TIMESTAMPTZ,
            Type::BYTEA,
            Type::JSONB
        ]
    );
    let row = client.query_one(&stmt, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "héllo wörld ✓ 日本");
    assert_eq!(row.get::<_, String>(1), "héllo wörld ✓ 日本");
    assert_eq!(row.get::<_, i32>(2), i32::MIN);
    assert_eq!(row.get::<_, i64>(3), i64::MIN);
    assert!(!row.get::<_, bool>(5));
    assert_eq!(row.get::<_, Vec<u8>>(8), vec![0x00, 0xff, 0x10]);
    // jsonb in binary: version byte 1, then the document.
    let jsonb = row.get::<_, JsonbRaw>(9).0;
    assert_eq!(jsonb, "{\"k\": [1, \"ü\"]}".as_bytes().to_vec());
    let empty = client.query_one(&stmt, &[&0i32]).await.unwrap();
    assert_eq!(empty.get::<_, String>(0), "");
    let nulls = client.query_one(&stmt, &[&3i32]).await.unwrap();
    for j in 0..COLUMNS.len() {
        assert!(
            nulls.try_get::<_, Option<String>>(j).is_err()
                || nulls.get::<_, Option<String>>(j).is_none()
        );
    }
    assert_eq!(nulls.get::<_, Option<i32>>(2), None);

    // Blind-index companions never reach clients, not even through `*`.
    let star = client.prepare("SELECT * FROM vault_items").await.unwrap();
    assert!(star.columns().iter().all(|c| !c.name().ends_with("_bidx")));
    assert_eq!(star.columns().len(), 2 + COLUMNS.len());
    let star_rows = simple_rows(&client, "SELECT * FROM vault_items WHERE id = 1").await;
    assert_eq!(star_rows[0].len(), 2 + COLUMNS.len());
}

/// A row that fails to decrypt ends the client's view of its pipeline at the error, but the
/// server runs everything after it up to the Sync: the audit records and the registry of
/// prepared statements follow the server, not the client's truncated view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_value_fails_to_decrypt_the_audit_and_prepared_statements_follow_the_server() {
    let fx = fixture_with(|dir| harness::audit_toml(&dir.join("audit"), "fsync = false")).await;
    let log = fx._dir.path().join("audit");
    fx.seed_directly(1, 1).await;
    let db = direct(&fx.database).await;
    db.batch_execute(
        "UPDATE vault_items SET c_text = set_byte(c_text, 29, (get_byte(c_text, 29) + 1) % 256) WHERE id = 1;
         CREATE TABLE pipeline_log (n int)",
    )
    .await
    .unwrap();
    let mut raw = harness::raw_proxied(&fx.proxy, &fx.database).await;
    use harness::msg;
    raw.send(&msg::batch(&[
        msg::parse("", "SELECT c_text FROM vault_items WHERE id = 1"),
        msg::bind("", "", &[], false),
        msg::execute("", 0),
        msg::parse("logged", "INSERT INTO pipeline_log VALUES (7)"),
        msg::bind("", "logged", &[], false),
        msg::execute("", 0),
        msg::sync(),
    ]))
    .await;
    let replies = raw.until_ready(1).await;
    let errors = harness::error_texts(&replies);
    assert_eq!(errors.len(), 1, "{replies:?}");
    assert!(errors[0].contains("XX001"), "{errors:?}");
    // The server ran the INSERT after the row the client got an error for, and committed it.
    let count: i64 = db
        .query_one("SELECT count(*) FROM pipeline_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
    // pgward knows the server prepared `logged`: a Bind of it is forwarded and runs.
    raw.send(&msg::batch(&[
        msg::bind("", "logged", &[], false),
        msg::execute("", 0),
        msg::sync(),
    ]))
    .await;
    let replies = raw.until_ready(1).await;
    assert!(harness::error_texts(&replies).is_empty(), "{replies:?}");
    assert!(replies.iter().any(|(tag, _)| *tag == b'C'), "{replies:?}");
    drop(raw);
    // The audit says what the server did: the SELECT ran (its client got XX001), and both
    // INSERTs ran and completed.
    let completion_of = |needle: &str| -> Vec<serde_json::Value> {
        let all = harness::audit_records(&log);
        let seqs: Vec<_> = all
            .iter()
            .filter(|r| {
                r["kind"] == "statement" && r["sql"].as_str().unwrap_or("").contains(needle)
            })
            .map(|r| r["seq"].clone())
            .collect();
        all.iter()
            .filter(|r| r["kind"] == "statement_completed" && seqs.contains(&r["statement_seq"]))
            .cloned()
            .collect()
    };
    let mut select = Vec::new();
    let mut inserts = Vec::new();
    for _ in 0..100 {
        select = completion_of("FROM vault_items");
        inserts = completion_of("INTO pipeline_log");
        if select.len() == 1 && inserts.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(select.len(), 1, "{select:?}");
    assert_eq!(select[0]["sqlstate"], "XX001", "{select:?}");
    assert_eq!(inserts.len(), 2, "{inserts:?}");
    for insert in &inserts {
        assert!(insert.get("skipped").is_none(), "{insert}");
        assert_eq!(insert["command"], "INSERT", "{insert}");
        assert_eq!(insert["rows"], 1, "{insert}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_copied_to_another_row_or_column_fails_to_decrypt() {
    let fx = fixture().await;
    fx.seed_directly(1, 1).await;
    fx.seed_directly(2, 2).await;
    let db = direct(&fx.database).await;
    // Another row's value into another column: the AAD binds table and column (not the row:
    // a value copied within one column still decrypts, see crypto/mod.rs).
    db.batch_execute(
        "UPDATE vault_items SET c_varchar = (SELECT c_text FROM vault_items WHERE id = 1) WHERE id = 2",
    )
        .await
        .unwrap();
    let client = fx.client().await;
    let e = client
        .query("SELECT c_varchar FROM vault_items WHERE id = 2", &[])
        .await
        .unwrap_err();
    let db_error = e.as_db_error().expect("a server error");
    assert_eq!(db_error.code().code(), "XX001");
    assert!(db_error.message().contains("vault_items.c_varchar"));
    assert!(!db_error.message().contains("héllo"));
    // The session keeps working, and the intact row still decrypts.
    let ok = client
        .query_one("SELECT c_text FROM vault_items WHERE id = 2", &[])
        .await
        .unwrap();
    assert_eq!(ok.get::<_, Option<String>>(0).as_deref(), Some("a'b\\c"));
    // Simple protocol: same error, and no ciphertext passed off as text.
    let e = client
        .simple_query("SELECT id, c_varchar FROM vault_items ORDER BY id")
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "XX001");
    // Tampering with one byte.
    // One byte changed (always: a byte set to a fixed value may already have had it).
    db.batch_execute(
        "UPDATE vault_items SET c_text = set_byte(c_text, 29, (get_byte(c_text, 29) + 1) % 256) WHERE id = 1",
    )
    .await
    .unwrap();
    let e = client
        .query("SELECT c_text FROM vault_items WHERE id = 1", &[])
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "XX001");
    assert_eq!(
        client
            .query_one("SELECT 1::int", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

/// A value sent as-is in binary format, whatever the parameter's type.
#[derive(Debug)]
struct Bin(Vec<u8>);

impl tokio_postgres::types::ToSql for Bin {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    tokio_postgres::types::to_sql_checked!();
}

/// SQL literal for a sample value (text form, quoted), NULL as NULL.
fn sql_literal(text: Option<&str>) -> String {
    match text {
        None => "NULL".into(),
        Some(t) => format!("'{}'", t.replace('\'', "''")),
    }
}

/// The raw stored bytes of every encrypted column, read directly (not through pgward).
async fn stored_bytes(database: &str) -> Vec<Vec<u8>> {
    let db = direct(database).await;
    let mut out = Vec::new();
    for row in db
        .query(&format!("SELECT {} FROM vault_items", column_list()), &[])
        .await
        .unwrap()
    {
        for j in 0..COLUMNS.len() {
            if let Some(b) = row.get::<_, Option<Vec<u8>>>(j) {
                out.push(b);
            }
        }
    }
    out
}

/// The whole table as `COPY … TO STDOUT` text, read directly.
async fn table_dump(database: &str) -> String {
    use futures_util::StreamExt;
    let db = direct(database).await;
    let stream = db.copy_out("COPY vault_items TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `secret` is nowhere upstream: not in the stored bytes, not in a dump (raw or as hex).
async fn assert_absent_upstream(database: &str, secret: &str) {
    for b in stored_bytes(database).await {
        assert_eq!(b.first(), Some(&1u8), "every stored value is a v1 envelope");
        assert!(!contains(&b, secret.as_bytes()), "plaintext stored");
    }
    let dump = table_dump(database).await;
    assert!(!dump.contains(secret), "plaintext in a table dump");
    assert!(
        !dump.contains(&hex::encode(secret)),
        "plaintext (hex) in a table dump"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_encrypt_literals_and_parameters_in_both_protocols() {
    let fx = fixture().await;
    let client = fx.client().await;
    // Simple protocol: literals of every type (and NULL, empty, unicode) encrypted by pgward.
    for i in 0..4 {
        let values: Vec<String> = COLUMNS
            .iter()
            .map(|(_, ty, _)| sql_literal(samples(*ty)[i]))
            .collect();
        client
            .simple_query(&format!(
                "INSERT INTO vault_items (id, {}) VALUES ({}, {})",
                column_list(),
                100 + i,
                values.join(", ")
            ))
            .await
            .unwrap();
    }
    let rows = simple_rows(
        &client,
        &format!(
            "SELECT {} FROM vault_items WHERE id >= 100 ORDER BY id",
            column_list()
        ),
    )
    .await;
    for (i, row) in rows.iter().enumerate() {
        for (j, (c, ty, _)) in COLUMNS.iter().enumerate() {
            assert_eq!(row[j], expected_text(*ty, samples(*ty)[i]), "{c} row {i}");
        }
    }

    // Extended protocol, binary parameters of the configured client types.
    let insert = client
        .prepare(&format!(
            "INSERT INTO vault_items (id, {}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            column_list()
        ))
        .await
        .unwrap();
    let param_types: Vec<Type> = insert.params().to_vec();
    assert_eq!(
        param_types[1],
        Type::TEXT,
        "ParameterDescription shows client types"
    );
    assert_eq!(param_types[3], Type::INT4);
    assert_eq!(param_types[8], Type::TIMESTAMPTZ);
    let big = "é".repeat(512 * 1024); // 1 MiB of UTF-8
    let numeric = Bin(vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 42]); // 42 in numeric binary
    let date = Bin(9_000i32.to_be_bytes().to_vec());
    let tstz = Bin(1_000_000i64.to_be_bytes().to_vec());
    let mut jsonb = vec![1u8];
    jsonb.extend_from_slice(br#"{"a": "b"}"#);
    let jsonb = Bin(jsonb);
    client
        .execute(
            &insert,
            &[
                &200i32,
                &big,
                &"",
                &7i32,
                &-7i64,
                &numeric,
                &true,
                &date,
                &tstz,
                &vec![0u8, 1, 2],
                &jsonb,
            ],
        )
        .await
        .unwrap();
    let none: Option<String> = None;
    let none_i: Option<i32> = None;
    client
        .execute(
            "INSERT INTO vault_items (id, c_text, c_int4) VALUES ($1, $2, $3)",
            &[&201i32, &none, &none_i],
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            &format!("SELECT {} FROM vault_items WHERE id = 200", column_list()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), big);
    assert_eq!(row.get::<_, String>(1), "");
    assert_eq!(row.get::<_, i32>(2), 7);
    assert_eq!(row.get::<_, i64>(3), -7);
    assert!(row.get::<_, bool>(5));
    assert_eq!(row.get::<_, Vec<u8>>(8), vec![0, 1, 2]);
    let text = simple_rows(
        &client,
        "SELECT c_numeric, c_date, c_tstz, c_jsonb FROM vault_items WHERE id = 200",
    )
    .await;
    assert_eq!(
        text[0],
        vec![
            Some("42".to_string()),
            Some("2024-08-22".to_string()),
            Some("2000-01-01 00:00:01+00".to_string()),
            Some(r#"{"a": "b"}"#.to_string())
        ]
    );
    let nulls = client
        .query_one("SELECT c_text, c_int4 FROM vault_items WHERE id = 201", &[])
        .await
        .unwrap();
    assert_eq!(nulls.get::<_, Option<String>>(0), None);
    assert_eq!(nulls.get::<_, Option<i32>>(1), None);

    // UPDATE and upsert, literal and parameter.
    client
        .simple_query("UPDATE vault_items SET c_text = 'updated-secret-1' WHERE id = 100")
        .await
        .unwrap();
    client
        .execute(
            "UPDATE vault_items SET c_varchar = $1 WHERE id = $2",
            &[&"updated-secret-2", &101i32],
        )
        .await
        .unwrap();
    direct(&fx.database)
        .await
        .batch_execute("CREATE UNIQUE INDEX ON vault_items (c_text_bidx)")
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO vault_items (id, c_text) VALUES ($1, $2) ON CONFLICT (c_text) DO UPDATE SET c_varchar = $3",
            &[&300i32, &"updated-secret-1", &"upserted-secret-3"],
        )
        .await
        .unwrap();
    let r = client
        .query_one(
            "SELECT id, c_text, c_varchar FROM vault_items WHERE c_text = $1",
            &[&"updated-secret-1"],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i32>(0), 100);
    assert_eq!(r.get::<_, String>(2), "upserted-secret-3");
    let r = client
        .query_one("SELECT c_varchar FROM vault_items WHERE id = 101", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "updated-secret-2");

    // Upstream holds only ciphertext.
    for secret in [
        "updated-secret-1",
        "updated-secret-2",
        "upserted-secret-3",
        "héllo wörld",
        "deadbeef",
    ] {
        assert_absent_upstream(&fx.database, secret).await;
    }
    assert!(!contains(
        &stored_bytes(&fx.database).await.concat(),
        "éééééééé".as_bytes()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_index_equality_search_and_refused_computations() {
    let fx = fixture().await;
    let client = fx.client().await;
    for (id, email) in [(1, "a@x.example"), (2, "b@x.example"), (3, "a@x.example")] {
        client
            .execute(
                "INSERT INTO vault_items (id, c_text, c_int4, c_varchar) VALUES ($1, $2, $3, 'v')",
                &[&id, &email, &id],
            )
            .await
            .unwrap();
    }
    client
        .simple_query("INSERT INTO vault_items (id) VALUES (4)")
        .await
        .unwrap();
    let ids = |rows: Vec<tokio_postgres::Row>| -> Vec<i32> {
        let mut v: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        v.sort();
        v
    };
    // Extended protocol, parameters turned into blind indexes.
    let q = |sql: &'static str| sql;
    assert_eq!(
        ids(client
            .query(
                q("SELECT id FROM vault_items WHERE c_text = $1"),
                &[&"a@x.example"]
            )
            .await
            .unwrap()),
        vec![1, 3]
    );
    assert_eq!(
        ids(client
            .query(q("SELECT id FROM vault_items WHERE c_int4 = $1"), &[&2i32])
            .await
            .unwrap()),
        vec![2]
    );
    assert_eq!(
        ids(client
            .query(
                "SELECT id FROM vault_items WHERE c_text IN ($1, $2)",
                &[&"b@x.example", &"nobody"]
            )
            .await
            .unwrap()),
        vec![2]
    );
    // Simple protocol, literals.
    let simple_ids = |rows: Vec<Vec<Option<String>>>| -> Vec<String> {
        rows.into_iter().filter_map(|r| r[0].clone()).collect()
    };
    assert_eq!(
        simple_ids(
            simple_rows(
                &client,
                "SELECT id FROM vault_items WHERE c_text <> 'a@x.example' ORDER BY id"
            )
            .await
        ),
        vec!["2"]
    );
    assert_eq!(
        simple_ids(simple_rows(&client, "SELECT id FROM vault_items WHERE c_text IS NULL").await),
        vec!["4"]
    );
    assert_eq!(
        simple_ids(
            simple_rows(
                &client,
                "SELECT v.id FROM vault_items v JOIN vault_items w ON v.c_text = w.c_text WHERE w.id = 3 ORDER BY 1"
            )
            .await
        ),
        vec!["1", "3"]
    );
    // Computations on ciphertext are refused, with the column named and no value echoed.
    for sql in [
        "SELECT id FROM vault_items WHERE c_text LIKE 'a%'",
        "SELECT id FROM vault_items WHERE c_int4 > 1",
        "SELECT id FROM vault_items ORDER BY c_text",
        "SELECT c_text, count(*) FROM vault_items GROUP BY c_text",
        "SELECT DISTINCT c_text FROM vault_items",
        "SELECT upper(c_text) FROM vault_items",
        "SELECT id FROM vault_items WHERE c_varchar = 'v'",
        "SELECT c_text FROM vault_items UNION SELECT c_text FROM vault_items",
        "UPDATE vault_items SET c_text = upper('secret-x')",
        "INSERT INTO vault_items (id, c_text) SELECT 9, 'secret-y'",
        "COPY vault_items FROM STDIN",
        "SELECT id FROM vault_items WHERE c_text = c_varchar",
    ] {
        let message = refused_in_both_protocols(&client, sql, "0A000").await;
        assert!(message.contains("vault_items"), "{sql}: {message}");
        assert!(!message.contains("secret-"), "{sql}: {message}");
    }
    // RETURNING decrypts too (PostgreSQL reports the column's origin).
    let r = client
        .query_one(
            "INSERT INTO vault_items (id, c_text) VALUES (5, $1) RETURNING id, c_text",
            &[&"r@x.example"],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(1), "r@x.example");
    assert_absent_upstream(&fx.database, "a@x.example").await;
}

/// jsonb as received in binary format, without the version byte.
struct JsonbRaw(Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for JsonbRaw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        match raw.split_first() {
            Some((1, doc)) => Ok(JsonbRaw(doc.to_vec())),
            _ => Err("bad jsonb".into()),
        }
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
}

async fn copy_rows(
    client: &Client,
    sql: &str,
    chunks: &[&[u8]],
) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = client.copy_in(sql).await?;
    futures_util::pin_mut!(sink);
    for chunk in chunks {
        sink.send(bytes::Bytes::copy_from_slice(chunk)).await?;
    }
    sink.finish().await
}

/// A second Parse of a prepared name is refused as PostgreSQL refuses it, so the Binds after
/// it are sealed by the plan of the statement the server runs (replacing the plan sent the
/// value in clear into the encrypted column of the first statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_parse_of_a_prepared_name_cannot_change_how_its_binds_are_sealed() {
    use harness::msg;
    let fx = fixture().await;
    let mut raw = harness::raw_proxied(&fx.proxy, &fx.database).await;
    raw.send(&msg::batch(&[
        msg::parse("s7", "INSERT INTO vault_items (id, c_text) VALUES ($1, $2)"),
        msg::sync(),
    ]))
    .await;
    let replies = raw.until_ready(1).await;
    assert!(replies.iter().any(|(t, _)| *t == b'1'), "{replies:?}");
    raw.send(&msg::batch(&[
        msg::parse("s7", "SELECT $1::int, $2::text"),
        msg::sync(),
        msg::bind("", "s7", &[Some("41"), Some("reparse-secret")], false),
        msg::execute("", 0),
        msg::sync(),
    ]))
    .await;
    let replies = raw.until_ready(2).await;
    let errors = harness::error_texts(&replies);
    assert_eq!(errors.len(), 1, "{replies:?}");
    assert!(errors[0].contains("42P05"), "{errors:?}");
    assert!(!table_dump(&fx.database).await.contains("reparse-secret"));
    let row = fx
        .client()
        .await
        .query_one("SELECT c_text FROM vault_items WHERE id = 41", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "reparse-secret");
}

/// A portal runs the statement it was bound to, as in PostgreSQL, even when its name is
/// closed and parsed again before the Execute: the COPY's rows are still sealed by the
/// COPY's plan (looking the plan up by the statement's name at Execute sent them in clear).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_portal_keeps_its_statement_when_the_name_is_parsed_again_before_execute() {
    use harness::msg;
    let fx = fixture().await;
    let mut raw = harness::raw_proxied(&fx.proxy, &fx.database).await;
    raw.send(&msg::batch(&[
        msg::parse("s1", "COPY vault_items (id, c_text) FROM STDIN"),
        msg::bind("p1", "s1", &[], false),
        msg::close_statement("s1"),
        msg::parse("s1", "SELECT 1"),
        msg::execute("p1", 0),
    ]))
    .await;
    let mut seen = Vec::new();
    while let Some(message) = raw.recv().await {
        seen.push(message.tag());
        if matches!(message.tag(), b'G' | b'E') {
            break;
        }
    }
    assert_eq!(seen.last(), Some(&b'G'), "no CopyInResponse: {seen:?}");
    raw.send(&msg::batch(&[
        msg::copy_data(b"31\treparsed-copy-secret\n"),
        msg::copy_done(),
        msg::sync(),
    ]))
    .await;
    let replies = raw.until_ready(1).await;
    assert!(
        replies.iter().any(|(tag, _)| *tag == b'C') && !replies.iter().any(|(tag, _)| *tag == b'E'),
        "{replies:?}"
    );
    assert!(!table_dump(&fx.database)
        .await
        .contains("reparsed-copy-secret"));
    let row = fx
        .client()
        .await
        .query_one("SELECT c_text FROM vault_items WHERE id = 31", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "reparsed-copy-secret");
}

/// CSV with an escape of its own (`ESCAPE '\\'`): rows and fields are read as the server
/// reads them, so no row can hide inside what the relay took for a quoted field and reach
/// the table in clear — neither after an escaped escape (`"\\\\"` closes its quote) nor after
/// an end-of-data line the server reads as data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_csv_with_an_escape_is_read_as_the_server_reads_it() {
    let fx = fixture().await;
    let client = fx.client().await;
    let sql = "COPY vault_items (id, note, c_text) FROM STDIN WITH (FORMAT csv, ESCAPE '\\')";
    let n = copy_rows(
        &client,
        sql,
        &[b"5,\"\\\\\",csv-escape-secret\n6,\\\"\",x\n"],
    )
    .await
    .unwrap();
    assert_eq!(n, 2);
    let n = copy_rows(
        &client,
        sql,
        &[b"7,\"\\\\\"\",x\n\\.\n\",csv-escape-secret-2\n8,n,csv-escape-secret-3\n"],
    )
    .await
    .unwrap();
    assert_eq!(n, 2);
    let dump = table_dump(&fx.database).await;
    assert!(!dump.contains("csv-escape-secret"), "{dump}");
    let rows = simple_rows(
        &client,
        "SELECT id, note, c_text FROM vault_items ORDER BY id",
    )
    .await;
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        rows,
        vec![
            vec![s("5"), s("\\"), s("csv-escape-secret")],
            vec![s("6"), s("\\"), s("x")],
            vec![s("7"), s("\\,x\n\\.\n"), s("csv-escape-secret-2")],
            vec![s("8"), s("n"), s("csv-escape-secret-3")],
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_encrypts_text_and_csv_rows() {
    let fx = fixture().await;
    let client = fx.client().await;
    // Text format, rows split across messages, escapes, NULL, the last row without newline.
    let n = copy_rows(
        &client,
        "COPY vault_items (id, c_text, c_int4, note) FROM STDIN",
        &[
            b"1\tcopy-secret\\tone\t42\tplain note\n2\t\\N\t-",
            b"7\tx\n3\tcopy-secret-3\t\\N\t\\N",
        ],
    )
    .await
    .unwrap();
    assert_eq!(n, 3);
    // CSV with a header, CRLF line ends, quotes and an embedded newline and delimiter.
    let n = copy_rows(
        &client,
        "COPY vault_items (id, c_text, c_varchar) FROM STDIN WITH (FORMAT csv, HEADER true)",
        &[b"id,c_text,c_varchar\r\n10,\"csv, \"\"secret\"\"\nline2\",\r\n11,,plain-ish\r\n"],
    )
    .await
    .unwrap();
    assert_eq!(n, 2);
    let rows = simple_rows(
        &client,
        "SELECT id, c_text, c_int4, c_varchar, note FROM vault_items ORDER BY id",
    )
    .await;
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        rows,
        vec![
            vec![
                s("1"),
                s("copy-secret\tone"),
                s("42"),
                None,
                s("plain note")
            ],
            vec![s("2"), None, s("-7"), None, s("x")],
            vec![s("3"), s("copy-secret-3"), None, None, None],
            vec![s("10"), s("csv, \"secret\"\nline2"), None, None, None],
            vec![s("11"), None, None, s("plain-ish"), None],
        ]
    );
    // Blind indexes were filled.
    let hit = client
        .query(
            "SELECT id FROM vault_items WHERE c_text = $1",
            &[&"copy-secret-3"],
        )
        .await
        .unwrap();
    assert_eq!(hit.len(), 1);
    let hit = client
        .query("SELECT id FROM vault_items WHERE c_int4 = $1", &[&42i32])
        .await
        .unwrap();
    assert_eq!(hit.len(), 1);
    // A bad value fails the whole COPY, naming the column and not the value.
    let e = copy_rows(
        &client,
        "COPY vault_items (id, c_int4) FROM STDIN",
        &[b"20\t5\n21\tcopy-secret-notanint\n22\t6\n"],
    )
    .await
    .unwrap_err();
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("vault_items.c_int4"), "{e:?}");
    assert!(!msg.contains("copy-secret"), "{msg}");
    assert!(
        simple_rows(&client, "SELECT id FROM vault_items WHERE id >= 20")
            .await
            .is_empty()
    );
    // COPY TO and binary COPY are refused.
    for sql in [
        "COPY vault_items TO STDOUT",
        "COPY vault_items (id, c_text) FROM STDIN WITH (FORMAT binary)",
    ] {
        let e = client.simple_query(sql).await.unwrap_err();
        assert_eq!(e.as_db_error().unwrap().code().code(), "0A000", "{sql}");
    }
    client.simple_query("SELECT 1").await.unwrap();
    for secret in ["copy-secret", "line2"] {
        assert_absent_upstream(&fx.database, secret).await;
    }
}

/// Raw extended protocol: a portal described once and executed in row-limited steps, an
/// undescribed one, and a pipeline with an error: every DataRow decrypted, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portals_executed_in_steps_and_pipelines_decode_every_row() {
    use harness::msg;
    let fx = fixture().await;
    for i in 0..3 {
        fx.seed_directly(i as i32, i).await;
    }
    let mut raw = harness::raw_proxied(&fx.proxy, &fx.database).await;
    let text = |body: &[u8]| -> Vec<Option<String>> {
        let n = u16::from_be_bytes([body[0], body[1]]) as usize;
        let mut out = Vec::new();
        let mut at = 2;
        for _ in 0..n {
            let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
            at += 4;
            if len < 0 {
                out.push(None);
            } else {
                let len = len as usize;
                out.push(Some(
                    String::from_utf8_lossy(&body[at..at + len]).into_owned(),
                ));
                at += len;
            }
        }
        out
    };
    raw.send(&msg::batch(&[
        msg::parse("s", "SELECT id, c_text FROM vault_items ORDER BY id"),
        msg::bind("p", "s", &[], false),
        msg::describe_portal("p"),
        msg::execute("p", 1),
        msg::execute("p", 1),
        msg::execute("p", 0),
        msg::bind("", "s", &[], false),
        msg::execute("", 0),
        msg::parse("bad", "SELECT nope FROM vault_items"),
        msg::bind("", "s", &[], false),
        msg::execute("", 0),
        msg::sync(),
        msg::bind("", "s", &[], false),
        msg::execute("", 0),
        msg::sync(),
    ]))
    .await;
    let got = raw.until_ready(2).await;
    let rows: Vec<Vec<Option<String>>> = got
        .iter()
        .filter(|(tag, _)| *tag == b'D')
        .map(|(_, body)| text(body))
        .collect();
    let expected_row = |i: usize| {
        vec![
            Some(i.to_string()),
            samples(ClientType::Text)[i].map(str::to_string),
        ]
    };
    let mut expected: Vec<Vec<Option<String>>> = (0..3).map(expected_row).collect();
    expected.extend((0..3).map(expected_row)); // the unnamed portal
    expected.extend((0..3).map(expected_row)); // after the failed pipeline's Sync
    assert_eq!(rows, expected);
    let tags: Vec<u8> = got.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        tags.iter().filter(|t| **t == b's').count(),
        2,
        "two PortalSuspended"
    );
    assert_eq!(
        tags.iter().filter(|t| **t == b'T').count(),
        1,
        "only the client's own Describe answered"
    );
    assert_eq!(
        tags.iter().filter(|t| **t == b'E').count(),
        1,
        "the bad Parse"
    );

    // The statement's rows are described once per result formats: portals bound with binary
    // and text results in turn each decode in their own format.
    let mut batch = Vec::new();
    for binary in [true, false, true, false] {
        batch.push(msg::bind("", "s", &[], binary));
        batch.push(msg::execute("", 0));
    }
    batch.push(msg::sync());
    raw.send(&msg::batch(&batch)).await;
    let got = raw.until_ready(1).await;
    let rows: Vec<Vec<u8>> = got
        .iter()
        .filter(|(tag, _)| *tag == b'D')
        .map(|(_, body)| body.to_vec())
        .collect();
    assert_eq!(rows.len(), 12);
    for (n, body) in rows.iter().enumerate() {
        let i = n % 3;
        let binary = (n / 3) % 2 == 0;
        let id_len = if binary { 4 } else { i.to_string().len() };
        let id = &body[6..6 + id_len];
        match binary {
            true => assert_eq!(id, (i as i32).to_be_bytes(), "row {n}"),
            false => assert_eq!(id, i.to_string().as_bytes(), "row {n}"),
        }
        // Text in binary format is its UTF-8 bytes, as in text format.
        assert_eq!(
            text(&{
                let mut one = vec![0, 1];
                one.extend_from_slice(&body[6 + id_len..]);
                one
            })[0]
                .as_deref(),
            samples(ClientType::Text)[i],
            "row {n}"
        );
    }
}

/// The demo: encrypted customers.email (searchable), customers.ssn, invoices.card_number
/// (searchable), seeded through the library, behind the demo policies.
/// The demo schema, seeded with values encrypted by the demo keys, behind the demo policies
/// (billing, support, analytics) and the demo encryption settings.
async fn demo_proxy() -> (TestProxy, String, tempfile::TempDir) {
    let database = harness::fresh_database("encdemo", true).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    LocalProvider::generate_file(&key_file).unwrap();
    let enc_toml = pgward::cli::dev::demo_encryption_toml(&key_file);
    let crypto: pgward::crypto::CryptoConfig = toml::from_str(&enc_toml).unwrap();
    let manager = KeyManager::from_config(&crypto, None).unwrap();
    let seeded = pgward::cli::dev::seed_encrypted_demo(&direct(&database).await, &manager)
        .await
        .unwrap();
    assert_eq!(seeded, 30);
    let policies = std::fs::canonicalize("policies").unwrap();
    let mut extra_toml = format!(
        "[policy]\ndir = {policies:?}\ndatabase = \"{database}\"\ncatalog_service = \"app\"\n"
    );
    for service in ["billing", "support", "analytics"] {
        extra_toml.push_str(&format!(
            "[services.{service}]\nupstream_user = \"postgres\"\nupstream_password = {{ env = \"PGWARD_TEST_SUPERUSER_PASSWORD\" }}\n"
        ));
    }
    extra_toml.push_str(&enc_toml);
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml,
        ..ProxyOptions::default()
    })
    .await;
    (proxy, database, dir)
}

/// A client of `service` for tenant 1 of the demo.
async fn demo_client(proxy: &TestProxy, database: &str, service: &str) -> Client {
    let mut cfg = proxy.client_config(service, database);
    cfg.password(harness::token(
        service,
        serde_json::json!({ "tenant_id": 1 }),
    ));
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_schema_encrypted_behind_the_demo_policies() {
    let (proxy, database, _dir) = demo_proxy().await;
    let connect = |service: &'static str| demo_client(&proxy, &database, service);
    let billing = connect("billing").await;
    let rows = billing
        .query("SELECT name, email, ssn FROM customers ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    for r in &rows {
        let (name, email, ssn): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(
            pgward::cli::dev::demo_customer_values(&name),
            Some((email.clone(), ssn.clone()))
        );
        assert!(email.ends_with("@tenant1.example") && ssn.starts_with("101-"));
    }
    // Equality search through the blind index, inside the tenant filter.
    let hit = billing
        .query(
            "SELECT c.name, i.card_number FROM customers c JOIN invoices i ON i.customer_id = c.id WHERE c.email = $1",
            &[&"customer2@tenant1.example"],
        )
        .await
        .unwrap();
    assert_eq!(hit.len(), 1);
    assert!(hit[0].get::<_, String>(1).starts_with("4111-1111-1111-"));
    let other_tenant = simple_rows(
        &billing,
        "SELECT id FROM customers WHERE email = 'customer2@tenant2.example'",
    )
    .await;
    assert!(
        other_tenant.is_empty(),
        "another tenant's row found by email"
    );
    // A write through both layers: tenant preset by the policy, email and ssn encrypted.
    let r = billing
        .query_one(
            "INSERT INTO customers (name, email, ssn) VALUES ('New', 'new@tenant1.example', '999-99-9999') RETURNING tenant_id, email",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 1);
    assert_eq!(r.get::<_, String>(1), "new@tenant1.example");
    let r = billing
        .query_one(
            "SELECT ssn FROM customers WHERE email = $1",
            &[&"new@tenant1.example"],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "999-99-9999");
    // Through a cursor (a server-side cursor's DECLARE and FETCH): searched by blind index,
    // inside the tenant filter, and ssn — sealed to its row's key — decrypted from FETCH.
    billing.batch_execute("BEGIN").await.unwrap();
    billing
        .batch_execute(
            "DECLARE c CURSOR FOR SELECT name, ssn FROM customers WHERE email IN ('new@tenant1.example', 'customer2@tenant2.example')",
        )
        .await
        .unwrap();
    let fetched = simple_rows(&billing, "FETCH ALL FROM c").await;
    let expected = vec![Some("New".to_string()), Some("999-99-9999".to_string())];
    assert_eq!(fetched, vec![expected]);
    billing.batch_execute("COMMIT").await.unwrap();

    // support: ssn and card_number hidden, and so are their blind indexes.
    let support = connect("support").await;
    let star = support.prepare("SELECT * FROM customers").await.unwrap();
    let names: Vec<&str> = star.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["id", "tenant_id", "name", "email", "created_at"]);
    let rows = simple_rows(&support, "SELECT * FROM customers ORDER BY id").await;
    assert_eq!(rows[0].len(), 5);
    assert_eq!(rows[0][3].as_deref(), Some("customer1@tenant1.example"));
    for (sql, code) in [
        ("SELECT ssn FROM customers", "42501"),
        // The policy answers first: support must not learn that ssn is encrypted.
        (
            "SELECT id FROM customers WHERE ssn = '101-01-1001'",
            "42501",
        ),
        ("SELECT card_number FROM invoices", "42501"),
        (
            "SELECT id FROM invoices WHERE card_number = '4111-1111-1111-0001'",
            "42501",
        ),
    ] {
        let e = support.simple_query(sql).await.unwrap_err();
        let db = e.as_db_error().unwrap();
        assert_eq!(db.code().code(), code, "{sql}: {}", db.message());
        assert!(
            !db.message().contains("101-01") && !db.message().contains("4111"),
            "{sql}"
        );
        assert!(
            !db.message().contains("encrypt") && !db.message().contains("searchable"),
            "{sql}: {}",
            db.message()
        );
    }
    // analytics: email hidden, so no equality search on it either.
    let analytics = connect("analytics").await;
    let e = analytics
        .query(
            "SELECT count(*) FROM customers WHERE email = $1",
            &[&"customer1@tenant1.example"],
        )
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "42501");

    // Upstream: ciphertext only.
    let db = direct(&database).await;
    use futures_util::StreamExt;
    let mut dump = Vec::new();
    for table in ["customers", "invoices"] {
        let stream = db
            .copy_out(&format!("COPY {table} TO STDOUT"))
            .await
            .unwrap();
        futures_util::pin_mut!(stream);
        while let Some(chunk) = stream.next().await {
            dump.extend_from_slice(&chunk.unwrap());
        }
    }
    let dump = String::from_utf8_lossy(&dump);
    for secret in [
        "@tenant1.example",
        "999-99-9999",
        "101-01-1001",
        "4111-1111",
    ] {
        assert!(!dump.contains(secret), "{secret} in the dump");
        assert!(
            !dump.contains(&hex::encode(secret)),
            "{secret} (hex) in the dump"
        );
    }

    // Writes through a view could put plaintext into an encrypted base column: refused. (A
    // view created around pgward is known once the catalog reloads: after DDL through pgward
    // or SIGHUP.)
    direct(&database)
        .await
        .batch_execute("CREATE VIEW customers_v AS SELECT * FROM customers")
        .await
        .unwrap();
    let app = proxy.connect("app", &database).await;
    app.batch_execute("CREATE TABLE unrelated (x int)")
        .await
        .unwrap();
    app.batch_execute("SELECT 1").await.unwrap();
    let e = app
        .simple_query(
            "INSERT INTO customers_v (tenant_id, name, email) VALUES (1, 'v', 'leak@example')",
        )
        .await
        .unwrap_err();
    let db_error = e.as_db_error().unwrap();
    assert_eq!(db_error.code().code(), "0A000", "{}", db_error.message());
    assert!(db_error.message().contains("not a plain table"));
    let leaked = direct(&database)
        .await
        .query("SELECT 1 FROM customers WHERE name = 'v'", &[])
        .await
        .unwrap();
    assert!(leaked.is_empty());
}

/// Reads that would hand back ciphertext, a blind index or something computed from them in
/// another form — a whole-row value, a parenthesised set operation, a join alias, an ARRAY
/// subquery, a sort by position or output name, the blind-index column itself — are refused
/// in both protocols; the plain forms next to them still decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_would_return_ciphertext_in_another_form_are_refused() {
    let (proxy, database, _dir) = demo_proxy().await;
    let billing = demo_client(&proxy, &database, "billing").await;
    // What the database holds for the tenant: none of it may come back.
    let mut stored: Vec<Vec<u8>> = Vec::new();
    for row in direct(&database)
        .await
        .query(
            "SELECT email, email_bidx, ssn FROM customers WHERE tenant_id = 1",
            &[],
        )
        .await
        .unwrap()
    {
        for i in 0..3 {
            stored.push(row.get(i));
        }
    }
    assert_eq!(stored.len(), 15);
    let leaks = |text: &str| {
        stored.iter().any(|v| {
            let hex = hex::encode(v);
            text.contains(&hex[..32]) || contains(text.as_bytes(), v)
        }) || text.contains("\\x")
            || text.contains("@tenant1.example")
    };
    for (sql, named) in [
        ("SELECT c FROM customers c", "customers.email"),
        (
            "SELECT id, length(to_jsonb(c)->>'email') FROM customers c",
            "customers.email",
        ),
        (
            "(SELECT email FROM customers) UNION ALL (SELECT email FROM customers)",
            "customers.email",
        ),
        (
            "SELECT octet_length(j.email), j.email FROM (customers CROSS JOIN (SELECT 1 AS one) o) AS j",
            "customers.email",
        ),
        (
            "SELECT length(array_to_string(ARRAY(SELECT email FROM customers WHERE id = 4), ''))",
            "customers.email",
        ),
        ("SELECT id, email FROM customers ORDER BY 2", "customers.email"),
        (
            "SELECT email AS name FROM customers ORDER BY name",
            "customers.email",
        ),
        ("SELECT ssn FROM customers ORDER BY 1", "customers.ssn"),
        (
            "SELECT encode(email_bidx, 'hex') FROM customers",
            "blind index of encrypted column public.customers.email",
        ),
        (
            "SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM customers d WHERE d.email_bidx = c.email_bidx AND d.id <> c.id)",
            "blind index",
        ),
    ] {
        let message = refused_in_both_protocols(&billing, sql, "0A000").await;
        assert!(message.contains(named), "{sql}: {message}");
        assert!(!leaks(&message), "{sql}: {message}");
    }

    // Still served: search and plain selection (decrypted), a qualified column, a whole-row
    // value of a relation without encrypted columns, a derived table passing email through.
    let r = billing
        .query_one(
            "SELECT email FROM customers WHERE email = 'customer2@tenant1.example'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "customer2@tenant1.example");
    assert_eq!(
        simple_rows(&billing, "SELECT c.id FROM customers c")
            .await
            .len(),
        5
    );
    let rows = simple_rows(
        &billing,
        "SELECT x FROM (SELECT id, name FROM customers) x ORDER BY x.id",
    )
    .await;
    assert_eq!(rows.len(), 5);
    for r in &rows {
        let text = r[0].as_deref().unwrap();
        assert!(text.contains("Customer 1-"), "{text}");
        assert!(!leaks(text), "{text}");
    }
    let mut emails: Vec<String> = billing
        .query(
            "SELECT x.e FROM (SELECT email AS e FROM customers) x WHERE x.e IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    emails.sort();
    assert_eq!(emails.len(), 5);
    assert!(
        emails.iter().all(|e| e.ends_with("@tenant1.example")),
        "{emails:?}"
    );
}

/// Simple-protocol reads of encrypted columns that differ only in their literals share one
/// rewrite template (the transform decided on the columns, not the values), and still
/// decrypt, bind and filter per row; a literal that is sealed or blind-indexed never takes a
/// template — each is encrypted on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_encrypted_columns_share_a_template_and_sealed_literals_never_do() {
    let (proxy, database, _dir) = demo_proxy().await;
    let billing = demo_client(&proxy, &database, "billing").await;
    let db = direct(&database).await;
    let shape_hits = || {
        proxy
            .metrics
            .rewrites
            .shape_hits
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let customers = crate::policy_proxy::demo_customers(&database).await;
    // ssn is bound to its row's key: the template carries the key column too.
    let before = shape_hits();
    for (id, tenant, name) in &customers {
        let rows = simple_rows(
            &billing,
            &format!("SELECT name, ssn FROM customers WHERE id = {id}"),
        )
        .await;
        if *tenant == 1 {
            let (_, ssn) = pgward::cli::dev::demo_customer_values(name).unwrap();
            assert_eq!(rows, vec![vec![Some(name.clone()), Some(ssn)]], "id {id}");
        } else {
            assert!(
                rows.is_empty(),
                "tenant 2's customer {id} through a template"
            );
        }
    }
    let ssn_hits = shape_hits() - before;
    // The same shape through Parse/Bind with binary results: the template keeps the plan
    // of the row-key column it adds.
    for (id, _, name) in customers.iter().filter(|c| c.1 == 1).take(3) {
        let row = billing
            .query_one(&format!("SELECT ssn FROM customers WHERE id = {id}"), &[])
            .await
            .unwrap();
        let (_, ssn) = pgward::cli::dev::demo_customer_values(name).unwrap();
        assert_eq!(row.get::<_, String>(0), ssn);
        assert_eq!(row.len(), 1, "the row-key column stays hidden");
    }
    let before = shape_hits();
    for (id, _, _) in &customers {
        let cards = simple_rows(
            &billing,
            &format!("SELECT card_number FROM invoices WHERE customer_id = {id}"),
        )
        .await;
        for card in cards.iter().flatten().flatten() {
            assert!(card.starts_with("4111-1111-1111-"), "{card}");
        }
    }
    let card_hits = shape_hits() - before;
    // Each shape learned once; every other statement filled its template.
    let others = customers.len() as u64 - 1;
    assert_eq!(
        (ssn_hits, card_hits),
        (others, others),
        "template hits (ssn, card_number)"
    );

    // Sealed and blind-indexed literals: the exact path, one fresh ciphertext each.
    let before = shape_hits();
    for n in 1..=3 {
        billing
            .simple_query(&format!(
                "UPDATE customers SET email = 'shape{n}@tenant1.example' WHERE id = 1"
            ))
            .await
            .unwrap();
        let found = simple_rows(
            &billing,
            &format!("SELECT id FROM customers WHERE email = 'shape{n}@tenant1.example'"),
        )
        .await;
        assert_eq!(found, vec![vec![Some("1".to_string())]], "search {n}");
    }
    assert_eq!(shape_hits(), before, "a sealed literal took a template");
    let stored: Vec<u8> = db
        .query_one("SELECT email FROM customers WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!stored.is_empty() && !contains(&stored, b"shape3@tenant1.example"));
    let stored_bidx: Vec<u8> = db
        .query_one("SELECT email_bidx FROM customers WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!contains(&stored_bidx, b"shape3"));
}

/// The default provider: OpenBao's transit engine wraps the data keys, which live in the
/// policy database. A KEK rotation is picked up by the poller (new writes use a new data key,
/// old values keep decrypting), and with OpenBao stopped the cached keys keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transit_keys_rotation_and_outage_through_the_proxy() {
    let mut bao = crate::vault::Bao::start().await;
    let database = harness::fresh_database("enctransit", true).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &bao.token).unwrap();
    let key = harness::unique_name("demo_pii");
    let policies = std::fs::canonicalize("policies").unwrap();
    let mut extra_toml = format!(
        "[policy]\ndir = {policies:?}\ndatabase = \"{database}\"\ncatalog_service = \"billing\"\n\
         [services.billing]\nupstream_user = \"postgres\"\nupstream_password = {{ env = \"PGWARD_TEST_SUPERUSER_PASSWORD\" }}\n\
         [vault]\naddress = {:?}\ntoken_file = {token_file:?}\n\
         [keys]\nprovider = \"transit\"\npoll_interval = \"1s\"\n",
        bao.addr
    );
    for (table, column, searchable) in [("customers", "email", true), ("customers", "ssn", false)] {
        extra_toml.push_str(&format!(
            "[[encrypt]]\ntable = \"{table}\"\ncolumn = \"{column}\"\nkey = \"{key}\"\ntype = \"text\"\nsearchable = {searchable}\n"
        ));
    }
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml,
        ..ProxyOptions::default()
    })
    .await;
    let mut cfg = proxy.client_config("billing", &database);
    cfg.password(harness::token(
        "billing",
        serde_json::json!({ "tenant_id": 1 }),
    ));
    let (billing, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let insert = "INSERT INTO customers (name, email, ssn) VALUES ($1, $2, $3)";
    billing
        .execute(
            insert,
            &[&"before", &"before@rotation.example", &"111-11-1111"],
        )
        .await
        .unwrap();
    let db = direct(&database).await;
    let dek_of = |name: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one("SELECT email FROM customers WHERE name = $1", &[&name])
                .await
                .unwrap();
            pgward::crypto::peek_key_ref(&row.get::<_, Vec<u8>>(0))
                .unwrap()
                .dek_version
        }
    };
    let first = dek_of("before").await;
    let wrapped: i64 = db
        .query_one("SELECT count(*) FROM pgward.data_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        wrapped >= 1,
        "wrapped DEKs are stored in the policy database"
    );
    bao.rotate(&key).await;
    let mut rotated = false;
    for i in 0..60 {
        let name: &'static str = Box::leak(format!("after-{i}").into_boxed_str());
        billing
            .execute(insert, &[&name, &"after@rotation.example", &"222-22-2222"])
            .await
            .unwrap();
        if dek_of(name).await > first {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        rotated,
        "writes moved to a new data key after the KEK rotation"
    );
    // Vault down: cached keys keep serving reads, searches and writes.
    bao.stop();
    billing
        .execute(
            insert,
            &[&"outage", &"outage@rotation.example", &"333-33-3333"],
        )
        .await
        .unwrap();
    let rows = billing
        .query(
            "SELECT name, ssn FROM customers WHERE email IN ($1, $2) ORDER BY name",
            &[&"before@rotation.example", &"outage@rotation.example"],
        )
        .await
        .unwrap();
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![
            ("before".to_string(), "111-11-1111".to_string()),
            ("outage".to_string(), "333-33-3333".to_string())
        ]
    );
}

/// pgward as a separate process (`pgward serve --log trace`), to read everything it logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_never_appears_in_pgward_logs() {
    let fx = fixture().await;
    let port = pgward::pgserver::free_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    LocalProvider::generate_file(&key_file).unwrap();
    let config = harness::proxy_config_text(&ProxyOptions {
        extra_toml: encrypt_toml(&key_file),
        ..ProxyOptions::default()
    })
    .replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1);
    let config_file = dir.path().join("pgward.toml");
    std::fs::write(&config_file, config).unwrap();
    let log_file = dir.path().join("pgward.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["--log", "trace", "serve", "--config"])
        .env("NO_COLOR", "1")
        .arg(&config_file)
        .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("app")
        .password(harness::token("app", serde_json::json!({})))
        .dbname(&fx.database);
    let mut client = None;
    for _ in 0..100 {
        if let Ok((c, conn)) = cfg.connect(tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(client) = client else {
        let _ = child.kill();
        panic!(
            "pgward serve did not accept connections:\n{}",
            std::fs::read_to_string(&log_file).unwrap_or_default()
        );
    };
    client
        .simple_query("INSERT INTO vault_items (id, c_text, c_varchar) VALUES (1, 'log-secret-literal', 'log-secret-other')")
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO vault_items (id, c_text) VALUES ($1, $2)",
            &[&2i32, &"log-secret-param"],
        )
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT c_text FROM vault_items WHERE c_text = 'log-secret-literal'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    // Refused and failing statements carrying secrets.
    assert!(client
        .simple_query("SELECT id FROM vault_items WHERE c_text LIKE 'log-secret-like%'")
        .await
        .is_err());
    assert!(client
        .simple_query("INSERT INTO vault_items (id, c_int4) VALUES (3, 'log-secret-badint')")
        .await
        .is_err());
    assert!(client
        .simple_query("INSERT INTO vault_items (id, c_text) VALUES (4, 'log-secret-unparsable'")
        .await
        .is_err());
    direct(&fx.database)
        .await
        .batch_execute("UPDATE vault_items SET c_varchar = c_text WHERE id = 1")
        .await
        .unwrap();
    assert!(client
        .query("SELECT c_varchar FROM vault_items WHERE id = 1", &[])
        .await
        .is_err());
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        log.contains("DEBUG") || log.contains("TRACE") || log.contains("INFO"),
        "logging ran: {log}"
    );
    assert!(
        !log.contains("log-secret"),
        "plaintext in pgward's log:\n{log}"
    );
    assert!(
        !log.contains(&hex::encode("log-secret")),
        "hex plaintext in pgward's log"
    );
    assert_absent_upstream(&fx.database, "log-secret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_round_trips_and_searches_encrypted_columns() {
    let fx = fixture().await;
    let token = harness::token("app", serde_json::json!({}));
    let dsn = format!(
        "host=127.0.0.1 port={} user=app dbname={} password={token} sslmode=disable",
        fx.proxy.addr.port(),
        fx.database
    );
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/psycopg_encrypted.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .env("PGWARD_DSN", &dsn)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "psycopg checks failed (install with `pip install 'psycopg[binary]'`):\n{stdout}\n{stderr}"
    );
    assert_absent_upstream(&fx.database, "psycopg-secret").await;
}

#[tokio::test]
async fn a_pipeline_without_sync_after_an_error_costs_no_memory_per_request() {
    use harness::msg;
    let fx = fixture().await;
    let mut raw = harness::raw_proxied(&fx.proxy, &fx.database).await;
    // After the failed Parse the server discards everything until Sync, answering nothing:
    // pgward settles those requests as skipped as they are sent instead of keeping an entry
    // per request (its own tracker, field encryption's) for answers that never come.
    raw.send(&msg::parse("", "SELECT nope")).await;
    let executes = msg::batch(&vec![msg::execute("", 0); 4096]);
    for _ in 0..400 {
        assert!(raw.try_send(&executes).await, "the session must stay open");
    }
    raw.send(&msg::sync()).await;
    let answers = raw.until_ready(1).await;
    let errors = harness::error_texts(&answers);
    assert_eq!(errors.len(), 1, "one error, for the Parse: {errors:?}");
    // The same session goes on, its answers matched to its requests.
    raw.send(&msg::query("SELECT 41 + 1")).await;
    let answers = raw.until_ready(1).await;
    assert!(
        answers
            .iter()
            .any(|(tag, body)| *tag == b'D' && body.ends_with(b"42")),
        "{answers:?}"
    );
    // Other sessions are unaffected.
    let client = fx.proxy.connect("app", &fx.database).await;
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_views_and_materialized_views_decrypt() {
    let fx = fixture().await;
    fx.seed_directly(1, 1).await;
    // Made around pgward, as an application's migrations would: a view, a view over it with
    // a renamed and a computed column, and a materialized view (its copy of the ciphertext).
    direct(&fx.database)
        .await
        .batch_execute(
            "CREATE VIEW item_texts AS SELECT id, c_text, c_text_bidx, note FROM vault_items;
             CREATE VIEW item_texts_2 (ident, secret, l) AS
               SELECT id, c_text, length(c_text) FROM item_texts;
             CREATE MATERIALIZED VIEW item_ints AS SELECT id, c_int4, c_jsonb FROM vault_items;",
        )
        .await
        .unwrap();
    let expected = expected_text(ClientType::Text, samples(ClientType::Text)[1]);
    let client = fx.client().await;
    assert_eq!(
        simple_rows(&client, "SELECT id, c_text FROM item_texts").await,
        vec![vec![Some("1".to_string()), expected.clone()]]
    );
    // The blind index stays hidden through a view, as it is from the table.
    let row = client
        .query_one("SELECT * FROM item_texts", &[])
        .await
        .unwrap();
    assert_eq!(row.len(), 3, "id, c_text, note");
    assert_eq!(row.get::<_, Option<String>>(1), expected);
    // A view over the view: its origin is the inner view's column.
    let row = client
        .query_one("SELECT ident, secret, l FROM item_texts_2", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(1), expected);
    assert!(
        row.get::<_, i32>(2) > 0,
        "a column computed from ciphertext stays as the server computed it"
    );
    let row = client
        .query_one("SELECT c_int4, c_jsonb FROM item_ints WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(
        Some(row.get::<_, i32>(0).to_string()),
        expected_text(ClientType::Int4, samples(ClientType::Int4)[1])
    );
    // Describing the views left nothing behind: a session starts without an unnamed
    // statement, as it would on the server directly.
    use harness::msg;
    let mut raw = harness::raw_proxied(&fx.proxy, &fx.database).await;
    raw.send(&harness::msg::batch(&[
        msg::bind("", "", &[], false),
        msg::execute("", 0),
        msg::sync(),
    ]))
    .await;
    let replies = raw.until_ready(1).await;
    assert_eq!(replies.first().map(|m| m.0), Some(b'E'), "{replies:?}");
    assert!(
        String::from_utf8_lossy(&replies[0].1).contains("26000"),
        "{replies:?}"
    );
}

/// Field encryption under transaction pooling: prepared statements that read and write
/// encrypted columns follow their client across server connections (prepared again on one
/// that never saw them), and every execution encrypts its parameters and decrypts its rows,
/// whichever connection runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_encrypted_reads_and_writes_follow_their_client_across_pooled_connections() {
    let fx = fixture_with(|_| {
        format!(
            "{}unrestricted = true\npool_mode = \"transaction\"\npool_size = 2\npool_timeout = \"20s\"\n",
            harness::superuser_service("pooled")
        )
    })
    .await;
    for i in 0..3 {
        fx.seed_directly(i as i32, i).await;
    }
    let owner = fx.proxy.connect("pooled", &fx.database).await;
    let holder = fx.proxy.connect("pooled", &fx.database).await;
    let read = owner
        .prepare("SELECT pg_backend_pid(), c_text FROM vault_items WHERE id = $1")
        .await
        .unwrap();
    let write = owner
        .prepare("INSERT INTO vault_items (id, c_text) VALUES ($1, $2)")
        .await
        .unwrap();
    let mut pids = std::collections::HashSet::new();
    for round in 0..6i32 {
        let i = (round % 3) as usize;
        let row = owner.query_one(&read, &[&(i as i32)]).await.unwrap();
        let text: Option<String> = row.get(1);
        assert_eq!(
            text.as_deref(),
            samples(ClientType::Text)[i],
            "round {round}"
        );
        pids.insert(row.get::<_, i32>(0));
        // Another client holds a connection in a transaction: the owner's next statements
        // run on the other one.
        holder.batch_execute("BEGIN").await.unwrap();
        let held: i32 = holder
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let secret = format!("pooled secret {round}");
        owner
            .execute(&write, &[&(100 + round), &secret])
            .await
            .unwrap();
        let row = owner.query_one(&read, &[&(100 + round)]).await.unwrap();
        assert_eq!(row.get::<_, String>(1), secret);
        assert_ne!(row.get::<_, i32>(0), held, "round {round}");
        pids.insert(row.get::<_, i32>(0));
        holder.batch_execute("COMMIT").await.unwrap();
    }
    assert!(pids.len() >= 2, "ran on {pids:?}");
    for round in 0..6 {
        assert_absent_upstream(&fx.database, &format!("pooled secret {round}")).await;
    }
}

/// A Bind carrying as many values as the statement has upstream (the client's parameters plus
/// the blind index pgward derives) instead of the client's count: refused with PostgreSQL's
/// own error, never forwarded — forwarded, the server's count check would pass and store the
/// plaintext in the encrypted column, beside an index of the client's choosing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_with_the_upstream_parameter_count_is_refused_not_forwarded_in_clear() {
    use harness::msg;
    let (proxy, database, _dir) = demo_proxy().await;
    let claims = serde_json::json!({ "tenant_id": 1 });
    let mut raw = harness::raw_as(&proxy, "billing", &database, claims).await;
    let marker = "plain-bind-marker@example.com";
    raw.send(&msg::batch(&[
        msg::parse("u", "UPDATE customers SET email = $1 WHERE id = 1"),
        msg::bind("", "u", &[Some(marker), Some("\\x00")], false),
        msg::execute("", 0),
        msg::sync(),
    ]))
    .await;
    let replies = raw.until_ready(1).await;
    let errors = harness::error_texts(&replies);
    assert_eq!(errors.len(), 1, "{replies:?}");
    assert!(
        errors[0].contains("08P01")
            && errors[0].contains("bind message supplies 2 parameters")
            && !errors[0].contains(marker),
        "{errors:?}"
    );
    let stored: Vec<u8> = direct(&database)
        .await
        .query_one("SELECT email FROM customers WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !String::from_utf8_lossy(&stored).contains(marker),
        "the plaintext reached the table"
    );
    // The session goes on, and the right count still works.
    raw.send(&msg::batch(&[
        msg::bind("", "u", &[Some(marker)], false),
        msg::execute("", 0),
        msg::sync(),
    ]))
    .await;
    let replies = raw.until_ready(1).await;
    assert!(harness::error_texts(&replies).is_empty(), "{replies:?}");
}

/// A long chain of one operator parses into a tree as deep as the chain; walking it recursed
/// past a worker's stack and aborted the whole proxy (a 4 KB `SELECT 1+1+…`). Past pgward's
/// depth limit it is refused for that client before it is parsed; the proxy goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_chained_too_deep_is_refused_not_a_crash() {
    let (proxy, database, _dir) = demo_proxy().await;
    let billing = demo_client(&proxy, &database, "billing").await;
    for sql in [
        format!("SELECT 1{}", "+1".repeat(5000)),
        format!(
            "SELECT id FROM invoices WHERE id = 1{}",
            " AND id = 1".repeat(5000)
        ),
        format!(
            "SELECT card_number FROM invoices WHERE card_number = 'x'{}",
            " || 'x'".repeat(5000)
        ),
        "SELECT 1 UNION ALL ".repeat(5000) + "SELECT 1",
    ] {
        let e = billing.simple_query(&sql).await.expect_err("refused");
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
        assert_eq!(db.code().code(), "42501", "{db:?}");
        assert!(db.message().contains("operators deep"), "{db:?}");
    }
    // A chain within the limit still runs, and so does the session.
    let sum = billing
        .simple_query(&format!("SELECT 1{}", "+1".repeat(200)))
        .await
        .unwrap();
    let value = sum.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("201"));
    let other = demo_client(&proxy, &database, "support").await;
    other.simple_query("SELECT 1").await.unwrap();
}

/// A statement of megabytes takes its session's analysis seconds of CPU: the other sessions
/// on that worker are handed to the rest of the runtime meanwhile, and answer as usual. A
/// message of more statements than pgward analyses is refused before it is parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_huge_statement_costs_its_own_session_not_the_others() {
    // One worker: whatever waits behind the analysis on it shows at once.
    let (proxy, database, _dir) = demo_proxy().await;
    let heavy = demo_client(&proxy, &database, "billing").await;
    let list: Vec<String> = (0..60_000).map(|i| i.to_string()).collect();
    let huge = format!(
        "SELECT id FROM invoices WHERE id IN ({}) AND card_number = 'x'",
        list.join(",")
    );
    let others: Vec<Client> =
        futures_util::future::join_all((0..4).map(|_| demo_client(&proxy, &database, "support")))
            .await;
    let started = std::time::Instant::now();
    let running = tokio::spawn(async move { heavy.simple_query(&huge).await.map(|_| heavy) });
    let mut slowest = Duration::ZERO;
    while !running.is_finished() {
        for other in &others {
            let asked = std::time::Instant::now();
            other.simple_query("SELECT 1").await.unwrap();
            slowest = slowest.max(asked.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let heavy = running.await.unwrap().unwrap();
    assert!(
        slowest < took / 2 && slowest < Duration::from_secs(1),
        "the huge statement took {took:?}; another session waited up to {slowest:?}"
    );
    let e = heavy
        .simple_query(&"SELECT 1;".repeat(10_001))
        .await
        .expect_err("refused");
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert!(db.message().contains("statements in one message"), "{db:?}");
}
