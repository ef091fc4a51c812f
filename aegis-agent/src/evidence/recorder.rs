//! The daemon's side of the decision log: every record, operator action and capability
//! change goes in as it happens, and checkpoints are signed on a timer.
//!
//! The earlier stages (the output loop, the control server, the capability table) hold it
//! as a [`Ledger`] trait object, so none of them imports this stage.
//!
//! An append that fails (disk full, I/O error) is never silent: the entry is counted as lost,
//! the failure is logged when it starts and when it ends, and once appends work again an
//! `entries_lost` entry says how many, since when, and why, so the gap is in the signed log
//! itself.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;

use super::{
    EvidenceConfig,
    key::{HostKey, KeySource},
    log::{CheckpointPolicy, DecisionLog},
};
use crate::journal::Ledger;

/// How often the timer asks whether a checkpoint is due.
const TICK: Duration = Duration::from_secs(1);

/// Counters of the decision log, for the stats line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecorderStats {
    /// Entries in the log (all time).
    pub entries: u64,
    /// Entries appended by this process.
    pub appended: u64,
    /// Entries that could not be appended.
    pub lost: u64,
    /// Checkpoints signed by this process.
    pub checkpoints: u64,
    /// Checkpoints that could not be signed or written.
    pub checkpoint_errors: u64,
}

/// The open decision log shared by the daemon's parts.
pub struct Recorder {
    log: Mutex<Inner>,
    appended: AtomicU64,
    lost: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_errors: AtomicU64,
}

struct Inner {
    log: DecisionLog,
    /// Since when appends fail, and the last error.
    failing: Option<(SystemTime, String)>,
    /// Entries lost since the last `entries_lost` entry.
    lost_unreported: u64,
}

impl Recorder {
    /// Open the configured log (creating the host key on first use) and log what opening it
    /// repaired.
    pub fn open(config: &EvidenceConfig) -> anyhow::Result<Arc<Self>> {
        let name = config.key_name()?;
        let (key, source) = HostKey::load_or_create(&config.key, &name)?;
        if source == KeySource::Created {
            tracing::info!(key = %config.key.display(), name, "created the host signing key (aegis-agent key show prints its public half)");
        }
        let (log, report) = DecisionLog::open(&config.dir, key, CheckpointPolicy::from_config(config))?;
        if report.partial_line_bytes > 0 || report.partial_leaf_bytes > 0 || report.leaves_rebuilt > 0 {
            tracing::warn!(
                dir = %config.dir.display(),
                partial_line_bytes = report.partial_line_bytes,
                partial_leaf_bytes = report.partial_leaf_bytes,
                leaves_rebuilt = report.leaves_rebuilt,
                "the decision log was cut off by a crash; repaired"
            );
        }
        tracing::info!(
            dir = %config.dir.display(),
            entries = report.entries,
            checkpoint = report.checkpoint_size,
            origin = log.origin(),
            "decision log open"
        );
        Ok(Arc::new(Self {
            log: Mutex::new(Inner { log, failing: None, lost_unreported: 0 }),
            appended: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoint_errors: AtomicU64::new(0),
        }))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sign a checkpoint when one is due (`force`: whenever entries are uncovered).
    pub fn checkpoint(&self, force: bool) {
        let mut inner = self.inner();
        self.flush_buffered(&mut inner);
        let result = if force { inner.log.checkpoint().map(Some) } else { inner.log.checkpoint_if_due() };
        match result {
            Ok(Some(cp)) => {
                self.checkpoints.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(size = cp.size, "decision log checkpoint signed");
            }
            Ok(None) => {}
            Err(e) => {
                let n = self.checkpoint_errors.fetch_add(1, Ordering::Relaxed);
                if n == 0 || n.is_power_of_two() {
                    tracing::error!(error = %format!("{e:#}"), failures = n + 1, "cannot sign a decision log checkpoint; entries since the last one are not covered");
                }
            }
        }
    }

    /// Sign checkpoints as they fall due, every second, until `stop`; a last one then.
    pub fn start_timer(self: &Arc<Self>, stop: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("aegis-checkpoint".into())
            .spawn(move || {
                let mut next = Instant::now() + TICK;
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    if Instant::now() >= next {
                        me.checkpoint(false);
                        next = Instant::now() + TICK;
                    }
                }
                me.checkpoint(true);
            })
            .context("cannot start the checkpoint timer")
    }

    pub fn stats(&self) -> RecorderStats {
        let entries = self.inner().log.size();
        RecorderStats {
            entries,
            appended: self.appended.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            checkpoint_errors: self.checkpoint_errors.load(Ordering::Relaxed),
        }
    }
}

impl Ledger for Recorder {
    fn checkpoint(&self) -> Option<u64> {
        let before = self.checkpoint_errors.load(Ordering::Relaxed);
        Recorder::checkpoint(self, true);
        (self.checkpoint_errors.load(Ordering::Relaxed) == before).then(|| self.inner().log.size())
    }

    fn append(&self, kind: &str, body: &serde_json::Value) {
        self.append_body(kind, body, false);
    }

    fn append_raw(&self, kind: &str, body: &serde_json::value::RawValue) {
        self.append_body(kind, body, true);
    }

    fn flush(&self) {
        self.flush_buffered(&mut self.inner());
    }
}

impl Recorder {
    /// An entry of `kind` with `body` as it serialises, written now or (`buffered`) at the
    /// next flush; a failure is counted as lost.
    fn append_body<B: serde::Serialize + ?Sized>(&self, kind: &str, body: &B, buffered: bool) {
        let mut inner = self.inner();
        if inner.lost_unreported > 0 {
            self.flush_buffered(&mut inner);
        }
        if inner.lost_unreported > 0 {
            let (since, reason) = inner.failing.clone().unwrap_or_else(|| (SystemTime::now(), String::new()));
            let note = serde_json::json!({
                "count": inner.lost_unreported,
                "since": crate::clock::rfc3339_at(since),
                "reason": reason,
            });
            if inner.log.append("entries_lost", &note).is_ok() {
                let lost = inner.lost_unreported;
                tracing::warn!(lost, reason, "the decision log takes entries again; the gap is recorded in it");
                inner.lost_unreported = 0;
                inner.failing = None;
            }
        }
        // Counted appended once written (`flush_buffered`).
        if let Err(e) = inner.log.append_buffered(kind, body) {
            self.count_lost(&mut inner, 1, kind, e);
        }
        if !buffered || inner.log.wants_flush() {
            self.flush_buffered(&mut inner);
        }
    }

    /// Write the buffered entries; counted appended, or all of them lost.
    fn flush_buffered(&self, inner: &mut Inner) {
        let n = inner.log.unwritten();
        if n == 0 {
            return;
        }
        match inner.log.flush() {
            Ok(()) => {
                self.appended.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => self.count_lost(inner, n, "buffered", e),
        }
    }

    fn count_lost(&self, inner: &mut Inner, n: u64, kind: &str, e: anyhow::Error) {
        self.lost.fetch_add(n, Ordering::Relaxed);
        inner.lost_unreported += n;
        let error = format!("{e:#}");
        if inner.failing.is_none() {
            tracing::error!(
                kind,
                entries = n,
                error,
                "cannot append to the decision log: entries are counted as lost until it takes writes again (free \
                 space on its filesystem, or see the error)"
            );
            inner.failing = Some((SystemTime::now(), error));
        } else if let Some((_, last)) = &mut inner.failing {
            *last = error;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::verify;

    fn config(dir: &std::path::Path) -> EvidenceConfig {
        let mut c = crate::config::Config::defaults().evidence;
        c.key = dir.join("host.key");
        c.dir = dir.join("log");
        c.name = "test-host".into();
        c
    }

    #[test]
    fn entries_go_in_and_checkpoints_cover_them() {
        let dir = crate::control::testutil::TempDir::new("recorder");
        let recorder = Recorder::open(&config(dir.path())).unwrap();
        recorder.append("llm_call", &serde_json::json!({"decision": {"action": "block"}}));
        recorder.append("audit", &serde_json::json!({"action": "block", "result": "ok"}));
        recorder.checkpoint(true);
        let stats = recorder.stats();
        assert_eq!((stats.entries, stats.appended, stats.lost, stats.checkpoints), (2, 2, 0, 1));
        drop(recorder);
        // Reopened (a restart): appends go on after the entries there.
        let recorder = Recorder::open(&config(dir.path())).unwrap();
        recorder.append("agent_start", &serde_json::json!({}));
        recorder.checkpoint(true);
        assert_eq!(recorder.stats().entries, 3);
        let key = HostKey::load(&dir.path().join("host.key"), "test-host").unwrap().verifier();
        let report = verify::verify_log(&dir.path().join("log"), &key).unwrap();
        assert!(report.is_valid(), "{report:?}");
        assert_eq!((report.lines, report.latest_checkpoint_size), (3, Some(3)));
    }

    /// Records are buffered until the sink's flush; a flush that fails on a full disk
    /// counts every buffered entry lost, and once there is space the log says so itself
    /// (`entries_lost` with the count) and verifies.
    #[test]
    fn buffered_entries_lost_on_a_full_disk_are_counted_and_recorded() {
        let disk = crate::control::testutil::SmallDisk::new("recorder-full", "256k");
        let recorder = Recorder::open(&config(disk.path())).unwrap();
        let raw = |n: u32| {
            serde_json::value::RawValue::from_string(format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(4000))).unwrap()
        };
        recorder.append_raw("llm_call", &raw(0));
        assert_eq!(recorder.stats().appended, 0, "buffered, not written yet");
        Ledger::flush(&*recorder);
        assert_eq!(recorder.stats().appended, 1);
        let filler = disk.fill_but(8192);
        for n in 1..6 {
            recorder.append_raw("llm_call", &raw(n));
        }
        Ledger::flush(&*recorder);
        let stats = recorder.stats();
        assert_eq!((stats.entries, stats.appended, stats.lost), (1, 1, 5), "{stats:?}");
        std::fs::remove_file(filler).unwrap();
        recorder.append_raw("llm_call", &raw(6));
        recorder.checkpoint(true);
        let stats = recorder.stats();
        assert_eq!((stats.entries, stats.appended, stats.lost), (3, 2, 5), "{stats:?}");
        drop(recorder);
        let text = std::fs::read_to_string(disk.path().join("log/log.jsonl")).unwrap();
        let kinds: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(kinds[1]["kind"], "entries_lost");
        assert_eq!(kinds[1]["body"]["count"], 5);
        assert_eq!(kinds[2]["body"]["n"], 6);
        let key = HostKey::load(&disk.path().join("host.key"), "test-host").unwrap().verifier();
        let report = verify::verify_log(&disk.path().join("log"), &key).unwrap();
        assert!(report.is_valid(), "{report:?}");
    }
}
