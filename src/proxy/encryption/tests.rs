use super::*;

fn row_description(fields: &[(&str, u32, i16, u32, i16)]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u16(fields.len() as u16);
    for (name, oid, attnum, ty, format) in fields {
        out.extend_from_slice(name.as_bytes());
        out.put_u8(0);
        out.put_u32(*oid);
        out.put_i16(*attnum);
        out.put_u32(*ty);
        out.put_i16(-1);
        out.put_i32(-1);
        out.put_i16(*format);
    }
    out.to_vec()
}

#[test]
fn row_description_is_retyped_and_blind_indexes_dropped() {
    let body = row_description(&[
        ("id", 10, 1, 20, 0),
        ("email", 10, 2, 17, 1),
        ("email_bidx", 10, 3, 17, 0),
    ]);
    let fields = crate::protocol::view::row_description(&body).unwrap();
    let plan = RowPlan {
        fields: vec![
            FieldAction::Keep,
            FieldAction::Decrypt(
                ColumnRef {
                    table: "public.t".into(),
                    column: "email".into(),
                    ty: ClientType::Int8,
                },
                WireFormat::Binary,
                None,
            ),
            FieldAction::Drop,
        ],
    };
    let out = rewrite_row_description(&fields, &plan);
    let msg = Message::from_raw(out).unwrap();
    let back = crate::protocol::view::row_description(msg.body()).unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(back[1].name, b"email");
    assert_eq!(
        (back[1].type_oid, back[1].typlen, back[1].format),
        (20, 8, 1)
    );
    assert_eq!(back[0].type_oid, 20);
}

#[test]
fn binary_integers_are_widened_to_the_column_width() {
    let w = |ty, v: &[u8]| widen_binary_integer(ty, WireFormat::Binary, v);
    assert_eq!(
        w(ClientType::Int4, &(-42i16).to_be_bytes()),
        Some((-42i32).to_be_bytes().to_vec())
    );
    assert_eq!(
        w(ClientType::Int8, &7i32.to_be_bytes()),
        Some(7i64.to_be_bytes().to_vec())
    );
    assert_eq!(w(ClientType::Int4, &(1i64 << 40).to_be_bytes()), None);
    assert_eq!(w(ClientType::Int4, &5i32.to_be_bytes()), None);
    assert_eq!(w(ClientType::Text, &5i16.to_be_bytes()), None);
    assert_eq!(
        widen_binary_integer(ClientType::Int4, WireFormat::Text, b"12"),
        None
    );
}

#[test]
fn bind_rebuild_adds_derived_parameters() {
    let mut body = BytesMut::new();
    body.put_u8(frontend::BIND);
    body.put_u32(0);
    body.extend_from_slice(b"\0s1\0");
    body.put_u16(1);
    body.put_i16(0);
    body.put_u16(2);
    put_value(&mut body, b"a@b").unwrap();
    body.put_i32(-1);
    body.put_u16(1);
    body.put_i16(1);
    let message = Message::from_raw(finish(body)).unwrap();
    let Ok(Frontend::Bind(bind)) = Frontend::decode(&message) else {
        panic!("not a Bind")
    };
    assert_eq!(bind.statement, "s1");
    assert_eq!(bind.format_of(1), 0);
    let out = rebuild_bind(
        &bind,
        &[1, 0, 1],
        &[Some(vec![9]), None, Some(vec![8, 8])],
        bind.results,
    )
    .unwrap();
    let msg = Message::from_raw(out).unwrap();
    let Ok(Frontend::Bind(again)) = Frontend::decode(&msg) else {
        panic!("not a Bind")
    };
    assert_eq!(
        (again.format_of(0), again.format_of(1), again.format_of(2)),
        (1, 0, 1)
    );
    assert_eq!(
        again.values,
        vec![Some(&[9u8][..]), None, Some(&[8u8, 8][..])]
    );
    assert_eq!(again.results, &[0, 1, 0, 1]);
}

#[test]
fn parameter_description_shows_client_types_and_hides_added_parameters() {
    let plan = ParamPlan {
        copy: None,
        row_keys: Vec::new(),
        result_keys: 0,
        client_count: 2,
        params: vec![
            (
                0,
                ParamUse::Encrypt(ColumnRef {
                    table: "public.t".into(),
                    column: "c".into(),
                    ty: ClientType::Date,
                }),
            ),
            (1, ParamUse::Plain),
            (
                0,
                ParamUse::BlindIndex(ColumnRef {
                    table: "public.t".into(),
                    column: "c".into(),
                    ty: ClientType::Date,
                }),
            ),
        ],
    };
    let mut body = BytesMut::new();
    body.put_u16(3);
    for oid in [17u32, 23, 17] {
        body.put_u32(oid);
    }
    let out = retype_parameter_description(&body, &plan).unwrap();
    let msg = Message::from_raw(out).unwrap();
    assert_eq!(msg.body(), &[0, 2, 0, 0, 4, 58, 0, 0, 0, 23]);
}

#[test]
fn result_formats_gain_a_text_code_per_row_key_only_when_listed_per_column() {
    // Two codes for two columns, one key appended: three codes.
    assert_eq!(
        with_key_formats(&[0, 2, 0, 1, 0, 1], 1),
        Some(vec![0, 3, 0, 1, 0, 1, 0, 0])
    );
    // None, or one code for every column (the key included): unchanged.
    assert_eq!(with_key_formats(&[0, 0], 2), None);
    assert_eq!(with_key_formats(&[0, 1, 0, 1], 2), None);
    assert_eq!(with_key_formats(&[0, 2, 0, 1, 0, 1], 0), None);
}

/// Field encryption of `customers.ssn` (row-bound) with a local key (call in a runtime).
fn ssn_encryption() -> Arc<Encryption> {
    use crate::crypto::config::EncryptColumn;
    let column = EncryptColumn {
        table: "customers".into(),
        column: "ssn".into(),
        key: "pii".into(),
        ty: ClientType::Text,
        searchable: false,
        context_claim: None,
        bind_primary_key: true,
    };
    let manager = Arc::new(
        KeyManager::new(
            Arc::new(crate::keys::local::LocalProvider::from_key(
                crate::keys::SecretKey::from_bytes([5; 32]),
            )),
            None,
            &[column],
            crate::crypto::manager::CachePolicy {
                ttl: std::time::Duration::from_secs(60),
                max_stale: std::time::Duration::from_secs(60),
                blocking_threshold: 1 << 20,
            },
        )
        .unwrap(),
    );
    Arc::new(Encryption {
        sql: Arc::new(SqlEncryption::new(manager.clone())),
        manager,
        _poller: tokio::spawn(async {}),
    })
}

#[tokio::test]
async fn row_keys_pair_in_order_by_name_and_never_with_a_views_column() {
    let encryption = ssn_encryption();
    let ssn = ColumnRef {
        table: "public.customers".into(),
        column: "ssn".into(),
        ty: ClientType::Text,
    };
    let mut columns = HashMap::new();
    columns.insert((10, 2), FieldRole::Encrypted(ssn.clone()));
    columns.insert((20, 1), FieldRole::EncryptedViaView(ssn));
    let half = UpstreamHalf::new(encryption, Arc::default(), columns, KeyScope::default());
    let keys = |fields: &[(&str, u32, i16, u32, i16)]| -> Vec<Option<usize>> {
        let body = row_description(fields);
        let fields = crate::protocol::view::row_description(&body).unwrap();
        let plan = half.plan_for(&fields).unwrap();
        plan.fields
            .iter()
            .map(|a| match a {
                FieldAction::Decrypt(_, _, key) => *key,
                _ => None,
            })
            .collect()
    };
    // Two table columns named ssn, two keys: the first with the first, in order.
    assert_eq!(
        keys(&[
            ("ssn", 10, 2, 17, 0),
            ("ssn", 10, 2, 17, 0),
            ("pgward_rk:ssn", 0, 0, 25, 0),
            ("pgward_rk:ssn", 0, 0, 25, 0),
        ]),
        [Some(2), Some(3), None, None]
    );
    // A view's column is never paired; a count that does not match pairs nothing.
    assert_eq!(
        keys(&[
            ("ssn", 20, 1, 17, 0),
            ("ssn", 10, 2, 17, 0),
            ("pgward_rk:ssn", 0, 0, 25, 0)
        ]),
        [None, Some(2), None]
    );
    assert_eq!(
        keys(&[
            ("ssn", 10, 2, 17, 0),
            ("ssn", 10, 2, 17, 0),
            ("pgward_rk:ssn", 0, 0, 25, 0)
        ]),
        [None, None, None]
    );
    // Key columns never reach the client, also when nothing is decrypted.
    let body = row_description(&[("id", 0, 0, 20, 0), ("pgward_rk:ssn", 0, 0, 25, 0)]);
    let fields = crate::protocol::view::row_description(&body).unwrap();
    let plan = half.plan_for(&fields).unwrap();
    assert_eq!(plan.visible_count(), 1);
}

#[tokio::test]
async fn the_answer_to_pgwards_own_describe_never_reaches_the_client() {
    let queue: Expected = Arc::default();
    let client = ClientHalf::new(ssn_encryption(), queue.clone(), KeyScope::default());
    let mut upstream =
        UpstreamHalf::new(ssn_encryption(), queue, HashMap::new(), KeyScope::default());
    let message = |raw: &[u8]| Message::from_raw(Bytes::copy_from_slice(raw)).unwrap();
    // An Execute of a portal the client did not describe: pgward describes it first.
    client.push(
        Request::DescribePortal,
        Expect {
            hidden: true,
            ..Expect::default()
        },
    );
    client.push(Request::Execute, Expect::default());
    client.push(Request::Sync, Expect::default());
    // Its answer is dropped even when it does not decode; the rest is the client's.
    let undecodable = message(b"T\0\0\0\x06\0\x01");
    assert!(matches!(
        upstream.message(&undecodable).await,
        Relayed::Hidden
    ));
    let row = message(b"D\0\0\0\x0b\0\x01\0\0\0\x011");
    assert!(matches!(upstream.message(&row).await, Relayed::Unchanged));
    let complete = message(b"C\0\0\0\x0dSELECT 1\0");
    assert!(matches!(
        upstream.message(&complete).await,
        Relayed::Unchanged
    ));
    assert_eq!(client.awaited(), 1);
    let ready = message(b"Z\0\0\0\x05I");
    assert!(matches!(upstream.message(&ready).await, Relayed::Unchanged));
    assert_eq!(client.awaited(), 0);
}

fn framed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A DataRow of one value.
fn one_value_row(value: &[u8]) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend_from_slice(&(value.len() as u32).to_be_bytes());
    body.extend_from_slice(value);
    framed(b'D', &body)
}

/// Both halves of a session where table OID 20's first column is `customers.ssn` read
/// through a view (decrypted without a row key).
fn ssn_via_view_halves() -> (ClientHalf, UpstreamHalf) {
    let ssn = ColumnRef {
        table: "public.customers".into(),
        column: "ssn".into(),
        ty: ClientType::Text,
    };
    let columns = HashMap::from([((20, 1), FieldRole::EncryptedViaView(ssn))]);
    let queue: Expected = Arc::default();
    let client = ClientHalf::new(ssn_encryption(), queue.clone(), KeyScope::default());
    let upstream = UpstreamHalf::new(ssn_encryption(), queue, columns, KeyScope::default());
    (client, upstream)
}

#[tokio::test]
async fn after_a_value_fails_to_decrypt_the_tracker_still_reads_what_the_server_ran() {
    let (client, mut upstream) = ssn_via_view_halves();
    // `SELECT ssn FROM customers_view; INSERT …`: the first statement's row is not a
    // ciphertext, the server goes on and runs the INSERT.
    client.push(Request::Query, Expect::default());
    let description = framed(b'T', &row_description(&[("ssn", 20, 1, 17, 0)]));
    let bad_row = one_value_row(b"not a ciphertext");
    let mut server = description.clone();
    server.extend_from_slice(&bad_row);
    server.extend_from_slice(&framed(b'C', b"SELECT 1\0"));
    server.extend_from_slice(&framed(b'C', b"INSERT 0 1\0"));
    server.extend_from_slice(&framed(b'Z', b"I"));
    let incoming = upstream
        .incoming(Batch::from_whole_messages(Bytes::from(server.clone())))
        .await;
    let tags = |batch: &Batch| batch.messages().map(|m| m.tag()).collect::<Vec<_>>();
    // The client: its retyped description, the error instead of the row, nothing more up
    // to ReadyForQuery.
    assert_eq!(tags(&incoming.client), b"TEZ");
    let tracked = incoming
        .tracked
        .expect("the tracker reads the server's answers");
    assert_eq!(tags(&tracked.batch), b"TDCCZ");
    let row_at = tracked.batch.messages().next().unwrap().raw().len();
    assert_eq!(tracked.failures, vec![(row_at, DATA_CORRUPTED)]);
    assert_eq!(
        &tracked.batch.bytes()[row_at..],
        &server[description.len()..]
    );
    // The next response is the client's again, and untouched.
    client.push(Request::Query, Expect::default());
    let next = framed(b'C', b"INSERT 0 1\0")
        .into_iter()
        .chain(framed(b'Z', b"I"))
        .collect::<Vec<_>>();
    let incoming = upstream
        .incoming(Batch::from_whole_messages(Bytes::from(next)))
        .await;
    assert_eq!(tags(&incoming.client), b"CZ");
    assert!(incoming.tracked.is_none());
}

/// A Bind of the unnamed portal to `statement` with no parameters and the result-format
/// section `results`.
fn bind_message(statement: &str, results: &[u8]) -> Message {
    let mut body = b"\0".to_vec();
    body.extend_from_slice(statement.as_bytes());
    body.extend_from_slice(&[0, 0, 0, 0, 0]);
    body.extend_from_slice(results);
    Message::from_raw(Bytes::from(framed(b'B', &body))).unwrap()
}

/// Bind and Execute of the unnamed portal as field encryption sends them: what replaces the
/// Execute (`Some`: a Describe of the portal goes first).
async fn bind_and_execute(
    client: &mut ClientHalf,
    (name, statement): (&str, &StatementCrypto),
    results: &[u8],
) -> Option<Bytes> {
    let bind = bind_message(name, results);
    let view = Frontend::decode(&bind).unwrap();
    client
        .outgoing(&bind, &view, Some(statement))
        .await
        .unwrap();
    let execute = Message::from_raw(Bytes::from(framed(b'E', b"\0\0\0\0\0"))).unwrap();
    let view = Frontend::decode(&execute).unwrap();
    client
        .outgoing(&execute, &view, Some(statement))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_statement_with_fixed_result_columns_is_described_once_per_result_formats() {
    let (mut client, mut upstream) = ssn_via_view_halves();
    let statement = StatementCrypto {
        plan: None,
        rows: Some(Arc::default()),
    };
    let text = [0, 1, 0, 0];
    let tags = |batch: &Batch| batch.messages().map(|m| m.tag()).collect::<Vec<_>>();
    let server = |description: bool| {
        let mut bytes = framed(b'2', b"");
        if description {
            bytes.extend(framed(b'T', &row_description(&[("ssn", 20, 1, 17, 0)])));
        }
        bytes.extend(one_value_row(b"not a ciphertext"));
        bytes.extend(framed(b'C', b"SELECT 1\0"));
        bytes.extend(framed(b'Z', b"I"));
        Batch::from_whole_messages(Bytes::from(bytes))
    };
    let sync = Message::from_raw(build::sync()).unwrap();
    let sync_view = Frontend::decode(&sync).unwrap();
    for round in 0..3 {
        let sent = bind_and_execute(&mut client, ("s", &statement), &text).await;
        // The first Execute is described by pgward; the ones after it need not be.
        assert_eq!(
            sent.as_ref().map(|b| b[0]),
            (round == 0).then_some(b'D'),
            "round {round}"
        );
        client.outgoing(&sync, &sync_view, None).await.unwrap();
        let incoming = upstream.incoming(server(round == 0)).await;
        // Each time the row is decrypted by the plan of the statement's rows (here it
        // fails: the client gets the error instead of the stored bytes).
        assert_eq!(tags(&incoming.client), b"2EZ", "round {round}");
        assert_eq!(client.awaited(), 0);
    }
    // Other result formats: described by the server each time.
    let binary = [0, 1, 0, 1];
    for _ in 0..2 {
        let sent = bind_and_execute(&mut client, ("s", &statement), &binary).await;
        assert_eq!(sent.map(|b| b[0]), Some(b'D'));
        client.outgoing(&sync, &sync_view, None).await.unwrap();
        upstream.incoming(server(true)).await;
    }
    // A statement whose result columns are not fixed (a FETCH) gets a Describe every time.
    let fetch = StatementCrypto::default();
    for _ in 0..2 {
        let sent = bind_and_execute(&mut client, ("s", &fetch), &text).await;
        assert_eq!(sent.map(|b| b[0]), Some(b'D'));
        client.outgoing(&sync, &sync_view, None).await.unwrap();
        upstream.incoming(server(true)).await;
    }
    assert_eq!(client.awaited(), 0);
}
