//! Where the TLS libraries live on this host: shared libraries (OpenSSL's libssl.so.3 and
//! libssl.so.1.1, GnuTLS's libgnutls.so.30, BoringSSL's builds such as Debian's
//! `android/libssl.so.0`, and any other shared object a process maps that defines them, a
//! Python extension module with a copy compiled in, say), executables that link OpenSSL or
//! BoringSSL statically (node), and Go executables, whose crypto/tls is found through Go's
//! own symbol table ([`gosym`](super::gosym)), so stripped ones too.
//!
//! A target qualifies when its ELF dynamic symbol table defines the read and write functions
//! of one [`TlsStack`], or, for a copy compiled in without exporting them, when its static
//! symbol table (`.symtab`, which `strip` removes) defines each of them once; the others
//! ([`TlsFn`]) are attached when also present. BoringSSL is told from OpenSSL by functions
//! only it defines ([`BORINGSSL_MARKERS`]). Shared objects are read only as far as their
//! headers and symbol tables (a process may map a library of a gigabyte); executables are
//! read whole, as Go's table needs. Paths are canonicalised and deduplicated by (device,
//! inode), so a library reached through several symlinks is probed once.
//!
//! GnuTLS needs no program of its own: its record functions take the same arguments in the
//! same registers as OpenSSL's and return the bytes moved the same way,
//! ```c
//! ssize_t gnutls_record_send(gnutls_session_t session, const void *data, size_t size); // like SSL_write
//! ssize_t gnutls_record_recv(gnutls_session_t session, void *data, size_t size);       // like SSL_read
//! void gnutls_deinit(gnutls_session_t session);                                        // like SSL_free
//! ```
//! so capture's OpenSSL programs go on them, the session pointer standing for the `SSL *`.
//! (A return value is read as a C int: a record is at most 16 KiB, far below 2^31.)
//!
//! Go's crypto/tls has programs of its own (Go's register ABI, probes on the RET
//! instructions: `aegis-ebpf/src/go_tls.rs`), attached at file offsets, not symbols.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use object::{Object as _, ObjectSymbol as _, ReadRef, SymbolKind};

use super::gosym::{self, GoTls};

/// The TLS implementations capture can read, told apart by the symbols a file exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsStack {
    /// OpenSSL 1.1.1 and 3.x.
    OpenSsl,
    /// BoringSSL (Google's fork: gRPC's core, Envoy, Chromium, Android's libssl): OpenSSL's
    /// `SSL_*` API, the same programs.
    BoringSsl,
    /// GnuTLS 3 (wget, and other Debian programs).
    GnuTls,
    /// Go's crypto/tls (Go 1.18 and later), linked into every Go program that speaks TLS.
    GoTls,
}

/// The library functions capture and the content gate put probes on, whatever the stack
/// calls them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsFn {
    /// Write plaintext: `int f(conn, buf, int num)`, bytes written (> 0) returned.
    Write,
    /// Read plaintext: `int f(conn, buf, int num)`, bytes read (> 0) returned.
    Read,
    /// `int f(conn, buf, size_t num, size_t *written)`, 1 on success (OpenSSL 1.1.1+ only).
    WriteEx,
    /// `int f(conn, buf, size_t num, size_t *read)`, 1 on success (OpenSSL 1.1.1+ only).
    ReadEx,
    /// The connection object is freed: `void f(conn)`.
    Free,
}

impl TlsFn {
    const ALL: [TlsFn; 5] = [TlsFn::Write, TlsFn::Read, TlsFn::WriteEx, TlsFn::ReadEx, TlsFn::Free];
}

impl TlsStack {
    /// The stacks found by their ELF symbols (BoringSSL as OpenSSL, then told apart; Go's is
    /// found by its own symbol table).
    const BY_SYMBOL: [TlsStack; 2] = [TlsStack::OpenSsl, TlsStack::GnuTls];

    /// The exported symbol of `f` in this stack, where the C-ABI programs (capture's OpenSSL
    /// ones, the content gate's) go; Go's functions have none.
    pub fn symbol(self, f: TlsFn) -> Option<&'static str> {
        match (self, f) {
            (TlsStack::OpenSsl | TlsStack::BoringSsl, TlsFn::Write) => Some("SSL_write"),
            (TlsStack::OpenSsl | TlsStack::BoringSsl, TlsFn::Read) => Some("SSL_read"),
            (TlsStack::OpenSsl | TlsStack::BoringSsl, TlsFn::WriteEx) => Some("SSL_write_ex"),
            (TlsStack::OpenSsl | TlsStack::BoringSsl, TlsFn::ReadEx) => Some("SSL_read_ex"),
            (TlsStack::OpenSsl | TlsStack::BoringSsl, TlsFn::Free) => Some("SSL_free"),
            (TlsStack::GnuTls, TlsFn::Write) => Some("gnutls_record_send"),
            (TlsStack::GnuTls, TlsFn::Read) => Some("gnutls_record_recv"),
            (TlsStack::GnuTls, TlsFn::Free) => Some("gnutls_deinit"),
            (TlsStack::GnuTls, TlsFn::WriteEx | TlsFn::ReadEx) => None,
            (TlsStack::GoTls, _) => None,
        }
    }

    /// The name of `f` in this stack, for records and logs.
    pub fn function_name(self, f: TlsFn) -> Option<&'static str> {
        match (self, f) {
            (TlsStack::GoTls, TlsFn::Write) => Some(gosym::WRITE),
            (TlsStack::GoTls, TlsFn::Read) => Some(gosym::READ),
            (TlsStack::GoTls, TlsFn::Free) => Some(gosym::CLOSE),
            (TlsStack::GoTls, TlsFn::WriteEx | TlsFn::ReadEx) => None,
            (stack, f) => stack.symbol(f),
        }
    }

    /// Its name in records and logs.
    pub fn name(self) -> &'static str {
        match self {
            TlsStack::OpenSsl => "openssl",
            TlsStack::BoringSsl => "boringssl",
            TlsStack::GnuTls => "gnutls",
            TlsStack::GoTls => "go-crypto/tls",
        }
    }

    /// The symbol of `f` in this stack, given the OpenSSL name capture's events use
    /// (`aegis_common::TlsHook::symbol`).
    pub fn rename(self, openssl_symbol: &'static str) -> &'static str {
        TlsFn::ALL
            .into_iter()
            .find(|f| TlsStack::OpenSsl.symbol(*f) == Some(openssl_symbol))
            .and_then(|f| self.function_name(f))
            .unwrap_or(openssl_symbol)
    }
}

/// Whether a mapped file's name is a shared object's (`libssl.so.3`, `_ssl.cpython-311-x86_64-linux-gnu.so`).
fn is_shared_object_name(name: &str) -> bool {
    name.ends_with(".so") || name.contains(".so.")
}

/// Directories searched for TLS libraries when discovery is on.
const LIBRARY_DIRS: [&str; 6] =
    ["/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib", "/usr/local/lib"];
const LIBRARY_NAMES: [&str; 3] = ["libssl.so.3", "libssl.so.1.1", "libgnutls.so.30"];
/// Functions BoringSSL defines and OpenSSL does not (its libssl's, and its libcrypto's for a
/// copy linked in whole).
pub const BORINGSSL_MARKERS: [&str; 3] =
    ["SSL_CTX_set_grease_enabled", "SSL_set_private_key_method", "BORINGSSL_self_test"];
/// Largest file inspected (it is read whole to parse its ELF symbols): node is about
/// 100 MiB, libssl a few.
const MAX_TARGET_BYTES: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// A shared library (libssl, libgnutls).
    Library,
    /// An executable with OpenSSL or Go's crypto/tls linked in.
    Executable,
}

/// One file to attach the probes to.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    pub path: PathBuf,
    pub kind: TargetKind,
    pub stack: TlsStack,
    /// The functions of [`TlsFn`] it defines.
    pub functions: Vec<TlsFn>,
    /// Go's crypto/tls: where its probes go (stack [`TlsStack::GoTls`] only).
    pub go: Option<GoTls>,
}

impl TlsTarget {
    /// The symbol to probe for `f`, when this target defines it.
    pub fn symbol(&self, f: TlsFn) -> Option<&'static str> {
        if self.functions.contains(&f) { self.stack.symbol(f) } else { None }
    }

    /// Whether it defines `f`.
    pub fn has(&self, f: TlsFn) -> bool {
        self.functions.contains(&f)
    }
}

/// Check `path` for a TLS library's API. Ok(None): readable ELF without the symbols of any
/// [`TlsStack`]. A file with both (a program linking OpenSSL and GnuTLS) is probed as OpenSSL.
/// A Go executable is probed when its crypto/tls can be found (Err with why when not).
pub fn inspect(path: &Path, kind: TargetKind) -> anyhow::Result<Option<TlsTarget>> {
    if kind == TargetKind::Library {
        // Headers and symbol tables only, read as the parser asks for them.
        let (file, _) = crate::files::open_regular(path).with_context(|| format!("cannot read {}", path.display()))?;
        let cache = object::ReadCache::new(file);
        let elf = object::File::parse(&cache).with_context(|| format!("{} is not an ELF file", path.display()))?;
        return Ok(by_symbols(&elf).map(|(stack, functions)| TlsTarget {
            path: path.to_owned(),
            kind,
            stack,
            functions,
            go: None,
        }));
    }
    let advice = "a TLS library or a program linking OpenSSL is smaller: leave it out of capture.libraries";
    let data = crate::files::read_capped(path, MAX_TARGET_BYTES, advice)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let file = object::File::parse(&*data).with_context(|| format!("{} is not an ELF file", path.display()))?;
    if let Some((stack, functions)) = by_symbols(&file) {
        return Ok(Some(TlsTarget { path: path.to_owned(), kind, stack, functions, go: None }));
    }
    if gosym::is_go(&file, &data) {
        let go = gosym::find(&file, &data)
            .with_context(|| format!("{} is a Go program whose crypto/tls cannot be probed", path.display()))?;
        return Ok(go.map(|go| {
            let mut functions = vec![TlsFn::Write, TlsFn::Read];
            if go.close.is_some() {
                functions.push(TlsFn::Free);
            }
            TlsTarget { path: path.to_owned(), kind, stack: TlsStack::GoTls, functions, go: Some(go) }
        }));
    }
    Ok(None)
}

/// The C stack whose functions `file` defines, and which of them: exported (the dynamic
/// symbol table), or else compiled in and kept in the static symbol table. A static symbol
/// counts only when it is a function defined once there and its name is not in the dynamic
/// table at all (the probes are attached by name, and the dynamic table is searched first).
fn by_symbols<'d, R: ReadRef<'d>>(file: &object::File<'d, R>) -> Option<(TlsStack, Vec<TlsFn>)> {
    let wanted: HashSet<&str> = TlsStack::BY_SYMBOL
        .iter()
        .flat_map(|s| TlsFn::ALL.iter().filter_map(|f| s.symbol(*f)))
        .chain(BORINGSSL_MARKERS)
        .collect();
    let mut dynamic_names = HashSet::new();
    let mut exported = HashSet::new();
    for sym in file.dynamic_symbols() {
        if let Ok(name) = sym.name()
            && let Some(&name) = wanted.get(name)
        {
            dynamic_names.insert(name);
            if sym.is_definition() {
                exported.insert(name);
            }
        }
    }
    if let Some(found) = qualify(&exported) {
        return Some(found);
    }
    let mut defined: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for sym in file.symbols() {
        if sym.is_definition()
            && sym.kind() == SymbolKind::Text
            && let Ok(name) = sym.name()
            && let Some(&name) = wanted.get(name)
            && !dynamic_names.contains(name)
        {
            *defined.entry(name).or_default() += 1;
        }
    }
    let compiled_in: HashSet<&str> = defined.into_iter().filter(|(_, n)| *n == 1).map(|(name, _)| name).collect();
    qualify(&compiled_in)
}

/// The first stack of [`TlsStack::BY_SYMBOL`] whose read and write functions are in
/// `defined`, told BoringSSL by its markers, with the functions of it that are.
fn qualify(defined: &HashSet<&str>) -> Option<(TlsStack, Vec<TlsFn>)> {
    for stack in TlsStack::BY_SYMBOL {
        let defines = |f: TlsFn| stack.symbol(f).is_some_and(|s| defined.contains(s));
        if !(defines(TlsFn::Write) && defines(TlsFn::Read)) {
            continue;
        }
        let mut functions: Vec<TlsFn> = TlsFn::ALL.into_iter().filter(|f| defines(*f)).collect();
        // The `_ex` pair goes on together or not at all (one alone would see half the traffic
        // of a program that uses both).
        if !(functions.contains(&TlsFn::WriteEx) && functions.contains(&TlsFn::ReadEx)) {
            functions.retain(|f| !matches!(f, TlsFn::WriteEx | TlsFn::ReadEx));
        }
        let boring = stack == TlsStack::OpenSsl && BORINGSSL_MARKERS.iter().any(|m| defined.contains(m));
        return Some((if boring { TlsStack::BoringSsl } else { stack }, functions));
    }
    None
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
            if let Some(t) = inspected(&real, kind, configured) {
                targets.push(t);
            }
        }
        targets
    }

    /// The executable of a process just started, looked at once (by device and inode) like
    /// those the scans find: a target when it carries a TLS stack of its own.
    pub fn executable(&mut self, path: &Path) -> Option<TlsTarget> {
        let meta = std::fs::metadata(path).ok()?;
        if !self.inspected.insert((meta.dev(), meta.ino())) {
            return None;
        }
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        inspected(&real, TargetKind::Executable, false)
    }

    /// Shared objects mapped by running processes (any of them may carry a TLS stack: a
    /// Python extension module with BoringSSL compiled in, say), and the executables of running processes
    /// (those that embed and export OpenSSL, and Go programs with crypto/tls, are kept by
    /// [`inspect`]). Each process is read
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
                        && path.starts_with('/')
                        && path.rsplit('/').next().is_some_and(is_shared_object_name)
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

/// [`inspect`], with what it could not do logged: at warn for a configured path or a Go
/// program whose crypto/tls cannot be probed, at debug otherwise.
fn inspected(real: &Path, kind: TargetKind, configured: bool) -> Option<TlsTarget> {
    match inspect(real, kind) {
        Ok(Some(t)) => Some(t),
        Ok(None) if configured => {
            tracing::warn!(
                path = %real.display(),
                "configured TLS target exports neither SSL_write/SSL_read nor gnutls_record_send/recv, and is \
                 not a Go program with crypto/tls; skipped"
            );
            None
        }
        Ok(None) => None,
        Err(e) if configured => {
            tracing::warn!(path = %real.display(), error = %format!("{e:#}"), "configured TLS target skipped");
            None
        }
        // A Go program whose crypto/tls is there but cannot be probed: said at warn
        // level, its calls are not seen.
        Err(e) if kind == TargetKind::Executable && e.chain().any(|c| c.is::<gosym::GoError>()) => {
            tracing::warn!(path = %real.display(), error = %format!("{e:#}"), "Go TLS not probed");
            None
        }
        Err(e) => {
            tracing::debug!(path = %real.display(), error = %e, "not inspectable");
            None
        }
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
        assert!(lib.has(TlsFn::WriteEx) && lib.has(TlsFn::ReadEx) && lib.has(TlsFn::Free), "{lib:?}");
    }

    #[test]
    fn system_gnutls_qualifies_with_its_own_symbols() {
        let lib = inspect(Path::new("/usr/lib/x86_64-linux-gnu/libgnutls.so.30"), TargetKind::Library)
            .expect("libgnutls.so.30 is installed on this machine (libgnutls30, wget's TLS library)")
            .expect("GnuTLS exports gnutls_record_send and gnutls_record_recv");
        assert_eq!(lib.stack, TlsStack::GnuTls);
        assert_eq!(lib.symbol(TlsFn::Write), Some("gnutls_record_send"));
        assert_eq!(lib.symbol(TlsFn::Read), Some("gnutls_record_recv"));
        assert_eq!(lib.symbol(TlsFn::Free), Some("gnutls_deinit"));
        assert_eq!(lib.symbol(TlsFn::WriteEx), None);
        assert_eq!(TlsStack::GnuTls.rename("SSL_read"), "gnutls_record_recv");
        assert_eq!(TlsStack::OpenSsl.rename("SSL_read_ex"), "SSL_read_ex");
    }

    /// BoringSSL (Debian's build for Android's tools: `cargo xtask setup` installs it) is
    /// told from OpenSSL by its own functions; a library that only imports `SSL_*` (libcurl)
    /// is no target. (A copy known by its static symbol table only: `tests/tests/capture.rs`.)
    #[test]
    fn boringssl_is_told_from_openssl_and_importers_are_not_targets() {
        let boring = inspect(Path::new("/usr/lib/x86_64-linux-gnu/android/libssl.so.0"), TargetKind::Library)
            .expect("android-libboringssl is installed on this machine (cargo xtask setup)")
            .expect("BoringSSL's libssl exports SSL_write and SSL_read");
        assert_eq!((boring.stack, boring.stack.name()), (TlsStack::BoringSsl, "boringssl"));
        assert_eq!(boring.symbol(TlsFn::Write), Some("SSL_write"));
        assert_eq!(boring.symbol(TlsFn::Free), Some("SSL_free"));
        let openssl = inspect(Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3"), TargetKind::Library)
            .unwrap()
            .expect("libssl.so.3 is a target");
        assert_eq!(openssl.stack, TlsStack::OpenSsl);
        let curl = inspect(Path::new("/usr/lib/x86_64-linux-gnu/libcurl.so.4"), TargetKind::Library)
            .expect("libcurl4 is installed on this machine (curl's library)");
        assert!(curl.is_none(), "{curl:?}");
        assert!(is_shared_object_name("_ssl.cpython-311-x86_64-linux-gnu.so") && is_shared_object_name("libssl.so.3"));
        assert!(!is_shared_object_name("locale-archive") && !is_shared_object_name("python3.11"));
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
