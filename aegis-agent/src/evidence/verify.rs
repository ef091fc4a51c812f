//! `aegis-agent log verify`: check a decision log directory entry by entry against its
//! chain, its leaf file and every signed checkpoint, and name what does not hold.
//!
//! The directory is hostile input: lines are read up to [`MAX_ENTRY_BYTES`] (longer ones
//! are hashed as they stream by, never held), nothing of the log is kept in memory but the
//! tree's right edge and what is needed to tell problems apart, and that is capped.
//!
//! How each change shows (entries by index `i`, lines of `log.jsonl` from 1):
//! - every line's leaf hash is compared with the leaf record of the index it claims: a
//!   line that is not its entry any more was **edited** (or **inserted**, when the
//!   entry it claims turns up at another line);
//! - the indexes as the lines come: a gap that is never filled is a **dropped** range, an
//!   index that comes after a higher one is **reordered**, one seen twice **repeated**;
//! - `prev`: an entry whose record matches but whose successor names another predecessor
//!   was rewritten together with its leaf record; a line whose leaf record differs while
//!   its successor's `prev` vouches for it points at an altered **leaf record**;
//! - each checkpoint: its signature by the given key, its origin (one per log), that sizes
//!   never decrease, and its root against the root of the log's first `size` lines, so a
//!   change rewritten consistently through the chain and the leaf file still shows, and
//!   the last matching checkpoint bounds where it is;
//! - the tail: fewer lines than the leaf file records or a checkpoint covers is a
//!   **truncated** log.
//!
//! Entries written after the latest checkpoint, and entries whose leaf records were not
//! yet written, are reported as notes: they are checked against the chain only.

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    io::{self, BufRead as _, BufReader},
    path::Path,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::{
    hex,
    key::VerifierKey,
    log::{CHECKPOINTS_FILE, CheckpointRecord, Entry, LOG_FILE, LeafFile, MAX_CHECKPOINT_LINE, MAX_ENTRY_BYTES},
    merkle::{Frontier, Hash},
    note::Checkpoint,
};

/// Problems listed; past this they are counted.
const MAX_PROBLEMS: usize = 1000;
/// Open questions (gaps, unexplained lines) tracked while reading; past this the log is
/// too damaged to tell changes apart, and only the checkpoints are checked.
const MAX_TRACKED: usize = 100_000;

/// What `log verify` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub dir: String,
    /// The key checkpoints were checked with.
    pub key: String,
    pub origin: Option<String>,
    /// Whole lines of `log.jsonl`.
    pub lines: u64,
    pub leaf_records: u64,
    /// Lines of `checkpoints.jsonl`, and those whose signature verified.
    pub checkpoints: u64,
    pub checkpoints_verified: u64,
    pub latest_checkpoint_size: Option<u64>,
    /// Tampering or damage: any makes the log invalid.
    pub problems: Vec<Problem>,
    pub problems_not_listed: u64,
    /// What is not a problem but limits what could be checked.
    pub notes: Vec<String>,
}

impl Report {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty() && self.problems_not_listed == 0
    }
}

/// Something in the log that does not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// The line of entry `index` is not what was written.
    Edited { index: u64, line: u64, detail: String },
    /// Entries `first..=last` are missing between others.
    Dropped { first: u64, last: u64 },
    /// A line that is none of the log's entries.
    Inserted { line: u64, detail: String },
    /// Entry `index` comes after entry `after`.
    Reordered { index: u64, line: u64, after: u64 },
    /// Entry `index` is there a second time.
    Repeated { index: u64, line: u64 },
    /// A file ends before what the other files say it held.
    Truncated { file: String, holds: u64, expected: u64, detail: String },
    /// The leaf file's record of entry `index` is not the entry's.
    LeafRecord { index: u64, detail: String },
    /// Checkpoint `number` (line of `checkpoints.jsonl`) does not hold.
    Checkpoint { number: u64, size: Option<u64>, detail: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Edited { index, line, detail } => write!(f, "entry {index} (line {line}) was edited: {detail}"),
            Problem::Dropped { first, last } if first == last => write!(f, "entry {first} was dropped"),
            Problem::Dropped { first, last } => write!(f, "entries {first} to {last} were dropped"),
            Problem::Inserted { line, detail } => write!(f, "line {line} was inserted: {detail}"),
            Problem::Reordered { index, line, after } => {
                write!(f, "entry {index} (line {line}) was moved: it comes after entry {after}")
            }
            Problem::Repeated { index, line } => write!(f, "entry {index} appears again at line {line}"),
            Problem::Truncated { file, holds, detail, .. } => {
                write!(f, "{file} was truncated: it holds {holds} entries, {detail}")
            }
            Problem::LeafRecord { index, detail } => {
                write!(f, "the leaf record of entry {index} was altered: {detail}")
            }
            Problem::Checkpoint { number, size: Some(size), detail } => {
                write!(f, "checkpoint {number} (size {size}): {detail}")
            }
            Problem::Checkpoint { number, size: None, detail } => write!(f, "checkpoint {number}: {detail}"),
        }
    }
}

/// Check the log in `dir` with `key`. An error is a usage or I/O failure (no log there,
/// unreadable files), not a finding.
pub fn verify_log(dir: &Path, key: &VerifierKey) -> anyhow::Result<Report> {
    let open = |name: &str| -> anyhow::Result<Option<File>> {
        let path = dir.join(name);
        match crate::files::open_regular(&path) {
            Ok((file, _)) => Ok(Some(file)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => anyhow::bail!("{}: {e}", path.display()),
        }
    };
    let Some(log) = open(LOG_FILE)? else {
        anyhow::bail!(
            "there is no decision log in {}: no {LOG_FILE} (give the log's directory with --dir)",
            dir.display()
        )
    };
    let (leaves, torn_leaf_bytes) = match open(super::log::LEAVES_FILE)? {
        Some(_) => LeafFile::open(dir)?,
        None => (LeafFile::empty(), 0),
    };
    let mut checker = Checker::new(leaves);
    let mut cps = Checkpoints::new(open(CHECKPOINTS_FILE)?, key);
    let mut lines = LineReader::new(log, MAX_ENTRY_BYTES);
    let mut tree = Frontier::new();
    let mut next_cp = cps.next_valid()?;
    let mut pending: Option<Line> = None;
    let mut partial = None;
    loop {
        while next_cp.as_ref().is_some_and(|(_, cp)| cp.size == tree.size()) {
            let (number, cp) = next_cp.take().expect("checked");
            cps.compare(number, &cp, &tree);
            next_cp = cps.next_valid()?;
        }
        let Some(raw) = lines.next()? else { break };
        if !raw.complete {
            partial = Some(raw.len);
            break;
        }
        let head = match &raw.bytes {
            None => Err(format!("it is over {MAX_ENTRY_BYTES} bytes long")),
            Some(bytes) => parse_head(bytes),
        };
        let line = Line { number: raw.number, offset: raw.offset, hash: raw.hash, head };
        if let Some(previous) = pending.take() {
            checker.finalize(&previous, Some(&line))?;
        }
        tree.push(line.hash);
        pending = Some(line);
    }
    if let Some(last) = pending.take() {
        checker.finalize(&last, None)?;
    }
    checker.finish();

    // Checkpoints past the end of the log.
    let lines_read = tree.size();
    let mut beyond: Option<(u64, u64)> = None;
    while let Some((number, cp)) = next_cp {
        beyond = Some((number, cp.size));
        next_cp = cps.next_valid()?;
    }
    if let Some((number, size)) = beyond {
        if checker.expected < size {
            checker.push(
                Group::Tail,
                0,
                Problem::Truncated {
                    file: LOG_FILE.into(),
                    holds: lines_read,
                    expected: size,
                    detail: format!("checkpoint {number} covers {size}"),
                },
            );
        } else {
            // Entries are missing in the middle (named above), not at the end.
            let detail = format!("the log has {lines_read} lines, fewer than the {size} entries it covers");
            checker.push(Group::Checkpoints, number, Problem::Checkpoint { number, size: Some(size), detail });
        }
    }
    let records = checker.leaves.records();
    if checker.expected < records {
        checker.push(
            Group::Tail,
            0,
            Problem::Truncated {
                file: LOG_FILE.into(),
                holds: checker.expected,
                expected: records,
                detail: format!(
                    "the leaf file records {records}: entries {} to {} were cut from its end",
                    checker.expected,
                    records - 1
                ),
            },
        );
    }
    let latest = cps.latest_size;
    if let Some(size) = latest.filter(|&s| s > records) {
        checker.push(
            Group::Tail,
            1,
            Problem::Truncated {
                file: super::log::LEAVES_FILE.into(),
                holds: records,
                expected: size,
                detail: format!("the latest checkpoint covers {size}"),
            },
        );
    }

    let mut notes = Vec::new();
    if let Some(bytes) = partial {
        notes.push(format!(
            "the last line of {LOG_FILE} is incomplete ({bytes} bytes without a newline): a write cut short by a stop \
             or crash, which the agent cuts when it opens the log; it is not checked"
        ));
    }
    if cps.partial {
        notes.push(format!(
            "the last line of {CHECKPOINTS_FILE} is incomplete (a checkpoint cut short by a stop or crash, which the \
             agent cuts when it opens the log)"
        ));
    }
    if torn_leaf_bytes > 0 {
        notes.push(format!(
            "the leaf file ends with {torn_leaf_bytes} bytes of a record cut short (a crash; the agent repairs it)"
        ));
    }
    if checker.unrecorded > 0 {
        notes.push(format!(
            "entries {} to {} have no leaf record yet (written in batches; the agent adds them when it opens the \
             log): they are checked against the chain only",
            records,
            records + checker.unrecorded - 1
        ));
    }
    match latest {
        None => notes.push(
            "there is no valid checkpoint: nothing in this log is signed, so it is only checked against itself".into(),
        ),
        Some(size) if size < lines_read => notes.push(format!(
            "entries {size} to {} are not covered by a signed checkpoint yet: they are only as trustworthy as this \
             host's files",
            lines_read - 1
        )),
        Some(_) => {}
    }
    if checker.overwhelmed {
        notes.push(format!("over {MAX_TRACKED} damaged places: past that point only the checkpoints were checked"));
    }
    let mut problems = checker.problems;
    problems.append(&mut cps.problems);
    problems.sort_by_key(|(group, key, _)| (*group, *key));
    let listed = problems.len().min(MAX_PROBLEMS);
    Ok(Report {
        dir: dir.display().to_string(),
        key: key.to_string(),
        origin: cps.origin,
        lines: lines_read,
        leaf_records: records,
        checkpoints: cps.number,
        checkpoints_verified: cps.verified,
        latest_checkpoint_size: latest,
        problems_not_listed: checker.omitted + cps.omitted + (problems.len() - listed) as u64,
        problems: problems.into_iter().take(listed).map(|(_, _, p)| p).collect(),
        notes,
    })
}

/// The parts of an entry line that verification uses.
struct Head {
    i: u64,
    prev: Option<Hash>,
}

fn parse_head(bytes: &[u8]) -> Result<Head, String> {
    let entry: Entry<serde::de::IgnoredAny> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let prev = match entry.prev {
        None => None,
        Some(p) => Some(hex::decode_hash(&p).ok_or_else(|| format!("its prev {p:?} is not a hash"))?),
    };
    Ok(Head { i: entry.i, prev })
}

struct Line {
    number: u64,
    offset: u64,
    hash: Hash,
    head: Result<Head, String>,
}

/// A line not (yet) explained: its verdict waits for the end of the log.
struct Suspect {
    line: u64,
    claim: u64,
    detail: String,
}

/// Sort order of problems: lines first, then the tail, then checkpoints.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Lines,
    Tail,
    Checkpoints,
}

struct Checker {
    leaves: LeafFile,
    problems: Vec<(Group, u64, Problem)>,
    omitted: u64,
    /// One past the highest index claimed so far.
    expected: u64,
    max_genuine: Option<u64>,
    /// Index ranges skipped and not (yet) found: start -> (end, line where the gap showed).
    missing: BTreeMap<u64, (u64, u64)>,
    suspects: Vec<Suspect>,
    overwhelmed: bool,
    /// Entries at the end whose leaf records are not written yet.
    unrecorded: u64,
    /// No line so far moved the others: offsets in the leaf file still mean something.
    offsets_trusted: bool,
    /// The previous line: its number, its index when it is a genuine entry, its hash.
    previous: Option<(u64, Option<u64>, Hash)>,
}

impl Checker {
    fn new(leaves: LeafFile) -> Self {
        Self {
            leaves,
            problems: Vec::new(),
            omitted: 0,
            expected: 0,
            max_genuine: None,
            missing: BTreeMap::new(),
            suspects: Vec::new(),
            overwhelmed: false,
            unrecorded: 0,
            offsets_trusted: true,
            previous: None,
        }
    }

    fn push(&mut self, group: Group, key: u64, problem: Problem) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push((group, key, problem));
        } else {
            self.omitted += 1;
        }
    }

    /// Judge line `x`, now that the line after it (if any) is known.
    fn finalize(&mut self, x: &Line, next: Option<&Line>) -> io::Result<()> {
        if self.overwhelmed {
            return Ok(());
        }
        let genuine = match &x.head {
            Err(why) => {
                self.suspect(x.number, None, format!("it is not an entry ({why})"));
                None
            }
            Ok(head) if head.i >= self.leaves.records() => {
                let chained = match self.previous {
                    None => head.i == 0 && head.prev.is_none(),
                    Some((_, Some(p), hash)) => p + 1 == head.i && head.prev == Some(hash),
                    Some(_) => false,
                };
                if head.i == self.expected && chained {
                    // Written after the last batch of leaf records: checked by the chain only.
                    self.unrecorded += 1;
                    self.sequence(head.i, x.number);
                    Some(head.i)
                } else {
                    self.offsets_trusted = false;
                    let detail = format!(
                        "it claims index {}, which has no leaf record, and does not follow the entry before it",
                        head.i
                    );
                    self.push(Group::Lines, x.number, Problem::Inserted { line: x.number, detail });
                    None
                }
            }
            Ok(head) => {
                let (recorded, offset) = self.leaves.record(head.i)?;
                let vouched = next
                    .and_then(|n| n.head.as_ref().ok())
                    .is_some_and(|n| n.i == head.i + 1 && n.prev == Some(x.hash));
                if recorded == x.hash {
                    self.sequence(head.i, x.number);
                    self.chain(head, x.number);
                    if offset != x.offset && self.offsets_trusted {
                        let detail =
                            format!("it gives offset {offset} for the entry's line, which starts at {}", x.offset);
                        self.push(Group::Lines, x.number, Problem::LeafRecord { index: head.i, detail });
                    }
                    Some(head.i)
                } else if vouched {
                    let detail = format!(
                        "it holds {}, the entry hashes to {} as entry {}'s prev confirms",
                        short(&recorded),
                        short(&x.hash),
                        head.i + 1
                    );
                    self.push(Group::Lines, x.number, Problem::LeafRecord { index: head.i, detail });
                    self.sequence(head.i, x.number);
                    Some(head.i)
                } else {
                    let detail = format!("it hashes to {}, its leaf record holds {}", short(&x.hash), short(&recorded));
                    self.suspect(x.number, Some(head.i), detail);
                    None
                }
            }
        };
        self.previous = Some((x.number, genuine, x.hash));
        Ok(())
    }

    /// A genuine entry `i` at `line`: where it comes in the order of indexes.
    fn sequence(&mut self, i: u64, line: u64) {
        if i >= self.expected {
            if i > self.expected {
                self.offsets_trusted = false;
                self.add_missing(self.expected, i - 1, line);
            }
            self.expected = i + 1;
        } else if self.remove_missing(i) {
            if let Some(after) = self.max_genuine.filter(|&m| m > i) {
                self.offsets_trusted = false;
                self.push(Group::Lines, line, Problem::Reordered { index: i, line, after });
            }
        } else {
            self.offsets_trusted = false;
            self.push(Group::Lines, line, Problem::Repeated { index: i, line });
        }
        self.max_genuine = Some(self.max_genuine.map_or(i, |m| m.max(i)));
    }

    /// A genuine entry's `prev` against the line before it.
    fn chain(&mut self, head: &Head, line: u64) {
        if head.i == 0 && head.prev.is_some() {
            let detail = "entry 0 names a predecessor".to_owned();
            self.push(Group::Lines, line, Problem::Edited { index: 0, line, detail });
        }
        if let Some((before, Some(p), hash)) = self.previous
            && p + 1 == head.i
            && head.prev != Some(hash)
        {
            let detail = format!(
                "it hashes to {}, but entry {}'s prev names {}: it was rewritten, with its leaf record, after entry {} \
                 was written",
                short(&hash),
                head.i,
                head.prev.map_or_else(|| "none".to_owned(), |h| short(&h)),
                head.i
            );
            self.push(Group::Lines, before, Problem::Edited { index: p, line: before, detail });
        }
    }

    /// A line that is not the entry it claims (`claim`), or no entry at all: edited if its
    /// index is never found elsewhere, inserted otherwise.
    fn suspect(&mut self, line: u64, claim: Option<u64>, detail: String) {
        self.offsets_trusted = false;
        let claim = claim.unwrap_or(self.expected);
        if claim >= self.expected {
            self.add_missing(self.expected, claim, line);
            self.expected = claim + 1;
        }
        if self.suspects.len() >= MAX_TRACKED {
            self.overwhelmed = true;
        } else {
            self.suspects.push(Suspect { line, claim, detail });
        }
    }

    fn add_missing(&mut self, first: u64, last: u64, line: u64) {
        if self.missing.len() >= MAX_TRACKED {
            self.overwhelmed = true;
        } else {
            self.missing.insert(first, (last, line));
        }
    }

    fn remove_missing(&mut self, i: u64) -> bool {
        let Some((&first, &(last, line))) = self.missing.range(..=i).next_back() else { return false };
        if last < i {
            return false;
        }
        self.missing.remove(&first);
        if first < i {
            self.missing.insert(first, (i - 1, line));
        }
        if i < last {
            self.missing.insert(i + 1, (last, line));
        }
        true
    }

    /// Settle the suspects and the gaps.
    fn finish(&mut self) {
        for Suspect { line, claim, detail } in std::mem::take(&mut self.suspects) {
            if self.remove_missing(claim) {
                self.push(Group::Lines, line, Problem::Edited { index: claim, line, detail });
            } else {
                self.push(Group::Lines, line, Problem::Inserted { line, detail });
            }
        }
        for (first, (last, line)) in std::mem::take(&mut self.missing) {
            self.push(Group::Lines, line, Problem::Dropped { first, last });
        }
    }
}

/// The checkpoints file, read in order, each one checked as it is read.
struct Checkpoints<'k> {
    reader: Option<LineReader>,
    key: &'k VerifierKey,
    number: u64,
    verified: u64,
    origin: Option<String>,
    latest_size: Option<u64>,
    /// The last checkpoint whose root matched: its number and size.
    last_match: Option<(u64, u64)>,
    /// The file ends with a partial line.
    partial: bool,
    problems: Vec<(Group, u64, Problem)>,
    omitted: u64,
}

impl<'k> Checkpoints<'k> {
    fn new(file: Option<File>, key: &'k VerifierKey) -> Self {
        Self {
            reader: file.map(|f| LineReader::new(f, MAX_CHECKPOINT_LINE)),
            key,
            number: 0,
            verified: 0,
            origin: None,
            latest_size: None,
            last_match: None,
            partial: false,
            problems: Vec::new(),
            omitted: 0,
        }
    }

    fn problem(&mut self, number: u64, size: Option<u64>, detail: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push((Group::Checkpoints, number, Problem::Checkpoint { number, size, detail }));
        } else {
            self.omitted += 1;
        }
    }

    /// The next checkpoint whose signature, origin and size hold.
    fn next_valid(&mut self) -> io::Result<Option<(u64, Checkpoint)>> {
        loop {
            let Some(raw) = self.reader.as_mut().map(LineReader::next).transpose()?.flatten() else { return Ok(None) };
            if !raw.complete {
                // A crash while appending: the agent cuts it when it opens the log.
                self.partial = true;
                return Ok(None);
            }
            self.number += 1;
            let number = self.number;
            let Some(bytes) = raw.bytes else {
                self.problem(number, None, format!("its line is over {MAX_CHECKPOINT_LINE} bytes long"));
                continue;
            };
            let record: CheckpointRecord = match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    self.problem(number, None, format!("its line is not a checkpoint record ({e})"));
                    continue;
                }
            };
            let cp = match Checkpoint::open(&record.note, self.key) {
                Ok(cp) => cp,
                Err(e) => {
                    let size = Checkpoint::parse_unverified(&record.note).ok().map(|c| c.size);
                    self.problem(number, size, e.to_string());
                    continue;
                }
            };
            self.verified += 1;
            match &self.origin {
                Some(origin) if *origin != cp.origin => {
                    let detail = format!("its origin {:?} is not the log's origin {origin:?}", cp.origin);
                    self.problem(number, Some(cp.size), detail);
                    continue;
                }
                Some(_) => {}
                None => self.origin = Some(cp.origin.clone()),
            }
            if let Some(before) = self.latest_size.filter(|&s| cp.size < s) {
                let detail = format!("the log shrank: an earlier checkpoint covers {before} entries");
                self.problem(number, Some(cp.size), detail);
                continue;
            }
            self.latest_size = Some(cp.size);
            return Ok(Some((number, cp)));
        }
    }

    /// Checkpoint `number` against the tree of the log's first `cp.size` lines.
    fn compare(&mut self, number: u64, cp: &Checkpoint, tree: &Frontier) {
        let root = tree.root();
        if root == cp.root {
            self.last_match = Some((number, cp.size));
            return;
        }
        let mut detail = format!(
            "it signed the root {}, the log's first {} lines give {}: a line below {} was changed, dropped, inserted \
             or moved after it was signed",
            BASE64.encode(cp.root),
            cp.size,
            BASE64.encode(root),
            cp.size
        );
        if let Some((m, size)) = self.last_match {
            detail.push_str(&format!(" (checkpoint {m} at size {size} holds: the change is at or after entry {size})"));
        }
        self.problem(number, Some(cp.size), detail);
    }
}

/// Lines of a file with their offset and leaf hash; a line over `max` bytes is hashed as it
/// streams by, without its bytes.
struct LineReader {
    reader: BufReader<File>,
    offset: u64,
    number: u64,
    max: usize,
}

struct RawLine {
    number: u64,
    offset: u64,
    /// Bytes without the newline.
    len: u64,
    /// `SHA-256(0x00 || bytes)`.
    hash: Hash,
    /// None when over `max`.
    bytes: Option<Vec<u8>>,
    /// Ends with a newline.
    complete: bool,
}

impl LineReader {
    fn new(file: File, max: usize) -> Self {
        Self { reader: BufReader::with_capacity(64 * 1024, file), offset: 0, number: 0, max }
    }

    fn next(&mut self) -> io::Result<Option<RawLine>> {
        let mut hasher = Sha256::new();
        hasher.update([0u8]);
        let mut bytes = Some(Vec::new());
        let mut len = 0u64;
        let complete = loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                if len == 0 {
                    return Ok(None);
                }
                break false;
            }
            let (used, newline) = match memchr::memchr(b'\n', buf) {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            let chunk = &buf[..used];
            hasher.update(chunk);
            len += used as u64;
            if bytes.as_ref().is_some_and(|b| b.len() + used > self.max) {
                bytes = None;
            }
            if let Some(b) = &mut bytes {
                b.extend_from_slice(chunk);
            }
            self.reader.consume(used + usize::from(newline));
            if newline {
                break true;
            }
        };
        self.number += 1;
        let line =
            RawLine { number: self.number, offset: self.offset, len, hash: hasher.finalize().into(), bytes, complete };
        self.offset += len + u64::from(complete);
        Ok(Some(line))
    }
}

/// The first 16 hex digits of a hash, enough to tell two apart in a message.
fn short(hash: &Hash) -> String {
    format!("{}…", &hex::encode(hash)[..16])
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::{
        control::testutil::TempDir,
        evidence::{
            key::HostKey,
            log::{
                CheckpointPolicy, DecisionLog, LEAF_RECORD, LEAVES_FILE,
                tests::{lines, test_key, write_log},
            },
        },
    };

    /// A fresh log of 12 entries (checkpoints at 5 and 12) in a temp dir.
    fn fresh() -> (TempDir, std::path::PathBuf) {
        let dir = TempDir::new("evverify");
        let d = dir.path().join("log");
        write_log(&d, 12);
        (dir, d)
    }

    fn verify(d: &Path) -> Report {
        verify_log(d, &test_key().verifier()).unwrap()
    }

    fn set_lines(d: &Path, lines: &[String]) {
        std::fs::write(d.join(LOG_FILE), format!("{}\n", lines.join("\n"))).unwrap();
    }

    fn problems(r: &Report) -> Vec<String> {
        r.problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn an_untouched_log_is_valid() {
        let (_dir, d) = fresh();
        let r = verify(&d);
        assert!(r.is_valid(), "{:?}", problems(&r));
        assert_eq!((r.lines, r.leaf_records, r.checkpoints, r.checkpoints_verified), (12, 12, 2, 2));
        assert_eq!(r.latest_checkpoint_size, Some(12));
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        assert!(r.origin.unwrap().starts_with("aegis-agent/test-host/"));
        // The raw public key works as well as the named verifier key.
        let raw = VerifierKey::parse(&test_key().verifier().base64()).unwrap();
        assert!(verify_log(&d, &raw).unwrap().is_valid());
    }

    #[test]
    fn an_edited_entry_is_named() {
        let (_dir, d) = fresh();
        let mut l = lines(&d);
        l[3] = l[3].replace("\"allow\"", "\"block\"");
        set_lines(&d, &l);
        let r = verify(&d);
        let p = problems(&r);
        assert!(matches!(r.problems[0], Problem::Edited { index: 3, line: 4, .. }), "{p:?}");
        assert!(p[0].starts_with("entry 3 (line 4) was edited: it hashes to "), "{p:?}");
        assert!(
            matches!(r.problems[1], Problem::Checkpoint { number: 1, size: Some(5), .. }),
            "the checkpoint covering it fails: {p:?}"
        );
        assert!(p[2].starts_with("checkpoint 2 (size 12): it signed the root"), "{p:?}");
        assert_eq!(r.problems.len(), 3, "{p:?}");
    }

    #[test]
    fn an_edit_rewritten_through_the_leaf_file_is_still_found() {
        let (_dir, d) = fresh();
        let mut l = lines(&d);
        l[7] = l[7].replace("\"allow\"", "\"block\"");
        set_lines(&d, &l);
        // The forger fixes the leaf record too.
        let mut leaves = std::fs::read(d.join(LEAVES_FILE)).unwrap();
        let at = 7 * LEAF_RECORD as usize;
        leaves[at..at + 32].copy_from_slice(&crate::evidence::merkle::leaf_hash(l[7].as_bytes()));
        std::fs::write(d.join(LEAVES_FILE), leaves).unwrap();
        let r = verify(&d);
        let p = problems(&r);
        assert!(matches!(r.problems[0], Problem::Edited { index: 7, line: 8, .. }), "{p:?}");
        assert!(p[0].contains("it was rewritten, with its leaf record, after entry 8 was written"), "{p:?}");
        assert!(p[1].starts_with("checkpoint 2 (size 12): it signed the root"), "{p:?}");
        assert!(p[1].ends_with("(checkpoint 1 at size 5 holds: the change is at or after entry 5)"), "{p:?}");
    }

    #[test]
    fn a_dropped_entry_is_named() {
        let (_dir, d) = fresh();
        let mut l = lines(&d);
        l.remove(6);
        set_lines(&d, &l);
        let r = verify(&d);
        let p = problems(&r);
        assert_eq!(r.problems[0], Problem::Dropped { first: 6, last: 6 }, "{p:?}");
        assert_eq!(p[0], "entry 6 was dropped");
        assert_eq!(p[1], "checkpoint 2 (size 12): the log has 11 lines, fewer than the 12 entries it covers");
        assert_eq!(r.problems.len(), 2, "offsets that moved are not reported: {p:?}");
        // Several in a row.
        let mut l = lines(&d);
        l.drain(1..4);
        set_lines(&d, &l);
        assert_eq!(verify(&d).problems[0].to_string(), "entries 1 to 3 were dropped");
    }

    #[test]
    fn an_inserted_line_is_named() {
        let (_dir, d) = fresh();
        let mut l = lines(&d);
        // A forged entry claiming index 8, chained to entry 7.
        let forged = l[8].replace("\"allow\"", "\"warn\"");
        l.insert(8, forged);
        set_lines(&d, &l);
        let r = verify(&d);
        let p = problems(&r);
        assert!(matches!(r.problems[0], Problem::Inserted { line: 9, .. }), "{p:?}");
        assert!(p[0].starts_with("line 9 was inserted: it hashes to"), "{p:?}");
        // Not an entry at all.
        let mut l = lines(&d);
        l.remove(8);
        l.insert(2, "{\"note\":\"hello\"}".into());
        set_lines(&d, &l);
        let r = verify(&d);
        let p = problems(&r);
        assert!(matches!(r.problems[0], Problem::Inserted { line: 3, .. }), "{p:?}");
        assert!(p[0].contains("it is not an entry (unknown field `note`"), "{p:?}");
        assert!(matches!(r.problems[1], Problem::Checkpoint { number: 1, .. }), "{p:?}");
    }

    #[test]
    fn reordered_and_repeated_entries_are_named() {
        let (_dir, d) = fresh();
        let mut l = lines(&d);
        l.swap(2, 3);
        set_lines(&d, &l);
        let r = verify(&d);
        let p = problems(&r);
        assert_eq!(r.problems[0], Problem::Reordered { index: 2, line: 4, after: 3 }, "{p:?}");
        assert_eq!(p[0], "entry 2 (line 4) was moved: it comes after entry 3");
        // A copy of an earlier entry.
        let mut l = lines(&d);
        l.swap(2, 3);
        let copy = l[1].clone();
        l.insert(9, copy);
        set_lines(&d, &l);
        let r = verify(&d);
        assert_eq!(r.problems[0], Problem::Repeated { index: 1, line: 10 }, "{:?}", problems(&r));
    }

    #[test]
    fn a_flipped_byte_of_the_leaf_file_is_named() {
        let (_dir, d) = fresh();
        let mut leaves = std::fs::read(d.join(LEAVES_FILE)).unwrap();
        leaves[4 * LEAF_RECORD as usize + 10] ^= 0x40;
        std::fs::write(d.join(LEAVES_FILE), &leaves).unwrap();
        let r = verify(&d);
        let p = problems(&r);
        assert_eq!(r.problems.len(), 1, "the entries and checkpoints hold: {p:?}");
        assert!(p[0].starts_with("the leaf record of entry 4 was altered: it holds"), "{p:?}");
        assert!(p[0].ends_with("as entry 5's prev confirms"), "{p:?}");
        // The offset part of a record.
        leaves[4 * LEAF_RECORD as usize + 10] ^= 0x40;
        leaves[9 * LEAF_RECORD as usize + 39] ^= 1;
        std::fs::write(d.join(LEAVES_FILE), &leaves).unwrap();
        let r = verify(&d);
        assert_eq!(r.problems.len(), 1, "{:?}", problems(&r));
        assert!(problems(&r)[0].starts_with("the leaf record of entry 9 was altered: it gives offset"));
    }

    #[test]
    fn a_truncated_tail_is_named() {
        let (_dir, d) = fresh();
        let l = lines(&d);
        set_lines(&d, &l[..9]);
        let r = verify(&d);
        let p = problems(&r);
        assert_eq!(
            p,
            [
                "log.jsonl was truncated: it holds 9 entries, checkpoint 2 covers 12",
                "log.jsonl was truncated: it holds 9 entries, the leaf file records 12: entries 9 to 11 were cut from its end"
            ]
        );
        // The leaf file cut as well: the checkpoint still says.
        let leaves = std::fs::read(d.join(LEAVES_FILE)).unwrap();
        std::fs::write(d.join(LEAVES_FILE), &leaves[..9 * LEAF_RECORD as usize]).unwrap();
        let r = verify(&d);
        assert_eq!(
            problems(&r),
            [
                "log.jsonl was truncated: it holds 9 entries, checkpoint 2 covers 12",
                "leaves.bin was truncated: it holds 9 entries, the latest checkpoint covers 12"
            ]
        );
    }

    #[test]
    fn bad_checkpoints_and_the_wrong_key_are_named() {
        let (_dir, d) = fresh();
        let path = d.join(CHECKPOINTS_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut cps: Vec<CheckpointRecord> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        // A byte of the signature flipped.
        let sig_at = cps[0].note.rfind(' ').unwrap() + 10;
        let mut note = cps[0].note.clone().into_bytes();
        note[sig_at] = if note[sig_at] == b'A' { b'B' } else { b'A' };
        cps[0].note = String::from_utf8(note).unwrap();
        // A checkpoint signed by another key, and a forged size under the host's name.
        let intruder = HostKey::from_seed([5; 32], "test-host").unwrap();
        let forged = Checkpoint::parse_unverified(&cps[1].note).unwrap();
        let forged = Checkpoint { size: 3, ..forged };
        cps.push(CheckpointRecord { time: "t".into(), note: forged.sign(&intruder) });
        let lines: Vec<String> = cps.iter().map(|c| serde_json::to_string(c).unwrap()).collect();
        std::fs::write(&path, format!("{}\n{{\"time\":1}}\n", lines.join("\n"))).unwrap();
        let r = verify(&d);
        let p = problems(&r);
        assert_eq!(r.checkpoints, 4);
        assert_eq!(r.checkpoints_verified, 1);
        assert_eq!(
            p[0],
            "checkpoint 1 (size 5): the signature of test-host does not verify: the note was altered after it was signed"
        );
        assert!(p[1].starts_with("checkpoint 3 (size 3): not signed by the given key test-host+"), "{p:?}");
        assert!(
            p[1].contains(&format!(
                "signed by test-host (key id {:08x})",
                intruder.verifier().note_key_id("test-host")
            ))
        );
        assert!(p[2].starts_with("checkpoint 4: its line is not a checkpoint record"), "{p:?}");
        assert_eq!(p.len(), 3);

        // Everything checked with the wrong key: no checkpoint holds.
        let (_dir2, d2) = fresh();
        let r = verify_log(&d2, &intruder.verifier()).unwrap();
        assert_eq!((r.checkpoints, r.checkpoints_verified, r.problems.len()), (2, 0, 2));
        assert!(r.notes.iter().any(|n| n.contains("there is no valid checkpoint")), "{:?}", r.notes);
    }

    #[test]
    fn a_shrinking_or_renamed_log_is_named() {
        let (_dir, d) = fresh();
        let key = test_key();
        let text = std::fs::read_to_string(d.join(CHECKPOINTS_FILE)).unwrap();
        let first: CheckpointRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let cp = Checkpoint::parse_unverified(&first.note).unwrap();
        let renamed = Checkpoint { origin: "elsewhere/log".into(), ..cp.clone() };
        let mut file = std::fs::OpenOptions::new().append(true).open(d.join(CHECKPOINTS_FILE)).unwrap();
        for note in [cp.sign(&key), renamed.sign(&key)] {
            writeln!(file, "{}", serde_json::to_string(&CheckpointRecord { time: "t".into(), note }).unwrap()).unwrap();
        }
        let r = verify(&d);
        let p = problems(&r);
        assert_eq!(
            p,
            [
                "checkpoint 3 (size 5): the log shrank: an earlier checkpoint covers 12 entries",
                &format!("checkpoint 4 (size 5): its origin \"elsewhere/log\" is not the log's origin {:?}", cp.origin),
            ]
        );
    }

    #[test]
    fn crash_leftovers_and_uncovered_entries_are_notes() {
        let (_dir, d) = fresh();
        {
            let (mut log, _) = DecisionLog::open(&d, test_key(), CheckpointPolicy::default()).unwrap();
            log.append("decision", &serde_json::json!({"late": true})).unwrap();
            log.append("decision", &serde_json::json!({"late": true})).unwrap();
            // Dropped without a checkpoint; its leaf records are written at drop.
        }
        let mut file = std::fs::OpenOptions::new().append(true).open(d.join(LOG_FILE)).unwrap();
        file.write_all(b"{\"i\":14,\"ti").unwrap();
        let mut file = std::fs::OpenOptions::new().append(true).open(d.join(CHECKPOINTS_FILE)).unwrap();
        file.write_all(b"{\"time\":\"2026").unwrap();
        let leaves = std::fs::read(d.join(LEAVES_FILE)).unwrap();
        std::fs::write(d.join(LEAVES_FILE), &leaves[..13 * LEAF_RECORD as usize + 7]).unwrap();
        let r = verify(&d);
        assert!(r.is_valid(), "{:?}", problems(&r));
        assert_eq!(r.notes.len(), 5, "{:?}", r.notes);
        assert!(r.notes[0].starts_with("the last line of log.jsonl is incomplete (11 bytes"), "{:?}", r.notes);
        assert!(r.notes[1].starts_with("the last line of checkpoints.jsonl is incomplete"), "{:?}", r.notes);
        assert!(r.notes[2].contains("7 bytes of a record cut short"), "{:?}", r.notes);
        assert!(r.notes[3].starts_with("entries 13 to 13 have no leaf record yet"), "{:?}", r.notes);
        assert!(r.notes[4].starts_with("entries 12 to 13 are not covered by a signed checkpoint"), "{:?}", r.notes);
        assert_eq!(r.checkpoints, 2, "the partial line is not counted");
    }

    #[test]
    fn hostile_files_are_bounded_and_errors_are_usage_errors() {
        let (_dir, d) = fresh();
        let mut l = lines(&d);
        l[5] = "x".repeat(MAX_ENTRY_BYTES + 10);
        set_lines(&d, &l);
        let r = verify(&d);
        let p = problems(&r);
        assert!(
            p[0].starts_with("entry 5 (line 6) was edited: it is not an entry (it is over 1048576 bytes long)"),
            "{p:?}"
        );
        let err = verify_log(&d.join("nowhere"), &test_key().verifier()).unwrap_err().to_string();
        assert!(err.contains("there is no decision log in"), "{err}");
        std::fs::remove_file(d.join(LOG_FILE)).unwrap();
        nix::unistd::mkfifo(&d.join(LOG_FILE), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = verify_log(&d, &test_key().verifier()).unwrap_err().to_string();
        assert!(err.contains("is a FIFO (named pipe), not a regular file"), "{err}");
    }
}
