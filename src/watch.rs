//! Watches `gateway.toml`, and the certificate, key and CA files it names, and reloads
//! when their bytes change.
//!
//! The watches are on directories, not files: editors save by writing a new file and
//! renaming it over the old one, and a Kubernetes ConfigMap volume swaps a `..data`
//! symlink, and neither is seen by a watch on the old inode. Every path is resolved one
//! component at a time, as the kernel does, and the directory holding each symlink met
//! on the way is watched, besides the directory that really holds the file: so a
//! `..data` swap, a Capistrano `current -> releases/N` swap and a directory replaced
//! whole are all seen. An inotify watch sticks to an inode, not a path, so the chain is
//! resolved again after every event and a directory whose inode changed (or that went
//! away) is watched afresh. Each directory has its own watcher: notify removes a watch
//! twice when one of its watches is a subdirectory of another and that subdirectory is
//! deleted (a ConfigMap swap), and warns about the second time.
//!
//! Events are debounced (an editor's save is a burst of them); after the burst the file
//! is read and its hash compared with the config in force, so events that change
//! nothing (another file in the directory, a `touch`, our own audit log) cost one read.
//! A watched file written in place is read once the writer closes it, not while it is
//! half written.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::reload;
use crate::server::Shared;

/// Quiet time after the last event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// A file that keeps changing is still read this often.
const MAX_DELAY: Duration = Duration::from_secs(2);
/// A watched file that was written in place but not closed is read after this long
/// without a write (a writer that holds it open, or a close that was missed).
pub const UNCLOSED_WRITE: Duration = Duration::from_secs(2);
/// Symlinks followed in one path before giving up, as the kernel's `ELOOP`.
const MAX_SYMLINKS: usize = 40;

enum Msg {
    Event(notify::Result<Event>),
    Stop,
}

/// A running watcher; dropping it stops it.
pub struct ConfigWatcher {
    tx: Sender<Msg>,
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
    let mut dirs = Dirs {
        tx: tx.clone(),
        watched: BTreeMap::new(),
        files: BTreeSet::new(),
    };
    let (_, errors) = dirs.sync(&path, &[]);
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    dirs.sync(&path, &shared.reload.tls_files());
    tracing::info!(path = %path.display(), "watching the configuration file for changes");
    let thread = std::thread::Builder::new()
        .name("bulkhead-watch".into())
        .spawn(move || run(dirs, path, rx, shared))?;
    Ok(ConfigWatcher {
        tx,
        thread: Some(thread),
    })
}

fn run(mut dirs: Dirs, path: PathBuf, rx: mpsc::Receiver<Msg>, shared: Arc<Shared>) {
    // The file was read before the watch was in place: an edit in between raised no
    // event, so the first burst starts now and ends in a read (one read when nothing
    // changed), after the writes that are going on, if any.
    let mut burst = Burst::new();
    loop {
        while let Some(wait) = burst.wait() {
            match rx.recv_timeout(wait) {
                Ok(Msg::Event(e)) if relevant(&e) => {
                    // Re-resolved before the event is classified: a new file or a new
                    // directory is judged by the chain as it is now.
                    dirs.sync(&path, &shared.reload.tls_files());
                    burst.add(&e, &dirs.files);
                }
                Ok(Msg::Event(_)) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // The outcome is logged, counted and recorded by `reload` itself.
        let _ = reload::reload_if_changed(&shared);
        // The reload may name other certificate files, and the chain may have moved
        // while it read: whatever was missed before the new watches were in place is
        // found by reading once more.
        if dirs.sync(&path, &shared.reload.tls_files()).0 {
            let _ = reload::reload_if_changed(&shared);
        }
        let first = loop {
            match rx.recv() {
                Ok(Msg::Event(e)) if relevant(&e) => break e,
                Ok(Msg::Event(_)) => {}
                Ok(Msg::Stop) | Err(_) => return,
            }
        };
        burst = Burst::new();
        dirs.sync(&path, &shared.reload.tls_files());
        burst.add(&first, &dirs.files);
    }
}

/// One burst of events, and when it is over.
struct Burst {
    start: Instant,
    last: Instant,
    /// Watched files written in place (`IN_MODIFY`, or created) and not closed since.
    writing: BTreeSet<PathBuf>,
    last_write: Instant,
}

impl Burst {
    fn new() -> Burst {
        let now = Instant::now();
        Burst {
            start: now,
            last: now,
            writing: BTreeSet::new(),
            last_write: now,
        }
    }

    fn add(&mut self, e: &notify::Result<Event>, files: &BTreeSet<PathBuf>) {
        let now = Instant::now();
        self.last = now;
        let Ok(e) = e else { return };
        for p in e.paths.iter().filter(|p| files.contains(*p)) {
            match e.kind {
                // A file created by `open` is as good as written in place: its writer
                // has yet to fill and close it. (A rename or a symlink is whole.)
                EventKind::Create(_) if is_regular_file(p) => {
                    self.writing.insert(p.clone());
                    self.last_write = now;
                }
                EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any | ModifyKind::Other) => {
                    self.writing.insert(p.clone());
                    self.last_write = now;
                }
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Remove(_)
                | EventKind::Modify(ModifyKind::Name(_)) => {
                    self.writing.remove(p);
                }
                _ => {}
            }
        }
    }

    /// How long to wait for more events; `None` when the file is to be read now.
    fn wait(&self) -> Option<Duration> {
        let left = if self.writing.is_empty() {
            DEBOUNCE
                .saturating_sub(self.last.elapsed())
                .min(MAX_DELAY.saturating_sub(self.start.elapsed()))
        } else {
            UNCLOSED_WRITE.saturating_sub(self.last_write.elapsed())
        };
        (!left.is_zero()).then_some(left)
    }
}

fn is_regular_file(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
}

/// Opening, reading or closing a file unwritten changes nothing (and reading the
/// config would otherwise wake the watcher itself); everything else may have.
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

/// The watched directories, one watcher each, with the inode each watch is on.
struct Dirs {
    tx: Sender<Msg>,
    watched: BTreeMap<PathBuf, (DirId, RecommendedWatcher)>,
    /// Where the watched files really are, every symlink resolved.
    files: BTreeSet<PathBuf>,
}

/// A directory's device and inode: what an inotify watch is bound to.
type DirId = (u64, u64);

impl Dirs {
    /// Resolves the config file's and the certificate files' paths again and moves the
    /// watches to the directories they go through now. Returns whether any watch
    /// changed, and the directories of the config file that cannot be watched.
    fn sync(&mut self, config: &Path, tls_files: &[PathBuf]) -> (bool, Vec<io::Error>) {
        let mut wanted = BTreeMap::new();
        let mut files = BTreeSet::new();
        for (i, file) in std::iter::once(config)
            .chain(tls_files.iter().map(PathBuf::as_path))
            .enumerate()
        {
            let mut dirs = BTreeSet::new();
            if let Some(real) = resolve(file, &mut dirs) {
                files.insert(real);
            }
            for d in dirs {
                // A directory that is gone between the two calls is left to the next
                // event (its parent is watched by then).
                if let Ok(m) = std::fs::metadata(&d) {
                    wanted.insert(d, ((m.dev(), m.ino()), i == 0));
                }
            }
        }
        self.files = files;

        let mut changed = false;
        // Dropping a watcher removes its watch; one on a deleted directory is gone
        // already, and notify says nothing.
        self.watched.retain(|dir, (id, _)| {
            let keep = wanted.get(dir).is_some_and(|(want, _)| want == id);
            changed |= !keep;
            keep
        });
        let mut errors = Vec::new();
        for (dir, (id, for_config)) in wanted {
            if self.watched.contains_key(&dir) {
                continue;
            }
            changed = true;
            match self.watch(&dir) {
                Ok(w) => {
                    self.watched.insert(dir, (id, w));
                }
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot watch");
                    if for_config {
                        errors.push(io::Error::other(format!(
                            "cannot watch {}: {e}",
                            dir.display()
                        )));
                    }
                }
            }
        }
        (changed, errors)
    }

    fn watch(&self, dir: &Path) -> notify::Result<RecommendedWatcher> {
        let events = self.tx.clone();
        let mut w = notify::recommended_watcher(move |e| {
            let _ = events.send(Msg::Event(e));
        })?;
        w.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(w)
    }
}

/// Resolves `file` one component at a time, as the kernel does, adding to `dirs` every
/// directory that holds a symlink on the way and the one that holds the file itself.
/// Returns the file's real path; `None` when some component is missing (then the
/// deepest directory that exists is in `dirs`, where it will appear).
fn resolve(file: &Path, dirs: &mut BTreeSet<PathBuf>) -> Option<PathBuf> {
    let absolute = if file.is_absolute() {
        file.to_owned()
    } else {
        std::env::current_dir().ok()?.join(file)
    };
    // Components still to walk, the next one last.
    let mut todo: Vec<OsString> = components(&absolute);
    let mut real = PathBuf::from("/");
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == "/" {
            real = PathBuf::from("/");
        } else if c == ".." {
            real.pop();
        } else if c != "." {
            let next = real.join(&c);
            match std::fs::symlink_metadata(&next) {
                Ok(m) if m.file_type().is_symlink() => {
                    dirs.insert(real.clone());
                    links += 1;
                    let target = std::fs::read_link(&next).ok()?;
                    if links > MAX_SYMLINKS {
                        return None;
                    }
                    todo.extend(components(&target));
                }
                Ok(_) => real = next,
                Err(_) => {
                    dirs.insert(real);
                    return None;
                }
            }
        }
    }
    dirs.insert(match real.parent() {
        Some(p) => p.to_owned(),
        None => real.clone(),
    });
    Some(real)
}

/// `p`'s components, last first.
fn components(p: &Path) -> Vec<OsString> {
    p.components()
        .rev()
        .map(|c| c.as_os_str().to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolve_watches_every_directory_holding_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir_all(d.join("releases/1")).unwrap();
        std::fs::write(d.join("releases/1/gateway.toml"), "").unwrap();
        symlink("releases/1", d.join("current")).unwrap();
        std::fs::create_dir(d.join("etc")).unwrap();
        symlink("../current/gateway.toml", d.join("etc/gateway.toml")).unwrap();

        let mut dirs = BTreeSet::new();
        let real = resolve(&d.join("etc/gateway.toml"), &mut dirs);
        assert_eq!(real, Some(d.join("releases/1/gateway.toml")));
        let want: BTreeSet<_> = [d.join("etc"), d.clone(), d.join("releases/1")].into();
        assert_eq!(dirs, want);

        let mut dirs = BTreeSet::new();
        assert_eq!(resolve(&d.join("gone/gateway.toml"), &mut dirs), None);
        assert_eq!(dirs, [d.clone()].into());
    }
}
