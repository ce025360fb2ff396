use super::*;
use crate::protocol::Message;

fn bind(portal: &str, statement: &str) -> Bytes {
    let mut body = BytesMut::new();
    body.put_slice(portal.as_bytes());
    body.put_u8(0);
    body.put_slice(statement.as_bytes());
    body.put_u8(0);
    body.put_i16(0); // parameter formats
    body.put_i16(0); // values
    body.put_i16(0); // result formats
    let mut buf = BytesMut::new();
    buf.put_u8(b'B');
    buf.put_u32(u32::try_from(body.len() + 4).unwrap());
    buf.put_slice(&body);
    buf.freeze()
}

/// (tag, names) of each message: Parse/Bind/Describe/Close statement names.
fn summary(bytes: &Bytes) -> Vec<(char, String)> {
    Batch::from_whole_messages(bytes.clone())
        .messages()
        .map(|m: Message| {
            let name = match Frontend::decode(&m).unwrap() {
                Frontend::Parse(p) => p.name.to_string(),
                Frontend::Bind(b) => b.statement.to_string(),
                Frontend::Describe(t) | Frontend::Close(t) => t.name.to_string(),
                Frontend::Query { sql } => sql.to_string(),
                _ => String::new(),
            };
            (m.tag() as char, name)
        })
        .collect()
}

struct Fixture {
    client: ClientStatements,
    tracker: Tracker,
    prepared: HashSet<String>,
    refused: Vec<ClientError>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            client: ClientStatements::default(),
            tracker: Tracker::default(),
            prepared: HashSet::new(),
            refused: Vec::new(),
        }
    }

    fn send(&mut self, parts: &[Bytes]) -> Translation {
        let refused = &mut self.refused;
        let mut refuse = |e: ClientError| {
            refused.push(e);
            format!("{REFUSAL_MARKER_PREFIX}{}", refused.len())
        };
        translate(
            parts,
            &mut self.client,
            OnServer {
                tracker: &mut self.tracker,
                prepared: &mut self.prepared,
            },
            &mut refuse,
        )
        .unwrap()
    }

    /// A new lease on another server connection.
    fn move_to_new_connection(&mut self) {
        self.tracker = Tracker::default();
        self.prepared = HashSet::new();
    }
}

/// Execute of the unnamed portal, all rows.
fn execute() -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'E');
    buf.put_u32(9);
    buf.put_u8(0);
    buf.put_i32(0);
    buf.freeze()
}

fn backend(tag: u8) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(tag);
    buf.put_u32(4);
    buf.freeze()
}

fn ready() -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'Z');
    buf.put_u32(5);
    buf.put_u8(b'I');
    buf.freeze()
}

#[test]
fn named_statements_get_server_names_and_follow_the_client_to_other_connections() {
    let mut f = Fixture::new();
    let sql = "SELECT 1 WHERE tenant_id = 7";
    let sent = f.send(&[build::parse("s1", sql), bind("", "s1"), build::sync()]);
    let server = server_name(sql, &[0, 0]);
    assert!(server.starts_with(SERVER_PREFIX));
    assert_eq!(
        summary(&sent.bytes),
        vec![
            ('C', server.clone()),
            ('P', server.clone()),
            ('B', server.clone()),
            ('S', String::new())
        ]
    );
    assert_eq!(sent.unsynced, Some(false));
    // The server's answers: the inserted Close's CloseComplete is swallowed.
    let answers = Batch::from_whole_messages(
        [backend(b'3'), backend(b'1'), backend(b'2'), ready()]
            .concat()
            .into(),
    );
    let kept = f.tracker.incoming(&answers, &mut f.prepared).unwrap();
    assert_eq!(
        kept.messages().map(|m| m.tag()).collect::<Vec<_>>(),
        b"12Z".to_vec()
    );
    assert!(f.tracker.is_settled());

    // Next transaction on a connection that never saw it: Parse inserted, answers swallowed.
    f.move_to_new_connection();
    let sent = f.send(&[bind("", "s1"), build::sync()]);
    assert_eq!(
        summary(&sent.bytes),
        vec![
            ('C', server.clone()),
            ('P', server.clone()),
            ('B', server.clone()),
            ('S', String::new())
        ]
    );
    let answers = Batch::from_whole_messages(
        [backend(b'3'), backend(b'1'), backend(b'2'), ready()]
            .concat()
            .into(),
    );
    let kept = f.tracker.incoming(&answers, &mut f.prepared).unwrap();
    assert_eq!(
        kept.messages().map(|m| m.tag()).collect::<Vec<_>>(),
        b"2Z".to_vec()
    );
    // Prepared there now: nothing inserted the next time.
    let sent = f.send(&[bind("", "s1"), build::sync()]);
    assert_eq!(summary(&sent.bytes).len(), 2);
}

#[test]
fn a_failed_parse_is_forgotten_by_the_connection() {
    let mut f = Fixture::new();
    f.send(&[build::parse("s1", "SELECT nope"), build::sync()]);
    let server = server_name("SELECT nope", &[0, 0]);
    assert!(f.prepared.contains(&server));
    let answers = Batch::from_whole_messages(
        [
            backend(b'3'),
            crate::error::ClientError::error("42703", "no").to_message(),
            ready(),
        ]
        .concat()
        .into(),
    );
    let kept = f.tracker.incoming(&answers, &mut f.prepared).unwrap();
    assert_eq!(
        kept.messages().map(|m| m.tag()).collect::<Vec<_>>(),
        b"EZ".to_vec()
    );
    assert!(!f.prepared.contains(&server));
}

#[test]
fn a_client_can_never_name_a_server_statement_or_another_clients_unnamed_one() {
    let mut f = Fixture::new();
    let other = server_name("SELECT secret", &[0, 0]);
    f.prepared.insert(other.clone());
    let sent = f.send(&[bind("", &other), build::sync()]);
    assert_eq!(summary(&sent.bytes)[0], ('B', NEVER_PREPARED.to_string()));
    // Unnamed statement on a fresh lease without a Parse of its own: the server's unnamed
    // statement (maybe another client's) is closed first.
    let mut f = Fixture::new();
    let sent = f.send(&[bind("", ""), build::sync()]);
    assert_eq!(summary(&sent.bytes)[0], ('C', String::new()));
    // With one of its own, that one is parsed again.
    let mut f = Fixture::new();
    f.send(&[build::parse("", "SELECT 2"), build::sync()]);
    f.move_to_new_connection();
    let sent = f.send(&[bind("", ""), build::sync()]);
    assert_eq!(summary(&sent.bytes)[0], ('P', String::new()));
}

#[test]
fn close_and_deallocate_forget_client_statements_and_session_state_is_refused() {
    let mut f = Fixture::new();
    f.send(&[build::parse("s1", "SELECT 1"), build::sync()]);
    let sent = f.send(&[build::close(b'S', "s1"), build::sync()]);
    assert_eq!(summary(&sent.bytes)[0], ('C', NEVER_PREPARED.to_string()));
    assert!(f.client.is_empty());
    f.send(&[build::parse("s2", "SELECT 2"), build::sync()]);
    let sent = f.send(&[build::query("DEALLOCATE s2")]);
    assert_eq!(summary(&sent.bytes)[0], ('Q', "DEALLOCATE ALL".to_string()));
    assert!(f.client.is_empty() && f.prepared.is_empty());
    let sent = f.send(&[build::query("SET search_path = evil")]);
    assert!(summary(&sent.bytes)[0].1.starts_with(REFUSAL_MARKER_PREFIX));
    let error = f.refused.last().unwrap();
    assert_eq!(error.sqlstate, "0A000");
    assert!(error.message.contains("transaction pooling mode"));
    let sent = f.send(&[build::terminate()]);
    assert!(sent.terminate && sent.bytes.is_empty());
}

#[test]
fn a_bare_prepare_is_answered_without_a_server_and_prepared_on_first_use() {
    let mut f = Fixture::new();
    let answer = answer_locally(
        &[build::parse("p1", "UPDATE t SET a = $1"), build::sync()],
        &mut f.client,
    )
    .unwrap();
    let tags: Vec<u8> = Batch::from_whole_messages(answer)
        .messages()
        .map(|m| m.tag())
        .collect();
    assert_eq!(tags, b"1Z".to_vec());
    assert_eq!(f.client.len(), 1);
    let sent = f.send(&[bind("", "p1"), build::sync()]);
    assert_eq!(summary(&sent.bytes)[1].0, 'P');
    // Anything else goes to the server.
    assert!(answer_locally(
        &[build::parse("", "SELECT 1"), build::sync()],
        &mut f.client
    )
    .is_none());
    assert!(answer_locally(
        &[build::parse("p1", "SELECT 1"), build::sync()],
        &mut f.client
    )
    .is_none());
    assert!(answer_locally(
        &[build::parse("p2", "SET x = 1"), build::sync()],
        &mut f.client
    )
    .is_none());
    assert!(answer_locally(&[build::parse("p3", "SELECT 1")], &mut f.client).is_none());
}

#[test]
fn a_sync_sent_into_copy_in_mode_is_not_owed_an_answer() {
    let mut f = Fixture::new();
    let copy_data = Bytes::from_static(b"d\0\0\0\x061\n");
    // psql-style pipelining: Execute of a COPY FROM STDIN and its Sync in one go, then the
    // data; the server ignores that Sync, so only the last one is answered.
    f.send(&[
        build::parse("", "COPY t FROM STDIN"),
        bind("", ""),
        execute(),
        build::sync(),
    ]);
    f.send(&[copy_data, backend(b'c'), build::sync()]);
    let answers = Batch::from_whole_messages(
        [
            backend(b'1'),
            backend(b'2'),
            backend(b'G'),
            build::command_complete("COPY 1"),
            ready(),
        ]
        .concat()
        .into(),
    );
    assert!(f.tracker.incoming(&answers, &mut f.prepared).is_none());
    assert!(
        f.tracker.is_settled(),
        "the lent connection can go back to the pool"
    );
}

#[test]
fn an_unnamed_parse_the_server_skips_leaves_no_other_clients_statement_to_bind() {
    let mut f = Fixture::new();
    // The lent connection's unnamed statement is another client's. This client's unnamed
    // Parse comes after a failing one, so the server skips it.
    f.send(&[
        build::parse("bad", "SELECT nope"),
        build::parse("", "SELECT 1"),
        build::sync(),
    ]);
    let mut in_transaction = BytesMut::new();
    in_transaction.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'E']);
    let answers = Batch::from_whole_messages(
        [backend(b'3'), backend(b'E'), in_transaction.freeze()]
            .concat()
            .into(),
    );
    f.tracker.incoming(&answers, &mut f.prepared);
    // A Bind of the unnamed statement on the same lease prepares the client's own first.
    let sent = f.send(&[bind("", ""), execute(), build::sync()]);
    let tags: Vec<char> = summary(&sent.bytes).iter().map(|(tag, _)| *tag).collect();
    assert_eq!(tags, ['P', 'B', 'E', 'S'], "{:?}", summary(&sent.bytes));
}
