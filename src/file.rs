//! Reading a file the config names (the config itself, certificates, keys, CA
//! bundles, JWT keys, the quota state file): one way for all of them, so that none
//! can hang the gateway. A FIFO in a file's place would block the read until some
//! writer came along (at start, in `bulkhead check`, and in a reload, which holds the
//! reload lock meanwhile, so every reload after it would wait too); a device such as
//! `/dev/zero` never ends, and a huge file is read into memory whole.
//!
//! The one file the gateway writes on its own, the audit log, is opened the same way
//! ([`append`]): a FIFO nobody reads would block the open (at start, and in a reload,
//! under its lock), and one whose reader falls behind would block each write.

use std::fs::{File, FileType};
use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// The most bytes read from one file: far beyond any config (a 100,000-tenant config
/// is about 10 MiB), certificate chain or key set.
pub const MAX_BYTES: u64 = 64 << 20;

/// The whole of the regular file at `path` (symlinks followed), at most
/// [`MAX_BYTES`]. Anything else is an error that says why: "not a regular file (a
/// FIFO)", or too large. The caller names the path.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    read_at_most(path, MAX_BYTES)
}

fn read_at_most(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    // O_NONBLOCK, so that opening a FIFO returns at once instead of waiting for a
    // writer; the type is then checked on what was opened, not on the path, which
    // could be swapped in between. (Reading a regular file ignores the flag.)
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", kind(meta.file_type())),
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB, the most the gateway reads from a file",
                limit >> 20
            ),
        )
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    // The length is only a hint: the file may grow while it is read (or, in /proc,
    // say 0), so the read itself is bounded too.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// The regular file at `path` (symlinks followed) opened for appending, made (mode
/// 0666 less the umask) when missing; for the audit log. It never blocks: opened with
/// O_NONBLOCK, a FIFO with no reader fails at once (ENXIO) instead of waiting for one;
/// anything that is not a regular file — a FIFO with a reader too, a device, a socket,
/// a directory — is [`AppendError::NotRegular`]. (A pipe blocks every write once its
/// reader falls behind, or, written without blocking, drops lines and splits those
/// longer than its atomic 4 KiB; a regular file does neither.)
pub fn append(path: &Path) -> Result<File, AppendError> {
    let flags =
        OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(path, flags, Mode::from_raw_mode(0o666)) {
        Ok(fd) => fd,
        Err(e) if e == rustix::io::Errno::ISDIR => {
            return Err(AppendError::NotRegular("a directory"))
        }
        // A FIFO no process has open for reading (or a socket, or a device without a
        // driver): what is there, from the path, since nothing was opened.
        Err(e) if e == rustix::io::Errno::NXIO => {
            return Err(match std::fs::metadata(path) {
                Ok(m) if !m.is_file() => AppendError::NotRegular(kind(m.file_type())),
                _ => AppendError::Io(e.into()),
            })
        }
        Err(e) => return Err(AppendError::Io(e.into())),
    };
    let file = File::from(fd);
    // The type of what was opened, not of the path, which could be swapped in between.
    let meta = file.metadata().map_err(AppendError::Io)?;
    if !meta.is_file() {
        return Err(AppendError::NotRegular(kind(meta.file_type())));
    }
    Ok(file)
}

/// Why [`append`] gave no file.
#[derive(Debug)]
pub enum AppendError {
    /// Something other than a regular file is at the path: what it is ("a FIFO").
    NotRegular(&'static str),
    /// The file could not be opened or made (permissions, a missing directory, …).
    Io(io::Error),
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::NotRegular(kind) => write!(f, "not a regular file ({kind})"),
            AppendError::Io(e) => e.fmt(f),
        }
    }
}

/// What a file that is not a regular file is, in words: "a FIFO", "a directory", ….
pub fn kind(t: FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "neither a file nor a directory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_read_whole() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").expect("written");
        assert_eq!(read(&path).expect("read"), b"hello");
    }

    #[test]
    fn a_device_or_a_directory_is_refused() {
        let err = read(Path::new("/dev/zero")).expect_err("a device is refused");
        assert_eq!(err.to_string(), "not a regular file (a character device)");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let err = read(dir.path()).expect_err("a directory is refused");
        assert_eq!(err.to_string(), "not a regular file (a directory)");
    }

    /// Opening a FIFO for writing waits for a reader; one that never comes hung the
    /// gateway's start, and a reload under its lock. Bounded: a hang fails the test.
    #[test]
    fn appending_to_a_fifo_is_refused_at_once_with_or_without_a_reader() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let fifo = dir.path().join("audit.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        let within_5s = |path: std::path::PathBuf| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || tx.send(append(&path).map(drop).map_err(|e| e.to_string())));
            rx.recv_timeout(std::time::Duration::from_secs(5))
                .expect("opening the FIFO blocked")
        };
        assert_eq!(
            within_5s(fifo.clone()),
            Err("not a regular file (a FIFO)".to_owned())
        );
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(OFlags::NONBLOCK.bits() as i32)
            .open(&fifo)
            .expect("the reader opens");
        assert_eq!(
            within_5s(fifo),
            Err("not a regular file (a FIFO)".to_owned())
        );
        drop(reader);
    }

    #[test]
    fn appending_to_a_device_or_a_directory_is_refused_and_a_file_is_made() {
        let err = append(Path::new("/dev/null")).expect_err("a device is refused");
        assert_eq!(err.to_string(), "not a regular file (a character device)");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let err = append(dir.path()).expect_err("a directory is refused");
        assert_eq!(err.to_string(), "not a regular file (a directory)");
        let path = dir.path().join("audit.jsonl");
        std::io::Write::write_all(&mut append(&path).expect("made"), b"one\n").expect("written");
        std::io::Write::write_all(&mut append(&path).expect("opened"), b"two\n").expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"one\ntwo\n");
        let missing = dir.path().join("no/such/dir/audit.jsonl");
        assert!(
            matches!(append(&missing), Err(AppendError::Io(e)) if e.kind() == io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn a_file_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![b'x'; 2 << 20]).expect("written");
        let err = read_at_most(&path, 1 << 20).expect_err("too large");
        assert_eq!(
            err.to_string(),
            "larger than 1 MiB, the most the gateway reads from a file"
        );
        assert_eq!(read_at_most(&path, 2 << 20).expect("read").len(), 2 << 20);
    }
}
