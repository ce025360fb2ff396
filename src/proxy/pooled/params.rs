//! Startup parameters of a client whose server connections are shared.
//!
//! Pooled server connections log in with no client parameters, so every client of a pool sees
//! the same server settings. A client's startup parameter is accepted when it changes nothing
//! (its value is the one the server reports), or it is `application_name` (kept per client:
//! reported back to it and written in its audit record, not set upstream), or
//! `extra_float_digits` ≥ 1 (PostgreSQL 12 and later print floats exactly for every positive
//! value). Anything else would differ between clients sharing a connection and is refused
//! (FATAL 0A000) rather than silently ignored.

use bytes::Bytes;

use crate::error::{sqlstate, ClientError};
use crate::protocol::backend;

/// The (name, value) of a ParameterStatus message.
fn parameter_status(message: &Bytes) -> Option<(&str, &str)> {
    if message.first() != Some(&backend::PARAMETER_STATUS) {
        return None;
    }
    let body = message.get(5..)?;
    let mut parts = body.split(|b| *b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

fn normalized(value: &str) -> String {
    value
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-' && *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Check the client's startup parameters against the server's; returns its application_name.
pub fn check(params: &[(String, String)], server: &[Bytes]) -> Result<Option<String>, ClientError> {
    let mut application_name = None;
    for (name, value) in params {
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "user" | "database" => continue,
            "application_name" => {
                application_name = Some(value.clone());
                continue;
            }
            "extra_float_digits" if value.trim().parse::<i32>().is_ok_and(|v| v >= 1) => continue,
            "options" if value.trim().is_empty() => continue,
            _ if lower.starts_with("_pq_.") => continue,
            _ => {}
        }
        let same = server
            .iter()
            .filter_map(parameter_status)
            .any(|(n, v)| n.eq_ignore_ascii_case(name) && normalized(v) == normalized(value));
        if !same {
            return Err(ClientError::fatal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "pgward: startup parameter {name:?} cannot be set per client: this service is in transaction pooling mode (server connections are shared); set it with ALTER ROLE/DATABASE upstream, or SET LOCAL inside a transaction"
                ),
            ));
        }
    }
    Ok(application_name)
}

/// The server's startup messages as this client sees them: its own application_name.
pub fn client_view(server: &[Bytes], application_name: Option<&str>) -> Vec<Bytes> {
    let mut out: Vec<Bytes> = server
        .iter()
        .filter(|m| parameter_status(m).is_none_or(|(n, _)| n != "application_name"))
        .cloned()
        .collect();
    out.push(crate::protocol::build::parameter_status(
        "application_name",
        application_name.unwrap_or(""),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::build::parameter_status as ps;

    fn params(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_parameters_that_change_nothing_are_accepted() {
        let server = vec![
            ps("client_encoding", "UTF8"),
            ps("DateStyle", "ISO, MDY"),
            ps("application_name", ""),
        ];
        let ok = params(&[
            ("user", "svc"),
            ("client_encoding", "utf-8"),
            ("datestyle", "ISO,MDY"),
            ("application_name", "pgbench"),
            ("extra_float_digits", "3"),
        ]);
        assert_eq!(check(&ok, &server).unwrap().as_deref(), Some("pgbench"));
        for bad in [
            ("DateStyle", "German"),
            ("TimeZone", "UTC"),
            ("options", "-c x=1"),
        ] {
            let error = check(&params(&[bad]), &server).unwrap_err();
            assert_eq!(error.sqlstate, "0A000");
            assert!(error.message.contains("transaction pooling mode"));
        }
        let view = client_view(&server, Some("me"));
        let names: Vec<_> = view.iter().filter_map(parameter_status).collect();
        assert!(names.contains(&("application_name", "me")));
        assert_eq!(
            names
                .iter()
                .filter(|(n, _)| *n == "application_name")
                .count(),
            1
        );
    }
}
