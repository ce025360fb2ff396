//! Data-key usage limits and key metrics against a real OpenBao and PostgreSQL.
use pgward::crypto::scope::KeyScope;
use std::sync::Arc;
use std::time::Duration;

use pgward::crypto::manager::{CachePolicy, KeyManager};
use pgward::crypto::{peek_key_ref, ClientType, EncryptColumn};
use pgward::keys::metrics::VaultOutcome;
use pgward::keys::store::{PgKeyStore, WrappedKeyStore};
use pgward::keys::transit::TransitProvider;
use pgward::keys::vault::{VaultAuth, VaultClient, VaultClientConfig};
use pgward::metrics::MetricSet;
use zeroize::Zeroizing;

use crate::harness;
use crate::vault::Bao;

async fn store() -> Arc<dyn WrappedKeyStore> {
    let database = harness::fresh_database("keyusage", false).await;
    let (client, conn) = harness::postgres()
        .direct(&database)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let store = PgKeyStore::new(Arc::new(client));
    store.migrate().await.unwrap();
    Arc::new(store)
}

/// A manager (one "pgward instance") over the shared OpenBao and key store, replacing its
/// data key after `limit` encryptions.
fn instance(bao: &Bao, store: &Arc<dyn WrappedKeyStore>, key: &str, limit: u64) -> KeyManager {
    let vault = Arc::new(
        VaultClient::new(VaultClientConfig {
            address: bao.addr.clone(),
            auth: VaultAuth::Token(Zeroizing::new(bao.token.clone())),
            ca_file: None,
            request_timeout: Duration::from_secs(3),
        })
        .unwrap(),
    );
    let provider = Arc::new(TransitProvider::new(
        vault.clone(),
        "transit",
        store.clone(),
        true,
    ));
    let columns = [EncryptColumn {
        table: "t".into(),
        column: "c".into(),
        key: key.into(),
        ty: ClientType::Text,
        searchable: false,
        context_claim: None,
        bind_primary_key: false,
    }];
    let policy = CachePolicy {
        ttl: Duration::from_secs(600),
        max_stale: Duration::from_secs(3600),
        blocking_threshold: 64 * 1024,
    };
    KeyManager::new(provider, Some(vault), &columns, policy)
        .unwrap()
        .with_usage_limit(limit)
}

fn dek_version(ct: &[u8]) -> u32 {
    peek_key_ref(ct).unwrap().dek_version
}

/// Encryptions are counted per data key across instances (in `pgward.data_keys`) and the key
/// is replaced at the next poll once the total reaches the limit; old values still decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_key_replaced_at_its_usage_limit_counted_across_instances() {
    let bao = Bao::start().await;
    let store = store().await;
    let key = harness::unique_name("usage");
    let a = instance(&bao, &store, &key, 10);
    let b = instance(&bao, &store, &key, 10);
    let mut written = Vec::new();
    for i in 0..6 {
        written.push(
            a.encrypt("t", "c", &KeyScope::default(), format!("a{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    for i in 0..3 {
        written.push(
            b.encrypt("t", "c", &KeyScope::default(), format!("b{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    a.poll_once().await;
    b.poll_once().await; // 9 in total: below the limit
    assert!(written.iter().all(|ct| dek_version(ct) == 1));
    for i in 0..2 {
        written.push(
            a.encrypt("t", "c", &KeyScope::default(), format!("c{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    a.poll_once().await; // 11: a replaces the data key
    let after_a = a
        .encrypt("t", "c", &KeyScope::default(), b"after")
        .await
        .unwrap();
    assert_eq!(dek_version(&after_a), 2);
    b.poll_once().await; // b adopts the new key instead of creating one more
    let after_b = b
        .encrypt("t", "c", &KeyScope::default(), b"after")
        .await
        .unwrap();
    assert_eq!(dek_version(&after_b), 2);
    for ct in &written {
        b.decrypt("t", "c", &KeyScope::default(), ct).await.unwrap();
    }
    let metrics = a.metrics();
    assert_eq!(
        metrics
            .usage_rotations
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(metrics.vault_requests(VaultOutcome::Ok) > 0);
    let mut text = String::new();
    metrics.render(&mut text);
    assert!(
        text.contains("pgward_dek_usage_rotations_total 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "pgward_key_refresh_last_success_timestamp_seconds{{key=\"{key}\"}}"
        )),
        "{text}"
    );
    // A tampered value counts as an integrity failure.
    let mut bad = after_a.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(a
        .decrypt("t", "c", &KeyScope::default(), &bad)
        .await
        .is_err());
    let mut text = String::new();
    metrics.render(&mut text);
    assert!(text.contains("pgward_integrity_failures_total 1"), "{text}");
}

/// The key store's connection to the database is lost (the server restarted, an operator
/// terminated its backend): the next operation opens another instead of failing until pgward
/// restarts.
#[tokio::test]
async fn the_key_store_reconnects_after_its_backend_is_terminated() {
    let database = harness::fresh_database("keystore_reconnect", false).await;
    let connect = {
        let database = database.clone();
        move || {
            let mut config = harness::postgres().direct(&database);
            config.application_name("key_store_under_test");
            async move {
                let (client, conn) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| pgward::keys::KeyError::Store(e.to_string()))?;
                tokio::spawn(conn);
                Ok(client)
            }
        }
    };
    let first = connect().await.unwrap();
    let reconnect = connect.clone();
    let store = PgKeyStore::reconnecting(first, Arc::new(move || Box::pin(reconnect())));
    store.migrate().await.unwrap();
    assert!(store.list("k").await.unwrap().is_empty());

    let admin = harness::direct(&database).await;
    let backends = || async {
        admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'key_store_under_test'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>()
    };
    let before = backends().await;
    assert_eq!(before.len(), 1, "{before:?}");
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&before[0]])
        .await
        .unwrap();

    // The operation that finds the connection dead may fail; the ones after it must not.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let listed = loop {
        match store.list("k").await {
            Ok(listed) => break listed,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "key store not back yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the key store never reconnected: {e}"),
        }
    };
    assert!(listed.is_empty());
    let after = backends().await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after[0], before[0], "served by a new backend");
}
