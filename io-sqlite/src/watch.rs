//! Noticing local writes quickly and cheaply: a file watch (inotify) on the database and its
//! `-wal` file is the wake-up; `PRAGMA data_version` inside [`crate::SqliteStore`] is the
//! truth. A hint may be spurious (marmot's own commits touch the WAL too) or, on file
//! systems without notifications, missing; the node also polls at a fixed interval.

use futures::channel::mpsc;
use notify::{RecursiveMode, Watcher as _};
use std::path::Path;

/// Keeps the watch alive; drop it to stop.
pub struct Watcher {
    _inner: notify::RecommendedWatcher,
}

/// Watches `db`. The receiver yields `()` whenever the database or its WAL changed
/// (coalesced: at most one hint is pending).
pub fn watch(db: &Path) -> notify::Result<(Watcher, mpsc::Receiver<()>)> {
    let (mut tx, rx) = mpsc::channel(1);
    let dir = db
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let mut wal = name.clone();
    wal.push("-wal");
    let mut inner = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let ours = ev
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|f| f == name || f == wal));
            let relevant = matches!(
                ev.kind,
                notify::EventKind::Modify(_)
                    | notify::EventKind::Create(_)
                    | notify::EventKind::Any
            );
            if ours && relevant {
                // Full means a hint is already pending: that is enough.
                let _ = tx.try_send(());
            }
        }
    })?;
    inner.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok((Watcher { _inner: inner }, rx))
}
