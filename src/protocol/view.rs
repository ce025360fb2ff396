//! Typed, zero-copy views of the messages pgward reads.
//!
//! The relay decodes each client message once into a [`Frontend`] view and hands that view to
//! every stage (policy, encryption, audit); a stage that leaves the message unchanged forwards
//! the original bytes, which the view borrows from. Backend views ([`RowField`], [`data_row`],
//! [`command_tag`]) serve the upstream → client direction the same way. Every view is read
//! with [`Cursor`], so a short or inconsistent body is a [`ProtocolError`], never a panic.

use super::cursor::{i16_at, Cursor};
use super::{frontend, Message, ProtocolError};

/// A client message, decoded once.
#[derive(Debug)]
pub enum Frontend<'a> {
    Query {
        sql: &'a str,
    },
    Parse(ParseView<'a>),
    Bind(BindView<'a>),
    Describe(Target<'a>),
    Execute {
        portal: &'a str,
        max_rows: i32,
    },
    Close(Target<'a>),
    Sync,
    Flush,
    /// The fast-path function call (its body is not needed by any stage).
    FunctionCall,
    CopyData(&'a [u8]),
    CopyDone,
    CopyFail,
    Terminate,
    /// Any other tag: forwarded or refused by the stages as a whole message.
    Other(u8),
}

/// A prepared statement (`S`) or portal (`P`) named by Describe or Close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub kind: u8,
    pub name: &'a str,
}

impl Target<'_> {
    pub fn is_statement(&self) -> bool {
        self.kind == b'S'
    }
}

/// A Parse message.
#[derive(Clone, Copy, Debug)]
pub struct ParseView<'a> {
    pub name: &'a str,
    pub sql: &'a str,
    /// The declared parameter types as sent: a 16-bit count, then one OID per parameter.
    param_section: &'a [u8],
}

impl<'a> ParseView<'a> {
    /// The declared parameter type OIDs (0 = unspecified).
    pub fn param_types(&self) -> impl Iterator<Item = u32> + 'a {
        self.param_section[2..]
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl<'a> ParseView<'a> {
    /// The parameter-type section as the client sent it (count and OIDs), for a Parse of a
    /// rewritten text that keeps the client's declarations.
    pub fn param_section(&self) -> &'a [u8] {
        self.param_section
    }

    /// The same Parse with another statement text (a rewrite of the client's).
    pub fn with_sql<'b>(&self, sql: &'b str) -> ParseView<'b>
    where
        'a: 'b,
    {
        ParseView { sql, ..*self }
    }
}

/// A Bind message.
#[derive(Debug)]
pub struct BindView<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Parameter format codes, raw (2 bytes each): none = all text, one = all alike.
    formats: &'a [u8],
    pub values: Vec<Option<&'a [u8]>>,
    /// The result-format section, raw (count and codes).
    pub results: &'a [u8],
}

impl BindView<'_> {
    /// The format code of parameter `i` (0 text, 1 binary).
    pub fn format_of(&self, i: usize) -> i16 {
        match self.formats.len() / 2 {
            0 => 0,
            1 => i16_at(self.formats, 0).unwrap_or(0),
            _ => i16_at(self.formats, i).unwrap_or(0),
        }
    }
}

impl<'a> Frontend<'a> {
    /// Decode one client message.
    pub fn decode(message: &'a Message) -> Result<Self, ProtocolError> {
        let body = message.body();
        Ok(match message.tag() {
            frontend::QUERY => Self::Query {
                sql: Cursor::new(body, "Query").cstr()?,
            },
            frontend::PARSE => Self::Parse(parse(body)?),
            frontend::BIND => Self::Bind(bind(body)?),
            frontend::DESCRIBE => Self::Describe(target(body, "Describe")?),
            frontend::CLOSE => Self::Close(target(body, "Close")?),
            frontend::EXECUTE => {
                let mut c = Cursor::new(body, "Execute");
                let portal = c.cstr()?;
                let max_rows = c.i32()?;
                Self::Execute { portal, max_rows }
            }
            frontend::SYNC => Self::Sync,
            frontend::FLUSH => Self::Flush,
            frontend::FUNCTION_CALL => Self::FunctionCall,
            frontend::COPY_DATA => Self::CopyData(body),
            frontend::COPY_DONE => Self::CopyDone,
            frontend::COPY_FAIL => Self::CopyFail,
            frontend::TERMINATE => Self::Terminate,
            other => Self::Other(other),
        })
    }

    /// The statement text a Query or Parse carries.
    pub fn sql(&self) -> Option<&'a str> {
        match self {
            Self::Query { sql } => Some(sql),
            Self::Parse(parse) => Some(parse.sql),
            _ => None,
        }
    }
}

fn parse(body: &[u8]) -> Result<ParseView<'_>, ProtocolError> {
    let mut c = Cursor::new(body, "Parse");
    let name = c.cstr()?;
    let sql = c.cstr()?;
    let param_section = c.rest();
    let n = c.u16()?;
    c.bytes(usize::from(n) * 4)?;
    c.finish()?;
    Ok(ParseView {
        name,
        sql,
        param_section,
    })
}

fn bind(body: &[u8]) -> Result<BindView<'_>, ProtocolError> {
    let mut c = Cursor::new(body, "Bind");
    let portal = c.cstr()?;
    let statement = c.cstr()?;
    let nf = c.u16()?;
    let formats = c.i16_array(nf)?;
    let nv = c.u16()?;
    let values = (0..nv).map(|_| c.value()).collect::<Result<Vec<_>, _>>()?;
    let results = c.rest();
    let mut r = Cursor::new(results, "Bind");
    let nr = r.u16()?;
    r.i16_array(nr)?;
    r.finish()?;
    Ok(BindView {
        portal,
        statement,
        formats,
        values,
        results,
    })
}

fn target<'a>(body: &'a [u8], what: &'static str) -> Result<Target<'a>, ProtocolError> {
    let mut c = Cursor::new(body, what);
    let kind = c.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed { what });
    }
    let name = c.cstr()?;
    Ok(Target { kind, name })
}

/// One field of a RowDescription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowField<'a> {
    pub name: &'a [u8],
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub typlen: i16,
    pub typmod: i32,
    pub format: i16,
}

/// The fields of a RowDescription body.
pub fn row_description(body: &[u8]) -> Result<Vec<RowField<'_>>, ProtocolError> {
    let mut c = Cursor::new(body, "RowDescription");
    let n = c.u16()?;
    (0..n)
        .map(|_| {
            Ok(RowField {
                name: c.cstr_bytes()?,
                table_oid: c.u32()?,
                attnum: c.i16()?,
                type_oid: c.u32()?,
                typlen: c.i16()?,
                typmod: c.i32()?,
                format: c.i16()?,
            })
        })
        .collect()
}

/// The values of a DataRow body (`None` = NULL).
pub fn data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, ProtocolError> {
    let mut c = Cursor::new(body, "DataRow");
    let n = c.u16()?;
    (0..n).map(|_| c.value()).collect()
}

/// The tag of a CommandComplete body (`SELECT 3`, `INSERT 0 1`, …).
pub fn command_tag(body: &[u8]) -> Result<&str, ProtocolError> {
    Cursor::new(body, "CommandComplete").cstr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn message(tag: u8, body: &[u8]) -> Message {
        let mut raw = BytesMut::new();
        raw.put_u8(tag);
        raw.put_u32(u32::try_from(body.len() + 4).unwrap());
        raw.extend_from_slice(body);
        Message::from_raw(raw.freeze()).unwrap()
    }

    #[test]
    fn bind_is_decoded_with_every_length_checked() {
        let mut body = b"p1\0s1\0".to_vec();
        body.extend_from_slice(&[0, 1, 0, 1]); // one format: binary
        body.extend_from_slice(&[0, 2]); // two values
        body.extend_from_slice(&[0, 0, 0, 2, b'h', b'i']);
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&[0, 0]); // no result formats
        let m = message(frontend::BIND, &body);
        let Frontend::Bind(b) = Frontend::decode(&m).unwrap() else {
            panic!("not a Bind")
        };
        assert_eq!((b.portal, b.statement), ("p1", "s1"));
        assert_eq!(b.values, vec![Some(&b"hi"[..]), None]);
        assert_eq!((b.format_of(0), b.format_of(1)), (1, 1));
        for cut in 0..body.len() {
            let m = message(frontend::BIND, &body[..cut]);
            assert!(Frontend::decode(&m).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn parse_carries_name_text_and_types() {
        let body = b"s\0select $1\0\0\x01\0\0\0\x17";
        let m = message(frontend::PARSE, body);
        let Frontend::Parse(p) = Frontend::decode(&m).unwrap() else {
            panic!("not a Parse")
        };
        assert_eq!((p.name, p.sql), ("s", "select $1"));
        assert_eq!(p.param_types().collect::<Vec<_>>(), vec![23]);
        let m = message(frontend::PARSE, &body[..body.len() - 1]);
        assert!(Frontend::decode(&m).is_err());
    }

    #[test]
    fn describe_and_close_need_a_known_kind() {
        let m = message(frontend::DESCRIBE, b"Pportal\0");
        assert!(matches!(
            Frontend::decode(&m).unwrap(),
            Frontend::Describe(Target {
                kind: b'P',
                name: "portal"
            })
        ));
        assert!(Frontend::decode(&message(frontend::CLOSE, b"Xname\0")).is_err());
    }

    #[test]
    fn row_description_and_data_row() {
        let mut body = vec![0, 1];
        body.extend_from_slice(b"id\0");
        body.extend_from_slice(&16384u32.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&23u32.to_be_bytes());
        body.extend_from_slice(&4i16.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        let fields = row_description(&body).unwrap();
        assert_eq!(fields[0].name, b"id");
        assert_eq!((fields[0].table_oid, fields[0].attnum), (16384, 1));
        assert!(row_description(&body[..body.len() - 1]).is_err());
        assert!(data_row(&[0, 1, 0, 0, 0, 5, b'x']).is_err());
    }
}
