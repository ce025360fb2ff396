//! Arbitrary bytes as the first packet of a connection, then the startup-parameter checks that
//! run before authentication: no panic, bounded allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgward::protocol::startup::{parse_startup_body, StartupPacket};
use pgward::proxy::handshake::{check_startup_parameters, parse_options, StartupRules};

fuzz_target!(|data: &[u8]| {
    if let Ok(StartupPacket::Startup(startup)) = parse_startup_body(data) {
        for rules in [
            StartupRules::Open { search_path: false },
            StartupRules::Open { search_path: true },
            StartupRules::Bound {
                settable: vec!["statement_timeout".into()],
            },
        ] {
            let _ = check_startup_parameters(&startup, &rules);
        }
        for (_, value) in &startup.params {
            let _ = parse_options(value);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_options(text);
    }
});
