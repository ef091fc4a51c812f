//! Append-only files of JSON lines (call records, the audit log) that stay valid through a
//! full disk and a crash.
//!
//! - A batch of whole lines is appended at once; when the write fails part-way (no space
//!   left, I/O error) the file is cut back to its length before the batch, so a later
//!   append never lands on a partial line.
//! - A partial last line left by a crash (kill -9 in the middle of a write) is cut away when
//!   the file is opened again, and the cut is reported.
//! - The file is opened without following a symbolic link, must be a regular file, and is
//!   kept at mode 0600 (a wider mode found on an existing file is narrowed, and said).
//!
//! One writer per file: the agent's instance lock guarantees it.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// Where what must be kept as evidence is also written: the signed decision log (in
/// `evidence`). Earlier stages (the record sink, the control server's audit, the capability
/// table) hold it as this trait, so none of them imports the later stage. `append` never
/// fails to its caller: the implementation counts and reports what it could not keep.
pub trait Ledger: Send + Sync {
    /// Append an entry of `kind` (printable ASCII, no spaces) with `body`.
    fn append(&self, kind: &str, body: &serde_json::Value);

    /// [`Ledger::append`] with a body that is JSON text already (a record's line), written as
    /// it is, at the next [`Ledger::flush`] (the record sink's, once per burst of records).
    fn append_raw(&self, kind: &str, body: &serde_json::value::RawValue);

    /// Write what [`Ledger::append_raw`] holds.
    fn flush(&self) {}

    /// Sign a checkpoint covering everything appended so far; the log's size then. None:
    /// no checkpoint could be signed (the error is logged).
    fn checkpoint(&self) -> Option<u64> {
        None
    }
}

impl std::fmt::Debug for dyn Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledger")
    }
}

/// What opening a journal had to repair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Bytes of a partial last line that were cut away.
    pub partial_line_bytes: u64,
    /// The file's mode was wider than 0600 (it was narrowed).
    pub narrowed_mode: Option<u32>,
}

/// An append-only JSON lines file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Length after the last successful append: everything before it is whole lines.
    len: u64,
    /// fsync after every append (the audit log), or leave it to the kernel (records).
    sync: bool,
}

impl Journal {
    /// Open (create, with its directory) `path` for appending. Errors say what to fix.
    pub fn open(path: &Path, sync: bool) -> anyhow::Result<(Self, Repairs)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create the directory {}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => anyhow::anyhow!(
                    "{} is a symbolic link: the agent does not follow links for the files it writes; give the \
                     real path",
                    path.display()
                ),
                _ => anyhow::anyhow!("cannot open {}: {e}", path.display()),
            })?;
        let meta = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?;
        anyhow::ensure!(
            meta.file_type().is_file(),
            "{} is not a regular file: give the path of a file the agent may create",
            path.display()
        );
        let mut repairs = Repairs::default();
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot narrow the mode of {} to 0600", path.display()))?;
            repairs.narrowed_mode = Some(mode);
        }
        let len = meta.len();
        let whole = whole_lines_len(&mut file, len).with_context(|| format!("cannot read {}", path.display()))?;
        if whole < len {
            file.set_len(whole).with_context(|| format!("cannot cut the partial last line of {}", path.display()))?;
            repairs.partial_line_bytes = len - whole;
        }
        Ok((Self { path: path.to_owned(), file, len: whole, sync }, repairs))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the path again, for log rotation: after the file was renamed away, appends go
    /// to a new file at the path (created as [`Journal::open`] does); the renamed file is
    /// closed, ending in the whole lines appended so far. The caller holds the only handle
    /// (`&mut`), so no append is under way. On an error the old file is kept.
    pub fn reopen(&mut self) -> anyhow::Result<Repairs> {
        let (fresh, repairs) = Self::open(&self.path, self.sync)?;
        *self = fresh;
        Ok(repairs)
    }

    /// Bytes in the file: whole lines only.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flush what was appended to the disk (for a journal opened without `sync`, before
    /// something that vouches for its content is written elsewhere).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The last line: see [`last_line`].
    pub fn last_line(&self, max: usize) -> io::Result<Option<(u64, Vec<u8>)>> {
        last_line(&self.file, self.len, max)
    }

    /// Append `lines` (whole lines, each ending in a newline): all of them, or none.
    pub fn append(&mut self, lines: &[u8]) -> io::Result<()> {
        debug_assert!(lines.is_empty() || lines.ends_with(b"\n"));
        if lines.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(lines).and_then(|()| if self.sync { self.file.sync_data() } else { Ok(()) });
        match result {
            Ok(()) => {
                self.len += lines.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut back what made it: the next append starts on a line boundary.
                if let Err(cut) = self.file.set_len(self.len) {
                    tracing::error!(path = %self.path.display(), error = %cut, "cannot cut a failed append back");
                }
                Err(e)
            }
        }
    }
}

/// The last line of the first `end` bytes of `file`, which end with a newline: its offset
/// and its bytes without the newline; None when `end` is 0. A last line over `max` bytes is
/// an `InvalidData` error (it is not read whole). Read with `pread`, backwards from `end`, so
/// the cost is the line's length, not the file's.
pub fn last_line(file: &File, end: u64, max: usize) -> io::Result<Option<(u64, Vec<u8>)>> {
    if end == 0 {
        return Ok(None);
    }
    // Without its newline; the line starts after the previous newline (or at 0).
    let stop = end - 1;
    let mut start = stop;
    let mut buf = [0u8; 4096];
    while start > 0 {
        let from = start.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(start - from) as usize];
        file.read_exact_at(chunk, from)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            start = from + i as u64 + 1;
            break;
        }
        start = from;
        if stop - start > max as u64 {
            break;
        }
    }
    if stop - start > max as u64 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("the last line is over {max} bytes long")));
    }
    let mut line = vec![0; (stop - start) as usize];
    file.read_exact_at(&mut line, start)?;
    Ok(Some((start, line)))
}

/// The length of the longest prefix of the file (of `len` bytes) that ends with a newline
/// (or is empty).
pub fn whole_lines_len(file: &mut File, len: u64) -> io::Result<u64> {
    let mut end = len;
    let mut buf = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("aegis-journal-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_partial_last_line_is_cut_at_open() {
        let d = dir();
        let path = d.join("j.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        let (mut j, repairs) = Journal::open(&path, false).unwrap();
        assert_eq!(repairs.partial_line_bytes, 5);
        j.append(b"{\"d\":4}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"b\":2}\n{\"d\":4}\n");
        // A file without any newline is all partial.
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(Journal::open(&path, false).unwrap().1.partial_line_bytes, 7);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Rotation: the renamed file keeps the lines appended before, whole; the next append
    /// goes to a new file at the path, created with mode 0600.
    #[test]
    fn reopen_after_a_rename_starts_a_new_file_at_the_path() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = dir();
        let path = d.join("j.jsonl");
        let (mut j, _) = Journal::open(&path, true).unwrap();
        j.append(b"{\"a\":1}\n").unwrap();
        let old = d.join("j.jsonl.1");
        std::fs::rename(&path, &old).unwrap();
        j.append(b"{\"b\":2}\n").unwrap(); // before the reopen: still the renamed file
        j.reopen().unwrap();
        j.append(b"{\"c\":3}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"c\":3}\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(j.len(), 8);
        // Not renamed: the same file is opened again and appended to.
        j.reopen().unwrap();
        j.append(b"{\"d\":4}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"c\":3}\n{\"d\":4}\n");
        // A path that cannot be opened: the old file is kept, and the error says why.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&old, &path).unwrap();
        let err = format!("{:#}", j.reopen().unwrap_err());
        assert!(err.contains("is a symbolic link"), "{err}");
        j.append(b"{\"e\":5}\n").unwrap();
        assert!(std::fs::read_to_string(&old).unwrap().ends_with("{\"b\":2}\n"), "nothing through the link");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A line that needs a page the disk no longer has is written in part by the kernel
    /// (a short write, then ENOSPC): the part is cut back, so the next line starts clean.
    #[test]
    fn a_write_cut_short_by_a_full_disk_leaves_whole_lines() {
        let d = dir();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"])
            .arg(&d)
            .status()
            .expect("mount (needs root)");
        assert!(ok.success());
        let path = d.join("j.jsonl");
        let (mut j, _) = Journal::open(&path, true).unwrap();
        let line = |n: usize| format!("{{\"pad\":\"{}\"}}\n", "p".repeat(n)).into_bytes();
        j.append(&line(4000)).unwrap(); // most of one page
        // Take every other page.
        let _ = std::fs::write(d.join("filler"), vec![b'x'; 64 * 1024]);
        let err = j.append(&line(300)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        let text = std::fs::read(&path).unwrap();
        assert_eq!(text.len(), line(4000).len(), "the part written was cut back");
        std::fs::remove_file(d.join("filler")).unwrap();
        j.append(&line(300)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{text}");
        drop(j);
        let _ = std::process::Command::new("umount").arg(&d).status();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_last_line_is_found_from_the_end() {
        let d = dir();
        let path = d.join("j.jsonl");
        let (mut j, _) = Journal::open(&path, false).unwrap();
        assert_eq!(j.last_line(100).unwrap(), None);
        j.append(b"{\"a\":1}\n").unwrap();
        assert_eq!(j.last_line(100).unwrap(), Some((0, b"{\"a\":1}".to_vec())));
        let long = format!("{{\"b\":\"{}\"}}\n", "x".repeat(10_000));
        j.append(long.as_bytes()).unwrap();
        j.append(b"\n").unwrap();
        assert_eq!(j.last_line(100).unwrap(), Some((8 + long.len() as u64, Vec::new())), "an empty last line");
        j.append(long.as_bytes()).unwrap();
        assert_eq!(j.len(), 8 + 2 * long.len() as u64 + 1);
        let (offset, line) = j.last_line(long.len()).unwrap().unwrap();
        assert_eq!((offset, line.len()), (9 + long.len() as u64, long.len() - 1));
        let e = j.last_line(9_000).unwrap_err();
        assert_eq!(e.to_string(), "the last line is over 9000 bytes long");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn links_other_file_types_and_wide_modes() {
        let d = dir();
        let real = d.join("real.jsonl");
        std::fs::write(&real, b"").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_, repairs) = Journal::open(&real, false).unwrap();
        assert_eq!(repairs.narrowed_mode, Some(0o644));
        assert_eq!(std::fs::metadata(&real).unwrap().mode() & 0o777, 0o600);
        let link = d.join("link.jsonl");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = Journal::open(&link, false).unwrap_err().to_string();
        assert!(err.contains("is a symbolic link"), "{err}");
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = Journal::open(&fifo, false).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
