//! The key-operations CLI, end to end: the real `pgward` binary against the harness
//! PostgreSQL and a real OpenBao dev server, following the README's key-rotation runbook.
use pgward::crypto::scope::KeyScope;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgward::config::Config;
use pgward::crypto::manager::KeyManager;
use pgward::crypto::{encode_for_encryption, peek_key_ref, ClientType, WireFormat};
use pgward::keys::store::{PgKeyStore, WrappedKeyStore};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use crate::harness;
use crate::vault::Bao;

/// A database, an OpenBao, and a pgward.toml encrypting `people.email` under `key`.
struct Setup {
    bao: Bao,
    _dir: tempfile::TempDir,
    config: PathBuf,
    database: String,
    key: String,
}

impl Setup {
    async fn new(key: &str, rows: i64) -> Setup {
        Self::with_extra(key, rows, "").await
    }

    /// Like [`Setup::new`], with more TOML appended to the configuration.
    async fn with_extra(key: &str, rows: i64, extra_toml: &str) -> Setup {
        let bao = Bao::start().await;
        let database = harness::fresh_database("keys_cli", false).await;
        let db = connect(&database).await;
        db.batch_execute(&format!(
            "CREATE TABLE people (id bigint PRIMARY KEY, email text, note text);
             INSERT INTO people SELECT g, 'user' || g || '@example.com', 'note ' || g FROM generate_series(1, {rows}) g;
             UPDATE people SET email = NULL WHERE id = 5;"
        ))
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("vault-token");
        std::fs::write(&token_file, format!("{}\n", bao.token)).unwrap();
        let config = dir.path().join("pgward.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[listen]
allow_plaintext_loopback = true
[upstream]
port = {port}
[vault]
address = "{addr}"
token_file = "{token}"
[keys]
poll_interval = "5s"
[[encrypt]]
table = "people"
column = "email"
key = "{key}"
type = "text"
searchable = true
{extra_toml}
"#,
                port = harness::postgres().port,
                addr = bao.addr,
                token = token_file.display(),
            ),
        )
        .unwrap();
        Setup {
            bao,
            _dir: dir,
            config,
            database,
            key: key.into(),
        }
    }

    fn database_url(&self) -> String {
        let pg = harness::postgres();
        format!(
            "postgresql://postgres:{}@127.0.0.1:{}/{}",
            pg.password, pg.port, self.database
        )
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        self.command_with(&self.config, args)
    }

    fn command_with(&self, config: &std::path::Path, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgward"));
        cmd.args(args)
            .arg("--config")
            .arg(config)
            .env("PGWARD_DATABASE_URL", self.database_url())
            .env_remove("VAULT_TOKEN")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Run `pgward <args> --config ...`: (exit code, stdout, stderr).
    async fn pgward(&self, args: &[&str]) -> (i32, String, String) {
        run(self.command(args), args).await
    }

    /// Run with another configuration file, which must be refused: the error on stderr.
    async fn pgward_refused(&self, config_text: &str, args: &[&str]) -> String {
        let path = self._dir.path().join("other.toml");
        std::fs::write(&path, config_text).unwrap();
        let (code, _, stderr) = run(self.command_with(&path, args), args).await;
        assert_eq!(code, 1, "{stderr}");
        stderr
    }

    async fn pgward_ok(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.pgward(args).await;
        assert_eq!(code, 0, "pgward {args:?} failed: {stderr}");
        stdout
    }

    /// A key manager built from the same configuration file, over its own connection: how
    /// a proxy sees the keys.
    async fn manager(&self) -> KeyManager {
        let config = Config::from_file(&self.config).unwrap();
        let store: Arc<dyn WrappedKeyStore> =
            Arc::new(PgKeyStore::new(Arc::new(connect(&self.database).await)));
        KeyManager::from_config(&config.crypto(), Some(store)).unwrap()
    }

    /// Start a slow job (25-row batches, 400 ms apart), SIGKILL it (no cleanup) as soon as it
    /// reports its first batch, and return that progress line.
    async fn kill_after_first_batch(&self, args: &[&str], job: &str) -> String {
        let mut args = args.to_vec();
        args.extend(["--batch-size", "25", "--pause-ms", "400"]);
        let mut child = self
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let prefix = format!("{job} public.people.email:");
        let first = loop {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .expect("a progress line")
                .unwrap()
                .expect("the job ended before its first batch");
            if line.starts_with(&prefix) {
                break line;
            }
        };
        child.kill().await.unwrap();
        first
    }

    async fn set_min_decryption_version(&self, version: u32) {
        self.bao
            .api(
                "POST",
                &format!("transit/keys/{}/config", self.key),
                Some(json!({ "min_decryption_version": version })),
            )
            .await
            .unwrap();
    }
}

async fn run(mut cmd: tokio::process::Command, args: &[&str]) -> (i32, String, String) {
    let out = cmd.output().await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("$ pgward {}\n{stdout}{stderr}", args.join(" "));
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

async fn connect(database: &str) -> tokio_postgres::Client {
    let (client, conn) = harness::postgres()
        .direct(database)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// The cells of the status-table row for DEK `dek` (`"index root"` for version 0).
fn dek_row(status: &str, key: &str, dek: &str) -> Vec<String> {
    status
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.len() >= 2 && cells[0] == key && cells[1] == dek)
        .unwrap_or_else(|| panic!("no row for DEK {dek} in:\n{status}"))
}

/// DEK version of every non-null `people.email`, read from the stored header.
async fn dek_versions(db: &tokio_postgres::Client) -> Vec<(i64, u32)> {
    db.query(
        "SELECT id, email FROM people WHERE email IS NOT NULL ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let ct: Vec<u8> = r.get(1);
        (r.get(0), peek_key_ref(&ct).unwrap().dek_version)
    })
    .collect()
}

/// Every stored email decrypts to its original value through `m`.
async fn assert_all_decrypt(m: &KeyManager, db: &tokio_postgres::Client, expected_rows: usize) {
    let rows = db
        .query("SELECT id, email FROM people WHERE email IS NOT NULL", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), expected_rows);
    for row in rows {
        let (id, ct): (i64, Vec<u8>) = (row.get(0), row.get(1));
        assert_eq!(
            m.decrypt("people", "email", &KeyScope::default(), &ct)
                .await
                .unwrap(),
            format!("user{id}@example.com").as_bytes(),
            "row {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_encrypt_existing_then_full_rotation_runbook() {
    let s = Setup::new("kc-pii", 300).await;
    let db = connect(&s.database).await;

    // Before migration, status names the plaintext column.
    let status = s.pgward_ok(&["keys", "status"]).await;
    assert!(
        status.contains("column public.people.email is not encrypted yet (stored as text"),
        "{status}"
    );

    // Clear refusals, non-zero exit: a column not in [[encrypt]], reencrypt before migration,
    // an inline Vault token, a key name that would escape its Vault path.
    let (code, _, err) = s
        .pgward(&["encrypt-existing", "--table", "people", "--column", "note"])
        .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("public.people.note is not configured for encryption"),
        "{err}"
    );
    let (code, _, err) = s.pgward(&["keys", "reencrypt"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("public.people.email is stored as text, not encrypted yet"),
        "{err}"
    );
    let config = std::fs::read_to_string(&s.config).unwrap();
    let err = s
        .pgward_refused(
            &config.replace("token_file", "token = \"s.x\"\ntoken_file"),
            &["keys", "status"],
        )
        .await;
    assert!(err.contains("unknown field `token`"), "{err}");
    let err = s
        .pgward_refused(
            &config.replace("\"kc-pii\"", "\"../../sys/seal\""),
            &["keys", "status"],
        )
        .await;
    assert!(err.contains("must be non-empty letters"), "{err}");

    // encrypt-existing: only ciphertext remains in the table.
    let out = s
        .pgward_ok(&[
            "encrypt-existing",
            "--table",
            "people",
            "--column",
            "email",
            "--batch-size",
            "64",
            "--pause-ms",
            "1",
        ])
        .await;
    assert!(out.contains("299 values encrypted"), "{out}");
    let columns: Vec<(String, String)> = db
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_name = 'people' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["id", "note", "email", "email_bidx"], "{columns:?}");
    assert!(columns
        .iter()
        .any(|c| c == &("email".into(), "bytea".into())));
    let leaked: i64 = db
        .query_one(
            "SELECT count(*) FROM people WHERE position('example.com'::bytea in email) > 0 \
             OR position('user'::bytea in email) > 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0, "plaintext left in the encrypted column");
    assert!(dek_versions(&db).await.iter().all(|&(_, v)| v == 1));
    let m = s.manager().await;
    assert_all_decrypt(&m, &db, 299).await;
    let probe =
        encode_for_encryption(ClientType::Text, WireFormat::Text, b"user42@example.com").unwrap();
    let bidx = m
        .blind_index("people", "email", &KeyScope::default(), &probe)
        .await
        .unwrap()
        .to_vec();
    let hit: i64 = db
        .query_one("SELECT id FROM people WHERE email_bidx = $1", &[&bidx])
        .await
        .unwrap()
        .get(0);
    assert_eq!(hit, 42);
    // Rerun is a no-op.
    let out = s
        .pgward_ok(&["encrypt-existing", "--table", "people", "--column", "email"])
        .await;
    assert!(out.contains(": 0 values encrypted"), "{out}");

    // Runbook step 1: rotate the KEK. A proxy picks it up and writes under a new DEK.
    s.bao.rotate(&s.key).await;
    let proxy = s.manager().await;
    proxy.refresh().await.unwrap();
    for id in 1001..=1010i64 {
        let ct = proxy
            .encrypt(
                "people",
                "email",
                &KeyScope::default(),
                format!("user{id}@example.com").as_bytes(),
            )
            .await
            .unwrap();
        db.execute(
            "INSERT INTO people (id, email) VALUES ($1, $2)",
            &[&id, &ct],
        )
        .await
        .unwrap();
    }

    // Step 2: status shows both KEK versions and rows per DEK.
    let status = s.pgward_ok(&["keys", "status"]).await;
    assert!(status.contains("1,2"), "{status}");
    assert_eq!(
        dek_row(&status, "kc-pii", "1"),
        ["kc-pii", "1", "v1", "299", "old: reencrypt; rewrap"]
    );
    assert_eq!(
        dek_row(&status, "kc-pii", "2"),
        ["kc-pii", "2", "v2", "10", "current (new writes)"]
    );
    assert!(
        status.contains("run `pgward keys rewrap` before raising"),
        "{status}"
    );

    // Raising min_decryption_version before rewrapping breaks the old keys: --verify says so.
    s.set_min_decryption_version(2).await;
    let (code, status, _) = s.pgward(&["keys", "status", "--verify"]).await;
    assert_eq!(code, 1, "{status}");
    assert!(
        dek_row(&status, "kc-pii", "1")[5].starts_with("FAILED"),
        "{status}"
    );
    assert!(dek_row(&status, "kc-pii", "index root")[5].starts_with("FAILED"));
    assert_eq!(dek_row(&status, "kc-pii", "2")[5], "ok");
    s.set_min_decryption_version(1).await;

    // Step 3: reencrypt moves every row to the newest DEK.
    let out = s
        .pgward_ok(&[
            "keys",
            "reencrypt",
            "--table",
            "people",
            "--batch-size",
            "40",
            "--pause-ms",
            "1",
        ])
        .await;
    assert!(
        out.contains("public.people.email: 299 values rewritten"),
        "{out}"
    );
    assert!(dek_versions(&db).await.iter().all(|&(_, v)| v == 2));
    let status = s.pgward_ok(&["keys", "status"]).await;
    assert_eq!(dek_row(&status, "kc-pii", "1")[3], "0");
    assert_eq!(dek_row(&status, "kc-pii", "2")[3], "309");

    // Step 4: rewrap, then raise min_decryption_version; everything still decrypts.
    let out = s.pgward_ok(&["keys", "rewrap"]).await;
    assert!(
        out.contains("kc-pii: 2 data keys rewrapped; all are now wrapped by KEK v2"),
        "{out}"
    );
    let keks: Vec<i32> = db
        .query(
            "SELECT kek_version FROM pgward.data_keys WHERE key_name = 'kc-pii'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keks, [2, 2, 2], "index root, DEK 1, DEK 2");
    let status = s.pgward_ok(&["keys", "status"]).await;
    assert!(
        status.contains("min_decryption_version may be raised to 2"),
        "{status}"
    );
    s.set_min_decryption_version(2).await;
    let status = s.pgward_ok(&["keys", "status", "--verify"]).await;
    for dek in ["index root", "1", "2"] {
        assert_eq!(dek_row(&status, "kc-pii", dek)[5], "ok", "{status}");
    }
    let cold = s.manager().await;
    let rows = db
        .query("SELECT id, email FROM people WHERE email IS NOT NULL", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 309);
    for row in rows {
        let (id, ct): (i64, Vec<u8>) = (row.get(0), row.get(1));
        assert_eq!(
            cold.decrypt("people", "email", &KeyScope::default(), &ct)
                .await
                .unwrap(),
            format!("user{id}@example.com").as_bytes()
        );
    }
    assert_eq!(
        cold.blind_index("people", "email", &KeyScope::default(), &probe)
            .await
            .unwrap()
            .to_vec(),
        bidx,
        "blind index unchanged by rotation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_jobs_killed_midway_resume_and_are_throttled() {
    let s = Setup::new("kc-resume", 400).await;
    let db = connect(&s.database).await;

    // encrypt-existing killed after its first batch: the plaintext column is untouched, the
    // twin partly filled; the rerun encrypts only the rest.
    let first = s
        .kill_after_first_batch(
            &["encrypt-existing", "--table", "people", "--column", "email"],
            "encrypt_existing",
        )
        .await;
    assert!(first.contains("25 rows scanned, 25 rewritten"), "{first}");
    let (email_type, filled): (String, i64) = {
        let r = db
            .query_one(
                "SELECT pg_typeof(email)::text, count(email__pgward_enc) FROM people GROUP BY 1",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(email_type, "text");
    assert!((25..399).contains(&filled), "{filled}");
    let out = s
        .pgward_ok(&[
            "encrypt-existing",
            "--table",
            "people",
            "--column",
            "email",
            "--batch-size",
            "200",
        ])
        .await;
    assert!(
        out.contains(&format!(": {} values encrypted", 399 - filled)),
        "{out}"
    );
    assert_all_decrypt(&s.manager().await, &db, 399).await;
    s.bao.rotate(&s.key).await;

    // reencrypt killed after its first batch.
    let first = s
        .kill_after_first_batch(&["keys", "reencrypt"], "reencrypt")
        .await;
    assert!(first.contains("25 rows scanned, 25 rewritten"), "{first}");

    let (last_pk, rows_done, finished): (Option<String>, i64, bool) = {
        let r = db
            .query_one(
                "SELECT last_pk, rows_done, finished_at IS NOT NULL FROM pgward.job_progress \
                 WHERE job = 'reencrypt' AND table_name = 'public.people' AND column_name = 'email'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert!(!finished);
    let moved = dek_versions(&db)
        .await
        .iter()
        .filter(|&&(_, v)| v == 2)
        .count() as i64;
    assert!((25..399).contains(&moved), "killed mid-way: {moved} moved");
    assert_eq!(
        last_pk.as_deref().map(|pk| pk.parse::<i64>().unwrap()),
        Some(rows_done + 1),
        "id 5 is NULL, so n values end at id n + 1"
    );

    // Rerun: continues after the saved key (first batch counts on from rows_done), rewrites
    // each remaining value exactly once, and pauses between batches.
    let started = Instant::now();
    let (code, out, err) = s
        .pgward(&[
            "keys",
            "reencrypt",
            "--batch-size",
            "100",
            "--pause-ms",
            "250",
        ])
        .await;
    let elapsed = started.elapsed();
    assert_eq!(code, 0, "{err}");
    let first = err
        .lines()
        .find(|l| l.starts_with("reencrypt public.people.email:"))
        .unwrap();
    assert!(
        first.contains(&format!("{} rows scanned", rows_done + 100)),
        "resumed, not restarted: {first}"
    );
    assert!(
        out.contains(&format!(
            "public.people.email: {} values rewritten",
            399 - moved
        )),
        "{out}"
    );
    // 399 - moved values over 100-row batches, with a 250 ms pause after each full batch.
    let pauses = ((399 - moved) / 100) as u32;
    assert!(
        elapsed >= Duration::from_millis(250) * pauses,
        "{elapsed:?} for {pauses} pauses"
    );
    assert!(dek_versions(&db).await.iter().all(|&(_, v)| v == 2));
    let finished: bool = db
        .query_one(
            "SELECT finished_at IS NOT NULL FROM pgward.job_progress WHERE job = 'reencrypt'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(finished);
    assert_all_decrypt(&s.manager().await, &db, 399).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_encrypt_existing_bytea_column_is_never_encrypted_twice() {
    let s = Setup::with_extra(
        "kc-bytea",
        50,
        "[[encrypt]]\ntable = \"people\"\ncolumn = \"photo\"\nkey = \"kc-bytea\"\ntype = \"bytea\"",
    )
    .await;
    let db = connect(&s.database).await;
    db.batch_execute(
        "ALTER TABLE people ADD COLUMN photo bytea; UPDATE people SET photo = convert_to('photo ' || id, 'UTF8')",
    )
    .await
    .unwrap();
    let args = ["encrypt-existing", "--table", "people", "--column", "photo"];
    let out = s.pgward_ok(&args).await;
    assert!(out.contains(": 50 values encrypted"), "{out}");
    // The column was bytea before and after: the rerun must recognise ciphertext, not encrypt it again.
    let out = s.pgward_ok(&args).await;
    assert!(out.contains(": 0 values encrypted"), "{out}");
    let m = s.manager().await;
    for row in db.query("SELECT id, photo FROM people", &[]).await.unwrap() {
        let (id, ct): (i64, Vec<u8>) = (row.get(0), row.get(1));
        assert_eq!(
            m.decrypt("people", "photo", &KeyScope::default(), &ct)
                .await
                .unwrap(),
            format!("photo {id}").as_bytes()
        );
    }
}

/// KEK versions come from Vault's wrapped forms, not from a hand-edited
/// `pgward.data_keys.kek_version`: `keys status` shows the real version, a proxy still picks up
/// the rotation, `keys rewrap` rewraps what Vault says is old. `keys reencrypt` skips values it
/// cannot read, names them by primary key, finishes the rest and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_trusts_vault_not_the_table_and_reencrypt_skips_unreadable_values() {
    let s = Setup::new("kc-trust", 40).await;
    let db = connect(&s.database).await;
    s.pgward_ok(&["encrypt-existing", "--table", "people", "--column", "email"])
        .await;
    s.bao.rotate(&s.key).await;
    // Someone with write access to the table claims every wrapped key is under KEK v999.
    db.execute("UPDATE pgward.data_keys SET kek_version = 999", &[])
        .await
        .unwrap();
    let status = s.pgward_ok(&["keys", "status"]).await;
    assert!(!status.contains("v999"), "{status}");
    assert_eq!(dek_row(&status, "kc-trust", "1")[2], "v1", "{status}");
    assert_eq!(dek_row(&status, "kc-trust", "index root")[2], "v1");
    assert!(
        !dek_row(&status, "kc-trust", "1")[4].contains("current"),
        "{status}"
    );
    // A proxy is not fooled either: the rotation gives new writes a new data key.
    let proxy = s.manager().await;
    let outcome = proxy.refresh_key(&s.key).await.unwrap();
    assert!(
        outcome.created && outcome.dek.dek_version == 2,
        "{outcome:?}"
    );
    let out = s.pgward_ok(&["keys", "rewrap"]).await;
    assert!(
        out.contains("kc-trust: 2 data keys rewrapped; all are now wrapped by KEK v2"),
        "{out}"
    );
    let wrapped: Vec<(i32, String)> = db
        .query(
            "SELECT kek_version, wrapped FROM pgward.data_keys WHERE key_name = 'kc-trust' ORDER BY dek_version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(wrapped.len(), 3);
    for (kek, w) in &wrapped {
        assert!(*kek == 2 && w.starts_with("vault:v2:"), "{kek} {w}");
    }

    // Two unreadable values: a 2-byte value and one with a flipped tag bit.
    db.batch_execute(
        "UPDATE people SET email = '\\x0102'::bytea WHERE id = 7;
         UPDATE people SET email = set_byte(email, length(email) - 1, get_byte(email, length(email) - 1) # 1) WHERE id = 9;",
    )
    .await
    .unwrap();
    let (code, stdout, stderr) = s
        .pgward(&["keys", "reencrypt", "--batch-size", "10", "--pause-ms", "1"])
        .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stdout.contains("public.people.email: 37 values rewritten"),
        "{stdout}"
    );
    assert!(
        stderr.contains("2 values could not be read") && stderr.contains("primary keys: 7, 9"),
        "{stderr}"
    );
    let headers: Vec<(i64, Vec<u8>)> = db
        .query(
            "SELECT id, email FROM people WHERE email IS NOT NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (id, ct) in headers {
        let version = peek_key_ref(&ct).map(|r| r.dek_version).ok();
        match id {
            7 => assert_eq!(version, None),
            9 => assert_eq!(version, Some(1)),
            _ => assert_eq!(version, Some(2), "row {id}"),
        }
    }
}
