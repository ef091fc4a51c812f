//! The look-back: the recent history a forensic snapshot is cut from, on disk, bounded in
//! size and age.
//!
//! Every record the agent writes also goes here, as `{"line": <the record's line>,
//! "payload": <the decoded request body, or null>}` (the payload only when `[lookback]
//! payloads = true`: it holds prompts as the application sent them). Lines go to segment
//! files `seg-<first unix ms>.jsonl` (0600, in a 0700 directory); a segment is closed at a
//! tenth of `max_bytes` (at least 64 KiB) or after a minute, and the oldest segments are
//! deleted once all of them together pass `max_bytes` or once they are older than
//! `max_age_secs`. What is deleted is counted (segments, bytes) and logged, never silent.
//! Segments are written through [`Journal`]s, so a crash leaves whole lines. Lines are
//! written by [`Lookback::flush`] (the output thread's, once per burst of records, as the
//! output file is), not one write each: a write per line was a tenth of the output thread's
//! time under `cargo xtask bench capture`. At most [`MAX_PENDING_BYTES`] wait in memory.
//!
//! In memory the store keeps only each segment's name, first and last time and size, so
//! that a snapshot reads the segments of its window and no other.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde::Deserialize;

use crate::journal::Journal;

/// A segment is closed after this long even when small, so that age bounds are kept.
const SEGMENT_SPAN: Duration = Duration::from_secs(60);
/// Lines waiting for [`Lookback::flush`] are written when they pass this many bytes.
pub const MAX_PENDING_BYTES: usize = 256 << 10;

/// `[lookback]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LookbackConfig {
    /// Keep the look-back.
    pub enabled: bool,
    /// Its directory.
    pub dir: PathBuf,
    /// All segments together at most this many bytes.
    pub max_bytes: u64,
    /// Nothing older than this many seconds.
    pub max_age_secs: u64,
    /// Keep each call's decoded request body too (prompts, in clear, in a 0600 file):
    /// what `replay` re-decides from. Off: replay works from what records hold only.
    pub payloads: bool,
}

impl LookbackConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.enabled {
            anyhow::ensure!(self.max_bytes >= 1 << 20, "lookback.max_bytes is {}: give at least 1 MiB", self.max_bytes);
            anyhow::ensure!(
                self.max_age_secs >= 60,
                "lookback.max_age_secs is {}: give at least 60",
                self.max_age_secs
            );
        }
        Ok(())
    }
}

/// One segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    /// Unix ms of its first line (from its name).
    pub first_ms: u64,
    /// Unix ms of its last line (its modification time).
    pub last_ms: u64,
    pub bytes: u64,
}

/// What the look-back dropped to keep its bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookbackStats {
    pub segments_deleted: u64,
    pub bytes_deleted: u64,
    /// Lines that could not be written (I/O error, disk full).
    pub lines_lost: u64,
}

/// The look-back, open for writing.
pub struct Lookback {
    dir: PathBuf,
    max_bytes: u64,
    max_age_ms: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    current: Option<Journal>,
    /// Lines for the current segment not written yet, and how many.
    pending: Vec<u8>,
    pending_lines: u64,
    pub stats: LookbackStats,
    failing: bool,
}

impl Lookback {
    /// Open the directory (created 0700), list the segments there, and apply the bounds.
    pub fn open(config: &LookbackConfig) -> anyhow::Result<Self> {
        crate::control::blocks::create_private_dir(&config.dir)?;
        let segments = list_segments(&config.dir)?.into();
        let mut me = Self {
            dir: config.dir.clone(),
            max_bytes: config.max_bytes,
            max_age_ms: config.max_age_secs.saturating_mul(1000),
            segment_bytes: (config.max_bytes / 10).max(64 << 10),
            segments,
            current: None,
            pending: Vec::new(),
            pending_lines: 0,
            stats: LookbackStats::default(),
            failing: false,
        };
        me.prune(crate::clock::now_unix_ms());
        Ok(me)
    }

    /// Append one record line (JSON, no newline) with its payload; it is written at the next
    /// [`Self::flush`] (or now, past [`MAX_PENDING_BYTES`]).
    pub fn append(&mut self, line: &[u8], payload: Option<&str>) {
        let now = crate::clock::now_unix_ms();
        let roll = match (&self.current, self.segments.back()) {
            (Some(_), Some(last)) => {
                last.bytes >= self.segment_bytes || now.saturating_sub(last.first_ms) >= SEGMENT_SPAN.as_millis() as u64
            }
            _ => true,
        };
        if roll {
            self.flush();
            self.current = None;
            self.prune(now);
            let path = self.dir.join(format!("seg-{now:013}.jsonl"));
            match Journal::open(&path, false) {
                Ok((journal, _)) => {
                    self.segments.push_back(Segment { path, first_ms: now, last_ms: now, bytes: journal.len() });
                    self.current = Some(journal);
                }
                Err(e) => {
                    self.lost(1, &format!("cannot open {}: {e:#}", path.display()));
                    return;
                }
            }
        }
        let start = self.pending.len();
        self.pending.extend_from_slice(b"{\"line\":");
        self.pending.extend_from_slice(line);
        self.pending.extend_from_slice(b",\"payload\":");
        match payload.map(serde_json::to_vec) {
            Some(Ok(p)) => self.pending.extend_from_slice(&p),
            _ => self.pending.extend_from_slice(b"null"),
        }
        self.pending.extend_from_slice(b"}\n");
        self.pending_lines += 1;
        // Counted in the segment now, so that it rolls at its size; taken back if the
        // write fails.
        let last = self.segments.back_mut().expect("the current segment is listed");
        last.bytes += (self.pending.len() - start) as u64;
        last.last_ms = now;
        if self.pending.len() >= MAX_PENDING_BYTES {
            self.flush();
        }
    }

    /// Write the lines appended since the last flush to the current segment; a failure
    /// counts them lost (and says so once, until writes work again).
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let (lines, bytes) = (std::mem::take(&mut self.pending_lines), self.pending.len());
        let result = match self.current.as_mut() {
            Some(journal) => journal.append(&self.pending),
            None => Err(std::io::Error::other("no segment is open")),
        };
        self.pending.clear();
        match result {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    tracing::warn!(dir = %self.dir.display(), lost = self.stats.lines_lost, "the look-back takes writes again");
                }
            }
            Err(e) => {
                if let Some(last) = self.segments.back_mut() {
                    last.bytes = last.bytes.saturating_sub(bytes as u64);
                }
                self.lost(lines, &format!("appending to the look-back: {e}"));
            }
        }
    }

    fn lost(&mut self, lines: u64, error: &str) {
        self.stats.lines_lost += lines;
        if !self.failing {
            self.failing = true;
            tracing::error!(dir = %self.dir.display(), error, "cannot write the look-back; lines are counted as lost until it can");
        }
    }

    /// Delete the oldest segments past the size or age bound (never the current one).
    fn prune(&mut self, now: u64) {
        let keep_current = usize::from(self.current.is_some());
        loop {
            let total: u64 = self.segments.iter().map(|s| s.bytes).sum();
            let Some(oldest) = self.segments.front() else { break };
            let too_old = now.saturating_sub(oldest.last_ms) > self.max_age_ms;
            if self.segments.len() <= keep_current || !(total > self.max_bytes || too_old) {
                break;
            }
            let oldest = self.segments.pop_front().expect("front exists");
            match std::fs::remove_file(&oldest.path) {
                Ok(()) => {
                    self.stats.segments_deleted += 1;
                    self.stats.bytes_deleted += oldest.bytes;
                    tracing::debug!(segment = %oldest.path.display(), bytes = oldest.bytes, "look-back segment past its bounds deleted");
                }
                Err(e) => {
                    tracing::warn!(segment = %oldest.path.display(), error = %e, "cannot delete a look-back segment")
                }
            }
        }
    }

    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter()
    }
}

impl Drop for Lookback {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The segments in `dir`, oldest first.
pub fn list_segments(dir: &Path) -> anyhow::Result<Vec<Segment>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("cannot read the look-back directory {}", dir.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(first_ms) = name
            .to_str()
            .and_then(|n| n.strip_prefix("seg-"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let last_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(first_ms, |d| d.as_millis() as u64);
        found.push(Segment { path: entry.path(), first_ms, last_ms, bytes: meta.len() });
    }
    found.sort_by_key(|s| s.first_ms);
    Ok(found)
}

/// One line of the look-back, read back.
#[derive(Debug, Deserialize)]
pub struct Kept {
    pub line: serde_json::Value,
    pub payload: Option<String>,
}

/// Every line of the segments of `dir` that may hold times in `since_ms..=until_ms`, in
/// order, given to `each` (lines that do not parse are counted and skipped).
pub fn read_window(dir: &Path, since_ms: u64, until_ms: u64, mut each: impl FnMut(Kept)) -> anyhow::Result<ReadStats> {
    let mut stats = ReadStats::default();
    for seg in list_segments(dir)? {
        if seg.last_ms < since_ms || seg.first_ms > until_ms {
            continue;
        }
        stats.segments += 1;
        let text = std::fs::read(&seg.path).with_context(|| format!("cannot read {}", seg.path.display()))?;
        for raw in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Kept>(raw) {
                Ok(kept) => {
                    stats.lines += 1;
                    each(kept);
                }
                Err(_) => stats.bad_lines += 1,
            }
        }
    }
    Ok(stats)
}

/// What [`read_window`] read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReadStats {
    pub segments: u64,
    pub lines: u64,
    pub bad_lines: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A look-back in `dir`/lb of `max_bytes`, kept an hour.
    fn config(dir: &Path, max_bytes: u64, payloads: bool) -> LookbackConfig {
        LookbackConfig { enabled: true, dir: dir.join("lb"), max_bytes, max_age_secs: 3600, payloads }
    }

    #[test]
    fn lines_are_kept_read_back_and_bounded() {
        let dir = crate::control::testutil::TempDir::new("lookback");
        let config = config(dir.path(), 1 << 20, true);
        let mut lb = Lookback::open(&config).unwrap();
        let pad = "x".repeat(1000);
        for i in 0..3000 {
            let line = serde_json::to_vec(&serde_json::json!({"type": "llm_call", "n": i, "pad": pad})).unwrap();
            lb.append(&line, (i % 2 == 0).then_some("{\"prompt\":\"hi\"}"));
        }
        lb.flush();
        let total: u64 = lb.segments().map(|s| s.bytes).sum();
        assert!(lb.stats.segments_deleted > 0, "3 MB through a 1 MiB look-back deletes segments: {:?}", lb.stats);
        assert!(total <= (1 << 20) + lb.segment_bytes, "{total}");
        let mut seen = Vec::new();
        let stats = read_window(&config.dir, 0, u64::MAX, |k| {
            seen.push((k.line["n"].as_u64().unwrap(), k.payload.is_some()));
        })
        .unwrap();
        assert_eq!(stats.bad_lines, 0);
        assert_eq!(seen.last(), Some(&(2999, false)), "the newest kept");
        assert!(seen.windows(2).all(|w| w[1].0 == w[0].0 + 1), "in order, none missing in what is kept");
        assert!(seen.iter().any(|(n, p)| n % 2 == 0 && *p), "payloads kept");
        assert!(seen.len() > 500 && seen.len() < 3000, "about 1 MiB of the 3 MB kept: {}", seen.len());
    }

    /// Lines wait for a flush (or a drop) and are then all written; past the pending bound
    /// they are written at once; a segment that cannot be opened counts each line lost.
    #[test]
    fn lines_are_written_at_flush_and_losses_are_counted() {
        let dir = crate::control::testutil::TempDir::new("lookback-flush");
        let config = config(dir.path(), 64 << 20, false);
        let count = |dir: &Path| {
            let mut n = 0;
            read_window(dir, 0, u64::MAX, |_| n += 1).unwrap();
            n
        };
        let mut lb = Lookback::open(&config).unwrap();
        lb.append(br#"{"n":0}"#, None);
        lb.append(br#"{"n":1}"#, Some("payload"));
        assert_eq!(count(&config.dir), 0, "not written before the flush");
        lb.flush();
        assert_eq!(count(&config.dir), 2);
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1000));
        for _ in 0..(MAX_PENDING_BYTES / 1000 + 1) {
            lb.append(big.as_bytes(), None);
        }
        assert!(count(&config.dir) > 2, "written once the pending bound is passed");
        lb.append(br#"{"n":"last"}"#, None);
        drop(lb);
        let lines = count(&config.dir);
        assert_eq!(lines, 2 + MAX_PENDING_BYTES / 1000 + 1 + 1, "all written at the drop");
        assert_eq!(Lookback::open(&config).unwrap().stats.lines_lost, 0);

        // The directory replaced by a file: the next segment cannot be opened.
        let mut lb = Lookback::open(&config).unwrap();
        lb.append(br#"{"n":"in the last segment"}"#, None);
        lb.flush();
        std::fs::remove_dir_all(&config.dir).unwrap();
        std::fs::write(&config.dir, b"not a directory").unwrap();
        for _ in 0..(lb.segment_bytes as usize / 1000 + 10) {
            lb.append(big.as_bytes(), None);
        }
        lb.flush();
        let lost = lb.stats.lines_lost;
        assert!(lost >= 9, "every line after the roll is counted lost: {lost}");
        assert!(lb.segments().last().is_some_and(|s| s.bytes <= lb.segment_bytes + 2000));
    }
}
