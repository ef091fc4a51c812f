//! Where call records go: standard output and/or an append-only JSON lines file.
//!
//! The file never loses a record silently. Lines are appended a burst at a time through a
//! [`Journal`] (a failed append is cut back, so the file stays whole lines). While the file
//! cannot be written (disk full, I/O error) records wait in a bounded queue in memory and
//! the write is retried every second; the failure is logged once when it starts and once
//! when it ends. Records that do not fit the queue are counted as lost, and once the file
//! takes writes again a `records_lost` record says how many, when, and why, so the loss is
//! in the file itself as well as in the counters.
//!
//! Rotation: [`JsonLines::reopen_flag`] asks for the file to be opened again at its path
//! (the daemon sets it on SIGHUP, after logrotate renamed the file). The output thread, the
//! file's only writer, reopens it at its next flush (within one tick), between two bursts:
//! the renamed file ends with whole lines, and the next record starts the new one.

use std::{
    io::{BufWriter, Write as _},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

pub mod lookback;
pub mod otlp;
pub mod record;

use self::record::{self as sinks_record, AgentIdentity, Identity, Line, Record, RecordsLost, SCHEMA_VERSION};
use crate::journal::{Journal, Ledger};

/// Sees every record written (the incident rules, in `evidence::incident`). Called on the
/// output thread: it must be quick, and hand any real work to a thread of its own.
pub trait RecordObserver: Send + Sync {
    fn observe(&self, record: &Record);
}

/// How often a failing file is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// One JSON object per line. The caller flushes after each burst of records, so a record
/// reaches the file within one pass of the output loop.
pub struct JsonLines {
    stdout: Option<BufWriter<std::io::Stdout>>,
    file: Option<FileSink>,
    /// Records taken (stdout and file).
    pub written: u64,
    /// Records that could not be serialised, or written to stdout.
    pub write_errors: u64,
    /// The decision log, which takes every record too (kind: its `type`).
    ledger: Option<std::sync::Arc<dyn Ledger>>,
    /// Who writes: stamped on every line.
    identity: Identity,
    /// The look-back snapshots are cut from (see [`lookback`]).
    lookback: Option<lookback::Lookback>,
    observers: Vec<std::sync::Arc<dyn RecordObserver>>,
    /// Set to have the file reopened at the next flush.
    reopen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The drills in progress: their records are marked (see `control::drills`).
    drills: Option<crate::control::drills::DrillMarks>,
    /// The buffer each record is serialised into.
    scratch: Vec<u8>,
}

/// The file side: the journal, what waits for it, and what was lost.
struct FileSink {
    journal: Journal,
    pending: Vec<u8>,
    pending_records: u64,
    max_pending: usize,
    /// Records dropped because the queue was full, not reported in the file yet.
    lost_unreported: u64,
    lost_since: Option<SystemTime>,
    /// Records dropped in total.
    lost: u64,
    /// Since when appends fail, the last error, and when to try again.
    failing: Option<(Instant, String)>,
    retry_at: Instant,
}

/// What the file side holds and lost, for the health report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileHealth {
    /// Records waiting in memory for the file to take writes again.
    pub pending: u64,
    /// Records that never reached the file (the queue was full).
    pub lost: u64,
    /// Whether appends are failing now.
    pub failing: bool,
}

impl JsonLines {
    /// `file`: empty path for none. The file is created with mode 0600 (records name
    /// processes and models; they are not for every local user). `max_pending`: bytes of
    /// records held in memory while the file cannot be written.
    pub fn open(stdout: bool, file: &Path, max_pending: usize) -> anyhow::Result<Self> {
        let file = if file.as_os_str().is_empty() {
            None
        } else {
            let (journal, repairs) = Journal::open(file, false).map_err(|e| anyhow::anyhow!("output.file: {e:#}"))?;
            if repairs.partial_line_bytes > 0 {
                tracing::warn!(
                    file = %file.display(),
                    bytes = repairs.partial_line_bytes,
                    "output.file ended in a partial record (left by a crash); it was cut away"
                );
            }
            if let Some(mode) = repairs.narrowed_mode {
                tracing::warn!(file = %file.display(), mode = format!("{mode:o}"), "output.file was readable by others; its mode is now 0600");
            }
            Some(FileSink {
                journal,
                pending: Vec::new(),
                pending_records: 0,
                max_pending,
                lost_unreported: 0,
                lost_since: None,
                lost: 0,
                failing: None,
                retry_at: Instant::now(),
            })
        };
        let stdout = stdout.then(|| BufWriter::new(std::io::stdout()));
        Ok(Self {
            stdout,
            file,
            written: 0,
            write_errors: 0,
            ledger: None,
            identity: Identity::new(None, None, None),
            lookback: None,
            observers: Vec::new(),
            reopen: std::sync::Arc::default(),
            drills: None,
            scratch: Vec::new(),
        })
    }

    /// Set it (from any thread) to have the file opened again at its path at the next
    /// flush: for log rotation.
    pub fn reopen_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.reopen.clone()
    }

    /// Also show every record to `observer` once it is written (observers see records in
    /// the order they were added).
    pub fn with_observer(mut self, observer: Option<std::sync::Arc<dyn RecordObserver>>) -> Self {
        self.observers.extend(observer);
        self
    }

    /// Also keep every line in `lookback`.
    pub fn with_lookback(mut self, lookback: Option<lookback::Lookback>) -> Self {
        self.lookback = lookback;
        self
    }

    /// What the look-back dropped to keep its bounds.
    pub fn lookback_stats(&self) -> Option<lookback::LookbackStats> {
        self.lookback.as_ref().map(|l| l.stats)
    }

    /// Stamp every line with `identity` (see [`record`]).
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = identity;
        self
    }

    /// Mark the records of the drills in `drills` as theirs.
    pub fn with_drills(mut self, drills: Option<crate::control::drills::DrillMarks>) -> Self {
        self.drills = drills;
        self
    }

    /// `record` marked as a drill's, when it is one (a copy: drills are rare, records many).
    fn drill_marked(&self, record: &Record) -> Option<Record> {
        let drills = self.drills.as_ref().filter(|d| !d.is_empty())?;
        match record {
            Record::LlmCall(call) => {
                let id = drills.of_cgroup(&call.process.cgroup)?;
                let mut call = call.clone();
                call.drill = Some(id);
                Some(Record::LlmCall(call))
            }
            Record::ConnectDenied(d) => {
                let id = drills.of_block(&d.block_id)?;
                Some(Record::ConnectDenied(sinks_record::ConnectDenied { drill: Some(id), ..d.clone() }))
            }
            Record::GateRefused(_) | Record::RecordsLost(_) | Record::BlindSpot(_) => None,
        }
    }

    /// Also append every record to `ledger` (the decision log).
    pub fn with_ledger(mut self, ledger: Option<std::sync::Arc<dyn Ledger>>) -> Self {
        self.ledger = ledger;
        self
    }

    pub fn write(&mut self, record: &Record) {
        let marked = self.drill_marked(record);
        let record = marked.as_ref().unwrap_or(record);
        // Into the buffer of the last record (every consumer below copies the line): no
        // allocation and regrowth per record.
        let mut line = std::mem::take(&mut self.scratch);
        line.clear();
        let serialised =
            serde_json::to_writer(&mut line, &Line { record, schema: SCHEMA_VERSION, agent: self.identity.current() });
        if let Err(e) = serialised {
            self.scratch = line;
            self.write_errors += 1;
            tracing::error!(error = %e, "cannot serialise a record");
            return;
        }
        if let Some(lookback) = &mut self.lookback {
            let payload = match record {
                Record::LlmCall(call) => call.payload.as_deref(),
                _ => None,
            };
            lookback.append(&line, payload);
        }
        if let Some(ledger) = &self.ledger {
            // The line is the entry's body as it is: checked as JSON, not parsed into a tree
            // and written again.
            match serde_json::from_slice::<&serde_json::value::RawValue>(&line) {
                Ok(body) => ledger.append_raw(record.kind(), body),
                Err(e) => tracing::error!(error = %e, "cannot serialise a record for the decision log"),
            }
        }
        line.push(b'\n');
        if let Some(out) = &mut self.stdout
            && out.write_all(&line).is_err()
        {
            self.write_errors += 1;
        }
        if let Some(f) = &mut self.file {
            f.queue(&line);
        }
        self.written += 1;
        // Not kept past a megabyte: one huge record does not hold its buffer for good.
        if line.capacity() <= 1 << 20 {
            self.scratch = line;
        }
        for observer in &self.observers {
            observer.observe(record);
        }
    }

    pub fn flush(&mut self) {
        if let Some(lookback) = &mut self.lookback {
            lookback.flush();
        }
        if let Some(ledger) = &self.ledger {
            ledger.flush();
        }
        if let Some(out) = &mut self.stdout
            && out.flush().is_err()
        {
            self.write_errors += 1;
        }
        let agent = self.identity.current();
        if let Some(f) = &mut self.file {
            if self.reopen.swap(false, std::sync::atomic::Ordering::SeqCst) {
                f.reopen();
            }
            f.flush(Instant::now(), agent);
        }
    }

    /// The last flush, at exit: the file is tried once more whatever the retry timer says.
    pub fn close(&mut self) {
        if let Some(f) = &mut self.file {
            f.retry_at = Instant::now();
        }
        self.flush();
    }

    /// What the file side holds and lost (all zero without a file).
    pub fn file_health(&self) -> FileHealth {
        self.file.as_ref().map_or_else(FileHealth::default, |f| FileHealth {
            pending: f.pending_records,
            lost: f.lost,
            failing: f.failing.is_some(),
        })
    }
}

impl FileSink {
    /// Open the file again at its path; on an error, records keep going to the file opened
    /// before (nothing is lost), and the error says so.
    fn reopen(&mut self) {
        let path = self.journal.path().to_owned();
        match self.journal.reopen() {
            Ok(repairs) => {
                if let Some(mode) = repairs.narrowed_mode {
                    tracing::warn!(file = %path.display(), mode = format!("{mode:o}"), "output.file was readable by others; its mode is now 0600");
                }
                tracing::info!(file = %path.display(), "output.file reopened");
            }
            Err(e) => tracing::error!(
                file = %path.display(),
                error = %format!("{e:#}"),
                "cannot reopen output.file: records still go to the file opened before (renamed, if it was rotated)"
            ),
        }
    }

    fn queue(&mut self, line: &[u8]) {
        if self.pending.len() + line.len() > self.max_pending {
            self.lost += 1;
            self.lost_unreported += 1;
            self.lost_since.get_or_insert_with(SystemTime::now);
            return;
        }
        self.pending.extend_from_slice(line);
        self.pending_records += 1;
    }

    fn flush(&mut self, now: Instant, agent: &AgentIdentity) {
        if self.pending.is_empty() && self.lost_unreported == 0 {
            return;
        }
        if self.failing.is_some() && now < self.retry_at {
            return;
        }
        let mut batch = std::mem::take(&mut self.pending);
        let lost_line = (self.lost_unreported > 0).then(|| self.lost_line(agent));
        if let Some(line) = &lost_line {
            batch.extend_from_slice(line);
        }
        match self.journal.append(&batch) {
            Ok(()) => {
                if let Some((since, error)) = self.failing.take() {
                    tracing::warn!(
                        file = %self.journal.path().display(),
                        failing_for_s = since.elapsed().as_secs(),
                        error,
                        written_late = self.pending_records,
                        lost = self.lost_unreported,
                        "output.file takes writes again"
                    );
                }
                self.pending_records = 0;
                self.lost_unreported = 0;
                self.lost_since = None;
            }
            Err(e) => {
                if let Some(line) = &lost_line {
                    batch.truncate(batch.len() - line.len());
                }
                self.pending = batch;
                self.retry_at = now + RETRY_EVERY;
                if self.failing.is_none() {
                    tracing::error!(
                        file = %self.journal.path().display(),
                        error = %e,
                        held_bytes_max = self.max_pending,
                        "cannot write output.file: records are held in memory and retried every second; past \
                         output.max_pending_bytes they are counted as lost (free space on its filesystem)"
                    );
                    self.failing = Some((now, e.to_string()));
                }
            }
        }
    }

    /// The `records_lost` record for what was dropped since the last one.
    fn lost_line(&self, agent: &AgentIdentity) -> Vec<u8> {
        let since = self.lost_since.unwrap_or_else(SystemTime::now);
        let reason = self.failing.as_ref().map_or("the file could not be written", |(_, e)| e.as_str());
        let record = Record::RecordsLost(RecordsLost {
            time: crate::clock::now_rfc3339(),
            count: self.lost_unreported,
            since: crate::clock::rfc3339_at(since),
            reason: reason.to_owned(),
        });
        let mut line = serde_json::to_vec(&Line { record: &record, schema: SCHEMA_VERSION, agent })
            .expect("a records_lost record serialises");
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tmpfs of 64 KiB mounted for the test (root), unmounted on drop.
    struct SmallDisk(std::path::PathBuf);

    impl SmallDisk {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("aegis-sink-disk-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                .arg(&dir)
                .status()
                .expect("mount (needs root)");
            assert!(ok.success(), "mounting a test tmpfs on {}", dir.display());
            Self(dir)
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "the file ends in a partial line");
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"))).collect()
    }

    /// A drill's refusals are marked as the drill's (by its block), others are not; the
    /// marks end with the drill.
    #[test]
    fn records_of_a_drill_are_marked_while_it_runs() {
        let dir = std::env::temp_dir().join(format!("aegis-sink-drill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("records.jsonl");
        let drills = crate::control::drills::DrillMarks::default();
        let mut sink = JsonLines::open(false, &path, 1 << 20).unwrap().with_drills(Some(drills.clone()));
        let denied = |block: &str| {
            Record::ConnectDenied(record::ConnectDenied {
                time: "t".into(),
                block_id: block.into(),
                pid: 1,
                tid: 1,
                comm: "curl".into(),
                cgroup_id: 7,
                exe: None,
                dest: "127.0.0.1:443".into(),
                udp: false,
                action: "redirect",
                drill: None,
            })
        };
        drills.begin("drill-1", "/aegis-drill-1", 0, None).unwrap();
        drills.note_block("blk-1", "/aegis-drill-1");
        sink.write(&denied("blk-1"));
        sink.write(&denied("blk-2"));
        drills.end("drill-1");
        sink.write(&denied("blk-1"));
        sink.flush();
        let got: Vec<serde_json::Value> = lines(&path).into_iter().map(|l| l["drill"].clone()).collect();
        assert_eq!(got, [serde_json::json!("drill-1"), serde_json::Value::Null, serde_json::Value::Null]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Rotation: after a rename and the flag, the next flush writes to a new file at the
    /// path; the renamed one ends with the records flushed before, whole.
    #[test]
    fn the_file_is_reopened_at_its_path_when_asked() {
        let dir = std::env::temp_dir().join(format!("aegis-sink-reopen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("calls.jsonl");
        let mut sink = JsonLines::open(false, &path, 1 << 20).unwrap();
        let record = |i: u64| {
            Record::RecordsLost(RecordsLost { time: "t".into(), count: i, since: "s".into(), reason: "r".into() })
        };
        sink.write(&record(1));
        sink.flush();
        let rotated = dir.join("calls.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        sink.write(&record(2));
        sink.flush(); // not asked yet: the renamed file
        sink.reopen_flag().store(true, std::sync::atomic::Ordering::SeqCst);
        sink.write(&record(3));
        sink.flush();
        sink.write(&record(4));
        sink.close();
        let counts = |p: &Path| lines(p).iter().map(|l| l["count"].as_u64().unwrap()).collect::<Vec<_>>();
        assert_eq!(counts(&rotated), [1, 2]);
        assert_eq!(counts(&path), [3, 4]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_disk_holds_then_counts_records_and_the_file_stays_whole() {
        let disk = SmallDisk::new();
        let path = disk.0.join("calls.jsonl");
        // Leave about 8 KiB free.
        let filler = disk.0.join("filler");
        std::fs::write(&filler, vec![b'x'; 56 * 1024]).unwrap();
        let mut sink = JsonLines::open(false, &path, 16 * 1024).unwrap();
        let agent = Identity::new(None, None, None).current().clone();
        let record = |i: u64| {
            Record::RecordsLost(RecordsLost { time: "t".into(), count: i, since: "s".into(), reason: "p".repeat(900) })
        };
        let start = Instant::now();
        for i in 0..40 {
            sink.write(&record(i));
            if let Some(f) = &mut sink.file {
                f.flush(start, &agent);
            }
        }
        let h = sink.file_health();
        assert!(h.failing && h.pending > 0 && h.lost > 0, "{h:?}");
        let written_before = lines(&path).len() as u64;
        assert_eq!(written_before + h.pending + h.lost, 40, "{h:?}");
        // Space again: the next retry writes what was held, then says what was lost.
        std::fs::remove_file(&filler).unwrap();
        let f = sink.file.as_mut().unwrap();
        f.flush(start + Duration::from_millis(10), &agent);
        assert!(sink.file_health().failing, "no retry before a second has passed");
        sink.file.as_mut().unwrap().flush(start + RETRY_EVERY + Duration::from_millis(10), &agent);
        assert_eq!(sink.file_health(), FileHealth { pending: 0, lost: h.lost, failing: false });
        let all = lines(&path);
        let calls = all.iter().filter(|l| l["reason"].as_str().is_some_and(|r| r.starts_with("ppp"))).count() as u64;
        let marker: Vec<_> =
            all.iter().filter(|l| l["reason"].as_str().is_some_and(|r| !r.starts_with("ppp"))).collect();
        assert_eq!(marker.len(), 1, "{marker:?}");
        assert_eq!(marker[0]["count"].as_u64(), Some(h.lost));
        assert!(marker[0]["reason"].as_str().unwrap().contains("No space left"), "{}", marker[0]);
        assert_eq!(calls + h.lost, 40);
        // Records in order, none twice.
        let ns: Vec<u64> = all
            .iter()
            .filter(|l| l["reason"].as_str().is_some_and(|r| r.starts_with("ppp")))
            .filter_map(|l| l["count"].as_u64())
            .collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{ns:?}");
    }
}
