//! Field encryption and key management against a real OpenBao and PostgreSQL.
use pgward::crypto::scope::KeyScope;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgward::crypto::manager::{CachePolicy, KeyManager};
use pgward::crypto::{peek_key_ref, ClientType, CryptoError, EncryptColumn, KeyFailure};
use pgward::keys::kv2::Kv2Provider;
use pgward::keys::store::{MemoryKeyStore, PgKeyStore, WrappedKeyStore};
use pgward::keys::transit::TransitProvider;
use pgward::keys::vault::{Health, VaultAuth, VaultClient, VaultClientConfig, VaultError};
use pgward::keys::{KeyError, KeyProvider};
use serde_json::json;
use zeroize::Zeroizing;

use crate::vault::Bao;

fn col(table: &str, column: &str, key: &str, searchable: bool) -> EncryptColumn {
    EncryptColumn {
        table: table.into(),
        column: column.into(),
        key: key.into(),
        ty: ClientType::Text,
        searchable,
        context_claim: None,
        bind_primary_key: false,
    }
}

fn policy(ttl: Duration) -> CachePolicy {
    CachePolicy {
        ttl,
        max_stale: Duration::from_secs(3600),
        blocking_threshold: 64 * 1024,
    }
}

fn client(bao: &Bao, auth: VaultAuth) -> Arc<VaultClient> {
    Arc::new(
        VaultClient::new(VaultClientConfig {
            address: bao.addr.clone(),
            auth,
            ca_file: None,
            request_timeout: Duration::from_secs(3),
        })
        .unwrap(),
    )
}

fn root(bao: &Bao) -> Arc<VaultClient> {
    client(bao, VaultAuth::Token(Zeroizing::new(bao.token.clone())))
}

fn transit(vault: &Arc<VaultClient>, store: &Arc<dyn WrappedKeyStore>) -> Arc<dyn KeyProvider> {
    Arc::new(TransitProvider::new(
        vault.clone(),
        "transit",
        store.clone(),
        true,
    ))
}

fn manager(
    provider: Arc<dyn KeyProvider>,
    vault: Option<Arc<VaultClient>>,
    cols: &[EncryptColumn],
    ttl: Duration,
) -> Arc<KeyManager> {
    Arc::new(KeyManager::new(provider, vault, cols, policy(ttl)).unwrap())
}

#[tokio::test]
async fn transit_datakey_unwrap_and_cache() {
    let bao = Bao::start().await;
    let vault = root(&bao);
    assert_eq!(vault.health().await.unwrap(), Health::Active);
    let store: Arc<dyn WrappedKeyStore> = Arc::new(MemoryKeyStore::default());
    let cols = [col("users", "email", "t1-pii", true)];

    let writer = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    let ct = writer
        .encrypt("users", "email", &KeyScope::default(), b"alice@example.com")
        .await
        .unwrap();
    assert_eq!(peek_key_ref(&ct).unwrap().dek_version, 1);
    assert!(!ct.windows(5).any(|w| w == b"alice"));

    // Only the wrapped DEK is at rest, wrapped under KEK version 1.
    let stored = store.list("t1-pii").await.unwrap();
    assert!(
        stored.iter().all(|d| d.wrapped.starts_with("vault:v1:")),
        "{stored:?}"
    );

    // A fresh manager (cold cache) unwraps through transit/decrypt, then serves from cache.
    let reader = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    assert_eq!(
        reader
            .decrypt("users", "email", &KeyScope::default(), &ct)
            .await
            .unwrap(),
        b"alice@example.com"
    );
    assert_eq!(
        writer
            .blind_index("users", "email", &KeyScope::default(), b"x")
            .await
            .unwrap(),
        reader
            .blind_index("users", "email", &KeyScope::default(), b"x")
            .await
            .unwrap()
    );
    let mut bao = bao;
    bao.stop();
    assert_eq!(
        reader
            .decrypt("users", "email", &KeyScope::default(), &ct)
            .await
            .unwrap(),
        b"alice@example.com",
        "served from cache"
    );
}

#[tokio::test]
async fn kek_rotation_during_write_loop() {
    let bao = Bao::start().await;
    let vault = root(&bao);
    let store: Arc<dyn WrappedKeyStore> = Arc::new(MemoryKeyStore::default());
    let cols = [col("orders", "card", "t2-pci", false)];
    let m = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    m.refresh().await.unwrap();
    let poller = m.spawn_poller(Duration::from_millis(200));

    let writer = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(4);
            let mut i = 0u32;
            while Instant::now() < deadline {
                let v = format!("card-{i}");
                out.push((
                    v.clone(),
                    m.encrypt("orders", "card", &KeyScope::default(), v.as_bytes())
                        .await
                        .unwrap(),
                ));
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bao.rotate("t2-pci").await;
    let written = writer.await.unwrap();
    poller.abort();

    let versions: Vec<u32> = written
        .iter()
        .map(|(_, ct)| peek_key_ref(ct).unwrap().dek_version)
        .collect();
    assert_eq!(versions.first(), Some(&1));
    assert_eq!(
        versions.last(),
        Some(&2),
        "writes after rotation use the new DEK"
    );
    assert!(
        versions.windows(2).all(|w| w[0] <= w[1]),
        "no write went back to the old DEK"
    );
    let dek2 = store.get("t2-pci", 2).await.unwrap().unwrap();
    assert_eq!(dek2.info.kek_version, 2);
    assert!(dek2.wrapped.starts_with("vault:v2:"));

    // Every value decrypts, also through a cold manager.
    let cold = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    for (plain, ct) in &written {
        assert_eq!(
            cold.decrypt("orders", "card", &KeyScope::default(), ct)
                .await
                .unwrap(),
            plain.as_bytes()
        );
    }
    // An explicit refresh (SIGHUP) after another rotation also switches.
    bao.rotate("t2-pci").await;
    let outcome = m.refresh().await.unwrap();
    assert!(outcome[0].created && outcome[0].kek_version == 3);
    assert_eq!(
        peek_key_ref(
            &m.encrypt("orders", "card", &KeyScope::default(), b"x")
                .await
                .unwrap()
        )
        .unwrap()
        .dek_version,
        3
    );
}

#[tokio::test]
async fn rewrap_then_min_decryption_version() {
    let bao = Bao::start().await;
    let vault = root(&bao);
    let store: Arc<dyn WrappedKeyStore> = Arc::new(MemoryKeyStore::default());
    let cols = [col("t", "c", "t3-key", false)];
    let m = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    let old_ct = m
        .encrypt("t", "c", &KeyScope::default(), b"old value")
        .await
        .unwrap();
    let old_wrapped = store.get("t3-key", 1).await.unwrap().unwrap().wrapped;
    bao.rotate("t3-key").await;
    m.refresh().await.unwrap();
    let new_ct = m
        .encrypt("t", "c", &KeyScope::default(), b"new value")
        .await
        .unwrap();

    let provider = transit(&vault, &store);
    // DEK 1 (KEK v1) and the index root (KEK v1) are rewrapped; DEK 2 is already on v2.
    assert_eq!(provider.rewrap("t3-key").await.unwrap(), 1);
    assert!(store
        .get("t3-key", 1)
        .await
        .unwrap()
        .unwrap()
        .wrapped
        .starts_with("vault:v2:"));
    assert_eq!(provider.rewrap("t3-key").await.unwrap(), 0, "idempotent");

    bao.api(
        "POST",
        "transit/keys/t3-key/config",
        Some(json!({"min_decryption_version": 2})),
    )
    .await
    .unwrap();
    let cold = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    assert_eq!(
        cold.decrypt("t", "c", &KeyScope::default(), &old_ct)
            .await
            .unwrap(),
        b"old value"
    );
    assert_eq!(
        cold.decrypt("t", "c", &KeyScope::default(), &new_ct)
            .await
            .unwrap(),
        b"new value"
    );

    // The pre-rewrap copy of DEK 1 is now refused by Vault: a typed, non-"unavailable" error.
    let stale_store: Arc<dyn WrappedKeyStore> = Arc::new(MemoryKeyStore::default());
    let mut stale = store.get("t3-key", 1).await.unwrap().unwrap();
    stale.wrapped = old_wrapped;
    stale_store.insert(&stale, "transit").await.unwrap();
    let err = transit(&vault, &stale_store)
        .fetch_dek("t3-key", 1)
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::Vault { .. }), "{err:?}");
    assert!(!err.is_unavailable());
}

#[tokio::test]
async fn approle_short_ttl_renews_and_relogs() {
    let bao = Bao::start().await;
    bao.api("POST", "sys/auth/approle", Some(json!({"type": "approle"})))
        .await
        .unwrap();
    let policy = r#"path "transit/*" { capabilities = ["create", "read", "update"] }"#;
    bao.api(
        "POST",
        "sys/policies/acl/pgward",
        Some(json!({ "policy": policy })),
    )
    .await
    .unwrap();
    bao.api(
        "POST",
        "auth/approle/role/pgward",
        Some(json!({"token_policies": ["pgward"], "token_ttl": "3s", "token_max_ttl": "6s"})),
    )
    .await
    .unwrap();
    let role_id = bao
        .api("GET", "auth/approle/role/pgward/role-id", None)
        .await
        .unwrap()["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id = bao
        .api(
            "POST",
            "auth/approle/role/pgward/secret-id",
            Some(json!({})),
        )
        .await
        .unwrap()["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_string();

    let vault = client(
        &bao,
        VaultAuth::AppRole {
            mount: "approle".into(),
            role_id,
            secret_id: Zeroizing::new(secret_id),
        },
    );
    let store: Arc<dyn WrappedKeyStore> = Arc::new(MemoryKeyStore::default());
    let provider = transit(&vault, &store);
    let deadline = Instant::now() + Duration::from_secs(11);
    while Instant::now() < deadline {
        provider.kek_status("t4-key").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stats = vault.stats();
    assert!(stats.renewals >= 1, "{stats:?}");
    assert!(stats.logins >= 2, "re-login after max TTL: {stats:?}");

    // A token revoked behind our back: the next call logs in again and succeeds.
    let before = vault.stats().logins;
    // Revoke every token of the role via its lease prefix.
    bao.api(
        "POST",
        "sys/leases/revoke-prefix/auth/approle/login",
        Some(json!({})),
    )
    .await
    .unwrap();
    provider.kek_status("t4-key").await.unwrap();
    assert!(vault.stats().logins > before, "re-login after revocation");
}

#[tokio::test]
async fn vault_down_cached_keys_serve_uncached_fail() {
    let mut bao = Bao::start().await;
    if !bao.owned() {
        eprintln!("skipped: external Vault cannot be stopped");
        return;
    }
    let vault = root(&bao);
    let store: Arc<dyn WrappedKeyStore> = Arc::new(MemoryKeyStore::default());
    let cols = [col("a", "x", "t5-a", true), col("b", "y", "t5-b", false)];
    let writer = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    let ct_a = writer
        .encrypt("a", "x", &KeyScope::default(), b"cached")
        .await
        .unwrap();
    let ct_b = writer
        .encrypt("b", "y", &KeyScope::default(), b"uncached")
        .await
        .unwrap();

    // Short TTL: the outage outlasts it, and stale keys must still serve.
    let reader = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_millis(200),
    );
    assert_eq!(
        reader
            .decrypt("a", "x", &KeyScope::default(), &ct_a)
            .await
            .unwrap(),
        b"cached"
    );
    let bidx = reader
        .blind_index("a", "x", &KeyScope::default(), b"v")
        .await
        .unwrap();
    bao.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        vault.health().await,
        Err(VaultError::Unreachable { .. })
    ));
    assert_eq!(
        reader
            .decrypt("a", "x", &KeyScope::default(), &ct_a)
            .await
            .unwrap(),
        b"cached"
    );
    assert_eq!(
        reader
            .blind_index("a", "x", &KeyScope::default(), b"v")
            .await
            .unwrap(),
        bidx
    );
    let new_ct = reader
        .encrypt("a", "x", &KeyScope::default(), b"written during outage")
        .await
        .unwrap();
    assert_eq!(
        reader
            .decrypt("a", "x", &KeyScope::default(), &new_ct)
            .await
            .unwrap(),
        b"written during outage"
    );
    let started = Instant::now();
    let err = reader
        .decrypt("b", "y", &KeyScope::default(), &ct_b)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CryptoError::KeyUnavailable(KeyFailure::Unreachable)),
        "{err:?}"
    );
    // Client-safe: neither the key name nor where Vault is.
    let msg = err.to_string();
    assert!(
        msg.contains("not cached") && !msg.contains("t5-b") && !msg.contains("127.0.0.1"),
        "{msg}"
    );
    // The failed fetch is remembered: the next rows fail at once instead of asking again.
    let again = Instant::now();
    assert!(reader
        .decrypt("b", "y", &KeyScope::default(), &ct_b)
        .await
        .is_err());
    assert!(
        again.elapsed() < Duration::from_millis(50) && started.elapsed() < Duration::from_secs(4)
    );
}

#[tokio::test]
async fn revoked_token_is_a_clear_error() {
    let bao = Bao::start().await;
    let policy = r#"path "transit/*" { capabilities = ["create", "read", "update"] }"#;
    bao.api(
        "POST",
        "sys/policies/acl/pgward",
        Some(json!({ "policy": policy })),
    )
    .await
    .unwrap();
    let created = bao
        .api(
            "POST",
            "auth/token/create",
            Some(json!({"policies": ["pgward"], "ttl": "1h"})),
        )
        .await
        .unwrap();
    let token = created["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();

    let vault = client(&bao, VaultAuth::Token(Zeroizing::new(token.clone())));
    let store: Arc<dyn WrappedKeyStore> = Arc::new(MemoryKeyStore::default());
    let cols = [col("t", "c", "t6-key", false)];
    let m = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_millis(100),
    );
    let ct = m
        .encrypt("t", "c", &KeyScope::default(), b"secret")
        .await
        .unwrap();

    bao.api("POST", "auth/token/revoke", Some(json!({ "token": token })))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next poll sees the refusal: the key stops serving reads and writes, cached or not.
    m.poll_once().await;
    let err = m
        .decrypt("t", "c", &KeyScope::default(), &ct)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CryptoError::KeyUnavailable(KeyFailure::Refused)),
        "{err:?}"
    );
    assert!(
        matches!(
            m.encrypt_now("t", "c", &KeyScope::default(), b"x"),
            Err(CryptoError::KeyUnavailable(KeyFailure::Refused))
        ),
        "writes stop too"
    );
    assert!(m
        .encrypt("t", "c", &KeyScope::default(), b"x")
        .await
        .is_err());
    let msg = err.to_string();
    assert!(
        msg.contains("refused") && !msg.contains("permission denied") && !msg.contains("t6-key"),
        "{msg}"
    );
}

#[tokio::test]
async fn kv2_provider_round_trip() {
    let bao = Bao::start().await;
    let vault = root(&bao);
    let provider: Arc<dyn KeyProvider> =
        Arc::new(Kv2Provider::new(vault.clone(), "secret", "pgward-test"));
    let cols = [col("people", "name", "t7-key", true)];
    let m = manager(
        provider.clone(),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    let ct1 = m
        .encrypt("people", "name", &KeyScope::default(), b"Ada")
        .await
        .unwrap();
    let idx1 = m
        .blind_index("people", "name", &KeyScope::default(), b"Ada")
        .await
        .unwrap();
    assert_eq!(m.rotate_dek("t7-key").await.unwrap().dek_version, 2);
    let ct2 = m
        .encrypt("people", "name", &KeyScope::default(), b"Grace")
        .await
        .unwrap();
    assert_eq!(peek_key_ref(&ct2).unwrap().dek_version, 2);

    let cold = manager(
        provider.clone(),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    assert_eq!(
        cold.decrypt("people", "name", &KeyScope::default(), &ct1)
            .await
            .unwrap(),
        b"Ada"
    );
    assert_eq!(
        cold.decrypt("people", "name", &KeyScope::default(), &ct2)
            .await
            .unwrap(),
        b"Grace"
    );
    assert_eq!(
        cold.blind_index("people", "name", &KeyScope::default(), b"Ada")
            .await
            .unwrap(),
        idx1,
        "index stable across DEK rotation"
    );
    assert_eq!(provider.list_deks("t7-key").await.unwrap().len(), 2);
    // The secret really is in KV v2.
    let meta = bao
        .api("GET", "secret/metadata/pgward-test/deks/t7-key", None)
        .await
        .unwrap();
    assert_eq!(meta["data"]["current_version"], 2);
}

async fn pg_client() -> Arc<tokio_postgres::Client> {
    let pg = crate::harness::postgres();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(pg.port)
        .user("postgres")
        .password(pg.password.as_str())
        .dbname("postgres");
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    Arc::new(client)
}

#[tokio::test]
async fn db_key_store_and_ops_against_postgres() {
    use pgward::crypto::ops::{
        self, BatchArgs, EncryptExistingArgs, KeysReencryptArgs, KeysRewrapArgs, KeysStatusArgs,
    };
    use pgward::crypto::{encode_for_encryption, WireFormat};

    let bao = Bao::start().await;
    let vault = root(&bao);
    let db = pg_client().await;
    let store = PgKeyStore::new(db.clone());
    store.migrate().await.unwrap();
    store.migrate().await.unwrap(); // idempotent
    let store: Arc<dyn WrappedKeyStore> = Arc::new(store);

    let table = format!("crypt_ops_{}", std::process::id());
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint PRIMARY KEY, email text, born date, note text);
         INSERT INTO {table} SELECT g, 'user' || g || '@example.com', date '1970-01-01' + g, 'n' FROM generate_series(1, 1200) g;
         UPDATE {table} SET email = NULL WHERE id = 7;"
    ))
    .await
    .unwrap();
    let key = "t8-pii";
    let cols = [
        EncryptColumn {
            table: table.clone(),
            column: "email".into(),
            key: key.into(),
            ty: ClientType::Text,
            searchable: true,
            context_claim: None,
            bind_primary_key: false,
        },
        EncryptColumn {
            table: table.clone(),
            column: "born".into(),
            key: key.into(),
            ty: ClientType::Date,
            searchable: false,
            context_claim: None,
            bind_primary_key: false,
        },
    ];
    let m = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    let batch = BatchArgs {
        batch_size: 100,
        pause: Duration::from_millis(1),
    };
    let mut events = Vec::new();
    for column in ["email", "born"] {
        let args = EncryptExistingArgs {
            table: table.clone(),
            column: column.into(),
            batch: batch.clone(),
        };
        let done = ops::encrypt_existing(&m, &db, &args, &mut |p| events.push(p.to_string()))
            .await
            .unwrap();
        assert!(
            done.finished && done.rows_changed == if column == "email" { 1199 } else { 1200 },
            "{done:?}"
        );
        // Rerun is a no-op.
        assert_eq!(
            ops::encrypt_existing(&m, &db, &args, &mut |_| {})
                .await
                .unwrap()
                .rows_changed,
            0
        );
    }
    assert!(events.len() >= 12, "{events:?}");

    // Stored as bytea; decrypts; equality search through the blind index finds the row.
    let row = db
        .query_one(
            &format!("SELECT email, born, pg_typeof(email)::text FROM {table} WHERE id = 5"),
            &[],
        )
        .await
        .unwrap();
    let (email, born, ty): (Vec<u8>, Vec<u8>, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(ty, "bytea");
    assert_eq!(
        m.decrypt(&table, "email", &KeyScope::default(), &email)
            .await
            .unwrap(),
        b"user5@example.com"
    );
    let born_text = pgward::crypto::decode_to_wire(
        ClientType::Date,
        WireFormat::Text,
        &m.decrypt(&table, "born", &KeyScope::default(), &born)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(born_text, b"1970-01-06");
    let probe =
        encode_for_encryption(ClientType::Text, WireFormat::Text, b"user42@example.com").unwrap();
    let bidx = m
        .blind_index(&table, "email", &KeyScope::default(), &probe)
        .await
        .unwrap()
        .to_vec();
    let hits = db
        .query(
            &format!("SELECT id FROM {table} WHERE email_bidx = $1"),
            &[&bidx],
        )
        .await
        .unwrap();
    assert_eq!(
        hits.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>(),
        vec![42]
    );
    assert!(db
        .query_one(&format!("SELECT email FROM {table} WHERE id = 7"), &[])
        .await
        .unwrap()
        .get::<_, Option<Vec<u8>>>(0)
        .is_none());

    // Status counts rows per DEK from the header bytes.
    let status = ops::keys_status(&m, &db, &KeysStatusArgs::default())
        .await
        .unwrap();
    assert_eq!(status[0].deks.len(), 1);
    assert_eq!(status[0].deks[0].rows, Some(2399), "{}", status[0]);

    // Rotate the KEK; reencrypt resumes from a recorded crash point (id 600) for email.
    bao.rotate(key).await;
    db.execute(
        "INSERT INTO pgward.job_progress (job, table_name, column_name, last_pk, rows_done) VALUES ('reencrypt', $1, 'email', '600', 600)
         ON CONFLICT (job, table_name, column_name) DO UPDATE SET last_pk = '600', rows_done = 600, finished_at = NULL",
        &[&format!("public.{table}")],
    )
    .await
    .unwrap();
    let args = KeysReencryptArgs {
        table: Some(table.clone()),
        batch: BatchArgs {
            batch_size: 250,
            pause: Duration::from_millis(1),
        },
    };
    let mut email_events = Vec::new();
    let reports = ops::keys_reencrypt(&m, &db, &args, &mut |p| {
        if p.column == "email" {
            email_events.push((p.last_pk.clone(), p.rows_done));
        }
    })
    .await
    .unwrap();
    // The first batch continued after the crash point; a sweep from the start then caught
    // the rows before it (done under an older target in the "crashed" run: here, not at all).
    assert_eq!(
        email_events[0],
        (Some("850".into()), 850),
        "{email_events:?}"
    );
    let email = reports.iter().find(|r| r.column == "email").unwrap();
    assert_eq!(
        (email.rows_changed, email.rows_done),
        (1199, 1799),
        "600 after the resume point, 599 by the sweep: {email:?}"
    );
    let status = ops::keys_status(&m, &db, &KeysStatusArgs::default())
        .await
        .unwrap();
    let rows: Vec<Option<i64>> = status[0].deks.iter().map(|d| d.rows).collect();
    assert_eq!(rows, vec![Some(0), Some(2399)], "{}", status[0]);
    // A second run (previous one finished) finds nothing to do.
    let again = ops::keys_reencrypt(&m, &db, &args, &mut |_| {})
        .await
        .unwrap();
    assert!(again.iter().all(|r| r.rows_changed == 0), "{again:?}");

    // Rewrap: DEK 1 and the index root move to KEK v2; nothing else changes.
    let rewrapped = ops::keys_rewrap(&m, &KeysRewrapArgs::default())
        .await
        .unwrap();
    assert_eq!(rewrapped, vec![(key.to_string(), 2)]);
    let keks: Vec<i32> = db
        .query(
            "SELECT kek_version FROM pgward.data_keys WHERE key_name = $1",
            &[&key],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(keks.iter().all(|&k| k == 2), "{keks:?}");

    // A cold manager over a new connection reads everything back.
    let cold_store: Arc<dyn WrappedKeyStore> = Arc::new(PgKeyStore::new(pg_client().await));
    let cold = manager(
        transit(&vault, &cold_store),
        Some(vault.clone()),
        &cols,
        Duration::from_secs(600),
    );
    for row in db
        .query(
            &format!("SELECT id, email FROM {table} WHERE id IN (1, 600, 601, 1200)"),
            &[],
        )
        .await
        .unwrap()
    {
        let (id, ct): (i64, Vec<u8>) = (row.get(0), row.get(1));
        assert_eq!(
            cold.decrypt(&table, "email", &KeyScope::default(), &ct)
                .await
                .unwrap(),
            format!("user{id}@example.com").as_bytes()
        );
    }
    db.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn tls_with_ca_file_and_token_file() {
    use pgward::crypto::manager::vault_client;
    use pgward::crypto::VaultConfig;

    let bao = Bao::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "root\n").unwrap();
    let mut cfg: VaultConfig = toml::from_str(&format!(
        "address = {:?}\ntoken_file = {:?}",
        bao.addr, token_file
    ))
    .unwrap();
    assert!(bao.addr.starts_with("https://"));

    // Without the CA, the dev certificate is not trusted: Vault counts as unreachable.
    let untrusted = Arc::new(vault_client(&cfg).unwrap());
    let store: Arc<dyn WrappedKeyStore> = Arc::new(MemoryKeyStore::default());
    let err = transit(&untrusted, &store)
        .kek_status("t9-key")
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");

    cfg.ca_file = Some(bao.ca_file());
    let vault = Arc::new(vault_client(&cfg).unwrap());
    assert_eq!(vault.health().await.unwrap(), Health::Active);
    let m = manager(
        transit(&vault, &store),
        Some(vault.clone()),
        &[col("t", "c", "t9-key", false)],
        Duration::from_secs(60),
    );
    let ct = m
        .encrypt("t", "c", &KeyScope::default(), b"over tls")
        .await
        .unwrap();
    assert_eq!(
        m.decrypt("t", "c", &KeyScope::default(), &ct)
            .await
            .unwrap(),
        b"over tls"
    );
}
