//! Evidence of a match without the secret itself.
//!
//! A record keeps, for each finding, a masked form (enough for a person to recognise which
//! key it was: "sk-p…56"), its length, and a keyed hash. The hash lets the same secret be
//! recognised across records, on this host or any host given the same key, while the
//! secret is never stored: HMAC-SHA256 truncated to 128 bits, since a plain hash of a short
//! or guessable value (a card number) could be reversed by trying every candidate, and a key
//! kept off the records prevents that.
//!
//! The key is 32 random bytes in a file readable by its owner only. It is created once, from
//! the OS generator through the `getrandom` crate: the getrandom(2) system call blocks until
//! the kernel generator is seeded, which reading /dev/urandom early at boot would not wait
//! for. The file appears complete or not at all ([`crate::files::create_exclusive`]), so an
//! agent and a CLI started together agree on one key and neither reads a half-written one.

use std::{
    fmt::Write as _,
    fs,
    io::{ErrorKind, Read},
    os::unix::fs::PermissionsExt,
    path::Path,
};

use anyhow::{Context, bail};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// A match as kept in records and logs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Evidence {
    /// A few leading and trailing characters, the rest masked ("sk-p…56").
    pub masked: String,
    /// Characters in the match.
    pub length: usize,
    /// "hmac-sha256:<32 hex>": the same secret gives the same hash on this host (and on
    /// every host sharing the key), so it can be correlated without being stored.
    pub hash: String,
}

/// Masks matches and hashes them with a host key.
pub struct Redactor {
    key: [u8; 32],
}

impl Redactor {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// Read the key from `path`, or create it (32 random bytes from the OS, mode 0600, and
    /// the missing parent directories). An existing file must hold exactly 32 bytes and be
    /// neither group- nor world-accessible (0600 or 0400); anything else is an error that
    /// says how to fix it, never silently replaced, since a new key breaks correlation with
    /// earlier evidence.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        match load(path)? {
            Some(key) => Ok(Self::new(key)),
            None => create(path).map(Self::new),
        }
    }

    /// Masked form, length in characters, and keyed hash of `matched`. The mask keeps the
    /// first 4 and last 2 characters of a match of 12 or more, the first 2 of one of 6 to 11,
    /// none of a shorter one: a short secret would be mostly revealed by its ends.
    pub fn evidence(&self, matched: &str) -> Evidence {
        let length = matched.chars().count();
        let masked = match length {
            0 => String::new(),
            12.. => format!("{}…{}", first_chars(matched, 4), last_chars(matched, 2)),
            6..12 => format!("{}…", first_chars(matched, 2)),
            _ => "…".to_owned(),
        };
        Evidence { masked, length, hash: self.hash(matched) }
    }

    fn hash(&self, matched: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(matched.as_bytes());
        let tag = mac.finalize().into_bytes();
        let mut hash = String::from("hmac-sha256:");
        for byte in &tag[..16] {
            write!(hash, "{byte:02x}").expect("writing to a String cannot fail");
        }
        hash
    }
}

fn first_chars(s: &str, n: usize) -> &str {
    &s[..s.char_indices().nth(n).map_or(s.len(), |(i, _)| i)]
}

fn last_chars(s: &str, n: usize) -> &str {
    &s[s.char_indices().rev().take(n).last().map_or(s.len(), |(i, _)| i)..]
}

/// The key in `path`, None if there is no such file.
fn load(path: &Path) -> anyhow::Result<Option<[u8; 32]>> {
    let shown = path.display();
    // Opened without blocking and checked on the open file, so that what is checked is
    // what is read (a FIFO or a device here is refused, not waited on).
    let (mut file, meta) = match crate::files::open_regular(path) {
        Ok(opened) => opened,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => bail!("HMAC key file {shown}: {e}"),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!("HMAC key file {shown} has mode {mode:04o}, must be private: run `chmod 600 {shown}`");
    }
    if meta.len() != 32 {
        bail!(
            "HMAC key file {shown} has {} bytes, expected exactly 32: restore this host's key, or \
             delete the file to create a new one (earlier evidence hashes will no longer match)",
            meta.len()
        );
    }
    let mut key = [0; 32];
    file.read_exact(&mut key).with_context(|| format!("cannot read HMAC key file {shown}"))?;
    Ok(Some(key))
}

/// Create the key file with a new random key; if another process created it first, its key.
fn create(path: &Path) -> anyhow::Result<[u8; 32]> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let mut key = [0; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("cannot get random bytes from the OS: {e}"))?;
    match crate::files::create_exclusive(path, &key) {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            load(path)?.with_context(|| format!("HMAC key file {} vanished while being created", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot create HMAC key file {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const SECRET: &str = "sk-proj-1234567890abcdef56";

    #[test]
    fn hash_is_keyed_hmac_sha256_truncated() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let evidence = Redactor::new(key).evidence(SECRET);
        // Python: hmac.new(bytes(range(32)), b"sk-proj-1234567890abcdef56", "sha256").hexdigest()[:32]
        assert_eq!(evidence.hash, "hmac-sha256:24dbfda258708010c611098a5c898a1c");
        assert_eq!(Redactor::new(key).evidence(SECRET).hash, evidence.hash);
        assert_eq!(Redactor::new([7; 32]).evidence(SECRET).hash, "hmac-sha256:a9cd29bb5daa363b73b3e07e435d5c81");
        assert_ne!(Redactor::new(key).evidence("sk-proj-1234567890abcdef57").hash, evidence.hash);
    }

    #[test]
    fn masking_depends_on_length_in_characters() {
        let r = Redactor::new([0; 32]);
        let masked = |s: &str| {
            let e = r.evidence(s);
            (e.masked, e.length)
        };
        assert_eq!(masked(SECRET), ("sk-p…56".into(), 26));
        assert_eq!(masked("abcdefghijkl"), ("abcd…kl".into(), 12));
        assert_eq!(masked("abcdefghijk"), ("ab…".into(), 11));
        assert_eq!(masked("abcdef"), ("ab…".into(), 6));
        assert_eq!(masked("abcde"), ("…".into(), 5));
        assert_eq!(masked("a"), ("…".into(), 1));
        assert_eq!(masked(""), ("".into(), 0));
        // Multi-byte characters are counted and kept whole.
        assert_eq!(masked("пароль-секрет-42"), ("паро…42".into(), 16));
        assert_eq!(masked("🔑🔑é-secret-ü€"), ("🔑🔑é-…ü€".into(), 13));
        assert_eq!(masked("ключ-7"), ("кл…".into(), 6));
    }

    /// A directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("aegis-redact-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let tmp = TempDir::new("create");
        let path = tmp.0.join("var/lib/aegis/hmac.key");
        let created = Redactor::load_or_create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let dir: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(dir, ["hmac.key"], "no temporary file left");

        let key: [u8; 32] = fs::read(&path).unwrap().try_into().unwrap();
        assert_ne!(key, [0; 32]);
        let hash = created.evidence(SECRET).hash;
        assert_eq!(Redactor::new(key).evidence(SECRET).hash, hash);
        assert_eq!(Redactor::load_or_create(&path).unwrap().evidence(SECRET).hash, hash);
        assert_eq!(fs::read(&path).unwrap(), key, "not rewritten");

        // Owner read-only is private enough.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(Redactor::load_or_create(&path).unwrap().evidence(SECRET).hash, hash);
    }

    #[test]
    fn bad_key_files_are_rejected_not_replaced() {
        let tmp = TempDir::new("reject");
        fs::create_dir_all(&tmp.0).unwrap();
        let path = tmp.0.join("hmac.key");
        crate::files::create_exclusive(&path, &[1; 31]).unwrap();
        let err = Redactor::load_or_create(&path).err().unwrap().to_string();
        assert!(err.contains("has 31 bytes, expected exactly 32"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), [1; 31]);

        fs::write(&path, [1; 32]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Redactor::load_or_create(&path).err().unwrap().to_string();
        assert!(err.contains("has mode 0644") && err.contains("chmod 600"), "{err}");

        let err = Redactor::load_or_create(&tmp.0).err().unwrap().to_string();
        assert!(err.contains("is a directory, not a regular file"), "{err}");

        // A FIFO: opening it used to wait for a writer forever.
        let fifo = tmp.0.join("fifo.key");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(Redactor::load_or_create(&fifo).err().map(|e| e.to_string())));
        let err = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("did not block").unwrap();
        assert!(err.contains("is a FIFO (named pipe), not a regular file"), "{err}");
    }
}
