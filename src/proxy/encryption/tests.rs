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
    let out = rebuild_bind(&bind, &[1, 0, 1], &[Some(vec![9]), None, Some(vec![8, 8])]).unwrap();
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
