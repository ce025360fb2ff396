//! Unit tests of the key manager (crypto/manager.rs).
use super::*;
use crate::crypto::codec::ClientType;
use crate::keys::local::LocalProvider;
use crate::keys::SecretKey;

fn manager() -> KeyManager {
    let cols = vec![
        EncryptColumn {
            table: "users".into(),
            column: "email".into(),
            key: "pii".into(),
            ty: ClientType::Text,
            searchable: true,
            context_claim: None,
            bind_primary_key: false,
        },
        EncryptColumn {
            table: "public.users".into(),
            column: "ssn".into(),
            key: "pii".into(),
            ty: ClientType::Text,
            searchable: false,
            context_claim: None,
            bind_primary_key: false,
        },
        EncryptColumn {
            table: "orders".into(),
            column: "card".into(),
            key: "pci".into(),
            ty: ClientType::Text,
            searchable: false,
            context_claim: None,
            bind_primary_key: false,
        },
    ];
    let provider = Arc::new(LocalProvider::from_key(SecretKey::from_bytes([9; 32])));
    KeyManager::new(
        provider,
        None,
        &cols,
        CachePolicy {
            ttl: Duration::from_secs(60),
            max_stale: Duration::from_secs(60),
            blocking_threshold: 64 * 1024,
        },
    )
    .unwrap()
}

#[test]
fn columns_are_found_by_bare_or_qualified_table_and_unknown_ones_named() {
    let m = manager();
    for (table, column) in [
        ("users", "email"),
        ("public.users", "email"),
        ("users", "ssn"),
    ] {
        assert_eq!(m.column(table, column).unwrap().column.column, column);
    }
    assert_eq!(m.column("orders", "card").unwrap().table, "public.orders");
    assert_eq!(m.columns().count(), 3);
    match m.column("users", "name") {
        Err(CryptoError::UnknownColumn { table, column }) => {
            assert_eq!((table.as_str(), column.as_str()), ("public.users", "name"));
        }
        other => panic!("{other:?}"),
    }
    assert!(m.column("other.users", "email").is_err());
}

#[tokio::test]
async fn round_trip_binding_and_index() {
    let m = manager();
    let ct = m
        .encrypt("users", "email", &KeyScope::default(), b"a@b.c")
        .await
        .unwrap();
    assert_eq!(
        m.decrypt("public.users", "email", &KeyScope::default(), &ct)
            .await
            .unwrap(),
        b"a@b.c"
    );
    assert!(matches!(
        m.decrypt("users", "ssn", &KeyScope::default(), &ct).await,
        Err(CryptoError::Integrity { .. })
    ));
    assert!(matches!(
        m.decrypt("orders", "card", &KeyScope::default(), &ct).await,
        Err(CryptoError::WrongKey { .. })
    ));
    assert!(matches!(
        m.decrypt("orders", "nope", &KeyScope::default(), &ct).await,
        Err(CryptoError::UnknownColumn { .. })
    ));
    let a = m
        .blind_index("users", "email", &KeyScope::default(), b"a@b.c")
        .await
        .unwrap();
    assert_eq!(
        a,
        m.blind_index("users", "email", &KeyScope::default(), b"a@b.c")
            .await
            .unwrap()
    );
    assert!(matches!(
        m.blind_index("users", "ssn", &KeyScope::default(), b"x")
            .await,
        Err(CryptoError::NotSearchable { .. })
    ));
}

#[tokio::test]
async fn large_values_go_through_the_blocking_pool() {
    let m = manager();
    let big = vec![0x5a; 200 * 1024];
    let ct = m
        .encrypt("users", "email", &KeyScope::default(), &big)
        .await
        .unwrap();
    assert_eq!(
        m.decrypt("users", "email", &KeyScope::default(), &ct)
            .await
            .unwrap(),
        big
    );
}

#[test]
fn rejects_duplicate_columns() {
    let c = EncryptColumn {
        table: "t".into(),
        column: "c".into(),
        key: "k".into(),
        ty: ClientType::Int4,
        searchable: false,
        context_claim: None,
        bind_primary_key: false,
    };
    let p = Arc::new(LocalProvider::from_key(SecretKey::from_bytes([1; 32])));
    let policy = CachePolicy {
        ttl: Duration::from_secs(1),
        max_stale: Duration::from_secs(1),
        blocking_threshold: 1,
    };
    assert!(KeyManager::new(
        p,
        None,
        &[
            c.clone(),
            EncryptColumn {
                table: "public.t".into(),
                ..c
            }
        ],
        policy
    )
    .is_err());
}
