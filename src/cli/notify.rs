//! systemd's readiness protocol (`Type=notify`): `READY=1`, `RELOADING=1`, `STOPPING=1` sent
//! as datagrams to `$NOTIFY_SOCKET`. A plain unix datagram socket does it; without the variable
//! (not started by systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// Tell the service manager, if there is one, about a state change. Failures are logged and
/// otherwise ignored: readiness reporting must never stop the proxy.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify_to(Path::new(&socket), state) {
        tracing::warn!(error = %e, state, "cannot notify the service manager");
    }
}

/// Send `state` to the notification socket at `path` (`@name` is an abstract socket).
pub fn notify_to(path: &Path, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let text = path.to_string_lossy();
    if let Some(name) = text.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.send_to_addr(state.as_bytes(), &address)?;
    } else {
        socket.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_arrive_as_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_to(&path, "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
