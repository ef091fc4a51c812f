//! Live reload of rulepacks: a changed file is loaded, validated and compiled off the hot
//! path, then swapped in whole; calls in flight finish with the rules they started with.
//! An invalid file is rejected with its file, line, rule and reason, and the rules in
//! force stay.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use super::Inspector;

/// What identifies a file version cheaply: modification time and size.
fn stamp(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

/// Check `paths` every `every` until `stop`; reload when one changed. Each reload, taken or
/// rejected, also goes to `ledger` (kind `rulepack_reload`).
pub fn watch(
    inspector: Arc<Inspector>,
    paths: Vec<PathBuf>,
    every: Duration,
    stop: Arc<AtomicBool>,
    ledger: Option<Arc<dyn crate::journal::Ledger>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("aegis-rules".into()).spawn(move || {
        let mut last = stamp(&paths);
        let tick = Duration::from_millis(100).min(every);
        let mut waited = Duration::ZERO;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(tick);
            waited += tick;
            if waited < every {
                continue;
            }
            waited = Duration::ZERO;
            let now = stamp(&paths);
            if now == last {
                continue;
            }
            last = now;
            let files: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            // With the fleet's packs in force, if any.
            match inspector.reload(&paths, None) {
                Ok(packs) => {
                    for p in &packs {
                        tracing::info!(pack = %p.name, version = %p.version, digest = %p.digest, "rulepack reloaded");
                    }
                    if let Some(ledger) = &ledger {
                        ledger.append(
                            "rulepack_reload",
                            &serde_json::json!({ "result": "ok", "files": files, "packs": packs }),
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "rulepack rejected; the rules in force stay");
                    if let Some(ledger) = &ledger {
                        ledger.append(
                            "rulepack_reload",
                            &serde_json::json!({ "result": "rejected", "files": files, "error": format!("{e:#}") }),
                        );
                    }
                }
            }
        }
    })
}
