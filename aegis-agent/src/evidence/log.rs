//! The decision log: an append-only log of JSON entries, chained and Merkle-hashed, with
//! signed checkpoints.
//!
//! # Files (in `[evidence] dir`, mode 0600, directory 0750)
//!
//! - `log.jsonl`: one entry per line, written through [`crate::journal`] (whole lines only,
//!   through a full disk or a crash):
//!   ```text
//!   {"i":41,"time":"2026-12-06T07:25:04.123456Z","kind":"decision","prev":"9f2c…64 hex…","body":{...}}
//!   ```
//!   `i` is the entry's index (0, 1, 2, ...), `time` when it was written (UTC), `kind` the
//!   caller's word for what it is (`decision`, `operator`, `capability`, `config`, ...),
//!   `body` the caller's JSON, `prev` the leaf hash of entry `i - 1` (null for entry 0).
//!   An entry's leaf hash is `SHA-256(0x00 || the line's bytes without its newline)`.
//! - `leaves.bin`: per entry, 40 bytes: its leaf hash, then the byte offset of its line in
//!   `log.jsonl` (u64 big-endian). Proofs read hashes from here, not from the log; the
//!   offset finds an entry's line without a scan. Written in batches: the records of the
//!   entries since the last batch are rebuilt from the log when it is opened.
//! - `checkpoints.jsonl`: one line per checkpoint, `{"time":"…","note":"<signed note>"}`,
//!   where the note is a C2SP checkpoint ([`super::note`]) of origin
//!   `aegis-agent/<key name>/<host id>`, the tree size and root, signed with the host key.
//!   The host id is 16 hex digits of SHA-256 of `/etc/machine-id` (systemd asks that the
//!   machine id itself not be shown), or of the public key where there is no machine id.
//!   A log keeps the origin of its first checkpoint, also when the host is renamed.
//! - `frontier.json`: the right edge of the tree at the latest checkpoint, so that opening
//!   the log does not rehash every leaf; checked against the signed root when read and
//!   rebuilt from `leaves.bin` when it does not match.
//!
//! # Costs
//!
//! An append writes one line and hashes O(log n) nodes ([`Frontier::push`]); nothing of
//! the log is held in memory but the right edge of the tree and at most
//! [`LEAF_BATCH`] pending leaf records. [`DecisionLog::append_buffered`] (the records of a
//! burst of calls) holds the lines until [`DecisionLog::flush`], at most
//! [`MAX_UNWRITTEN_BYTES`], and writes them at once: a write per entry was a fifth of the
//! output thread's time under `cargo xtask bench capture`. A failed write takes them all
//! back (the tree is as before them) and the caller counts them lost. A checkpoint flushes
//! the log and the leaf file to
//! disk before it signs, so a signed root never covers entries a crash could lose, then
//! appends the checkpoint with an fsync.
//!
//! One writer: the daemon (its instance lock keeps a second one away); commands only read.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    hex,
    key::{HostKey, VerifierKey},
    merkle::{Frontier, Hash, LeafSource, leaf_hash},
    note::Checkpoint,
};
use crate::journal::Journal;

pub const LOG_FILE: &str = "log.jsonl";
pub const LEAVES_FILE: &str = "leaves.bin";
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";
pub const FRONTIER_FILE: &str = "frontier.json";
/// Bytes per record of `leaves.bin`: leaf hash, line offset.
pub const LEAF_RECORD: u64 = 40;
/// Largest entry line: bodies are decisions and references (hashes, ids), not payloads.
pub const MAX_ENTRY_BYTES: usize = 1 << 20;
/// Largest line of `checkpoints.jsonl`.
pub const MAX_CHECKPOINT_LINE: usize = 128 * 1024;
/// Longest `kind`.
pub const MAX_KIND_BYTES: usize = 64;
/// Leaf records held before they are written (and at most held while the leaf file cannot
/// be written; past that, appends are refused).
pub const LEAF_BATCH: usize = 256;
const MAX_PENDING_LEAVES: usize = 16 * LEAF_BATCH;
const MAX_FRONTIER_BYTES: u64 = 16 * 1024;
/// Bytes of buffered entries past which [`DecisionLog::wants_flush`] says to write them.
pub const MAX_UNWRITTEN_BYTES: usize = 256 << 10;

/// One line of `log.jsonl`. `B` is the body: `serde_json::Value`, or
/// `serde::de::IgnoredAny` where only the head matters.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry<B = serde_json::Value> {
    pub i: u64,
    pub time: String,
    pub kind: String,
    /// Leaf hash of the previous entry, hex; None for entry 0.
    pub prev: Option<String>,
    pub body: B,
}

/// One line of `checkpoints.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRecord {
    /// When it was signed (UTC); not signed itself.
    pub time: String,
    /// The signed note.
    pub note: String,
}

/// `frontier.json`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedFrontier {
    size: u64,
    nodes: Vec<String>,
}

/// When checkpoints are signed besides on demand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// When the oldest uncovered entry may be this old.
    pub every: Option<Duration>,
    /// When this many entries are uncovered.
    pub entries: Option<u64>,
}

impl CheckpointPolicy {
    pub fn from_config(config: &super::EvidenceConfig) -> Self {
        Self {
            every: (config.checkpoint_secs > 0).then(|| Duration::from_secs(config.checkpoint_secs)),
            entries: (config.checkpoint_entries > 0).then_some(config.checkpoint_entries),
        }
    }
}

/// What opening the log found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Entries in the log.
    pub entries: u64,
    /// Bytes of a partial last line cut from `log.jsonl` (a crash in a write).
    pub partial_line_bytes: u64,
    /// Bytes of a partial last record cut from `leaves.bin`.
    pub partial_leaf_bytes: u64,
    /// Leaf records rebuilt from the log (entries written since the last batch).
    pub leaves_rebuilt: u64,
    /// `frontier.json` was missing or stale: the tree's edge was rebuilt from the leaf file.
    pub frontier_rebuilt: bool,
    /// Size of the latest checkpoint.
    pub checkpoint_size: Option<u64>,
}

/// The decision log, open for appending.
pub struct DecisionLog {
    dir: PathBuf,
    key: HostKey,
    origin: String,
    policy: CheckpointPolicy,
    log: Journal,
    leaves: File,
    /// Records in `leaves.bin`.
    leaves_written: u64,
    /// Records not yet written, in order after `leaves_written`.
    pending: Vec<u8>,
    frontier: Frontier,
    last_leaf: Option<Hash>,
    checkpoints: Journal,
    latest: Option<Checkpoint>,
    /// When `latest` was signed (or the log opened).
    latest_at: Instant,
    /// Lines of buffered entries not written yet ([`Self::append_buffered`]), and the tree
    /// and leaf records as they were before the first of them (restored if their write
    /// fails). While it holds lines, the leaf file is not written: it never gets ahead of
    /// the log.
    unwritten: Vec<u8>,
    before_unwritten: Option<(Frontier, Option<Hash>, usize)>,
}

impl DecisionLog {
    /// Open (or create) the log in `dir`, repairing what a crash leaves (a partial line or
    /// leaf record, leaf records not yet written) and checking that the leaf file gives the
    /// latest checkpoint's root. A log that disagrees with its own checkpoints or leaf file
    /// is not opened: appending to it would sign over the damage. The error says to run
    /// `aegis-agent log verify`, then to move the directory aside to start a new log.
    pub fn open(dir: &Path, key: HostKey, policy: CheckpointPolicy) -> anyhow::Result<(Self, OpenReport)> {
        crate::control::blocks::create_private_dir(dir)?;
        let shown = dir.display();
        let damaged = |what: String| {
            anyhow::anyhow!(
                "the decision log in {shown} is damaged: {what}. Run `aegis-agent log verify --dir {shown}` to see \
                 what changed; to go on with a new log, move the directory aside (keep it as evidence)"
            )
        };
        let mut report = OpenReport::default();
        let (log, repairs) = Journal::open(&dir.join(LOG_FILE), false)?;
        report.partial_line_bytes = repairs.partial_line_bytes;
        let last = log.last_line(MAX_ENTRY_BYTES).with_context(|| format!("cannot read {}", log.path().display()))?;
        let (size, last_leaf) = match &last {
            None => (0, None),
            Some((_, line)) => {
                let entry: Entry<serde::de::IgnoredAny> = serde_json::from_slice(line)
                    .map_err(|e| damaged(format!("its last line is not an entry ({e})")))?;
                (
                    entry.i.checked_add(1).ok_or_else(|| damaged("the last index is out of range".into()))?,
                    Some(leaf_hash(line)),
                )
            }
        };
        report.entries = size;

        let leaves_path = dir.join(LEAVES_FILE);
        let leaves = open_appending(&leaves_path)?;
        let len = leaves.metadata().with_context(|| format!("cannot stat {}", leaves_path.display()))?.len();
        report.partial_leaf_bytes = len % LEAF_RECORD;
        if report.partial_leaf_bytes > 0 {
            leaves
                .set_len(len - report.partial_leaf_bytes)
                .with_context(|| format!("cannot cut {}", leaves_path.display()))?;
        }
        let mut me = Self {
            dir: dir.to_owned(),
            origin: String::new(),
            policy,
            log,
            leaves,
            leaves_written: len / LEAF_RECORD,
            pending: Vec::new(),
            frontier: Frontier::new(),
            last_leaf,
            checkpoints: Journal::open(&dir.join(CHECKPOINTS_FILE), true)?.0,
            latest: None,
            latest_at: Instant::now(),
            key,
            unwritten: Vec::new(),
            before_unwritten: None,
        };
        if me.leaves_written > size {
            return Err(damaged(format!(
                "{LEAVES_FILE} records {} entries, {LOG_FILE} holds {size}: entries were cut from the log",
                me.leaves_written
            )));
        }
        if me.leaves_written < size {
            report.leaves_rebuilt = me.rebuild_leaves(size).map_err(|e| damaged(format!("{e:#}")))?;
        }
        if let (Some((offset, _)), Some(leaf)) = (&last, last_leaf) {
            let record = LeafFile::from_file(me.leaves.try_clone()?, size).record(size - 1)?;
            if record != (leaf, *offset) {
                return Err(damaged(format!("its last entry ({}) does not match its leaf record", size - 1)));
            }
        }

        let latest = me.checkpoints.last_line(MAX_CHECKPOINT_LINE).context("cannot read the latest checkpoint")?;
        if let Some((_, line)) = latest {
            let record: CheckpointRecord = serde_json::from_slice(&line)
                .map_err(|e| damaged(format!("the last line of {CHECKPOINTS_FILE} is not a checkpoint ({e})")))?;
            let verifier = me.key.verifier();
            let cp = Checkpoint::open(&record.note, &verifier).map_err(|e| {
                anyhow::anyhow!(
                    "the latest checkpoint of the decision log in {shown}: {e}. The log was signed with another key: \
                     restore that key, or move the directory aside to start a new log"
                )
            })?;
            if cp.size > size {
                return Err(damaged(format!("its latest checkpoint covers {} entries, the log holds {size}", cp.size)));
            }
            me.origin = cp.origin.clone();
            report.checkpoint_size = Some(cp.size);
            me.latest = Some(cp);
        } else {
            me.origin = default_origin(&me.key.verifier());
        }
        report.frontier_rebuilt = me.restore_frontier(size).map_err(|e| damaged(format!("{e:#}")))?;
        Ok((me, report))
    }

    /// Append an entry of `kind` (1 to 64 printable ASCII characters) with `body`, written
    /// now (with the buffered entries before it); its index.
    /// The body is written as it serialises: a [`serde_json::value::RawValue`] goes in byte
    /// for byte (a record's line, already JSON, is not parsed and written again).
    pub fn append<B: serde::Serialize + ?Sized>(&mut self, kind: &str, body: &B) -> anyhow::Result<u64> {
        let index = self.append_buffered(kind, body)?;
        self.flush()?;
        Ok(index)
    }

    /// [`Self::append`], but the entry's line is written at the next [`Self::flush`] (the
    /// caller's, when [`Self::wants_flush`] or its burst ends). Until then it is in the tree
    /// (and in [`Self::size`]) but not in the file, and no checkpoint covers it.
    pub fn append_buffered<B: serde::Serialize + ?Sized>(&mut self, kind: &str, body: &B) -> anyhow::Result<u64> {
        anyhow::ensure!(
            !kind.is_empty() && kind.len() <= MAX_KIND_BYTES && kind.bytes().all(|b| b.is_ascii_graphic()),
            "entry kind {kind:?}: use 1 to {MAX_KIND_BYTES} printable ASCII characters without spaces"
        );
        if self.pending.len() >= MAX_PENDING_LEAVES * LEAF_RECORD as usize {
            anyhow::ensure!(
                self.unwritten.is_empty(),
                "the leaf file cannot be written; entries are refused until it can"
            );
            self.flush_leaves().context("the leaf file cannot be written; entries are refused until it can")?;
        }
        let index = self.frontier.size();
        let entry = Entry {
            i: index,
            time: crate::clock::now_rfc3339(),
            kind: kind.to_owned(),
            prev: self.last_leaf.map(|h| hex::encode(&h)),
            body,
        };
        // Serialised straight after the entries already held (no buffer of its own to grow
        // and copy), and cut away again if it cannot be kept.
        let start = self.unwritten.len();
        let offset = self.log.len() + start as u64;
        let written = serde_json::to_writer(&mut self.unwritten, &entry);
        let len = self.unwritten.len() - start;
        if let Err(e) = written {
            self.unwritten.truncate(start);
            return Err(anyhow::Error::new(e).context("the entry cannot be written as JSON"));
        }
        if len > MAX_ENTRY_BYTES {
            self.unwritten.truncate(start);
            anyhow::bail!(
                "an entry of {len} bytes is over the limit of {MAX_ENTRY_BYTES}: keep bodies to decisions and \
                 references (hashes, ids), not payloads"
            );
        }
        let leaf = leaf_hash(&self.unwritten[start..]);
        self.unwritten.push(b'\n');
        if start == 0 {
            self.before_unwritten = Some((self.frontier.clone(), self.last_leaf, self.pending.len()));
        }
        self.pending.extend_from_slice(&leaf);
        self.pending.extend_from_slice(&offset.to_be_bytes());
        self.frontier.push(leaf);
        self.last_leaf = Some(leaf);
        Ok(index)
    }

    /// Buffered entries are past [`MAX_UNWRITTEN_BYTES`], or their leaf records past a
    /// batch: time to [`Self::flush`].
    pub fn wants_flush(&self) -> bool {
        self.unwritten.len() >= MAX_UNWRITTEN_BYTES || self.pending.len() >= LEAF_BATCH * LEAF_RECORD as usize
    }

    /// Entries appended with [`Self::append_buffered`] and not written yet.
    pub fn unwritten(&self) -> u64 {
        self.before_unwritten.as_ref().map_or(0, |(before, _, _)| self.frontier.size() - before.size())
    }

    /// Write the buffered entries, all of them or none: on an error the log, its tree and
    /// its leaf records are as before the first of them (the caller counts them lost), and
    /// the next entry takes the first one's index.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if !self.unwritten.is_empty() {
            let result = self.log.append(&self.unwritten);
            self.unwritten.clear();
            let (frontier, last_leaf, pending) =
                self.before_unwritten.take().expect("kept with the first unwritten line");
            if let Err(e) = result {
                self.frontier = frontier;
                self.last_leaf = last_leaf;
                self.pending.truncate(pending);
                return Err(e).with_context(|| format!("cannot append to {}", self.log.path().display()));
            }
        }
        if self.pending.len() >= LEAF_BATCH * LEAF_RECORD as usize
            && let Err(e) = self.flush_leaves()
        {
            // The entries are in the log; their records wait in memory and are retried.
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write leaf records (will retry)");
        }
        Ok(())
    }

    /// Sign a checkpoint of the whole log now (the latest one when nothing was appended
    /// since), after the log and leaf file are on disk.
    pub fn checkpoint(&mut self) -> anyhow::Result<Checkpoint> {
        let size = self.frontier.size();
        if let Some(cp) = self.latest.as_ref().filter(|cp| cp.size == size) {
            self.latest_at = Instant::now();
            return Ok(cp.clone());
        }
        self.flush()?;
        self.flush_leaves()?;
        self.log.sync().with_context(|| format!("cannot flush {}", self.log.path().display()))?;
        self.leaves.sync_data().with_context(|| format!("cannot flush {}", self.dir.join(LEAVES_FILE).display()))?;
        let cp = Checkpoint { origin: self.origin.clone(), size, root: self.frontier.root() };
        let record = CheckpointRecord { time: crate::clock::now_rfc3339(), note: cp.sign(&self.key) };
        let mut line = serde_json::to_vec(&record).expect("a checkpoint record serialises");
        line.push(b'\n');
        self.checkpoints
            .append(&line)
            .with_context(|| format!("cannot append to {}", self.checkpoints.path().display()))?;
        if let Err(e) = self.save_frontier() {
            // Only a cache: the next open rebuilds it from the leaf file.
            tracing::warn!(dir = %self.dir.display(), error = %format!("{e:#}"), "cannot save the tree's frontier");
        }
        self.latest = Some(cp.clone());
        self.latest_at = Instant::now();
        Ok(cp)
    }

    /// [`Self::checkpoint`] when the policy says one is due: entries are uncovered and
    /// either enough of them, or the last checkpoint is old enough. For the daemon's timer
    /// and after its appends; cheap when nothing is due.
    pub fn checkpoint_if_due(&mut self) -> anyhow::Result<Option<Checkpoint>> {
        let uncovered = self.frontier.size() - self.latest.as_ref().map_or(0, |cp| cp.size);
        let due = uncovered > 0
            && (self.policy.entries.is_some_and(|n| uncovered >= n)
                || self.policy.every.is_some_and(|d| self.latest_at.elapsed() >= d));
        if due { self.checkpoint().map(Some) } else { Ok(None) }
    }

    /// Entries in the log (buffered ones included).
    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    /// The log's origin (first line of its checkpoints).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The latest signed checkpoint.
    pub fn latest_checkpoint(&self) -> Option<&Checkpoint> {
        self.latest.as_ref()
    }

    /// Write the pending leaf records; on failure the file is cut back and they stay pending.
    fn flush_leaves(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        debug_assert!(self.unwritten.is_empty(), "leaf records of entries not in the log");
        if let Err(e) = self.leaves.write_all(&self.pending) {
            let _ = self.leaves.set_len(self.leaves_written * LEAF_RECORD);
            return Err(e).with_context(|| format!("cannot write {}", self.dir.join(LEAVES_FILE).display()));
        }
        self.leaves_written += (self.pending.len() as u64) / LEAF_RECORD;
        self.pending.clear();
        Ok(())
    }

    /// Write the leaf records of the entries from `leaves_written` to `size` from the log's
    /// lines (entries written since the last batch before a stop or crash).
    fn rebuild_leaves(&mut self, size: u64) -> anyhow::Result<u64> {
        let from = self.leaves_written;
        let start = if from == 0 {
            0
        } else {
            // The line after entry from - 1, whose record holds its offset.
            let (_, offset) = LeafFile::from_file(self.leaves.try_clone()?, from).record(from - 1)?;
            let mut reader = BufReader::new(crate::files::open_regular(self.log.path())?.0);
            reader.seek(SeekFrom::Start(offset))?;
            let mut skip = Vec::new();
            let n = reader.by_ref().take(MAX_ENTRY_BYTES as u64 + 1).read_until(b'\n', &mut skip)?;
            anyhow::ensure!(skip.ends_with(b"\n"), "leaf record {} points into the middle of the log", from - 1);
            offset + n as u64
        };
        let mut reader = BufReader::new(crate::files::open_regular(self.log.path())?.0);
        reader.seek(SeekFrom::Start(start))?;
        let (mut offset, mut index, mut line) = (start, from, Vec::new());
        while index < size {
            line.clear();
            let n = reader.by_ref().take(MAX_ENTRY_BYTES as u64 + 2).read_until(b'\n', &mut line)?;
            anyhow::ensure!(n > 0 && line.ends_with(b"\n"), "entry {index} has no whole line in {LOG_FILE}");
            line.pop();
            let entry: Entry<serde::de::IgnoredAny> =
                serde_json::from_slice(&line).with_context(|| format!("the line of entry {index} is not an entry"))?;
            anyhow::ensure!(entry.i == index, "the line after entry {} holds entry {}", index.wrapping_sub(1), entry.i);
            self.pending.extend_from_slice(&leaf_hash(&line));
            self.pending.extend_from_slice(&offset.to_be_bytes());
            offset += n as u64;
            index += 1;
            if self.pending.len() >= LEAF_BATCH * LEAF_RECORD as usize {
                self.flush_leaves()?;
            }
        }
        self.flush_leaves()?;
        Ok(size - from)
    }

    /// Rebuild the tree's right edge for `size` leaves: from `frontier.json` when it is
    /// there and fits, else from the first leaf; checked against the latest checkpoint.
    /// Whether it was rebuilt from the first leaf.
    fn restore_frontier(&mut self, size: u64) -> anyhow::Result<bool> {
        let mut source = LeafFile::from_file(self.leaves.try_clone()?, size);
        let target = self.latest.clone();
        let saved = load_frontier(&self.dir.join(FRONTIER_FILE))
            .filter(|f| f.size() <= size && target.as_ref().is_none_or(|cp| f.size() <= cp.size));
        if let Some(frontier) = saved
            && let Some(frontier) = replay(frontier, &mut source, size, target.as_ref())?
        {
            self.frontier = frontier;
            return Ok(false);
        }
        match replay(Frontier::new(), &mut source, size, target.as_ref())? {
            Some(frontier) => {
                self.frontier = frontier;
                Ok(true)
            }
            None => {
                let cp = target.expect("only a checkpoint can disagree");
                bail!("the leaf file does not give the root of the latest checkpoint (size {})", cp.size)
            }
        }
    }

    fn save_frontier(&self) -> anyhow::Result<()> {
        let saved = SavedFrontier {
            size: self.frontier.size(),
            nodes: self.frontier.nodes().iter().map(|h| hex::encode(h)).collect(),
        };
        let path = self.dir.join(FRONTIER_FILE);
        let tmp = self.dir.join(format!(".{FRONTIER_FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(&serde_json::to_vec(&saved)?)?;
        file.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

impl Drop for DecisionLog {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(dir = %self.dir.display(), error = %format!("{e:#}"), "buffered decision log entries could not be written at close: they are lost");
            return;
        }
        if let Err(e) = self.flush_leaves() {
            tracing::warn!(dir = %self.dir.display(), error = %format!("{e:#}"), "leaf records not written (rebuilt at the next open)");
        }
    }
}

/// Push the leaves from `frontier.size()` to `size`; None when the root at `check`'s size
/// is not `check`'s root.
fn replay(
    mut frontier: Frontier,
    source: &mut LeafFile,
    size: u64,
    check: Option<&Checkpoint>,
) -> io::Result<Option<Frontier>> {
    let mut buf = vec![[0u8; 32]; 4096];
    let matches = |f: &Frontier| check.is_none_or(|cp| cp.size != f.size() || cp.root == f.root());
    if !matches(&frontier) {
        return Ok(None);
    }
    while frontier.size() < size {
        let n = buf.len().min((size - frontier.size()) as usize);
        // Stop at the checkpoint's size to compare the root there.
        let n = match check {
            Some(cp) if cp.size > frontier.size() => n.min((cp.size - frontier.size()) as usize),
            _ => n,
        };
        source.read_leaves(frontier.size(), &mut buf[..n])?;
        for leaf in &buf[..n] {
            frontier.push(*leaf);
        }
        if !matches(&frontier) {
            return Ok(None);
        }
    }
    Ok(Some(frontier))
}

fn load_frontier(path: &Path) -> Option<Frontier> {
    let data = crate::files::read_capped(path, MAX_FRONTIER_BYTES, "").ok()?;
    let saved: SavedFrontier = serde_json::from_slice(&data).ok()?;
    let nodes = saved.nodes.iter().map(|h| hex::decode_hash(h)).collect::<Option<Vec<_>>>()?;
    Frontier::from_parts(saved.size, nodes)
}

/// Open `path` for appending (created 0600), refusing a symbolic link.
fn open_appending(path: &Path) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!("{} is a symbolic link: give the real path", path.display()),
            _ => anyhow::anyhow!("cannot open {}: {e}", path.display()),
        })?;
    anyhow::ensure!(file.metadata()?.file_type().is_file(), "{} is not a regular file", path.display());
    Ok(file)
}

/// The origin of a new log: `aegis-agent/<key name>/<host id>` (see the module docs).
pub fn default_origin(key: &VerifierKey) -> String {
    let machine_id = crate::files::read_capped_to_string(Path::new("/etc/machine-id"), 4096, "")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let id = match machine_id {
        Some(id) => Sha256::digest(format!("aegis-agent log origin\n{id}")),
        None => Sha256::digest(key.raw()),
    };
    format!("aegis-agent/{}/{}", key.name().unwrap_or("host"), hex::encode(&id[..8]))
}

/// `leaves.bin` read by index, through a window of records.
pub struct LeafFile {
    /// None for a log without a leaf file (no records).
    file: Option<File>,
    /// Records readable (whole ones, up to what the caller trusts).
    records: u64,
    window_start: u64,
    window: Vec<u8>,
}

impl LeafFile {
    /// The leaf file of a log directory, read only: its whole records and the bytes of a
    /// partial last one.
    pub fn open(dir: &Path) -> anyhow::Result<(Self, u64)> {
        let path = dir.join(LEAVES_FILE);
        let (file, meta) = crate::files::open_regular(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok((Self::from_file(file, meta.len() / LEAF_RECORD), meta.len() % LEAF_RECORD))
    }

    fn from_file(file: File, records: u64) -> Self {
        Self { file: Some(file), records, window_start: 0, window: Vec::new() }
    }

    /// No leaf file: no records.
    pub fn empty() -> Self {
        Self { file: None, records: 0, window_start: 0, window: Vec::new() }
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// Record `index`: leaf hash and line offset.
    pub fn record(&mut self, index: u64) -> io::Result<(Hash, u64)> {
        let file = match &self.file {
            Some(file) if index < self.records => file,
            _ => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("no leaf record {index}"))),
        };
        let in_window =
            index >= self.window_start && (index - self.window_start) < self.window.len() as u64 / LEAF_RECORD;
        if !in_window {
            let n = 1024.min(self.records - index);
            self.window.resize((n * LEAF_RECORD) as usize, 0);
            file.read_exact_at(&mut self.window, index * LEAF_RECORD)?;
            self.window_start = index;
        }
        let at = ((index - self.window_start) * LEAF_RECORD) as usize;
        let rec = &self.window[at..at + LEAF_RECORD as usize];
        Ok((rec[..32].try_into().expect("32 bytes"), u64::from_be_bytes(rec[32..].try_into().expect("8 bytes"))))
    }
}

impl LeafSource for LeafFile {
    fn read_leaves(&mut self, start: u64, out: &mut [Hash]) -> io::Result<()> {
        for (i, leaf) in out.iter_mut().enumerate() {
            *leaf = self.record(start + i as u64)?.0;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::{control::testutil::TempDir, evidence::key::HostKey};

    pub(crate) fn test_key() -> HostKey {
        HostKey::from_seed([42; 32], "test-host").unwrap()
    }

    /// A log in `dir` with `n` entries, a checkpoint at 5 when n > 5, and one at the end.
    pub(crate) fn write_log(dir: &Path, n: u64) {
        let (mut log, _) = DecisionLog::open(dir, test_key(), CheckpointPolicy::default()).unwrap();
        for i in 0..n {
            let kind = if i % 3 == 0 { "operator" } else { "decision" };
            assert_eq!(log.append(kind, &json!({"n": i, "action": "allow"})).unwrap(), i);
            if i == 4 {
                log.checkpoint().unwrap();
            }
        }
        log.checkpoint().unwrap();
    }

    pub(crate) fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join(LOG_FILE)).unwrap().lines().map(str::to_owned).collect()
    }

    #[test]
    fn entries_chain_and_checkpoints_sign_the_tree() {
        let dir = TempDir::new("evlog-write");
        let d = dir.path().join("log");
        write_log(&d, 12);
        let lines = lines(&d);
        assert_eq!(lines.len(), 12);
        let entries: Vec<Entry> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(entries[0].prev, None);
        assert!(lines[0].starts_with("{\"i\":0,\"time\":\"20"), "{}", lines[0]);
        assert!(lines[0].ends_with(",\"kind\":\"operator\",\"prev\":null,\"body\":{\"action\":\"allow\",\"n\":0}}"));
        for (i, pair) in lines.windows(2).enumerate() {
            assert_eq!(entries[i + 1].prev, Some(hex::encode(&leaf_hash(pair[0].as_bytes()))), "entry {}", i + 1);
        }
        let (mut leaves, torn) = LeafFile::open(&d).unwrap();
        assert_eq!((leaves.records(), torn), (12, 0));
        let mut offset = 0;
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(leaves.record(i as u64).unwrap(), (leaf_hash(line.as_bytes()), offset));
            offset += line.len() as u64 + 1;
        }
        let cps: Vec<CheckpointRecord> = std::fs::read_to_string(d.join(CHECKPOINTS_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(cps.len(), 2);
        let all: Vec<Hash> = lines.iter().map(|l| leaf_hash(l.as_bytes())).collect();
        for (cp, size) in cps.iter().zip([5u64, 12]) {
            let cp = Checkpoint::open(&cp.note, &test_key().verifier()).unwrap();
            assert_eq!(cp.size, size);
            assert_eq!(cp.root, crate::evidence::merkle::subtree_root(&mut &all[..], 0, size).unwrap());
            assert!(cp.origin.starts_with("aegis-agent/test-host/"), "{}", cp.origin);
        }
        let mode =
            |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777;
        for file in [LOG_FILE, LEAVES_FILE, CHECKPOINTS_FILE, FRONTIER_FILE] {
            assert_eq!(mode(&d.join(file)), 0o600, "{file}");
        }
        assert_eq!(mode(&d), 0o750);
    }

    #[test]
    fn reopening_continues_the_chain_and_repairs_a_crash() {
        let dir = TempDir::new("evlog-reopen");
        let d = dir.path().join("log");
        write_log(&d, 7);
        // A crash: half a line in the log, the last leaf record torn and two missing, no frontier.
        let mut log_file = OpenOptions::new().append(true).open(d.join(LOG_FILE)).unwrap();
        log_file.write_all(b"{\"i\":7,\"ti").unwrap();
        let leaves = OpenOptions::new().write(true).open(d.join(LEAVES_FILE)).unwrap();
        leaves.set_len(5 * LEAF_RECORD - 3).unwrap();
        std::fs::remove_file(d.join(FRONTIER_FILE)).unwrap();
        let (mut log, report) = DecisionLog::open(&d, test_key(), CheckpointPolicy::default()).unwrap();
        assert_eq!(
            report,
            OpenReport {
                entries: 7,
                partial_line_bytes: 10,
                partial_leaf_bytes: LEAF_RECORD - 3,
                leaves_rebuilt: 3,
                frontier_rebuilt: true,
                checkpoint_size: Some(7),
            }
        );
        assert_eq!(log.append("decision", &json!({"n": 7})).unwrap(), 7);
        let origin = log.origin().to_owned();
        let cp = log.checkpoint().unwrap();
        assert_eq!((cp.size, cp.origin.as_str()), (8, origin.as_str()));
        drop(log);
        let lines = lines(&d);
        let last: Entry = serde_json::from_str(&lines[7]).unwrap();
        assert_eq!(last.prev, Some(hex::encode(&leaf_hash(lines[6].as_bytes()))));
        // A clean reopen uses the saved frontier.
        let (log, report) = DecisionLog::open(&d, test_key(), CheckpointPolicy::default()).unwrap();
        assert_eq!((report.frontier_rebuilt, report.leaves_rebuilt, log.size()), (false, 0, 8));
        assert_eq!(log.latest_checkpoint(), Some(&cp));
    }

    #[test]
    fn a_damaged_log_or_another_key_is_not_opened() {
        let dir = TempDir::new("evlog-damaged");
        let d = dir.path().join("log");
        write_log(&d, 6);
        let other = HostKey::from_seed([1; 32], "test-host").unwrap();
        let err = format!("{:#}", DecisionLog::open(&d, other, CheckpointPolicy::default()).err().unwrap());
        assert!(err.contains("The log was signed with another key"), "{err}");

        // The leaf file rewritten: the saved frontier and a full rebuild both disagree with the checkpoint.
        let mut bytes = std::fs::read(d.join(LEAVES_FILE)).unwrap();
        bytes[2 * LEAF_RECORD as usize] ^= 1;
        std::fs::write(d.join(LEAVES_FILE), &bytes).unwrap();
        std::fs::remove_file(d.join(FRONTIER_FILE)).unwrap();
        let err = format!("{:#}", DecisionLog::open(&d, test_key(), CheckpointPolicy::default()).err().unwrap());
        assert!(err.contains("does not give the root of the latest checkpoint (size 6)"), "{err}");
        assert!(err.contains("Run `aegis-agent log verify --dir"), "{err}");
        bytes[2 * LEAF_RECORD as usize] ^= 1;
        std::fs::write(d.join(LEAVES_FILE), &bytes).unwrap();

        // Entries cut from the end.
        let lines = lines(&d);
        std::fs::write(d.join(LOG_FILE), format!("{}\n", lines[..4].join("\n"))).unwrap();
        let err = format!("{:#}", DecisionLog::open(&d, test_key(), CheckpointPolicy::default()).err().unwrap());
        assert!(err.contains("leaves.bin records 6 entries, log.jsonl holds 4"), "{err}");
    }

    #[test]
    fn checkpoints_come_by_count_and_by_time() {
        let dir = TempDir::new("evlog-policy");
        let d = dir.path().join("log");
        let policy = CheckpointPolicy { every: Some(Duration::from_millis(200)), entries: Some(3) };
        let (mut log, _) = DecisionLog::open(&d, test_key(), policy).unwrap();
        assert_eq!(log.checkpoint_if_due().unwrap(), None, "nothing to cover");
        log.append("decision", &json!({})).unwrap();
        log.append("decision", &json!({})).unwrap();
        assert_eq!(log.checkpoint_if_due().unwrap(), None, "2 entries, not yet 200 ms");
        log.append("decision", &json!({})).unwrap();
        assert_eq!(log.checkpoint_if_due().unwrap().map(|cp| cp.size), Some(3), "3 entries");
        log.append("decision", &json!({})).unwrap();
        assert_eq!(log.checkpoint_if_due().unwrap(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(log.checkpoint_if_due().unwrap().map(|cp| cp.size), Some(4), "after 200 ms");
        assert_eq!(log.checkpoint_if_due().unwrap(), None, "covered");
        // On demand with nothing new: the same checkpoint, not a new line.
        let again = log.checkpoint().unwrap();
        assert_eq!(again.size, 4);
        assert_eq!(std::fs::read_to_string(d.join(CHECKPOINTS_FILE)).unwrap().lines().count(), 2);
    }

    #[test]
    fn the_shipped_policy_checkpoints_every_10_s_or_1000_entries() {
        let config = crate::config::Config::defaults().evidence;
        let policy = CheckpointPolicy::from_config(&config);
        assert_eq!(policy, CheckpointPolicy { every: Some(Duration::from_secs(10)), entries: Some(1000) });
        let off = crate::config::Config::parse("[evidence]\ncheckpoint_secs = 0\ncheckpoint_entries = 0\n").unwrap();
        assert_eq!(CheckpointPolicy::from_config(&off.evidence), CheckpointPolicy::default());
        assert_eq!(config.dir, Path::new("/var/lib/aegis/decision-log"));
        assert_eq!(config.key, Path::new("/var/lib/aegis/host.key"));
    }

    #[test]
    fn bad_kinds_and_huge_bodies_are_refused_before_anything_is_written() {
        let dir = TempDir::new("evlog-refuse");
        let d = dir.path().join("log");
        let (mut log, _) = DecisionLog::open(&d, test_key(), CheckpointPolicy::default()).unwrap();
        for kind in ["", "with space", "x".repeat(65).as_str(), "dé"] {
            let err = log.append(kind, &json!({})).unwrap_err().to_string();
            assert!(err.contains("use 1 to 64 printable ASCII"), "{kind:?}: {err}");
        }
        let err = log.append("decision", &json!({"blob": "x".repeat(MAX_ENTRY_BYTES)})).unwrap_err().to_string();
        assert!(err.contains("over the limit of 1048576"), "{err}");
        assert_eq!(log.size(), 0);
        assert_eq!(std::fs::read(d.join(LOG_FILE)).unwrap(), b"");
    }

    /// Buffered entries are in the file only after the flush, in order, chained and proven
    /// like the others. A flush that fails (a full tmpfs, mounted for the test: root, as in
    /// CI) takes them all back: the tree, the next index and the leaf file are as before
    /// them, and once there is space the log goes on and verifies.
    #[test]
    fn buffered_entries_are_written_at_flush_or_taken_back_whole() {
        let disk = crate::control::testutil::SmallDisk::new("evlog-buffered", "256k");
        let d = disk.path().join("log");
        let (mut log, _) = DecisionLog::open(&d, test_key(), CheckpointPolicy::default()).unwrap();
        log.append("decision", &json!({"n": 0})).unwrap();
        for i in 1..4 {
            assert_eq!(log.append_buffered("decision", &json!({"n": i})).unwrap(), i);
        }
        assert!(log.unwritten() == 3 && !log.wants_flush());
        assert_eq!(lines(&d).len(), 1, "buffered entries are not in the file before the flush");
        log.flush().unwrap();
        assert_eq!(log.unwritten(), 0);
        assert_eq!(lines(&d).len(), 4);
        let root = log.frontier.root();

        // Fill the disk but for a few KiB, then buffer more than that.
        let filler = disk.fill_but(8192);
        let pad = "x".repeat(4000);
        for i in 4..10 {
            assert_eq!(log.append_buffered("decision", &json!({"n": i, "pad": pad})).unwrap(), i);
        }
        let err = format!("{:#}", log.flush().unwrap_err());
        assert!(err.contains("cannot append to") && err.contains("log.jsonl"), "{err}");
        assert_eq!((log.size(), log.frontier.root()), (4, root), "the tree is as before the failed entries");
        assert_eq!(lines(&d).len(), 4, "none of them is in the file");

        std::fs::remove_file(&filler).unwrap();
        assert_eq!(log.append_buffered("decision", &json!({"n": "after"})).unwrap(), 4, "the index is taken again");
        log.flush().unwrap();
        log.checkpoint().unwrap();
        drop(log);
        let report = crate::evidence::verify::verify_log(&d, &test_key().verifier()).unwrap();
        assert!(report.is_valid(), "{report:?}");
        assert_eq!((report.lines, report.latest_checkpoint_size), (5, Some(5)));
    }
}
