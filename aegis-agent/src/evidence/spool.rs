//! The agent's outbox of evidence bundles, and the shipper that empties it into the
//! collector ([`crate::collector`]).
//!
//! # Design
//!
//! A bundle goes to disk before it goes to the network, so that neither a collector that is
//! down, slow or restarting nor an agent that restarts loses it:
//! - [`Spool::push`] (`aegis-agent evidence ship`) and [`Spool::sign_and_push`] (the daemon's
//!   bundle builder) write `<spool_dir>/<hex SHA-256>.dsse` atomically: a temporary file,
//!   fsync, rename, fsync of the directory. A crash leaves a whole bundle or a `.tmp-` file,
//!   which is never shipped and is removed when the spool is next opened.
//! - The shipper ([`start_shipper`]) PUTs each file to `/v1/bundles/sha256/<digest>` and
//!   deletes it once the collector answers 201 stored or 200 already stored. Uploads are
//!   idempotent by content hash, so a retry after any failure (the answer lost, the agent
//!   killed before the delete) stores nothing twice. Failures to reach the collector are
//!   retried with exponential backoff and full jitter (250 ms doubling up to
//!   `backoff_max_secs`); a bundle the collector refuses for good (4xx) is moved to
//!   `rejected/` with the collector's reason beside it, logged and counted, never retried
//!   in a loop and never deleted.
//! - The spool is bounded (`spool_max_files`, `spool_max_bytes`): a bundle that would pass
//!   the bound is refused with an error saying so, counted in `counters.json`
//!   (`refused_full`) and logged; nothing already queued is dropped to make room.
//! - [`Spool::sign_and_push`] numbers bundles: `sequence` holds the last number given, and
//!   is written (atomically, synced) before the bundle, so a number is never given twice,
//!   also across a crash; a crash may skip one. Writers take `flock` on `.lock`, so the
//!   daemon and `evidence ship` can share a spool.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    bundle_meta::{BundleMetaBuilder, PREDICATE_TYPE},
    dsse::{self, Subject},
    hex,
    key::HostKey,
};
use crate::collector::client::{ClientError, CollectorClient, Uploaded};

/// First retry delay; doubles up to `backoff_max_secs`.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// How often an idle shipper looks for new bundles.
const POLL: Duration = Duration::from_millis(500);
const SUFFIX: &str = ".dsse";

/// `[collector]` of the agent's config: where bundles are shipped.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipperConfig {
    /// `https://host:port` of the collector; empty: no shipping.
    pub url: String,
    /// The CA of the collector's certificate (PEM).
    pub ca: PathBuf,
    /// This agent's client certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    pub spool_dir: PathBuf,
    /// Bounds of the spool: bundles and bytes queued.
    pub spool_max_bytes: u64,
    pub spool_max_files: u64,
    /// Longest wait between two tries to reach the collector.
    pub backoff_max_secs: u64,
}

impl ShipperConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    pub fn spool(&self) -> anyhow::Result<Spool> {
        Spool::open(&self.spool_dir, self.spool_max_bytes, self.spool_max_files)
    }

    pub fn client(&self) -> anyhow::Result<CollectorClient> {
        anyhow::ensure!(
            self.enabled(),
            "[collector] url is empty: set it to the collector's https://host:port to ship evidence"
        );
        CollectorClient::new(&self.url, &self.ca, Some((&self.cert, &self.key)))
    }
}

/// What [`Spool::push`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Queued {
    Queued {
        digest: String,
    },
    /// The same bytes are queued already.
    AlreadyQueued {
        digest: String,
    },
}

/// The spool's state, as `aegis-agent evidence spool` prints it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolStatus {
    pub files: u64,
    pub bytes: u64,
    pub max_files: u64,
    pub max_bytes: u64,
    /// Bundles refused because the spool was full, ever.
    pub refused_full: u64,
    /// Bundles the collector refused for good (in `rejected/`), ever.
    pub rejected: u64,
    /// The last sequence number given.
    pub sequence: u64,
}

/// Counters kept across processes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Counters {
    refused_full: u64,
    rejected: u64,
}

/// A spool directory.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    max_files: u64,
}

impl Spool {
    /// Open (create, mode 0700) the spool at `dir`, removing temporary files of writers that
    /// died.
    pub fn open(dir: &Path, max_bytes: u64, max_files: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(max_files >= 1 && max_bytes >= 1, "the spool bounds must be at least 1 file and 1 byte");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join("rejected")).with_context(|| {
            format!("cannot create the spool {}: give a writable [collector] spool_dir", dir.display())
        })?;
        let spool = Self { dir: dir.to_owned(), max_bytes, max_files };
        let _lock = spool.lock()?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> anyhow::Result<nix::fcntl::Flock<File>> {
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", path.display()))
    }

    /// Queue the envelope `bytes` as they are (a DSSE envelope, checked for form only).
    pub fn push(&self, bytes: &[u8]) -> anyhow::Result<Queued> {
        anyhow::ensure!(
            bytes.len() as u64 <= dsse::MAX_ENVELOPE_BYTES,
            "the bundle is {} bytes, over the {} a bundle may have",
            bytes.len(),
            dsse::MAX_ENVELOPE_BYTES
        );
        serde_json::from_slice::<dsse::Envelope>(bytes).context("not a DSSE envelope (JSON)")?;
        let _lock = self.lock()?;
        self.push_locked(bytes)
    }

    fn push_locked(&self, bytes: &[u8]) -> anyhow::Result<Queued> {
        let digest = hex::encode(&Sha256::digest(bytes));
        let name = format!("{digest}{SUFFIX}");
        if self.dir.join(&name).exists() {
            return Ok(Queued::AlreadyQueued { digest });
        }
        let (files, queued_bytes) = self.usage()?;
        if files + 1 > self.max_files || queued_bytes + bytes.len() as u64 > self.max_bytes {
            let mut counters = self.counters();
            counters.refused_full += 1;
            self.save_counters(&counters)?;
            tracing::error!(
                spool = %self.dir.display(), files, bytes = queued_bytes, refused_full = counters.refused_full,
                "evidence spool full: bundle {digest} refused"
            );
            anyhow::bail!(
                "the evidence spool {} is full ({files} bundles, {queued_bytes} bytes; bounds {} bundles, {} bytes): \
                 bundle {digest} is refused, not queued (refused so far: {}). Check that the collector at [collector] \
                 url is reachable and accepts this agent (see the shipper's log and {}/rejected), or raise \
                 [collector] spool_max_files / spool_max_bytes",
                self.dir.display(),
                self.max_files,
                self.max_bytes,
                counters.refused_full,
                self.dir.display()
            );
        }
        write_atomic(&self.dir, &name, bytes)?;
        Ok(Queued::Queued { digest })
    }

    /// Sign a bundle about `subjects` with the next sequence number and queue it.
    pub fn sign_and_push(
        &self,
        key: &HostKey,
        subjects: Vec<Subject>,
        meta: &BundleMetaBuilder,
    ) -> anyhow::Result<(Queued, u64)> {
        let _lock = self.lock()?;
        let sequence = self.sequence()? + 1;
        let created = crate::clock::rfc3339_ms(crate::clock::now_unix_ms());
        let predicate = meta.build(&key.verifier(), sequence, &created)?;
        let envelope = dsse::sign_statement(key, subjects, PREDICATE_TYPE, predicate)?;
        let bytes = serde_json::to_vec(&envelope)?;
        // The number is spent before the bundle exists: never given twice.
        write_atomic(&self.dir, "sequence", format!("{sequence}\n").as_bytes())?;
        Ok((self.push_locked(&bytes)?, sequence))
    }

    fn sequence(&self) -> anyhow::Result<u64> {
        let path = self.dir.join("sequence");
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().with_context(|| {
                format!("{} does not hold a number: restore it (bundle numbers must never repeat)", path.display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// The bundles queued, oldest first: (digest, path).
    pub fn pending(&self) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("cannot read {}", self.dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(digest) = name.strip_suffix(SUFFIX).filter(|d| hex::decode_hash(d).is_some()) else { continue };
            let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            found.push((modified, digest.to_owned(), entry.path()));
        }
        found.sort();
        Ok(found.into_iter().map(|(_, d, p)| (d, p)).collect())
    }

    /// The bundle `digest` is shipped: forget it.
    pub fn remove(&self, digest: &str) -> anyhow::Result<()> {
        match std::fs::remove_file(self.dir.join(format!("{digest}{SUFFIX}"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        sync_dir(&self.dir)
    }

    /// The collector refused `digest` for good: move it to `rejected/` with the reason.
    pub fn reject(&self, digest: &str, why: &str) -> anyhow::Result<()> {
        let _lock = self.lock()?;
        let rejected = self.dir.join("rejected");
        write_atomic(&rejected, &format!("{digest}.why"), format!("{why}\n").as_bytes())?;
        std::fs::rename(self.dir.join(format!("{digest}{SUFFIX}")), rejected.join(format!("{digest}{SUFFIX}")))?;
        sync_dir(&self.dir)?;
        let mut counters = self.counters();
        counters.rejected += 1;
        self.save_counters(&counters)
    }

    fn usage(&self) -> anyhow::Result<(u64, u64)> {
        let mut usage = (0, 0);
        for (_, path) in self.pending()? {
            if let Ok(meta) = std::fs::metadata(path) {
                usage.0 += 1;
                usage.1 += meta.len();
            }
        }
        Ok(usage)
    }

    fn counters(&self) -> Counters {
        std::fs::read(self.dir.join("counters.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_counters(&self, counters: &Counters) -> anyhow::Result<()> {
        write_atomic(&self.dir, "counters.json", &serde_json::to_vec(counters)?)
    }

    pub fn status(&self) -> anyhow::Result<SpoolStatus> {
        let (files, bytes) = self.usage()?;
        let counters = self.counters();
        Ok(SpoolStatus {
            files,
            bytes,
            max_files: self.max_files,
            max_bytes: self.max_bytes,
            refused_full: counters.refused_full,
            rejected: counters.rejected,
            sequence: self.sequence()?,
        })
    }
}

/// Write `dir/name` whole or not at all: a temporary file, fsync, rename, fsync of `dir`.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(".tmp-{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let written = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    let placed = written.and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {} in {}", name, dir.display()));
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

/// What a shipper has done, for its caller's stats.
#[derive(Debug, Default)]
pub struct ShipperStats {
    pub stored: AtomicU64,
    pub already_stored: AtomicU64,
    pub rejected: AtomicU64,
    pub failed_tries: AtomicU64,
}

/// Start the shipper thread: it uploads the spool of `config` until `stop` is set, then
/// returns within about half a second. Errors in `config` (no URL, unreadable certificates)
/// are returned here, not logged later.
pub fn start_shipper(config: &ShipperConfig, stop: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<()>> {
    start_shipper_with_stats(config, stop, Arc::default())
}

/// The daemon's shipper: running while this lives, stopped and joined when dropped.
pub struct ShipperGuard {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl ShipperGuard {
    /// Start shipping when `[collector] url` is set. A shipper that cannot start (unreadable
    /// certificates, a spool that cannot be made) does not stop the agent: the error says
    /// what to fix, and bundles wait in the spool.
    pub fn start(config: &ShipperConfig) -> Option<Self> {
        if !config.enabled() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        match start_shipper(config, stop.clone()) {
            Ok(handle) => Some(Self { stop, handle: Some(handle) }),
            Err(e) => {
                tracing::error!("evidence shipping is off: {e:#}; fix [collector] and restart the agent");
                None
            }
        }
    }
}

impl Drop for ShipperGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// [`start_shipper`], counting into `stats`.
pub fn start_shipper_with_stats(
    config: &ShipperConfig,
    stop: Arc<AtomicBool>,
    stats: Arc<ShipperStats>,
) -> anyhow::Result<JoinHandle<()>> {
    let client = config.client()?;
    let spool = config.spool()?;
    let backoff_max = Duration::from_secs(config.backoff_max_secs.max(1));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    tracing::info!(collector = config.url, spool = %spool.dir.display(), "evidence shipper started");
    std::thread::Builder::new()
        .name("aegis-shipper".into())
        .spawn(move || runtime.block_on(ship(&client, &spool, &stop, &stats, backoff_max)))
        .context("cannot start the shipper thread")
}

async fn ship(client: &CollectorClient, spool: &Spool, stop: &AtomicBool, stats: &ShipperStats, backoff_max: Duration) {
    let mut failures: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let pending = match spool.pending() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("cannot read the evidence spool: {e:#}");
                Vec::new()
            }
        };
        let mut delay = if pending.is_empty() { POLL } else { Duration::ZERO };
        for (digest, path) in pending {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let bytes = match std::fs::read(&path) {
                Ok(b) => Bytes::from(b),
                // Shipped and removed meanwhile (another shipper), or unreadable: look again.
                Err(e) => {
                    tracing::debug!("{}: {e}", path.display());
                    continue;
                }
            };
            match client.put(&digest, bytes).await {
                Ok(outcome) => {
                    failures = 0;
                    match outcome {
                        Uploaded::Stored => stats.stored.fetch_add(1, Ordering::Relaxed),
                        Uploaded::AlreadyStored => stats.already_stored.fetch_add(1, Ordering::Relaxed),
                    };
                    tracing::info!(digest, ?outcome, "evidence bundle shipped");
                    if let Err(e) = spool.remove(&digest) {
                        tracing::error!("cannot remove shipped bundle {digest} from the spool: {e:#}");
                    }
                }
                Err(ClientError::Refused { status, error, message }) => {
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        digest,
                        status,
                        error,
                        "the collector refused evidence bundle {digest}: {message}; moved to {}/rejected",
                        spool.dir.display()
                    );
                    if let Err(e) = spool.reject(&digest, &format!("{status} {error}: {message}")) {
                        tracing::error!("cannot move bundle {digest} to rejected/: {e:#}");
                    }
                }
                Err(ClientError::Transient(e)) => {
                    stats.failed_tries.fetch_add(1, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    delay = backoff(failures, backoff_max);
                    tracing::warn!(digest, failures, "cannot ship evidence yet ({e}); next try in {delay:?}");
                    break;
                }
            }
        }
        sleep_unless_stopped(delay, stop).await;
    }
    tracing::info!("evidence shipper stopped");
}

/// Full jitter: uniform in [0, min(max, base * 2^(failures-1))] (AWS's "exponential backoff
/// and jitter"), so that the agents of a fleet do not return all at once.
fn backoff(failures: u32, max: Duration) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1 << failures.saturating_sub(1).min(20)).min(max);
    let mut random = [0u8; 8];
    let _ = getrandom::fill(&mut random);
    let fraction = (u64::from_le_bytes(random) >> 11) as f64 / (1u64 << 53) as f64;
    ceiling.mul_f64(fraction).max(Duration::from_millis(10))
}

async fn sleep_unless_stopped(delay: Duration, stop: &AtomicBool) {
    let until = tokio::time::Instant::now() + delay;
    while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < until {
        tokio::time::sleep_until(until.min(tokio::time::Instant::now() + Duration::from_millis(100))).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{control::testutil::TempDir, evidence::bundle_meta::BundleMeta};

    fn subject() -> Vec<Subject> {
        vec![Subject { name: "a".into(), digest: BTreeMap::from([("sha256".into(), "ab".repeat(32))]) }]
    }

    fn envelope(n: u8) -> Vec<u8> {
        let key = HostKey::from_seed([n; 32], "h").unwrap();
        serde_json::to_vec(
            &dsse::sign_statement(&key, subject(), "https://example.com/t", serde_json::json!(n)).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn push_is_atomic_deduplicated_and_bounded_with_refusals_counted() {
        let dir = TempDir::new("spool-bound");
        let spool = Spool::open(dir.path(), 1 << 20, 3).unwrap();
        let (a, b, c, d) = (envelope(1), envelope(2), envelope(3), envelope(4));
        let digest = |b: &[u8]| hex::encode(&Sha256::digest(b));
        assert_eq!(spool.push(&a).unwrap(), Queued::Queued { digest: digest(&a) });
        assert_eq!(spool.push(&a).unwrap(), Queued::AlreadyQueued { digest: digest(&a) });
        spool.push(&b).unwrap();
        spool.push(&c).unwrap();
        let err = format!("{:#}", spool.push(&d).unwrap_err());
        assert!(err.contains("is full (3 bundles") && err.contains("refused so far: 1"), "{err}");
        assert!(spool.push(&d).is_err());
        let status = spool.status().unwrap();
        assert_eq!((status.files, status.refused_full), (3, 2));
        assert_eq!(status.bytes, (a.len() + b.len() + c.len()) as u64);
        // Already queued bytes are not refused by a full spool: they are there.
        assert!(matches!(spool.push(&b).unwrap(), Queued::AlreadyQueued { .. }));
        assert_eq!(std::fs::read(dir.path().join(format!("{}.dsse", digest(&a)))).unwrap(), a);
        // Shipping frees room.
        spool.remove(&digest(&a)).unwrap();
        spool.push(&d).unwrap();
        // Bytes bound too.
        let small = TempDir::new("spool-bytes");
        let spool = Spool::open(small.path(), a.len() as u64 + 10, 100).unwrap();
        spool.push(&a).unwrap();
        assert!(format!("{:#}", spool.push(&b).unwrap_err()).contains("spool_max_bytes"));
        assert!(spool.push(b"not json").is_err());
    }

    #[test]
    fn a_crashed_write_is_never_pending_and_is_cleaned() {
        let dir = TempDir::new("spool-tmp");
        let spool = Spool::open(dir.path(), 1 << 20, 10).unwrap();
        let a = envelope(1);
        let half = format!(".tmp-{}.dsse-999-0", hex::encode(&Sha256::digest(&a)));
        std::fs::write(dir.path().join(&half), &a[..a.len() / 2]).unwrap();
        assert!(spool.pending().unwrap().is_empty(), "a temporary file is not a bundle");
        drop(spool);
        Spool::open(dir.path(), 1 << 20, 10).unwrap();
        assert!(!dir.path().join(&half).exists(), "removed when opened");
    }

    #[test]
    fn sequences_are_given_once_and_survive_reopening() {
        let dir = TempDir::new("spool-seq");
        let key = HostKey::from_seed([5; 32], "web-1").unwrap();
        let builder = BundleMetaBuilder::new("web-1");
        let spool = Spool::open(dir.path(), 1 << 20, 2).unwrap();
        let (_, first) = spool.sign_and_push(&key, subject(), &builder).unwrap();
        let (_, second) = spool.sign_and_push(&key, subject(), &builder).unwrap();
        assert_eq!((first, second), (1, 2));
        // Full: refused, and the number it took is not given again.
        assert!(spool.sign_and_push(&key, subject(), &builder).is_err());
        let spool = Spool::open(dir.path(), 1 << 20, 10).unwrap();
        let (queued, third) = spool.sign_and_push(&key, subject(), &builder).unwrap();
        assert!(third > second, "{third} after {second}");
        let Queued::Queued { digest } = queued else { panic!("{queued:?}") };
        let envelope = dsse::read_envelope(&dir.path().join(format!("{digest}.dsse"))).unwrap();
        let statement = dsse::verify(&envelope, &key.verifier()).unwrap();
        let meta = BundleMeta::from_statement(&statement, &key.verifier().dsse_keyid()).unwrap();
        assert_eq!(meta.sequence, third);
        assert_eq!(spool.status().unwrap().sequence, third);
    }

    #[test]
    fn backoff_grows_to_its_bound_with_jitter() {
        let max = Duration::from_secs(5);
        for failures in 1..40 {
            let ceiling = BACKOFF_BASE.saturating_mul(1 << (failures - 1).min(20)).min(max);
            let d = backoff(failures, max);
            assert!(d <= ceiling.max(Duration::from_millis(10)), "{failures}: {d:?}");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(10, max)).collect();
        assert!(samples.len() > 10, "jittered: {samples:?}");
        assert!((0..50).map(|_| backoff(30, max)).any(|d| d > Duration::from_secs(2)), "reaches toward the bound");
    }
}
