//! Reading a file whose path an operator gave (rulepacks, the configuration, the evidence
//! key, the block state file, TLS targets, `scan` input): opened without blocking, refused
//! unless it is a regular file, and read up to a cap.
//!
//! Such a path can name anything. `/dev/zero` never ends (`std::fs::read` grows until the
//! process is killed), opening a FIFO blocks until some writer appears, a terminal blocks
//! on read, a directory cannot be read at all. So every read of an operator's path goes
//! through [`open_regular`] or [`read_capped`]:
//!
//! - the file is opened with `O_NONBLOCK` (and `O_NOCTTY`): opening a FIFO returns at once
//!   instead of waiting for a writer, and a terminal never becomes our controlling one;
//! - the type is checked on the open descriptor (`fstat`), so what is checked is what is
//!   read: anything but a regular file is refused, naming what it is;
//! - at most `max + 1` bytes are read: a file over the cap is refused with its size and
//!   the cap (also one that grows while it is read), never truncated silently.
//!
//! Each caller picks its cap next to what the file is (`rules::pack::MAX_PACK_BYTES`,
//! `config::MAX_CONFIG_BYTES`, ...), and names the file and what to do in its own error.
//!
//! Key files are read with [`open_regular_nofollow`] (a symbolic link is refused: whoever
//! can plant one could point the agent at a key of their own) and created with
//! [`create_exclusive`] (complete or not at all, never over an existing file).
//!
//! This is a bottom module: it imports nothing of the agent.

use std::{
    fs::{File, Metadata, OpenOptions},
    io::{self, ErrorKind, Read as _, Write as _},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

/// Why an operator's file was not read. The message says what is wrong with the file,
/// not which file: the caller's message names it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open: {0}")]
    Open(io::Error),
    #[error("it is a symbolic link: the agent does not follow links to its keys; give the real path")]
    Symlink,
    #[error("it is {0}, not a regular file: give the path of a regular file")]
    NotRegular(&'static str),
    #[error("it has {size} bytes or more, over the limit of {max} bytes: {advice}")]
    TooLarge { size: u64, max: u64, advice: &'static str },
    #[error("cannot read: {0}")]
    Read(io::Error),
    #[error("it is not UTF-8 text ({0})")]
    NotUtf8(std::str::Utf8Error),
}

impl FileError {
    /// The file does not exist (some callers treat that as "use the default").
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Open(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// Open `path` for reading without blocking, and check on the open file that it is a
/// regular file. The descriptor keeps `O_NONBLOCK`, which regular files ignore.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), FileError> {
    open_with_flags(path, 0)
}

/// [`open_regular`], refusing a symbolic link as the last component ([`FileError::Symlink`]).
pub fn open_regular_nofollow(path: &Path) -> Result<(File, Metadata), FileError> {
    open_with_flags(path, libc::O_NOFOLLOW).map_err(|e| match e {
        FileError::Open(io) if io.raw_os_error() == Some(libc::ELOOP) => FileError::Symlink,
        other => other,
    })
}

fn open_with_flags(path: &Path, flags: i32) -> Result<(File, Metadata), FileError> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | flags)
        .open(path)
        .map_err(FileError::Open)?;
    let meta = file.metadata().map_err(FileError::Read)?;
    let kind = meta.file_type();
    let what = if kind.is_file() {
        return Ok((file, meta));
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(FileError::NotRegular(what))
}

/// The bytes of the regular file `path`, at most `max`; a larger file is refused with
/// `advice` (what the operator can do about it).
pub fn read_capped(path: &Path, max: u64, advice: &'static str) -> Result<Vec<u8>, FileError> {
    let (file, meta) = open_regular(path)?;
    let too_large = |size| FileError::TooLarge { size, max, advice };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    // The size may change between fstat and read (or lie, as in /proc): the read is capped too.
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(max.saturating_add(1)).read_to_end(&mut data).map_err(FileError::Read)?;
    if data.len() as u64 > max {
        return Err(too_large(data.len() as u64));
    }
    Ok(data)
}

/// [`read_capped`], as UTF-8 text.
pub fn read_capped_to_string(path: &Path, max: u64, advice: &'static str) -> Result<String, FileError> {
    String::from_utf8(read_capped(path, max, advice)?).map_err(|e| FileError::NotUtf8(e.utf8_error()))
}

/// Create `path` holding `contents`, mode 0600, complete or not at all: written to a
/// temporary file beside it, flushed, then hard-linked into place, which fails with
/// [`ErrorKind::AlreadyExists`] when the name exists. So two processes creating the same key
/// at once agree on one, and neither ever reads a half-written file.
pub fn create_exclusive(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "the path has no file name"))?;
    let tmp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    // A leftover of a crashed process with our pid is ours to remove; errors show up below.
    let _ = std::fs::remove_file(&tmp);
    let written = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    let placed = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    placed
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, time::Duration};

    use super::*;

    /// A fresh directory under the system temporary directory, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!("aegis-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Run `f` on another thread; fail (instead of hanging the test run) when it blocks.
    fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(Duration::from_secs(5)).expect("the read blocked")
    }

    #[test]
    fn regular_files_are_read_up_to_the_cap() {
        let dir = TempDir::new("cap");
        let path = dir.0.join("f");
        std::fs::write(&path, b"12345678").unwrap();
        assert_eq!(read_capped(&path, 8, "shorten it").unwrap(), b"12345678");
        let e = read_capped(&path, 7, "shorten it").unwrap_err();
        assert!(matches!(e, FileError::TooLarge { size: 8, max: 7, .. }), "{e:?}");
        assert_eq!(e.to_string(), "it has 8 bytes or more, over the limit of 7 bytes: shorten it");
        std::fs::write(&path, b"\xff").unwrap();
        assert!(matches!(read_capped_to_string(&path, 8, "x"), Err(FileError::NotUtf8(_))));
        let e = read_capped(&dir.0.join("missing"), 8, "x").unwrap_err();
        assert!(e.is_not_found() && e.to_string().starts_with("cannot open: "), "{e}");
    }

    #[test]
    fn endless_and_special_files_are_refused_at_once() {
        let e = within_5s(|| read_capped(Path::new("/dev/zero"), 1 << 20, "x")).unwrap_err();
        assert_eq!(e.to_string(), "it is a character device, not a regular file: give the path of a regular file");
        let dir = TempDir::new("special");
        assert!(matches!(read_capped(&dir.0, 1, "x"), Err(FileError::NotRegular("a directory"))));
        // A FIFO nobody writes to: a plain open would block forever.
        let fifo = dir.0.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = within_5s(move || read_capped(&fifo, 1 << 20, "x")).unwrap_err();
        assert!(matches!(e, FileError::NotRegular("a FIFO (named pipe)")), "{e:?}");
        // /proc files say they are empty: the cap holds on what is read.
        let e = read_capped(Path::new("/proc/self/maps"), 16, "x").unwrap_err();
        assert!(matches!(e, FileError::TooLarge { size: 17, max: 16, .. }), "{e:?}");
    }

    #[test]
    fn exclusive_creation_and_links() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = TempDir::new("exclusive");
        let path = dir.0.join("key");
        create_exclusive(&path, b"first").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let e = create_exclusive(&path, b"second").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first", "never replaced");
        let names: Vec<_> = std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["key"], "no temporary file left");

        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(open_regular(&link).is_ok());
        let e = open_regular_nofollow(&link).unwrap_err();
        assert!(matches!(e, FileError::Symlink), "{e:?}");
        assert!(open_regular_nofollow(&path).is_ok());
    }
}
