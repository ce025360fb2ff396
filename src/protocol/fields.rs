//! ErrorResponse fields and the password message (the other messages pgward reads are typed
//! views in [`super::view`]).

use super::cursor::take_cstr;
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
