//! The startup parameters a client may send: identity-changing ones are refused for everyone,
//! and a policy-bound service may set only what its `SET` statements may (including through
//! `options`, split as the server splits it).
use crate::error::{sqlstate, ClientError};
use crate::policy::allow;
use crate::protocol::startup::StartupMessage;
use crate::proxy::Shared;

/// Parameters that change identity or name resolution; refused at connect.
const IDENTITY_PARAMETERS: [&str; 5] = [
    "role",
    "session_authorization",
    "replication",
    "session_preload_libraries",
    "local_preload_libraries",
];

/// Which startup parameters a service may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRules {
    /// Anything but identity-changing parameters (unrestricted services, or no `[policy]`).
    Open { search_path: bool },
    /// A policy-bound service: the same allowlist as its `SET` statements (built-in safe
    /// parameters plus the policy's `[allow].set`), and a UTF-8 client encoding, so the
    /// startup packet cannot reach what the rewriter refuses in SQL (`standard_conforming_strings`,
    /// `row_security`, an SJIS encoding that reads our quoting differently, ...).
    Bound { settable: Vec<String> },
}

pub(super) fn startup_rules(shared: &Shared, service: &str, unrestricted: bool) -> StartupRules {
    let bound = shared
        .policies
        .as_ref()
        .filter(|_| !unrestricted)
        .and_then(|p| p.engine().extra_settable(service));
    match bound {
        Some(settable) => StartupRules::Bound { settable },
        None => StartupRules::Open {
            search_path: unrestricted,
        },
    }
}

/// Refuse startup parameters (and `-c`/`--` switches inside `options`) that change identity or
/// name resolution, or that a policy-bound service may not set. Anything in `options` that is
/// not a `-c name=value` setting is refused too, because server switches are not ours to pass
/// through unseen.
pub fn check_startup_parameters(
    startup: &StartupMessage,
    rules: &StartupRules,
) -> Result<(), ClientError> {
    for (name, value) in &startup.params {
        match name.as_str() {
            "user" | "database" | "application_name" => {}
            "options" => {
                for (setting, value) in parse_options(value)? {
                    check_setting(&setting, &value, rules)?;
                }
            }
            _ if name.starts_with("_pq_.") => {}
            other => check_setting(other, value, rules)?,
        }
    }
    Ok(())
}

fn check_setting(name: &str, value: &str, rules: &StartupRules) -> Result<(), ClientError> {
    let normalized = name.to_ascii_lowercase().replace('-', "_");
    let refuse = |why: &str| {
        Err(ClientError::fatal(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("pgward: startup parameter \"{normalized}\" is not allowed: {why}"),
        ))
    };
    if IDENTITY_PARAMETERS.contains(&normalized.as_str()) {
        return refuse("it would change the session's identity");
    }
    if crate::sql::settings::reads_differently(&normalized, value) == Some(true) {
        return refuse("the server would read SQL differently from pgward's analysis (standard_conforming_strings must stay on, and the client_encoding must not embed ASCII bytes in its characters)");
    }
    match rules {
        StartupRules::Open { search_path: false } if normalized == "search_path" => {
            refuse("it would change the session's name resolution")
        }
        StartupRules::Open { .. } => Ok(()),
        StartupRules::Bound { .. }
            if normalized == "client_encoding" && !allow::is_utf8_encoding(value) =>
        {
            refuse("a policy-bound service must use client_encoding UTF8")
        }
        StartupRules::Bound { settable } if !allow::is_settable(&normalized, settable) => refuse(
            "a policy-bound service may only set the parameters its SET statements may (see the policy reference)",
        ),
        StartupRules::Bound { .. } => Ok(()),
    }
}

/// Split the `options` startup parameter the way the server does (whitespace-separated,
/// backslash escapes) into `-c name=value` / `--name=value` settings.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, ClientError> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(escaped) = chars.next() {
                    current.push(escaped);
                }
                in_word = true;
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    let refuse = |word: &str| {
        ClientError::fatal(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("pgward: unsupported switch in startup options: {word:?} (only -c name=value and --name=value are passed on)"),
        )
    };
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let assignment = if word == "-c" {
            words.next().ok_or_else(|| refuse(&word))?
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(refuse(&word));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| refuse(&assignment))?;
        settings.push((name.to_string(), value.to_string()));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage {
            minor_version: 0,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn options_are_split_like_the_server_does() {
        let parsed =
            parse_options(r"-c DateStyle=ISO --extra_float_digits=3 -capplication_name=a\ b")
                .unwrap();
        assert_eq!(
            parsed,
            vec![
                ("DateStyle".into(), "ISO".into()),
                ("extra_float_digits".into(), "3".into()),
                ("application_name".into(), "a b".into())
            ]
        );
        assert!(parse_options("-D /tmp").is_err());
        assert!(parse_options("-c").is_err());
    }

    const OPEN: StartupRules = StartupRules::Open { search_path: false };
    const OPEN_UNRESTRICTED: StartupRules = StartupRules::Open { search_path: true };

    #[test]
    fn identity_changing_parameters_are_refused() {
        assert!(
            check_startup_parameters(&startup(&[("user", "a"), ("DateStyle", "ISO")]), &OPEN)
                .is_ok()
        );
        for bad in [
            startup(&[("role", "postgres")]),
            startup(&[("options", "-c role=postgres")]),
            startup(&[("options", "--session-authorization=postgres")]),
            startup(&[("search_path", "evil")]),
            startup(&[("options", "-c search_path=evil")]),
            startup(&[("replication", "database")]),
        ] {
            let err = check_startup_parameters(&bad, &OPEN).unwrap_err();
            assert_eq!(err.sqlstate, sqlstate::INSUFFICIENT_PRIVILEGE);
        }
        let unrestricted = &OPEN_UNRESTRICTED;
        assert!(
            check_startup_parameters(&startup(&[("search_path", "app")]), unrestricted).is_ok()
        );
        assert!(check_startup_parameters(&startup(&[("role", "x")]), unrestricted).is_err());
    }

    #[test]
    fn bound_services_start_with_only_settable_parameters_and_utf8() {
        let bound = StartupRules::Bound {
            settable: vec!["work_mem".into()],
        };
        for ok in [
            startup(&[
                ("user", "a"),
                ("client_encoding", "UTF8"),
                ("DateStyle", "ISO"),
            ]),
            startup(&[("options", "-c extra_float_digits=3 -c work_mem=64MB")]),
            startup(&[("TimeZone", "UTC"), ("client_encoding", "utf-8")]),
            // asyncpg sends the quotes as part of the value; PostgreSQL ignores them.
            startup(&[("client_encoding", "'utf-8'")]),
            startup(&[("options", "-c client_encoding=Unicode")]),
        ] {
            assert!(check_startup_parameters(&ok, &bound).is_ok(), "{ok:?}");
        }
        for bad in [
            startup(&[("client_encoding", "SJIS")]),
            startup(&[("options", "-c client_encoding=BIG5")]),
            startup(&[("standard_conforming_strings", "off")]),
            startup(&[("options", "-c standard_conforming_strings=off")]),
            startup(&[("row_security", "off")]),
            startup(&[("search_path", "evil")]),
            startup(&[("options", "-c maintenance_work_mem=1GB")]),
        ] {
            let err = check_startup_parameters(&bad, &bound).unwrap_err();
            assert_eq!(err.sqlstate, sqlstate::INSUFFICIENT_PRIVILEGE, "{bad:?}");
        }
        // A service no policy binds may choose other encodings, but not one in which the
        // server reads SQL differently from pgward, nor turn standard_conforming_strings off.
        assert!(
            check_startup_parameters(&startup(&[("client_encoding", "LATIN1")]), &OPEN).is_ok()
        );
        for bad in [
            startup(&[("client_encoding", "SJIS")]),
            startup(&[("options", "-c client_encoding=BIG5")]),
            startup(&[("standard_conforming_strings", "off")]),
        ] {
            let err = check_startup_parameters(&bad, &OPEN).unwrap_err();
            assert_eq!(err.sqlstate, sqlstate::INSUFFICIENT_PRIVILEGE, "{bad:?}");
        }
    }
}
