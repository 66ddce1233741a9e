//! Watches `gateway.toml`, and the certificate, key and CA files it names, and reloads
//! when their bytes change.
//!
//! The watch is on the file's directory, not the file: editors save by writing a new
//! file and renaming it over the old one, and a Kubernetes ConfigMap volume swaps a
//! `..data` symlink, and neither is seen by a watch on the old inode. When the path is
//! a symlink, the directory of its target is watched too (and followed when it moves).
//! Events are debounced (an editor's save is a burst of them); after the burst the file
//! is read and its hash compared with the config in force, so events that change
//! nothing (another file in the directory, a `touch`, our own audit log) cost one read.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::reload;
use crate::server::Shared;

/// Quiet time after the last event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// A file that keeps changing is still read this often.
const MAX_DELAY: Duration = Duration::from_secs(2);

enum Msg {
    Event(notify::Result<Event>),
    Stop,
}

/// A running watcher; dropping it stops it.
pub struct ConfigWatcher {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts watching the file the gateway was started with, and applies at once any
/// change made since it was read. Fails when its directory cannot be watched.
pub fn spawn(shared: Arc<Shared>) -> io::Result<ConfigWatcher> {
    let path = shared.config.path.clone();
    let (tx, rx) = mpsc::channel();
    let events = tx.clone();
    let mut watcher = notify::recommended_watcher(move |e| {
        let _ = events.send(Msg::Event(e));
    })
    .map_err(io::Error::other)?;
    let mut watched = BTreeSet::new();
    let dir = parent(&path);
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| io::Error::other(format!("cannot watch {}: {e}", dir.display())))?;
    watched.insert(dir);
    follow_symlink(
        &mut watcher,
        &mut watched,
        &path,
        &shared.reload.tls_files(),
    );
    tracing::info!(path = %path.display(), "watching the configuration file for changes");
    let thread = std::thread::Builder::new()
        .name("bulkhead-watch".into())
        .spawn(move || run(watcher, watched, path, rx, shared))?;
    Ok(ConfigWatcher {
        tx,
        thread: Some(thread),
    })
}

fn run(
    mut watcher: RecommendedWatcher,
    mut watched: BTreeSet<PathBuf>,
    path: PathBuf,
    rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
) {
    // The file was read before the watch was in place: an edit in between raised no
    // event, so compare once now (one read when nothing changed).
    let _ = reload::reload_if_changed(&shared);
    loop {
        match rx.recv() {
            Ok(Msg::Event(e)) if relevant(&e) => {}
            Ok(Msg::Event(_)) => continue,
            Ok(Msg::Stop) | Err(_) => return,
        }
        let burst = Instant::now();
        loop {
            match rx.recv_timeout(DEBOUNCE) {
                Ok(Msg::Event(_)) if burst.elapsed() < MAX_DELAY => {}
                Ok(Msg::Event(_)) | Err(RecvTimeoutError::Timeout) => break,
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // The outcome is logged, counted and recorded by `reload` itself.
        let _ = reload::reload_if_changed(&shared);
        follow_symlink(
            &mut watcher,
            &mut watched,
            &path,
            &shared.reload.tls_files(),
        );
    }
}

/// Opening or reading a file changes nothing (and reading the config would otherwise
/// wake the watcher itself); everything else may have.
fn relevant(e: &notify::Result<Event>) -> bool {
    match e {
        Ok(e) => match e.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
        Err(err) => {
            tracing::warn!(error = %err, "file watch error; re-reading the configuration");
            true
        }
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Keeps a watch on the directory of the symlink's current target (besides the
/// link's own directory), moving it when the link is repointed; and on the
/// directories of the certificate files the config reads (and of their targets).
fn follow_symlink(
    watcher: &mut RecommendedWatcher,
    watched: &mut BTreeSet<PathBuf>,
    path: &Path,
    tls_files: &[PathBuf],
) {
    let mut wanted = BTreeSet::new();
    for file in std::iter::once(path).chain(tls_files.iter().map(PathBuf::as_path)) {
        let own = parent(file);
        let target = std::fs::canonicalize(file).ok().map(|p| parent(&p));
        let own_canonical = std::fs::canonicalize(&own).ok();
        if let Some(t) = target.filter(|t| Some(t) != own_canonical.as_ref()) {
            wanted.insert(t);
        }
        wanted.insert(own);
    }
    for stale in watched.difference(&wanted).cloned().collect::<Vec<_>>() {
        let _ = watcher.unwatch(&stale);
        watched.remove(&stale);
    }
    for dir in wanted {
        if !watched.contains(&dir) {
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir);
                }
                Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot watch"),
            }
        }
    }
}
