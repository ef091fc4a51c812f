//! Where OpenSSL lives on this host: shared libraries (libssl.so.3, libssl.so.1.1) and
//! executables that link it statically and export its API (node).
//!
//! A target qualifies when its ELF dynamic symbol table defines all of
//! [`REQUIRED_SYMBOLS`]; `SSL_write_ex`/`SSL_read_ex` are attached when also present
//! (OpenSSL >= 1.1.1). Paths are canonicalised and deduplicated by (device, inode), so a
//! library reached through several symlinks is probed once.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use object::{Object as _, ObjectSymbol as _};

/// Symbols a target must define for capture to work at all.
pub const REQUIRED_SYMBOLS: [&str; 2] = ["SSL_write", "SSL_read"];
/// Symbols attached when present.
pub const OPTIONAL_SYMBOLS: [&str; 3] = ["SSL_write_ex", "SSL_read_ex", "SSL_free"];

/// Directories searched for libssl when discovery is on.
const LIBRARY_DIRS: [&str; 6] =
    ["/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib", "/usr/local/lib"];
const LIBRARY_NAMES: [&str; 2] = ["libssl.so.3", "libssl.so.1.1"];
/// Largest file inspected (it is read whole to parse its ELF symbols): node is about
/// 100 MiB, libssl a few.
const MAX_TARGET_BYTES: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// A shared library (libssl).
    Library,
    /// An executable with OpenSSL linked in.
    Executable,
}

/// One file to attach the probes to.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    pub path: PathBuf,
    pub kind: TargetKind,
    /// Which of the optional symbols it defines.
    pub has_ex: bool,
    pub has_free: bool,
}

/// Check `path` for the OpenSSL API. Ok(None): readable ELF without the symbols.
pub fn inspect(path: &Path, kind: TargetKind) -> anyhow::Result<Option<TlsTarget>> {
    let advice = "a TLS library or a program linking OpenSSL is smaller: leave it out of capture.libraries";
    let data = crate::files::read_capped(path, MAX_TARGET_BYTES, advice)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let file = object::File::parse(&*data).with_context(|| format!("{} is not an ELF file", path.display()))?;
    let mut found = HashSet::new();
    for sym in file.dynamic_symbols() {
        if sym.is_definition()
            && let Ok(name) = sym.name()
            && (REQUIRED_SYMBOLS.contains(&name) || OPTIONAL_SYMBOLS.contains(&name))
        {
            found.insert(name.to_owned());
        }
    }
    if !REQUIRED_SYMBOLS.iter().all(|s| found.contains(*s)) {
        return Ok(None);
    }
    Ok(Some(TlsTarget {
        path: path.to_owned(),
        kind,
        has_ex: found.contains("SSL_write_ex") && found.contains("SSL_read_ex"),
        has_free: found.contains("SSL_free"),
    }))
}

/// Finds targets, remembering what it already looked at so that a periodic rescan only
/// reads new files and new processes.
#[derive(Default)]
pub struct Discovery {
    /// (device, inode) of every file inspected, target or not.
    inspected: HashSet<(u64, u64)>,
    /// Processes whose maps were read twice (at first sight, and one round later, since
    /// programs such as python load libssl lazily).
    settled: HashSet<u32>,
    /// Processes read once so far.
    fresh: HashSet<u32>,
    scans: u64,
}

impl Discovery {
    /// New targets among the configured paths and (with `discover`) the standard library
    /// directories and the running processes. Problems with single candidates are logged
    /// and skipped.
    pub fn scan(&mut self, libraries: &[PathBuf], executables: &[PathBuf], discover: bool) -> Vec<TlsTarget> {
        let mut candidates: Vec<(PathBuf, TargetKind, bool)> = Vec::new();
        for p in libraries {
            candidates.push((p.clone(), TargetKind::Library, true));
        }
        for p in executables {
            candidates.push((p.clone(), TargetKind::Executable, true));
        }
        if discover {
            for dir in LIBRARY_DIRS {
                for name in LIBRARY_NAMES {
                    candidates.push((Path::new(dir).join(name), TargetKind::Library, false));
                }
            }
            candidates.extend(self.scan_processes().into_iter().map(|(p, k)| (p, k, false)));
        }
        self.scans += 1;

        let mut targets = Vec::new();
        for (path, kind, configured) in candidates {
            let Ok(meta) = std::fs::metadata(&path) else {
                if configured && self.scans == 0 {
                    tracing::warn!(path = %path.display(), "configured TLS target does not exist; skipped");
                }
                continue;
            };
            if !self.inspected.insert((meta.dev(), meta.ino())) {
                continue;
            }
            let real = std::fs::canonicalize(&path).unwrap_or(path);
            match inspect(&real, kind) {
                Ok(Some(t)) => targets.push(t),
                Ok(None) if configured => tracing::warn!(
                    path = %real.display(),
                    "configured TLS target does not export SSL_write/SSL_read; skipped"
                ),
                Ok(None) => {}
                Err(e) if configured => {
                    tracing::warn!(path = %real.display(), error = %format!("{e:#}"), "configured TLS target skipped")
                }
                Err(e) => tracing::debug!(path = %real.display(), error = %e, "not inspectable"),
            }
        }
        targets
    }

    /// libssl files mapped by running processes, and the executables of running processes
    /// (those that embed and export OpenSSL are kept by [`inspect`]). Each process is read
    /// twice at most.
    fn scan_processes(&mut self) -> Vec<(PathBuf, TargetKind)> {
        let mut out = HashSet::new();
        let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
        let mut alive = HashSet::new();
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            alive.insert(pid);
            if self.settled.contains(&pid) {
                continue;
            }
            if !self.fresh.insert(pid) {
                self.fresh.remove(&pid);
                self.settled.insert(pid);
            }
            if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
                for line in maps.lines() {
                    if let Some(path) = line.split_whitespace().nth(5)
                        && path.rsplit('/').next().is_some_and(|f| f.starts_with("libssl.so"))
                    {
                        out.insert((PathBuf::from(path), TargetKind::Library));
                    }
                }
            }
            if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
                out.insert((exe, TargetKind::Executable));
            }
        }
        // Forget processes that are gone, so a reused pid is looked at again.
        self.settled.retain(|p| alive.contains(p));
        self.fresh.retain(|p| alive.contains(p));
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_libssl_qualifies() {
        let found = Discovery::default().scan(&[], &[], true);
        let lib = found
            .iter()
            .find(|t| t.kind == TargetKind::Library)
            .expect("libssl.so.3 is installed on this machine (libssl3)");
        assert!(lib.has_ex && lib.has_free, "{lib:?}");
    }

    #[test]
    fn non_elf_and_unrelated_elf_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("aegis-targets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, b"not an elf").unwrap();
        assert!(inspect(&junk, TargetKind::Library).is_err());
        // /bin/true is ELF and has no SSL symbols.
        assert!(inspect(Path::new("/bin/true"), TargetKind::Executable).unwrap().is_none());
        // A device named as a library is refused, not read without end.
        let err = format!("{:#}", inspect(Path::new("/dev/zero"), TargetKind::Library).unwrap_err());
        assert!(err.contains("it is a character device"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rescan_reports_only_new_files() {
        let mut d = Discovery::default();
        let first = d.scan(&[], &[], true);
        assert!(!first.is_empty());
        let again = d.scan(&[], &[], true);
        assert!(again.is_empty(), "already inspected: {again:?}");
    }
}
