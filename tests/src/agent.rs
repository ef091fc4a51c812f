//! The agent under test as a child process, with a temporary config and output file.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

use crate::{TempDir, file_tail, scaled, time_scale, workspace_dir};

/// How long the agent may take to load and attach its probes ([`scaled`] where used, like
/// every wait here).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent may take to exit after SIGINT before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of the agent binary: `$AEGIS_AGENT_BIN`, else `aegis-agent` in the nearest
/// ancestor of the running test executable that has one (the profile directory, e.g.
/// `target/release/` for `cargo test --release`, whatever the build-dir layout), else
/// `<workspace>/target/debug/aegis-agent`.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AEGIS_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut tried: Vec<PathBuf> = exe.ancestors().skip(1).take(6).map(|d| d.join("aegis-agent")).collect();
    tried.push(workspace_dir().join("target/debug/aegis-agent"));
    tried.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "aegis-agent binary not found (tried {tried:?}); build it first with \
             `cargo build -p aegis-agent`, or set AEGIS_AGENT_BIN"
        )
    })
}

/// A `[control]` table whose socket, state file and audit log are in `dir`.
pub fn test_control_toml(dir: &Path) -> String {
    let path = |name: &str| format!("{:?}", dir.join(name).display().to_string());
    format!(
        "[control]\nsocket = {}\nstate_file = {}\naudit_log = {}\n",
        path("control.sock"),
        path("blocks.json"),
        path("audit.jsonl")
    )
}

/// `[evidence]`, `[lookback]` and `[incidents]` tables whose host key, decision log,
/// look-back (payloads kept, for replay), incidents and bundles are in `dir`, so that a
/// test agent never writes to /var/lib/aegis.
pub fn test_evidence_toml(dir: &Path) -> String {
    let path = |name: &str| format!("{:?}", dir.join(name).display().to_string());
    format!(
        "[evidence]\nkey = {}\ndir = {}\nname = \"aegis-test\"\n\n[lookback]\ndir = {}\npayloads = true\n\n\
         [incidents]\ndir = {}\nbundles_dir = {}\n",
        path("host.key"),
        path("decision-log"),
        path("lookback"),
        path("incidents"),
        path("bundles")
    )
}

/// A running agent writing JSON lines to a temporary file. Dropping it stops it (SIGINT,
/// then SIGKILL after [`STOP_TIMEOUT`]) and, unless already panicking, asserts a clean exit.
pub struct Agent {
    child: Child,
    dir: TempDir,
    output: PathBuf,
    status: Option<ExitStatus>,
}

impl Agent {
    /// Starts the agent with the default test config.
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// Starts the agent; `extra_toml` is appended to the generated config. Waits until the
    /// agent creates its ready file (probes attached).
    pub fn start_with_config(extra_toml: &str) -> Self {
        Self::start_writing_to(extra_toml, None)
    }

    /// [`Agent::start_with_config`], writing its records to `output` (default: a file in
    /// the agent's temporary directory).
    pub fn start_writing_to(extra_toml: &str, output: Option<PathBuf>) -> Self {
        Self::start_full(extra_toml, output, &[])
    }

    /// [`Agent::start_with_config`] with `env` added to the agent's environment (e.g.
    /// `AEGIS_FAILPOINTS`).
    pub fn start_with_env(extra_toml: &str, env: &[(&str, &str)]) -> Self {
        Self::start_full(extra_toml, None, env)
    }

    fn start_full(extra_toml: &str, output: Option<PathBuf>, env: &[(&str, &str)]) -> Self {
        let bin = agent_bin();
        let dir = TempDir::new("agent");
        let output = output.unwrap_or_else(|| dir.join("calls.jsonl"));
        let config = dir.join("agent.toml");
        let ready = dir.join("ready");
        // The evidence key lives with the test, not in /var/lib (unless the test sets
        // its own [rules] table).
        let rules = if extra_toml.contains("[rules]") {
            String::new()
        } else {
            format!("[rules]\nevidence_key = {:?}\n", dir.join("evidence.key").display().to_string())
        };
        // Containment attaches to the root cgroup by default: tests that want it name their
        // own test cgroup in an [enforce] table.
        let enforce = if extra_toml.contains("[enforce]") { "" } else { "[enforce]\nenabled = false\n" };
        // The control socket always runs: it and its files live with the test too.
        let control = if extra_toml.contains("[control]") { String::new() } else { test_control_toml(dir.path()) };
        let evidence = if extra_toml.contains("[evidence]") { String::new() } else { test_evidence_toml(dir.path()) };
        // The two ends of a local call are joined when their views come within a window of
        // each other; where everything runs slower ([`scaled`]), so do they.
        let capture = if time_scale() == 1 || extra_toml.contains("[capture]") {
            String::new()
        } else {
            let window = aegis_agent::config::Config::defaults().capture.correlation_window_ms;
            format!("[capture]\ncorrelation_window_ms = {}\n", window * u64::from(time_scale()))
        };
        // The records go to `output` whatever `extra_toml` says of the rest of `[output]`.
        let output_keys = format!("stdout = false\nfile = {:?}\n", output.display().to_string());
        let (output_table, extra) = match extra_toml.split_once("[output]\n") {
            Some((before, after)) => (String::new(), format!("{before}[output]\n{output_keys}{after}")),
            None => (format!("[output]\n{output_keys}"), extra_toml.to_owned()),
        };
        let toml = format!("{rules}{enforce}{control}{evidence}{capture}{output_table}{extra}");
        fs::write(&config, toml).expect("writing agent config");
        let child = Command::new(&bin)
            .envs(env.iter().copied())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(File::create(dir.join("stdout.log")).expect("creating agent stdout log"))
            .stderr(File::create(dir.join("stderr.log")).expect("creating agent stderr log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let mut agent = Self { child, dir, output, status: None };

        let ready_timeout = scaled(READY_TIMEOUT);
        let deadline = Instant::now() + ready_timeout;
        while !ready.exists() {
            if let Some(status) = agent.child.try_wait().expect("waiting for the agent") {
                agent.status = Some(status);
                panic!("agent {} exited before ready ({status}){}", bin.display(), agent.logs());
            }
            if Instant::now() >= deadline {
                agent.kill();
                panic!("agent not ready after {ready_timeout:?}{}", agent.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's directory: its config (`agent.toml`), control files, host key
    /// (`host.key`) and decision log (`decision-log/`), unless the test's TOML moved them.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file the agent runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    /// The JSON lines file the agent writes.
    pub fn output_path(&self) -> &Path {
        &self.output
    }

    /// The output file as text ("" before the first record).
    pub fn raw_output(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// All complete lines of the output file, parsed. Panics on a line that is not JSON; a
    /// last line without its newline (being written) is left for the next call.
    pub fn records(&self) -> Vec<Value> {
        let raw = self.raw_output();
        let complete = match raw.rfind('\n') {
            Some(end) => &raw[..end],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("agent output line {} is not JSON ({e}): {line}{}", i + 1, self.logs()))
            })
            .collect()
    }

    /// Polls until at least `n` records satisfy `pred`, and returns those; panics with the
    /// records seen and the agent's stderr after `timeout`.
    pub fn wait_for_records(&self, pred: impl Fn(&Value) -> bool, n: usize, timeout: Duration) -> Vec<Value> {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            let matching: Vec<Value> = self.records().into_iter().filter(|r| pred(r)).collect();
            if matching.len() >= n {
                return matching;
            }
            if Instant::now() >= deadline {
                panic!(
                    "waited {timeout:?} for {n} matching records, got {}; all records:\n{}{}",
                    matching.len(),
                    self.raw_output(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Like [`Agent::wait_for_records`] but returns false on timeout instead of panicking,
    /// so the caller can go on to a detailed comparison.
    pub fn wait_until(&self, pred: impl Fn(&Value) -> bool, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + scaled(timeout);
        while self.records().iter().filter(|r| pred(r)).count() < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Stops the agent (SIGINT), asserts it exited cleanly, and returns every record it
    /// wrote (so a test can check that nothing more came at shutdown).
    pub fn stop(&mut self) -> Vec<Value> {
        let status = self.terminate();
        assert!(status.success(), "agent exited with {status} after SIGINT{}", self.logs());
        self.records()
    }

    /// The agent's stdout/stderr tails, formatted for a panic message.
    pub fn logs(&self) -> String {
        format!(
            "\n--- agent stderr (tail) ---\n{}\n--- agent stdout (tail) ---\n{}\n---",
            file_tail(&self.dir.join("stderr.log"), 6000),
            file_tail(&self.dir.join("stdout.log"), 2000)
        )
    }

    /// SIGINT, wait up to STOP_TIMEOUT, then SIGKILL. Idempotent.
    fn terminate(&mut self) -> ExitStatus {
        self.terminate_with(Signal::SIGINT)
    }

    /// `signal`, wait up to STOP_TIMEOUT, then SIGKILL. Idempotent.
    pub fn terminate_with(&mut self, signal: Signal) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, signal);
        let stop_timeout = scaled(STOP_TIMEOUT);
        let deadline = Instant::now() + stop_timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                break status;
            }
            if Instant::now() >= deadline {
                eprintln!("agent did not exit {stop_timeout:?} after {signal}; sending SIGKILL");
                self.kill();
                break self.status.expect("set by kill");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.status = Some(status);
        status
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        self.status = Some(self.child.wait().expect("waiting for the killed agent"));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let already_stopped = self.status.is_some();
        let status = self.terminate();
        if !already_stopped && !status.success() && !std::thread::panicking() {
            panic!("agent exited with {status} after SIGINT{}", self.logs());
        }
    }
}
