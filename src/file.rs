//! Reading a file the config names (the config itself, certificates, keys, CA
//! bundles, JWT keys, the quota state file): one way for all of them, so that none
//! can hang the gateway. A FIFO in a file's place would block the read until some
//! writer came along (at start, in `bulkhead check`, and in a reload, which holds the
//! reload lock meanwhile, so every reload after it would wait too); a device such as
//! `/dev/zero` never ends, and a huge file is read into memory whole.

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

fn kind(t: FileType) -> &'static str {
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
