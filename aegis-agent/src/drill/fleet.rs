//! A fleet drill on this host: what the agent does with the drill request of a fleet policy
//! it has put in force ([`crate::fleet::drill`]). The drill runs as a child process of the
//! agent, `aegis-agent drill --json` with the agent's own configuration, exactly as an
//! operator's drill on this host would: a drill that hangs or crashes cannot take the agent
//! down, and it is killed (SIGTERM, so its guard lifts what it set; SIGKILL 20 s later,
//! and then the agent's own clean-up of a killed drill) when it runs past [`MAX_RUN`].

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    clock::now_unix_ms,
    evidence::bundle_meta::parse_rfc3339_ms,
    fleet::drill::{DrillRequest, DrillResult, DrillStatus},
};

/// Longest a fleet drill may run on one host.
pub const MAX_RUN: Duration = Duration::from_secs(30 * 60);
/// Largest report read back from the drill.
const MAX_REPORT_BYTES: u64 = 16 << 20;

/// Runs the drills of fleet policies on this host.
#[derive(Clone, Debug)]
pub struct Launcher {
    /// The agent's executable.
    pub exe: PathBuf,
    /// The agent's configuration file (None: the embedded defaults).
    pub config: Option<PathBuf>,
    /// `[fleet] drills`.
    pub enabled: bool,
    /// False for an agent run with `--no-kernel` (nothing is captured: nothing to drill).
    pub kernel: bool,
    busy: Arc<AtomicBool>,
}

/// Clears the busy flag when the drill ends, however it ends.
struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Launcher {
    pub fn new(config: Option<PathBuf>, enabled: bool, kernel: bool) -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("aegis-agent"));
        Self { exe, config, enabled, kernel, busy: Arc::new(AtomicBool::new(false)) }
    }

    /// Why this agent does not run `request` now, if it does not.
    pub fn refusal(&self, request: &DrillRequest, now_ms: u64) -> Option<String> {
        if !self.kernel {
            return Some("this agent runs with --no-kernel: it captures nothing, so there is nothing to drill".into());
        }
        if !self.enabled {
            return Some("[fleet] drills = false on this host: it runs no fleet drill".into());
        }
        match parse_rfc3339_ms(&request.not_after) {
            Ok(t) if t < now_ms as i64 => {
                return Some(format!("the request expired at {} before this agent had it", request.not_after));
            }
            Ok(_) => {}
            Err(e) => return Some(format!("the request's not_after is not a time: {e}")),
        }
        if self.busy.load(Ordering::SeqCst) {
            return Some("another fleet drill is still running on this host".into());
        }
        None
    }

    /// Run `request` (blocking, up to [`MAX_RUN`]); its result (unsigned).
    pub fn run(&self, request: &DrillRequest, result: DrillResult) -> DrillResult {
        let mut result = result;
        if let Some(reason) = self.refusal(request, now_unix_ms()) {
            result.status = DrillStatus::NotRun;
            result.reason = reason;
            result.finished_unix_ms = now_unix_ms();
            return result;
        }
        self.busy.store(true, Ordering::SeqCst);
        let _busy = Busy(self.busy.clone());
        match self.run_child(request) {
            Ok(report) => {
                result.status = if report.passed { DrillStatus::Passed } else { DrillStatus::Failed };
                if let Some(s) = &report.stopped {
                    result.reason = s.clone();
                }
                result.report = Some(report);
            }
            Err(e) => {
                result.status = DrillStatus::Error;
                result.reason = format!("{e:#}");
            }
        }
        result.finished_unix_ms = now_unix_ms();
        result
    }

    fn run_child(&self, request: &DrillRequest) -> anyhow::Result<crate::drill::report::DrillReport> {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir = std::env::temp_dir().join(format!("aegis-{}", request.id));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| anyhow::anyhow!("cannot make the drill's directory {}: {e}", dir.display()))?;
        let _cleanup = RemoveDir(dir.clone());
        let mut cmd = Command::new(&self.exe);
        cmd.arg("drill").arg("--json");
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        for name in &request.scenarios {
            // One argument: a name is never taken for an option.
            cmd.arg(format!("--scenario={name}"));
        }
        for (i, f) in request.files.iter().enumerate() {
            let path = dir.join(format!("scenario-{i}.toml"));
            std::fs::write(&path, &f.text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            cmd.arg("--scenario-file").arg(path);
        }
        let (out, err) = (dir.join("report.json"), dir.join("drill.log"));
        cmd.stdin(Stdio::null()).stdout(std::fs::File::create(&out)?).stderr(std::fs::File::create(&err)?);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        // The drill gets SIGTERM when the agent dies (its guard then lifts what it set).
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start {}: {e}", self.exe.display()))?;
        tracing::warn!(drill = request.id, pid = child.id(), "fleet drill started on this host");
        let started = Instant::now();
        let mut termed: Option<Instant> = None;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            match termed {
                None if started.elapsed() > MAX_RUN => {
                    tracing::error!(drill = request.id, "the fleet drill runs past {MAX_RUN:?}: stopping it");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(child.id() as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    termed = Some(Instant::now());
                }
                Some(t) if t.elapsed() > Duration::from_secs(20) => {
                    let _ = child.kill();
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let text = crate::files::read_capped_to_string(&out, MAX_REPORT_BYTES, "a drill report is at most 16 MiB")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        serde_json::from_str(&text).map_err(|e| {
            let log = std::fs::read_to_string(&err).unwrap_or_default();
            let tail: String = log.chars().rev().take(600).collect::<Vec<_>>().into_iter().rev().collect();
            anyhow::anyhow!("the drill ({status}) gave no report ({e}): {}", tail.trim())
        })
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(not_after_ms: u64) -> DrillRequest {
        DrillRequest {
            id: "fleet-drill-1-ab".into(),
            scenarios: vec![],
            files: vec![],
            not_after: crate::clock::rfc3339_ms(not_after_ms),
        }
    }

    #[test]
    fn an_agent_says_why_it_does_not_drill() {
        let now = now_unix_ms();
        let l = Launcher::new(None, true, true);
        assert_eq!(l.refusal(&request(now + 60_000), now), None);
        assert!(l.refusal(&request(now - 1), now).unwrap().contains("expired"));
        assert!(Launcher::new(None, true, false).refusal(&request(now + 60_000), now).unwrap().contains("--no-kernel"));
        assert!(
            Launcher::new(None, false, true).refusal(&request(now + 60_000), now).unwrap().contains("drills = false")
        );
        l.busy.store(true, Ordering::SeqCst);
        assert!(l.refusal(&request(now + 60_000), now).unwrap().contains("another fleet drill"));
        {
            let _b = Busy(l.busy.clone());
        }
        assert_eq!(l.refusal(&request(now + 60_000), now), None, "the flag is cleared when a drill ends");
    }
}
