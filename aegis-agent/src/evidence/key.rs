//! The host key: one Ed25519 key per host that signs the decision log's checkpoints
//! ([`super::note`]) and evidence envelopes ([`super::dsse`]).
//!
//! Ed25519 because both formats a third party will check with off-the-shelf tools name it:
//! C2SP signed notes (signature type 0x01) and DSSE as securesystemslib and Sigstore verify
//! it. Signatures are deterministic (RFC 8032), so no signing-time randomness can leak the
//! key, and keys are 32 bytes, small enough to paste.
//!
//! The private key is a PKCS#8 PEM file (RFC 8410), the form `openssl genpkey -algorithm
//! ed25519` writes and `openssl pkey -in host.key -pubout` reads, so an operator can bring a
//! key or inspect this one with standard tools. It is created on first use, mode 0600,
//! complete or not at all ([`crate::files::create_exclusive`]). An existing key file must be
//! a regular file (not a symbolic link), owned by the agent's user and readable by nobody
//! else; anything else is refused with what to do, never silently replaced: a new key
//! would not verify what the old one signed.
//!
//! The public half has three printed forms, all from [`VerifierKey`]:
//! - the C2SP verifier key `<name>+<key id, 8 hex>+<base64(0x01 || public key)>`, which
//!   names the key as signature lines of notes do (the key id is
//!   `SHA-256(name || 0x0A || 0x01 || public key)[:4]`);
//! - the raw public key, base64 (32 bytes);
//! - the DSSE key id: hex SHA-256 of the raw public key.

use std::{fmt, io::Read as _, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use super::hex;
use crate::files;

/// Largest key file read: a PEM private key is 119 bytes.
const MAX_KEY_FILE_BYTES: u64 = 4096;
/// DER of a PKCS#8 v1 Ed25519 private key (RFC 8410 §7) before the 32-byte seed.
const PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
/// DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4) before the 32-byte key.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
/// Signature type byte of Ed25519 in C2SP signed notes.
const NOTE_ED25519: u8 = 0x01;

/// The host's signing key and the name it signs under.
pub struct HostKey {
    signing: SigningKey,
    name: String,
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private half.
        write!(f, "HostKey({})", self.verifier())
    }
}

/// What [`HostKey::load_or_create`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    Loaded,
    Created,
}

impl HostKey {
    /// The key in `path`, or a new one created there (with the missing directories, 0750).
    /// `name` is the key's name in signatures ([`check_key_name`]).
    pub fn load_or_create(path: &Path, name: &str) -> anyhow::Result<(Self, KeySource)> {
        check_key_name(name)?;
        if let Some(signing) = load(path)? {
            return Ok((Self { signing, name: name.to_owned() }, KeySource::Loaded));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::control::blocks::create_private_dir(dir)?;
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("cannot get random bytes from the OS: {e}"))?;
        match files::create_exclusive(path, pkcs8_pem(&seed).as_bytes()) {
            Ok(()) => Ok((Self::from_seed(seed, name)?, KeySource::Created)),
            // Another process created it first: use its key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let signing =
                    load(path)?.with_context(|| format!("host key {} vanished while created", path.display()))?;
                Ok((Self { signing, name: name.to_owned() }, KeySource::Loaded))
            }
            Err(e) => Err(e).with_context(|| {
                format!(
                    "cannot create the host key {}: give a writable path with --key (or [evidence] key)",
                    path.display()
                )
            }),
        }
    }

    /// The key of an existing file (never created): for commands that only read.
    pub fn load(path: &Path, name: &str) -> anyhow::Result<Self> {
        check_key_name(name)?;
        let signing = load(path)?.with_context(|| {
            format!(
                "there is no host key at {}: the agent creates it on first use (or run `aegis-agent key show` \
                 as the agent's user); give another path with --key",
                path.display()
            )
        })?;
        Ok(Self { signing, name: name.to_owned() })
    }

    /// A key from its 32-byte seed (tests, and keys brought in other forms).
    pub fn from_seed(seed: [u8; 32], name: &str) -> anyhow::Result<Self> {
        check_key_name(name)?;
        Ok(Self { signing: SigningKey::from_bytes(&seed), name: name.to_owned() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public half, named.
    pub fn verifier(&self) -> VerifierKey {
        VerifierKey { name: Some(self.name.clone()), key: self.signing.verifying_key() }
    }

    /// Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

/// A key name must be usable in a signed note: non-empty, no white space, no `+`
/// (C2SP signed-note), printable ASCII (so it reads the same everywhere), at most 128 bytes.
pub fn check_key_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_graphic() && b != b'+');
    anyhow::ensure!(
        ok,
        "key name {name:?} cannot name a key in signatures: use 1 to 128 printable ASCII characters without spaces \
         or '+' (set [evidence] name, or --name)"
    );
    Ok(())
}

/// The name keys and logs take when `[evidence] name` is empty: the host name.
pub fn host_name() -> anyhow::Result<String> {
    let uts = nix::sys::utsname::uname().context("cannot read the host name")?;
    let name = uts.nodename().to_string_lossy().into_owned();
    check_key_name(&name).context("the host name cannot be a key name: set [evidence] name")?;
    Ok(name)
}

fn pkcs8_pem(seed: &[u8; 32]) -> String {
    let mut der = PKCS8_PREFIX.to_vec();
    der.extend_from_slice(seed);
    format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", BASE64.encode(der))
}

/// The key in `path`; None when there is no file.
fn load(path: &Path) -> anyhow::Result<Option<SigningKey>> {
    let shown = path.display();
    let (file, meta) = match files::open_regular_nofollow(path) {
        Ok(opened) => opened,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => bail!("host key {shown}: {e}"),
    };
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "host key {shown} has mode {mode:04o}: others may read it. Run `chmod 600 {shown}`; if someone else \
             could have read it, delete it instead so that a new key is made (what the old key signed then \
             verifies only with the old public key)"
        );
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        bail!(
            "host key {shown} belongs to uid {}, not to this user (uid {me}): another user could replace it. \
             Run `chown {me} {shown}`, or run as its owner",
            meta.uid()
        );
    }
    // Read from the descriptor checked above, not from the path again.
    let mut text = String::new();
    (&file)
        .take(MAX_KEY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read the host key {shown} as text"))?;
    anyhow::ensure!(
        text.len() as u64 <= MAX_KEY_FILE_BYTES,
        "host key {shown} is over {MAX_KEY_FILE_BYTES} bytes: a key file holds one PEM private key"
    );
    let seed = parse_pkcs8_pem(&text).with_context(|| {
        format!(
            "host key {shown} is not an Ed25519 private key in PKCS#8 PEM (RFC 8410): restore this host's key, \
             make one with `openssl genpkey -algorithm ed25519 -out {shown}`, or delete the file to have the \
             agent create one"
        )
    })?;
    Ok(Some(SigningKey::from_bytes(&seed)))
}

/// The seed of a PKCS#8 v1 Ed25519 private key in PEM.
fn parse_pkcs8_pem(text: &str) -> anyhow::Result<[u8; 32]> {
    let der = pem_body(text, "PRIVATE KEY")?;
    match der.strip_prefix(&PKCS8_PREFIX[..]) {
        Some(seed) if seed.len() == 32 => Ok(seed.try_into().expect("32 bytes")),
        _ => bail!("the PEM block is not a PKCS#8 Ed25519 key ({} bytes of DER)", der.len()),
    }
}

/// The DER inside the one PEM block labelled `label`.
fn pem_body(text: &str, label: &str) -> anyhow::Result<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    anyhow::ensure!(lines.next() == Some(begin.as_str()), "no {begin} line");
    let mut b64 = String::new();
    for line in lines.by_ref() {
        if line == end {
            anyhow::ensure!(lines.next().is_none(), "text after {end}");
            return BASE64.decode(b64.as_bytes()).context("the PEM block is not base64");
        }
        b64.push_str(line);
    }
    bail!("no {end} line")
}

/// A public key that checks signatures; named when it came with a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierKey {
    name: Option<String>,
    key: VerifyingKey,
}

impl VerifierKey {
    /// A verifier from a key's printed forms: the C2SP verifier key
    /// (`name+keyid+base64(0x01||key)`, key id checked), the raw public key in base64, or an
    /// Ed25519 public key PEM (`openssl pkey -pubout`).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        let key = if text.starts_with("-----BEGIN") {
            let der = pem_body(text, "PUBLIC KEY")?;
            let raw = der.strip_prefix(&SPKI_PREFIX[..]).filter(|k| k.len() == 32);
            let raw =
                raw.with_context(|| format!("the PEM block is not an Ed25519 public key ({} bytes)", der.len()))?;
            return Ok(Self { name: None, key: ed25519_key(raw)? });
        } else if let Some(raw) = BASE64.decode(text).ok().filter(|_| text.len() == 44) {
            // A raw key (its base64 may hold '+' too: it is tried first).
            anyhow::ensure!(raw.len() == 32, "a base64 Ed25519 public key has 32 bytes, this one {}", raw.len());
            ed25519_key(&raw)?
        } else if let Some((name, rest)) = text.split_once('+') {
            let (id, key) = rest.split_once('+').context("a verifier key is name+keyid+base64 key")?;
            check_key_name(name)?;
            let bytes = BASE64.decode(key).context("the key part of the verifier key is not base64")?;
            let raw = match bytes.split_first() {
                Some((&NOTE_ED25519, raw)) if raw.len() == 32 => raw,
                Some((&NOTE_ED25519, raw)) => bail!("the verifier key holds {} bytes of key, not 32", raw.len()),
                _ => bail!("the verifier key is not an Ed25519 key (type byte 0x01)"),
            };
            let me = Self { name: Some(name.to_owned()), key: ed25519_key(raw)? };
            let want = me.note_key_id(name);
            anyhow::ensure!(
                id.len() == 8 && hex::decode(id).as_deref() == Some(&want.to_be_bytes()[..]),
                "the verifier key's id {id} does not match its name and key (expected {want:08x})"
            );
            return Ok(me);
        } else {
            let raw = BASE64.decode(text).context("not a verifier key (name+keyid+key), a base64 key or a PEM key")?;
            anyhow::ensure!(raw.len() == 32, "a base64 Ed25519 public key has 32 bytes, this one {}", raw.len());
            ed25519_key(&raw)?
        };
        Ok(Self { name: None, key })
    }

    /// [`Self::parse`] of `arg` when it is a key, else of the file it names.
    pub fn from_arg(arg: &str) -> anyhow::Result<Self> {
        match Self::parse(arg) {
            Ok(key) => Ok(key),
            Err(as_key) => {
                let path = Path::new(arg);
                let text = match files::read_capped_to_string(path, MAX_KEY_FILE_BYTES, "a key file holds one key") {
                    Ok(text) => text,
                    Err(e) if e.is_not_found() => {
                        return Err(as_key).context(format!("--key {arg:?} is neither a public key nor a file"));
                    }
                    Err(e) => bail!("key file {arg}: {e}"),
                };
                Self::parse(&text).with_context(|| format!("key file {arg}"))
            }
        }
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn raw(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The signed-note key id of this key under `name`.
    pub fn note_key_id(&self, name: &str) -> u32 {
        let mut h = Sha256::new();
        h.update(name.as_bytes());
        h.update([b'\n', NOTE_ED25519]);
        h.update(self.key.as_bytes());
        u32::from_be_bytes(h.finalize()[..4].try_into().expect("4 bytes"))
    }

    /// The DSSE key id: hex SHA-256 of the raw public key.
    pub fn dsse_keyid(&self) -> String {
        hex::encode(&Sha256::digest(self.key.as_bytes()))
    }

    /// The raw public key, base64.
    pub fn base64(&self) -> String {
        BASE64.encode(self.key.as_bytes())
    }

    /// Whether `signature` is this key's signature of `message` (strict RFC 8032 checks: no
    /// small-order keys, canonical encodings only).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = <[u8; 64]>::try_from(signature) else { return false };
        self.key.verify_strict(message, &Signature::from_bytes(&sig)).is_ok()
    }
}

impl fmt::Display for VerifierKey {
    /// The C2SP verifier key when named, else the raw key in base64.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => {
                let mut typed = vec![NOTE_ED25519];
                typed.extend_from_slice(self.key.as_bytes());
                write!(f, "{name}+{:08x}+{}", self.note_key_id(name), BASE64.encode(typed))
            }
            None => f.write_str(&self.base64()),
        }
    }
}

fn ed25519_key(raw: &[u8]) -> anyhow::Result<VerifyingKey> {
    let raw: [u8; 32] = raw.try_into().context("an Ed25519 public key has 32 bytes")?;
    let key = VerifyingKey::from_bytes(&raw).map_err(|_| anyhow::anyhow!("not a valid Ed25519 public key"))?;
    anyhow::ensure!(!key.is_weak(), "a weak (small-order) Ed25519 public key: it would accept forged signatures");
    Ok(key)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::control::testutil::TempDir;

    /// golang.org/x/mod/sumdb/note's test key: `PRIVATE+KEY+PeterNeumann+c74f20a3+<base64(0x01||seed)>`.
    pub(crate) fn peter() -> HostKey {
        let typed = BASE64.decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz").unwrap();
        HostKey::from_seed(typed[1..].try_into().unwrap(), "PeterNeumann").unwrap()
    }

    #[test]
    fn verifier_key_matches_the_go_reference() {
        let vkey = peter().verifier();
        assert_eq!(vkey.to_string(), "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW");
        assert_eq!(VerifierKey::parse(&vkey.to_string()).unwrap(), vkey);
        let raw = VerifierKey::parse(&vkey.base64()).unwrap();
        assert_eq!((raw.raw(), raw.name()), (vkey.raw(), None));
        assert_eq!(raw.to_string(), vkey.base64());
        // transparency-dev/formats' key whose base64 holds a '+'.
        let plus = VerifierKey::parse("TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6").unwrap();
        assert_eq!(plus.name(), Some("TEST"));
    }

    #[test]
    fn mangled_verifier_keys_are_refused() {
        let good = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
        for (bad, why) in [
            ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match its name and key"),
            ("PeterNeumanN+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match its name and key"),
            ("PeterNeumann+c74f20a3+AhpjZHNhX2tleV9vZl8zMl9ieXRlc19sb25nX19f", "not an Ed25519 key"),
            ("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10Q=", "holds 31 bytes"),
            ("PeterNeumann+c74f20a3", "name+keyid+base64"),
            ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "cannot name a key"),
            ("AAAA", "has 32 bytes, this one 3"),
            // The identity point: a weak key.
            ("AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "weak"),
        ] {
            let err = format!("{:#}", VerifierKey::parse(bad).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(VerifierKey::parse(good).is_ok());
    }

    #[test]
    fn signatures_verify_with_the_key_only() {
        let key = peter();
        let sig = key.sign(b"text\n");
        assert!(key.verifier().verify(b"text\n", &sig));
        assert!(!key.verifier().verify(b"text!\n", &sig));
        assert!(!key.verifier().verify(b"text\n", &sig[..63]));
        let other = HostKey::from_seed([7; 32], "other").unwrap();
        assert!(!other.verifier().verify(b"text\n", &sig));
        assert_eq!(format!("{key:?}"), format!("HostKey({})", key.verifier()), "Debug shows no secret");
    }

    #[test]
    fn key_file_is_created_private_reused_and_readable_by_openssl_form() {
        let dir = TempDir::new("key-create");
        let path = dir.path().join("var/lib/aegis/host.key");
        let (created, source) = HostKey::load_or_create(&path, "host-a").unwrap();
        assert_eq!(source, KeySource::Created);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI"), "{text}");
        let (loaded, source) = HostKey::load_or_create(&path, "host-a").unwrap();
        assert_eq!((source, loaded.verifier()), (KeySource::Loaded, created.verifier()));
        assert_eq!(HostKey::load(&path, "host-a").unwrap().verifier(), created.verifier());
        // Another name: the same key, another key id.
        let renamed = HostKey::load(&path, "host-b").unwrap().verifier();
        assert_eq!(renamed.raw(), created.verifier().raw());
        assert_ne!(renamed.to_string(), created.verifier().to_string());
        // The PEM form of openssl's own output for RFC 8032's first test key.
        let rfc8032 = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n";
        let seed = parse_pkcs8_pem(rfc8032).unwrap();
        let key = HostKey::from_seed(seed, "rfc8032").unwrap();
        assert_eq!(
            hex::encode(&key.verifier().raw()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let spki = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n-----END PUBLIC KEY-----\n";
        assert_eq!(VerifierKey::parse(spki).unwrap().raw(), key.verifier().raw());
    }

    #[test]
    fn unsafe_key_files_are_refused_not_replaced() {
        let dir = TempDir::new("key-refuse");
        let path = dir.path().join("host.key");
        HostKey::load_or_create(&path, "h").unwrap();
        let before = std::fs::read(&path).unwrap();

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = format!("{:#}", HostKey::load_or_create(&path, "h").unwrap_err());
        assert!(err.contains("has mode 0640: others may read it. Run `chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(HostKey::load(&path, "h").is_ok(), "owner read-only is private");

        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = format!("{:#}", HostKey::load_or_create(&link, "h").unwrap_err());
        assert!(err.contains("is a symbolic link"), "{err}");

        let garbage = dir.path().join("garbage.key");
        files::create_exclusive(&garbage, b"not a key\n").unwrap();
        let err = format!("{:#}", HostKey::load_or_create(&garbage, "h").unwrap_err());
        assert!(
            err.contains("is not an Ed25519 private key in PKCS#8 PEM") && err.contains("openssl genpkey"),
            "{err}"
        );
        assert_eq!(std::fs::read(&garbage).unwrap(), b"not a key\n", "never replaced");

        let err = format!("{:#}", HostKey::load(&dir.path().join("missing.key"), "h").unwrap_err());
        assert!(err.contains("there is no host key at"), "{err}");
        let err = format!("{:#}", HostKey::load_or_create(&path, "bad name").unwrap_err());
        assert!(err.contains("cannot name a key"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
