//! One writer per audit directory: an exclusive `flock` on `<dir>/pgward-audit.lock`, held
//! by the writer for as long as it runs and released by the kernel when the process exits
//! (even after `kill -9`), so a stale lock never blocks a restart.
//!
//! A second pgward pointed at the same directory would interleave its own chain (and a
//! `recovery` record) with the live one, which `verify` then reports as tampering. It must
//! therefore fail before it reads the tail or writes a byte.
use std::fs::File;
use std::path::Path;

use super::AuditError;

/// Name of the lock file inside the audit directory (not a segment: `verify` ignores it).
pub(crate) const LOCK_FILE: &str = "pgward-audit.lock";

/// The held lock; dropping it releases the directory.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

/// Takes the directory's lock without waiting: `AuditError::Locked` when another process
/// (or another writer of this process) holds it.
pub(crate) fn acquire(dir: &Path) -> Result<DirLock, AuditError> {
    let path = dir.join(LOCK_FILE);
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(&path).map_err(|e| AuditError::io(&path, e))?;
    match try_flock(&file) {
        Ok(()) => Ok(DirLock { _file: file }),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(AuditError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(e) => Err(AuditError::io(&path, e)),
    }
}

/// `flock(LOCK_EX | LOCK_NB)` (`File::try_lock` is newer than the crate's MSRV).
fn try_flock(file: &File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_a_directory_fails_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap();
        let second = acquire(dir.path()).unwrap_err();
        assert!(matches!(second, AuditError::Locked { .. }), "{second}");
        assert!(second.to_string().contains("another pgward"), "{second}");
        drop(first);
        acquire(dir.path()).unwrap();
    }
}
