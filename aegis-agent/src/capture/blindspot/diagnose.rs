//! Why capture likely sees nothing of a process: its TLS stack, guessed from what it has
//! loaded and from its executable.
//!
//! [`Snapshot::take`] runs when a process's first unexplained connect arrives, while the
//! process most likely still runs: it keeps the executable open (so it can be read after the
//! process exits) and the list of mapped files. It is cheap (an open and a read of
//! `/proc/PID/maps`). The executable is read only if the connect stays unexplained
//! ([`diagnose`]), at most [`MAX_EXE_BYTES`] of it.

use std::{
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSymbol as _};

use super::Diagnosis;

/// Largest executable read (node is about 100 MB).
pub const MAX_EXE_BYTES: u64 = 512 << 20;

/// What was taken of a process when it first connected unexplained.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub exe: Option<PathBuf>,
    exe_file: Option<File>,
    /// Files mapped into the process (libraries), without duplicates.
    pub mapped: Vec<PathBuf>,
    /// The process was gone before it could be looked at.
    pub gone: bool,
}

impl Snapshot {
    pub fn take(pid: u32) -> Self {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let exe_file = File::open(format!("/proc/{pid}/exe")).ok();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"));
        let gone = maps.is_err() && exe.is_none();
        Self { exe, exe_file, mapped: maps.map(|m| mapped_files(&m)).unwrap_or_default(), gone }
    }
}

/// The distinct file paths of a `/proc/PID/maps` text.
pub fn mapped_files(maps: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else { continue };
        if !path.starts_with('/') {
            continue;
        }
        let path = PathBuf::from(path);
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// What the executable's bytes say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExeFacts {
    pub readable: bool,
    pub go: bool,
    pub rustls: bool,
    /// Defines `SSL_write` (a static OpenSSL or BoringSSL copy).
    pub static_openssl: bool,
    /// No `.symtab`.
    pub stripped: bool,
}

/// Read and inspect an executable (at most [`MAX_EXE_BYTES`]).
pub fn exe_facts(file: &mut File) -> ExeFacts {
    let mut data = Vec::new();
    if file.by_ref().take(MAX_EXE_BYTES).read_to_end(&mut data).is_err() {
        return ExeFacts::default();
    }
    facts_of(&data)
}

/// rustls's crate path, kept in every build that can panic (`rustls-0.23.x/src/...`),
/// stored with every byte XORed with [`MASK`] so that the agent's own executable does not
/// contain it (it would find itself). Go is told by `capture::gosym::is_go`.
const MASK: u8 = 0x5a;
const RUSTLS_MASKED: [u8; 9] = masked(*b"rustls-0.");

const fn masked<const N: usize>(mut bytes: [u8; N]) -> [u8; N] {
    let mut i = 0;
    while i < N {
        bytes[i] ^= MASK;
        i += 1;
    }
    bytes
}

fn contains_masked(data: &[u8], masked_needle: &[u8]) -> bool {
    let needle: Vec<u8> = masked_needle.iter().map(|b| b ^ MASK).collect();
    memchr::memmem::find(data, &needle).is_some()
}

pub fn facts_of(data: &[u8]) -> ExeFacts {
    let mut facts = ExeFacts { readable: true, rustls: contains_masked(data, &RUSTLS_MASKED), ..ExeFacts::default() };
    if let Ok(elf) = object::File::parse(data) {
        facts.go = crate::capture::gosym::is_go(&elf, data);
        facts.stripped = elf.symbol_table().is_none();
        facts.static_openssl = elf
            .symbols()
            .chain(elf.dynamic_symbols())
            .any(|s| s.is_definition() && s.name_bytes().is_ok_and(|n| n == b"SSL_write"));
    }
    facts
}

/// The likely reason capture sees nothing of the process of `snapshot`. `probed` says
/// whether capture's probes are on a file; `capture_active` whether capture runs at all;
/// `scoped` whether probes are put in each process at its first connect.
pub fn diagnose(
    snapshot: &mut Snapshot,
    probed: &dyn Fn(&Path) -> bool,
    capture_active: bool,
    scoped: bool,
) -> Diagnosis {
    let exe = snapshot.exe.clone();
    let facts = snapshot.exe_file.as_mut().map(exe_facts).unwrap_or_default();
    let (stack, mut reason) = classify(&snapshot.mapped, exe.as_deref(), facts, snapshot.gone, probed, capture_active);
    if scoped && matches!(stack, "openssl" | "gnutls" | "unknown") {
        reason = format!(
            "capture.scope = model_processes: probes go into a process at its first connect to a model endpoint \
             (at its start only for a program seen talking to one before, or the child of a probed process), \
             and this connection's calls came before they were in place (or: {reason})"
        );
    }
    Diagnosis { stack, reason, exe }
}

fn named(mapped: &[PathBuf], stem: &str) -> Option<PathBuf> {
    mapped.iter().find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(stem))).cloned()
}

/// The reasoning of [`diagnose`], on what was found.
pub fn classify(
    mapped: &[PathBuf],
    exe: Option<&Path>,
    facts: ExeFacts,
    gone: bool,
    probed: &dyn Fn(&Path) -> bool,
    capture_active: bool,
) -> (&'static str, String) {
    if !capture_active {
        return (
            "unknown",
            "capture is unavailable on this host (see `aegis-agent status`): no TLS plaintext is seen at all".into(),
        );
    }
    if gone {
        return ("unknown", "the process exited before it could be examined: its TLS stack is unknown".into());
    }
    if let Some(nss) = named(mapped, "libnss3.so") {
        return (
            "nss",
            format!(
                "NSS ({}) is loaded: capture does not hook NSS (Firefox, Thunderbird, some curl builds)",
                nss.display()
            ),
        );
    }
    if facts.go {
        let reason = if exe.is_some_and(probed) {
            "a Go program whose crypto/tls probes saw nothing of this connection (TLS through another Go \
             library, or a call that did not reach crypto/tls.(*Conn).Write)"
        } else {
            "a Go program whose crypto/tls is not probed: Go older than 1.18, another architecture, code that did \
             not decode, or started after discovery's last scan (list it under capture.executables)"
        };
        return ("go", reason.into());
    }
    if facts.rustls {
        return (
            "rustls",
            "the executable contains rustls, a Rust TLS library compiled in with no exported functions to hook".into(),
        );
    }
    for (stem, stack) in [("libssl.so", "openssl"), ("libgnutls.so", "gnutls")] {
        if let Some(lib) = named(mapped, stem) {
            let reason = if probed(&lib) {
                format!(
                    "{} is loaded and probed, but none of this connection's plaintext went through it: the \
                     process likely has a second, compiled-in TLS stack",
                    lib.display()
                )
            } else {
                format!(
                    "{} is loaded but not probed: check capture.discover and the attach failures in \
                     `aegis-agent status`",
                    lib.display()
                )
            };
            return (stack, reason);
        }
    }
    if facts.static_openssl && !exe.is_some_and(probed) {
        return (
            "static",
            "the executable has its own OpenSSL/BoringSSL copy, not probed: list it under capture.executables".into(),
        );
    }
    if facts.readable && facts.stripped {
        return (
            "static",
            "a stripped executable with no TLS library loaded: its TLS stack is compiled in and cannot be found by \
             symbol"
                .into(),
        );
    }
    ("unknown", "no TLS library capture hooks is loaded, and the executable names none: unknown TLS stack".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn maps_give_the_mapped_files_once() {
        let maps = "55d0-55d1 r--p 00000000 fd:01 123 /usr/bin/curl\n\
                    55d1-55d2 r-xp 00001000 fd:01 123 /usr/bin/curl\n\
                    7f00-7f01 r-xp 00000000 fd:01 456 /usr/lib/x86_64-linux-gnu/libssl.so.3\n\
                    7f02-7f03 rw-p 00000000 00:00 0 \n\
                    7ffd-7ffe rw-p 00000000 00:00 0 [stack]\n";
        assert_eq!(mapped_files(maps), paths(&["/usr/bin/curl", "/usr/lib/x86_64-linux-gnu/libssl.so.3"]));
    }

    #[test]
    fn the_likely_stack_is_named() {
        let none = |_: &Path| false;
        let all = |_: &Path| true;
        let exe = Some(Path::new("/usr/bin/x"));
        let f = ExeFacts { readable: true, ..ExeFacts::default() };
        let ssl = paths(&["/usr/bin/x", "/usr/lib/libssl.so.3"]);
        assert_eq!(classify(&ssl, exe, f, false, &none, false).0, "unknown");
        assert!(classify(&ssl, exe, f, false, &none, false).1.contains("capture is unavailable"));
        assert_eq!(classify(&ssl, exe, f, true, &none, true).0, "unknown");
        let nss = paths(&["/usr/lib/libnss3.so", "/usr/lib/libssl.so.3"]);
        assert_eq!(classify(&nss, exe, f, false, &none, true).0, "nss");
        assert_eq!(classify(&[], exe, ExeFacts { go: true, ..f }, false, &none, true).0, "go");
        assert_eq!(classify(&[], exe, ExeFacts { rustls: true, ..f }, false, &none, true).0, "rustls");
        let (stack, reason) = classify(&ssl, exe, f, false, &none, true);
        assert_eq!(stack, "openssl");
        assert!(reason.contains("not probed"), "{reason}");
        let (_, reason) = classify(&ssl, exe, f, false, &all, true);
        assert!(reason.contains("second, compiled-in"), "{reason}");
        assert_eq!(classify(&[], exe, ExeFacts { static_openssl: true, ..f }, false, &none, true).0, "static");
        assert_eq!(classify(&[], exe, ExeFacts { stripped: true, ..f }, false, &none, true).0, "static");
        assert_eq!(classify(&[], exe, f, false, &none, true).0, "unknown");
    }

    #[test]
    fn the_agent_itself_is_recognised_as_rustls() {
        // The agent links rustls (its collector and shipper): its own executable says so,
        // and does not look like Go although it holds the (masked) markers.
        let mut exe = File::open("/proc/self/exe").unwrap();
        let facts = exe_facts(&mut exe);
        assert!(facts.readable && facts.rustls && !facts.go, "{facts:?}");
        let data = std::fs::read("/bin/sh").unwrap();
        let sh = facts_of(&data);
        assert!(sh.readable && !sh.rustls && !sh.go, "{sh:?}");
    }
}
