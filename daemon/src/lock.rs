//! One daemon per database, and commands that must not run beside it.
//!
//! A running daemon holds an exclusive `flock` on `<db>-marmot.lock` beside the database for
//! its whole life (the kernel drops it when the process ends, however it ends). A second
//! daemon for the same database refuses to start; commands that change marmot's state in the
//! database behind the daemon's back (`snapshot restore`, which captures pending writes into
//! an outbox the daemon would never learn of, and `cleanup`) refuse while it is held.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock a running daemon holds. Dropping it releases it.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

/// Where the lock of the database at `db` lives.
pub fn lock_path(db: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
    let name = canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "marmot".into());
    canonical.with_file_name(format!("{name}-marmot.lock"))
}

impl DaemonLock {
    /// Takes the lock of `db`, or says that a daemon already runs for it.
    pub fn acquire(db: &Path) -> anyhow::Result<DaemonLock> {
        let path = lock_path(db);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening the lock file {}: {e}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                anyhow::bail!(
                    "a marmot daemon already runs for {} (it holds {}): stop it first",
                    db.display(),
                    path.display()
                );
            }
            anyhow::bail!("locking {}: {err}", path.display());
        }
        Ok(DaemonLock { _file: file })
    }
}

/// Takes the daemon's lock for `what`, a command that must not run while a daemon runs for
/// `db` (and during which none may start): refused with a clear message while one runs.
pub fn exclusive(db: &Path, what: &str) -> anyhow::Result<DaemonLock> {
    match DaemonLock::acquire(db) {
        Ok(lock) => Ok(lock),
        Err(e) if e.to_string().contains("already runs") => anyhow::bail!(
            "{what} cannot run while the marmot daemon for {} runs: stop the daemon first, \
             then run it again (the daemon restores by itself when it falls behind or starts empty)",
            db.display()
        ),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_commands_refuse_while_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        std::fs::write(&db, b"").unwrap();
        let held = DaemonLock::acquire(&db).unwrap();
        let again = DaemonLock::acquire(&db).unwrap_err().to_string();
        assert!(again.contains("already runs"), "{again}");
        let refused = exclusive(&db, "`marmot snapshot restore`")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("stop the daemon first"), "{refused}");
        drop(held);
        let cmd = exclusive(&db, "`marmot snapshot restore`").unwrap();
        assert!(
            DaemonLock::acquire(&db).is_err(),
            "no daemon starts while the command runs"
        );
        drop(cmd);
        DaemonLock::acquire(&db).unwrap();
    }
}
