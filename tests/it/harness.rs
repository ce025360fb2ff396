//! The shared integration-test harness: one real PostgreSQL per test binary, stopped at exit.
use std::sync::OnceLock;

use pgward::pgserver::{EmbeddedOptions, EmbeddedPostgres};

static SERVER: OnceLock<parking_lot::Mutex<Option<EmbeddedPostgres>>> = OnceLock::new();

extern "C" fn stop_server_at_exit() {
    if let Some(slot) = SERVER.get() {
        drop(slot.lock().take());
    }
}

/// Connection facts of the shared server.
#[derive(Clone, Debug)]
pub struct Pg {
    pub port: u16,
    pub password: String,
    #[allow(dead_code)]
    pub socket_dir: std::path::PathBuf,
}

/// The shared server, started (with the demo migrations applied to `postgres`) on first use.
pub fn postgres() -> Pg {
    let slot = SERVER.get_or_init(|| {
        let server = EmbeddedPostgres::start(EmbeddedOptions::default()).expect("start PostgreSQL");
        // SAFETY: registering a plain extern "C" fn with atexit.
        unsafe { libc::atexit(stop_server_at_exit) };
        parking_lot::Mutex::new(Some(server))
    });
    let guard = slot.lock();
    let server = guard.as_ref().expect("server running");
    Pg {
        port: server.port(),
        password: server.password().to_string(),
        socket_dir: server.socket_dir(),
    }
}
