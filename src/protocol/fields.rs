//! Reading the fields of the few messages the proxy looks inside.

use super::startup::take_cstr;
use super::ProtocolError;

/// Fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
}

impl ErrorFields {
    /// Parse the body of an ErrorResponse/NoticeResponse.
    pub fn parse(mut body: &[u8]) -> Result<Self, ProtocolError> {
        let mut fields = Self::default();
        loop {
            let (&kind, rest) = body.split_first().ok_or(ProtocolError::Malformed {
                what: "ErrorResponse",
            })?;
            if kind == 0 {
                return Ok(fields);
            }
            let (value, rest) = take_cstr(rest).ok_or(ProtocolError::Malformed {
                what: "ErrorResponse",
            })?;
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'V' => fields.severity = Some(value),
                b'S' if fields.severity.is_none() => fields.severity = Some(value),
                b'C' => fields.code = Some(value),
                b'M' => fields.message = Some(value),
                _ => {}
            }
            body = rest;
        }
    }
}

/// The SQL text of a Query message body.
pub fn query_text(body: &[u8]) -> Result<&str, ProtocolError> {
    let (sql, _) = take_cstr(body).ok_or(ProtocolError::Malformed { what: "Query" })?;
    std::str::from_utf8(sql).map_err(|_| ProtocolError::Malformed { what: "Query" })
}

/// Statement name and SQL text of a Parse message body.
pub fn parse_name_and_text(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    parse_parts(body).map(|(name, sql, _)| (name, sql))
}

/// Statement name, SQL text and the raw parameter-type list (count and OIDs) of a Parse body.
pub fn parse_parts(body: &[u8]) -> Result<(&str, &str, &[u8]), ProtocolError> {
    let malformed = || ProtocolError::Malformed { what: "Parse" };
    let (name, rest) = take_cstr(body).ok_or_else(malformed)?;
    let (sql, param_types) = take_cstr(rest).ok_or_else(malformed)?;
    Ok((
        std::str::from_utf8(name).map_err(|_| malformed())?,
        std::str::from_utf8(sql).map_err(|_| malformed())?,
        param_types,
    ))
}

/// The password (here: the token) of a PasswordMessage body.
pub fn password_text(body: &[u8]) -> Result<&str, ProtocolError> {
    let malformed = || ProtocolError::Malformed {
        what: "PasswordMessage",
    };
    let (password, rest) = take_cstr(body).ok_or_else(malformed)?;
    if !rest.is_empty() {
        return Err(malformed());
    }
    std::str::from_utf8(password).map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_query_and_parse_bodies() {
        assert_eq!(query_text(b"select 1\0").unwrap(), "select 1");
        assert!(query_text(b"select 1").is_err());
        assert_eq!(
            parse_name_and_text(b"s1\0select $1\0\0\0").unwrap(),
            ("s1", "select $1")
        );
        assert!(parse_name_and_text(b"s1\0select").is_err());
    }

    #[test]
    fn password_must_be_exactly_one_string() {
        assert_eq!(password_text(b"tok\0").unwrap(), "tok");
        assert!(password_text(b"tok\0extra").is_err());
        assert!(password_text(b"tok").is_err());
    }

    #[test]
    fn error_fields_reject_unterminated_input() {
        assert!(ErrorFields::parse(b"Cabc").is_err());
        assert!(ErrorFields::parse(b"").is_err());
        let parsed = ErrorFields::parse(b"SERROR\0C42501\0Mno\0\0").unwrap();
        assert_eq!(parsed.code.as_deref(), Some("42501"));
    }
}
